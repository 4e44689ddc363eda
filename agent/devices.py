"""What is attached to this machine, for ``edgecap devices``: V4L2 cameras (with the formats
the kernel driver lists), audio inputs, serial ports, PPS and PTP devices, plus a probe that
opens one URI with its driver and reports what it negotiated and its first samples.

Every lister returns plain dicts and never raises: a missing subsystem gives an empty list
and, where useful, a ``note``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def _read(p: str) -> str:
    try:
        return Path(p).read_text().strip()
    except OSError:
        return ""


def _access(path: str) -> str:
    return "ok" if os.access(path, os.R_OK | os.W_OK) else "no permission"


def cameras() -> list[dict[str, Any]]:
    """``/dev/video*`` with the sysfs name and, when ``v4l2-ctl`` is installed, formats."""
    out = []
    for dev in sorted(glob.glob("/dev/video*")):
        name = _read(f"/sys/class/video4linux/{Path(dev).name}/name")
        entry: dict[str, Any] = {"path": dev, "name": name, "access": _access(dev)}
        if shutil.which("v4l2-ctl"):
            try:
                res = subprocess.run(["v4l2-ctl", "-d", dev, "--list-formats-ext"],
                                     capture_output=True, text=True, timeout=5)
                entry["formats"] = [ln.strip() for ln in res.stdout.splitlines()
                                    if ln.strip().startswith(("[", "Size", "Interval"))][:40]
            except (OSError, subprocess.SubprocessError):
                pass
        out.append(entry)
    return out


def audio_inputs() -> list[dict[str, Any]]:
    try:
        from drivers.audio import list_devices

        return list_devices()
    except Exception as e:  # PortAudio missing or no server: say so
        return [{"note": f"audio devices unavailable: {e}"}]


def serial_ports() -> list[dict[str, Any]]:
    try:
        from serial.tools import list_ports
    except ImportError:
        return []
    return [{"path": p.device, "description": p.description, "hwid": p.hwid,
             "access": _access(p.device)} for p in list_ports.comports()]


def pps_devices() -> list[dict[str, Any]]:
    return [{"path": d, "name": _read(f"/sys/class/pps/{Path(d).name}/name"),
             "access": _access(d)} for d in sorted(glob.glob("/dev/pps*"))]


def ptp_devices() -> list[dict[str, Any]]:
    return [{"path": d, "clock_name": _read(f"/sys/class/ptp/{Path(d).name}/clock_name"),
             "access": _access(d)} for d in sorted(glob.glob("/dev/ptp*"))]


def list_all() -> dict[str, list[dict[str, Any]]]:
    return {"cameras": cameras(), "audio_inputs": audio_inputs(),
            "serial_ports": serial_ports(), "pps": pps_devices(), "ptp": ptp_devices()}


def probe(driver_key: str, uri: str, options: dict[str, Any] | None = None,
          seconds: float = 3.0, max_samples: int = 5) -> dict[str, Any]:
    """Open ``uri`` with ``driver_key`` for up to ``seconds``; report the streams it
    declares, its first samples (sizes, device times) and its counters. Errors (bad
    options, missing device) come back as ``error``, never raised."""
    import threading

    from pydantic import ValidationError

    from drivers import registry

    rep: dict[str, Any] = {"driver": driver_key, "uri": uri}
    try:
        cls = registry.get(driver_key)
        drv = cls("/probe", uri, cls.Options.model_validate(options or {}))
    except (KeyError, ValidationError, ImportError) as e:
        rep["error"] = str(e)
        return rep
    try:
        drv.open()
    except Exception as e:
        rep["error"] = str(e)
        return rep
    samples: list[dict[str, Any]] = []
    timer = threading.Timer(seconds, drv.close)
    timer.start()
    t0 = time.monotonic()
    try:
        rep["streams"] = [{"name": i.name, "kind": i.kind.value, "encoding": i.encoding,
                           "rate_hz": i.rate_hz, "params": {k: v for k, v in i.params.items()
                                                           if isinstance(v, (int, float, str))}}
                          for i in drv.streams()]
        for s in drv:
            samples.append({"stream": s.stream, "bytes": s.nbytes(), "seq": s.seq,
                            "device_t_ns": s.device_t_ns,
                            "after_s": round(time.monotonic() - t0, 3)})
            if len(samples) >= max_samples:
                break
    except Exception as e:
        rep["error"] = str(e)
    finally:
        timer.cancel()
        drv.close()
    rep["samples"] = samples
    rep["counters"] = drv.counters.as_dict()
    return rep
