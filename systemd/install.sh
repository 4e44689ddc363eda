#!/bin/sh
# Install edgecap as systemd services: the `edgecap` system user, a virtualenv under
# PREFIX, /etc/edgecap, /var/lib/edgecap and the unit files. Idempotent; run as root.
#
#   systemd/install.sh                      # everything, then `systemctl daemon-reload`
#   systemd/install.sh --units-only         # only the unit files (+ user, dirs)
#   systemd/install.sh --enable agent,sync  # ... and enable --now those units
#   systemd/install.sh --destdir /tmp/root --units-only --no-user   # stage into a tree
#
# Options:
#   --prefix DIR     where the virtualenv lives (default /opt/edgecap; ExecStart follows)
#   --from DIR       source tree or wheel to pip-install (default: this repository)
#   --destdir DIR    install below DIR (packaging/tests); implies --no-reload
#   --units-only     do not create the virtualenv
#   --no-user        do not create the edgecap user/groups (and do not chown)
#   --no-reload      do not run systemctl daemon-reload
#   --enable LIST    comma-separated of agent,sync,ingest: systemctl enable --now
# See docs/operations.md.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
prefix=/opt/edgecap
src=$repo
destdir=
units_only=0
make_user=1
reload=1
enable=

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; prefix=$2; shift 2 ;;
        --from) [ $# -ge 2 ] || die "--from needs a value"; src=$2; shift 2 ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a value"; destdir=$2; reload=0; shift 2 ;;
        --units-only) units_only=1; shift ;;
        --no-user) make_user=0; shift ;;
        --no-reload) reload=0; shift ;;
        --enable) [ $# -ge 2 ] || die "--enable needs a value"; enable=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case $prefix in /*) ;; *) die "--prefix must be absolute" ;; esac

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or use --destdir to stage)"
fi

# 1. the service user: a system account with the device groups it needs
if [ "$make_user" = 1 ]; then
    for g in video audio dialout; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
    getent group edgecap >/dev/null || groupadd --system edgecap
    if ! getent passwd edgecap >/dev/null; then
        useradd --system --gid edgecap --groups video,audio,dialout \
            --home-dir /var/lib/edgecap --no-create-home --shell /usr/sbin/nologin \
            --comment "edgecap capture agent" edgecap
    else
        usermod --append --groups video,audio,dialout edgecap
    fi
fi

# 2. directories: config readable by the service, state owned by it
install -d -m 0755 "$destdir/etc/systemd/system"
install -d -m 0750 "$destdir/etc/edgecap" "$destdir/etc/edgecap/keys"
install -d -m 0750 "$destdir/var/lib/edgecap"
if [ "$make_user" = 1 ]; then
    chown root:edgecap "$destdir/etc/edgecap" "$destdir/etc/edgecap/keys"
    chown edgecap:edgecap "$destdir/var/lib/edgecap"
fi
if [ -f "$repo/examples/synthetic.toml" ]; then
    install -m 0640 "$repo/examples/synthetic.toml" "$destdir/etc/edgecap/rig.toml.example"
    [ "$make_user" = 1 ] && chown root:edgecap "$destdir/etc/edgecap/rig.toml.example"
fi

# 3. the application
if [ "$units_only" = 0 ]; then
    py=${PYTHON:-python3}
    "$py" -m venv "$destdir$prefix/.venv"
    "$destdir$prefix/.venv/bin/pip" install --quiet --upgrade pip
    "$destdir$prefix/.venv/bin/pip" install --quiet "$src"
fi

# 4. the units (ExecStart follows --prefix)
for unit in "$here"/edgecap-*.service; do
    name=$(basename "$unit")
    sed "s#/opt/edgecap/.venv/#$prefix/.venv/#g" "$unit" > "$destdir/etc/systemd/system/$name.tmp"
    chmod 0644 "$destdir/etc/systemd/system/$name.tmp"
    mv "$destdir/etc/systemd/system/$name.tmp" "$destdir/etc/systemd/system/$name"
    echo "installed $destdir/etc/systemd/system/$name"
done

if [ "$reload" = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    for u in $(echo "$enable" | tr ',' ' '); do
        case $u in agent|sync|ingest) systemctl enable --now "edgecap-$u.service" ;;
                   *) die "--enable: unknown unit $u (agent, sync, ingest)" ;; esac
    done
elif [ -n "$enable" ]; then
    echo "install.sh: not enabling units (no running systemd or --no-reload)" >&2
fi

[ -f "$destdir/etc/edgecap/rig.toml" ] || cat <<EOF
next: write $destdir/etc/edgecap/rig.toml (start from rig.toml.example; set
recorder.out_dir = "/var/lib/edgecap/recordings"), check it with
  $prefix/.venv/bin/edgecap doctor --service --config /etc/edgecap/rig.toml
then: systemctl enable --now edgecap-agent edgecap-sync
EOF
