"""``edgecap status``: a terminal view of a running agent, read from its metrics endpoint
(so it works from any process or over an SSH tunnel), rendered with rich.

    GET http://127.0.0.1:9108/metrics ──parse──▶ Snapshot ──render──▶ rich table + lines
    GET http://127.0.0.1:9109/metrics (``edgecap sync run --metrics-port 9109``, optional)
        ──▶ bytes sent (a rate between two snapshots), pending bundles/bytes, connected

``fetch_snapshot`` blocks for at most ``timeout_s`` per endpoint (the CLI thread).
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text


class StatusError(Exception):
    """The agent's endpoint cannot be read or is not an edgecap endpoint."""


@dataclass
class StreamView:
    name: str
    samples: float = 0
    rate_hz: float | None = None
    nominal_hz: float | None = None
    queue_drops: float = 0
    gaps: float = 0
    corrupt: float = 0
    depth: float = 0
    required: bool = False
    locked: bool | None = None
    offset_s: float | None = None
    jitter_s: float | None = None


@dataclass
class Snapshot:
    info: dict[str, str] = field(default_factory=dict)
    streams: dict[str, StreamView] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    upload_source: str = ""
    t_mono: float = 0.0

    def get(self, name: str) -> float | None:
        return self.values.get(name)


_STREAM_FIELDS = {
    "edgecap_stream_samples_total": "samples",
    "edgecap_stream_rate_hz": "rate_hz",
    "edgecap_stream_nominal_rate_hz": "nominal_hz",
    "edgecap_stream_queue_drops_total": "queue_drops",
    "edgecap_stream_gaps_total": "gaps",
    "edgecap_stream_corrupt_total": "corrupt",
    "edgecap_stream_queue_depth": "depth",
}


def _get(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"{url}: {reason}") from None


def parse_metrics(text: str) -> Snapshot:
    """Build a :class:`Snapshot` from Prometheus text; raises StatusError when it holds no
    edgecap metrics (a different service on the port)."""
    snap = Snapshot()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and friends on garbage
        raise StatusError(f"not Prometheus text: {e}") from None
    for fam in families:
        for s in fam.samples:
            name, labels, v = s.name, s.labels, s.value
            if name == "edgecap_agent_info":
                snap.info = {k: str(x) for k, x in labels.items()}
                continue
            stream = labels.get("stream")
            if stream is not None:
                sv = snap.streams.setdefault(stream, StreamView(stream))
                if name in _STREAM_FIELDS:
                    setattr(sv, _STREAM_FIELDS[name], v)
                elif name == "edgecap_stream_required":
                    sv.required = v >= 0.5
                elif name == "edgecap_clock_locked":
                    sv.locked = v >= 0.5
                elif name == "edgecap_clock_offset_seconds":
                    sv.offset_s = v
                elif name == "edgecap_clock_jitter_seconds":
                    sv.jitter_s = v
            elif not labels or set(labels) == {"path"}:
                snap.values[name] = v
    if not snap.info and not snap.streams:
        raise StatusError("no edgecap metrics at this address")
    return snap


def fetch_snapshot(url: str, sync_url: str | None = None, timeout_s: float = 2.0,
                   prev: Snapshot | None = None) -> Snapshot:
    """Read the agent (required) and the uploader (optional) endpoints. With ``prev`` (the
    previous snapshot), the upload rate is derived from the bytes-sent counter."""
    snap = parse_metrics(_get(url, timeout_s))
    snap.t_mono = time.monotonic()
    snap.upload_source = "agent"
    if sync_url:
        try:
            text = _get(sync_url, timeout_s)
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if (s.name.startswith(("edgecap_upload_", "edgecap_sync_upload_"))
                            and not s.labels):
                        snap.values[s.name] = s.value
            snap.upload_source = "uploader"
        except (StatusError, ValueError):
            snap.upload_source = f"uploader not reachable at {sync_url}"
    rate = upload_rate(prev, snap)
    if rate is not None:
        snap.values["upload_rate_bytes_per_second"] = rate
    return snap


def _human(n: float | None, unit: str = "B") -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for u in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or u == "Ti":
            return f"{n:.0f} {u}{unit}" if not u else f"{n:.1f} {u}{unit}"
        n /= 1024
    return f"{n:.1f} Ti{unit}"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:+.0f} µs" if abs(s) < 1e-2 else f"{s * 1e3:+.1f} ms"


def render(snap: Snapshot) -> Group:
    """The view: a header line, one table row per stream, then disk/spool/upload lines."""
    i = snap.info
    ready, healthy, degraded = (snap.get("edgecap_ready"), snap.get("edgecap_healthy"),
                                snap.get("edgecap_degraded"))
    if ready is None:
        state = Text("state unknown (no watchdog in this process)", style="yellow")
    elif ready < 0.5:
        state = Text("STARTING (waiting for required streams)", style="yellow")
    elif healthy and healthy >= 0.5:
        state = Text("HEALTHY", style="bold green")
    elif degraded and degraded >= 0.5:
        state = Text("DEGRADED (kept alive by degraded_ok)", style="bold yellow")
    else:
        state = Text("UNHEALTHY (watchdog starved)", style="bold red")
    head = Text.assemble(("edgecap ", "bold"), f"{i.get('device_id', '?')}  ", state,
                         f"\nsession {i.get('session_id', '?')}  v{i.get('version', '?')}"
                         f"  up {_dur(snap.get('edgecap_uptime_seconds'))}")
    t = Table(expand=False, pad_edge=False, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  show_edge=False)
    name_w = max([len(n) for n in snap.streams] + [6])
    t.add_column("stream", no_wrap=True, min_width=name_w)
    for col, just in (("req", "center"), ("rate/nom", "right"), ("samples", "right"),
                      ("drops", "right"), ("gaps", "right"), ("bad", "right"),
                      ("queue", "right"), ("clock", "left")):
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    clocks = Table(expand=False, pad_edge=False, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  show_edge=False)
    for col in ("stream", "clock", "offset", "jitter"):
        clocks.add_column(col, justify="left" if col in ("stream", "clock") else "right",
                          no_wrap=True, min_width=name_w if col == "stream" else None)
    for sv in sorted(snap.streams.values(), key=lambda s: s.name):
        slow = (sv.rate_hz is not None and sv.nominal_hz
                and sv.rate_hz < 0.8 * sv.nominal_hz)
        rate = Text(("-" if sv.rate_hz is None else f"{sv.rate_hz:.1f}") + "/"
                    + ("-" if sv.nominal_hz is None else f"{sv.nominal_hz:g}"),
                    style="red" if slow else "")
        lock = (Text("-") if sv.locked is None else
                Text("locked", style="green") if sv.locked else Text("UNLOCKED", style="red"))
        t.add_row(sv.name, "•" if sv.required else "", rate, f"{sv.samples:.0f}",
                  Text(f"{sv.queue_drops:.0f}", style="red" if sv.queue_drops else ""),
                  Text(f"{sv.gaps:.0f}", style="red" if sv.gaps else ""),
                  Text(f"{sv.corrupt:.0f}", style="red" if sv.corrupt else ""),
                  f"{sv.depth:.0f}", lock)
        if sv.offset_s is not None or sv.jitter_s is not None:
            clocks.add_row(sv.name, lock.copy(), _us(sv.offset_s),
                           "-" if sv.jitter_s is None else _us(sv.jitter_s).lstrip("+"))
    free, total = snap.get("edgecap_disk_free_bytes"), snap.get("edgecap_disk_total_bytes")
    pct = f" ({100 * free / total:.0f}% free)" if free is not None and total else ""
    lines = [
        Text(f"disk      {_human(free)} free of {_human(total)}{pct}",
             style="red" if total and free is not None and free < 0.05 * total else ""),
        Text(f"segments  {snap.get('edgecap_segments_closed_total') or 0:.0f} closed, "
             f"{snap.get('edgecap_segments_open') or 0:.0f} open, disk drops "
             f"{snap.get('edgecap_disk_drops_total') or 0:.0f}, recorder alerts "
             f"{snap.get('edgecap_recorder_alerts_total') or 0:.0f}"),
        Text(f"spool     {snap.get('edgecap_spool_backlog_segments') or 0:.0f} segment(s) "
             f"waiting ({_human(snap.get('edgecap_spool_backlog_bytes'))}), "
             f"{snap.get('edgecap_spool_uploaded_segments') or 0:.0f} uploaded still on disk"),
        Text(_upload_line(snap)),
    ]
    return Group(head, t, *([clocks] if clocks.row_count else []), *lines)


def upload_rate(prev: Snapshot | None, cur: Snapshot) -> float | None:
    """Bytes/s the uploader sent between two snapshots (its ``bytes_sent`` counter), or
    the gauge an uploader sets itself; None when neither is known."""
    g = cur.get("edgecap_upload_rate_bytes_per_second")
    if g is not None:
        return g
    key = "edgecap_sync_upload_bytes_sent_total"
    if prev is None or key not in cur.values or key not in prev.values:
        return None
    dt = cur.t_mono - prev.t_mono
    d = cur.values[key] - prev.values[key]
    return d / dt if dt > 0 and d >= 0 else None


def _upload_line(snap: Snapshot) -> str:
    rate = snap.get("upload_rate_bytes_per_second")
    parts = [f"upload    {_human(rate, 'B/s') if rate is not None else '- B/s'}"]
    sent = snap.get("edgecap_sync_upload_bytes_sent_total")
    if sent is not None:
        parts.append(f"sent {_human(sent)}")
    pend = snap.get("edgecap_sync_upload_pending_bundles")
    if pend is not None:
        parts.append(f"pending {pend:.0f} bundle(s) "
                     f"{_human(snap.get('edgecap_sync_upload_pending_bytes'))}")
    elif snap.get("edgecap_upload_backlog_bytes") is not None:
        parts.append(f"backlog {_human(snap.get('edgecap_upload_backlog_bytes'))}")
    conn = snap.get("edgecap_sync_upload_connected")
    if conn is not None:
        parts.append("connected" if conn >= 0.5 else "NOT CONNECTED")
    if snap.upload_source:
        parts.append(f"[{snap.upload_source}]")
    return "  ".join(parts)


def snapshot_dict(snap: Snapshot) -> dict[str, Any]:
    """Plain data (for ``--json``)."""
    return {"info": snap.info, "values": snap.values, "upload_source": snap.upload_source,
            "streams": {n: vars(s) for n, s in snap.streams.items()}}
