"""The capture pipeline: drivers → clock stage → bounded queues → recorder.

    driver ──reader thread──▶ ClockStage.stamp ──▶ StreamQueue.put (never blocks)
                                  └──▶ taps (labeler pool, live publishers; never block)
    StreamQueues ──writer thread──▶ Recorder ──▶ segments + manifests

Capture never waits: a reader thread only stamps, enqueues and offers the sample to taps,
each of which must return at once. A driver that fails mid-stream is reopened with
back-off; the failure is counted and capture of the other streams goes on.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from drivers import registry
from drivers.base import Driver

from . import __version__
from .clock import ClockStage, Timebase
from .config import RigConfig
from .errors import DriverError, RecorderError
from .quality import QualityMonitor
from .retention import Retention
from .triggers import TriggerEngine
from .queues import StreamQueue
from .recorder import Recorder
from .types import Sample, StreamInfo

log = logging.getLogger("edgecap.pipeline")

Tap = Callable[[Sample], None]


def new_session_id(device_id: str) -> str:
    """``<device>_<UTC yyyymmddThhmmssZ>_<4 hex>``: sortable and unique per device."""
    return f"{device_id}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}_{secrets.token_hex(2)}"


def build_driver(cfg_stream: Any) -> Driver:
    """Instantiate the driver of one ``[[streams]]`` entry (options already validated)."""
    cls = registry.get(cfg_stream.driver)
    opts = cls.Options.model_validate(cfg_stream.options)
    return cls(cfg_stream.name, cfg_stream.uri, opts, cfg_stream.rate_hz, cfg_stream.calibration)


def choose_compression(setting: str, infos: list[StreamInfo]) -> str:
    """``auto``: no chunk compression when any stream carries compressed images (zstd on
    JPEG gains nothing and costs CPU), zstd otherwise."""
    if setting != "auto":
        return setting
    if any(i.encoding in ("jpeg", "png") for i in infos):
        return "none"
    return "zstd"


class Pipeline:
    """One capture session. ``open`` opens every driver (raising DriverError naming the
    stream), ``start`` begins capture, ``stop`` closes drivers and then the recorder so
    that every segment is closed and has its manifest."""

    def __init__(self, cfg: RigConfig, out_dir: str | os.PathLike[str] | None = None,
                 drivers: list[Driver] | None = None, live: bool | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir if out_dir is not None else cfg.recorder.out_dir)
        self.drivers = drivers if drivers is not None else [build_driver(s)
                                                            for s in cfg.streams]
        self.live = all(d.is_live for d in self.drivers) if live is None else live
        self.timebase = Timebase(cfg.clock.timebase, cfg.clock.ptp_device)
        self.clock = ClockStage(self.timebase, cfg.clock.options)
        self.session_id = new_session_id(cfg.device_id)
        self.session_dir = self.out_dir / self.session_id
        self.queues: dict[str, StreamQueue] = {}
        self.infos: dict[str, StreamInfo] = {}
        self.taps: list[Tap] = []
        self._driver_of: dict[str, Driver | None] = {}
        self.recorder: Recorder | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.started_ns = 0
        self.driver_failures: dict[str, int] = {}
        self.recovered: list[dict[str, Any]] = []
        #: the on-device labeler pool (agent.labelers.pool.LabelerPool) when configured
        self.labelers: Any = None

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        """Open every driver and prepare the recorder. On a failure, drivers already
        opened are closed again and DriverError names the stream."""
        from .recovery import recover_all

        if self.cfg.labelers and self.labelers is None:
            # models load before any device opens: a missing model is a set-up error
            from .labelers.pool import LabelerPool

            self.labelers = LabelerPool.from_config(self.cfg)
        self._lock_out_dir()
        opened: list[Driver] = []
        try:
            self.recovered = recover_all(self.out_dir, self.cfg.recorder.fsync_interval_s)
            for d in self.drivers:
                try:
                    d.open()
                except DriverError as e:
                    raise DriverError(f"stream {d.name} ({d.key} {d.uri}): {e}") from e
                opened.append(d)
            stream_cfg = {s.name: s for s in self.cfg.streams}
            for d in self.drivers:
                sc = stream_cfg.get(d.name)
                for info in d.streams():
                    self.add_stream(info, sc.queue_size if sc else 64,
                                    int((sc.queue_mb if sc else 256) * (1 << 20)),
                                    sc.drop_policy if sc else "drop_oldest", d)
                    if not d.device_clock_is_timebase:
                        self.clock.configure_stream(info)
            for info in self.clock.quality_stream_infos():
                self.add_stream(info, 16, 1 << 20)
            self._make_recorder()
            if self.labelers is not None:
                self._attach_labelers()
        except BaseException:
            for d in opened:
                d.close()
            self._unlock_out_dir()
            raise

    def _lock_out_dir(self) -> None:
        """One recorder per output directory: a second one would race the first's
        recovery and retention. Raises RecorderError naming the directory."""
        import fcntl

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out_dir / ".edgecap.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RecorderError(f"{self.out_dir} is in use by another edgecap recorder "
                                "(one recorder per output directory)") from None

    def _unlock_out_dir(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def add_stream(self, info: StreamInfo, max_items: int = 64, max_bytes: int = 256 << 20,
                   policy: str = "drop_oldest", driver: Driver | None = None) -> StreamQueue:
        """Declare a stream (driver output or derived, such as labels). Before ``start``."""
        q = StreamQueue(info.name, max_items, max_bytes, policy)
        self.queues[info.name] = q
        self.infos[info.name] = info
        self._driver_of[info.name] = driver
        return q

    def _make_recorder(self) -> None:
        rc = self.cfg.recorder
        infos = list(self.infos.values())
        self.started_ns = self.timebase.now_ns()
        window_ns = int(rc.window_s * 1e9)
        t0 = self.started_ns - self.started_ns % window_ns if self.live else self.started_ns
        self.recorder = Recorder(
            self.session_dir, self.session_id, self.session_metadata(),
            {"device_id": self.cfg.device_id, "config_digest": self.cfg.digest,
             "timebase": self.timebase.kind,
             "provenance": self.cfg.provenance.model_dump()},
            self.timebase.now_ns, t0, window_s=rc.window_s, max_segment_mb=rc.max_segment_mb,
            compression=choose_compression(rc.compression, infos), chunk_kb=rc.chunk_kb,
            fsync_interval_s=rc.fsync_interval_s, late_grace_s=rc.late_grace_s, live=self.live)
        self.recorder.clock_summary = self.clock.summary
        rc = self.cfg.recorder
        self.triggers = TriggerEngine(self.cfg.triggers, self.session_dir)
        self.retention = Retention(
            self.out_dir, self.triggers, rc.keep_s,
            int(rc.quota_gb * 1e9) if rc.quota_gb else None, rc.evict_triggered,
            now_ns=self.timebase.now_ns if self.live else (lambda: self.recorder._max_t),
            degrade=self.degrade)
        self.retention.periodic.append(
            lambda: self.triggers.poll_manual(self.out_dir, self.timebase.from_monotonic))
        self.retention.periodic.append(self._emit_clock_quality)
        self.retention.adopt_existing(skip=self.session_dir)
        self.recorder.initial_retention = lambda: self.retention.initial_state
        self.recorder.on_closed.append(self.retention.on_closed)
        self.recorder.quality = QualityMonitor(
            self.infos, self.cfg.provenance.model_dump(),
            required={s.name for s in self.cfg.streams if s.required and s.name in self.infos})
        for name, info in self.infos.items():
            drv = self._driver_of.get(name)
            self.recorder.add_stream(
                info, self.queues[name],
                counters=drv.counters.as_dict if drv else dict,
                gap_events=(lambda d=drv: list(d.gap_events)) if drv else list)

    def session_metadata(self) -> dict[str, dict[str, str]]:
        """MCAP metadata records written at the head of every segment."""
        import json

        cfg = self.cfg
        meta = {
            "edgecap.session": {
                "session_id": self.session_id, "device_id": cfg.device_id,
                "agent_version": __version__, "config_digest": cfg.digest,
                "config_path": cfg.source_path, "timebase": self.timebase.kind,
                "clock_source": "system", "timebase_info": json.dumps(
                    self.timebase.describe(), default=str), "hostname": socket.gethostname(),
                "platform": platform.platform(), "started_unix_ns": str(time.time_ns()),
            },
            "edgecap.provenance": {k: json.dumps(v) if isinstance(v, list) else str(v)
                                   for k, v in cfg.provenance.model_dump().items()},
            "edgecap.calibration": {s.name: json.dumps(s.calibration)
                                    for s in cfg.streams if s.calibration},
            "edgecap.streams": {i.name: json.dumps({"kind": i.kind.value,
                                                    "encoding": i.encoding,
                                                    "rate_hz": i.rate_hz, "params": {
                                                        k: v for k, v in i.params.items()
                                                        if isinstance(v, (int, float, str))}})
                                for i in self.infos.values()},
        }
        return meta

    def _attach_labelers(self) -> None:
        """Declare the labelers' label streams and feed their results to the triggers."""
        self.labelers.attach(self)
        if self.triggers.configured:
            self.labelers.subscribe(self._on_label)

    def _on_label(self, label: Sample, dets: list[dict[str, Any]]) -> None:
        """Labeler worker thread: hand one label's detections to the trigger rules, with
        image boxes normalised to 0..1 of the source image."""
        by_src: dict[str, list[dict[str, Any]]] = {}
        for d in dets:
            by_src.setdefault(d.get("stream", label.stream), []).append(d)
        for src, ds in by_src.items():
            info = self.infos.get(src)
            w = h = None
            if info is not None:
                w, h = info.params.get("width"), info.params.get("height")
            boxes = []
            segs = []
            for d in ds:
                if "start_ns" in d:
                    segs.append({"kind": d.get("cls"), "start_ns": d["start_ns"],
                                 "end_ns": d.get("end_ns", d["start_ns"])})
                    continue
                b = d.get("box")
                if b is not None and w and h:
                    b = [b[0] / w, b[1] / h, b[2] / w, b[3] / h]
                boxes.append({"cls": d.get("cls"), "score": d.get("score", 1.0), "box": b})
            self.triggers.on_label({"stream": src, "t_ns": label.t_ns, "detections": boxes,
                                    "segments": segs})

    def _emit_clock_quality(self) -> None:
        """Housekeeping (retention thread, 1 Hz): the per-device clock-quality and the
        timebase↔UTC records. Not for recorded sources (their quality was recorded)."""
        if not self.live:
            return
        for s in self.clock.poll_quality(self.timebase.now_ns()):
            self.push(s)

    def degrade(self, on: bool) -> list[str]:
        """Retention's lever when the spool is over quota with nothing left to evict:
        each call while ``on`` stops writing one more group — label streams first, then
        sensor streams by ascending ``priority`` (the highest-priority stream is never
        dropped). Escalates at most every 10 s. Returns the suppressed streams."""
        assert self.recorder is not None
        if not on:
            self.recorder.suppressed.clear()
            self._degrade_level = 0
            return []
        now = time.monotonic()
        if now - getattr(self, "_degrade_at", 0.0) < 10.0 and self.recorder.suppressed:
            return sorted(self.recorder.suppressed)
        self._degrade_at = now
        prio = {s.name: s.priority for s in self.cfg.streams}
        labels = [n for n, i in self.infos.items() if i.kind.value == "label"]
        sensors = sorted((n for n in self.infos if n not in labels and n in prio),
                         key=lambda n: prio[n])[:-1]
        groups = ([labels] if labels else []) + [[n] for n in sensors]
        self._degrade_level = min(getattr(self, "_degrade_level", 0) + 1, len(groups))
        for g in groups[:self._degrade_level]:
            self.recorder.suppressed.update(g)
        return sorted(self.recorder.suppressed)

    def start(self) -> None:
        assert self.recorder is not None, "open() first"
        self.recorder.start()
        self.retention.start()
        if self.labelers is not None:
            self.labelers.start()
        for d in self.drivers:
            t = threading.Thread(target=self._read_loop, args=(d,), name=f"reader:{d.name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def push(self, sample: Sample) -> None:
        """Enqueue a derived sample (labels) whose ``t_ns`` is already set. Never blocks."""
        q = self.queues.get(sample.stream)
        if q is not None:
            q.put(sample)

    def _read_loop(self, d: Driver) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                for s in d:
                    if not d.t_ns_final:
                        self.clock.stamp(s, d.device_clock_is_timebase)
                    q = self.queues.get(s.stream)
                    if q is None:
                        d.counters.inc("errors")
                        continue
                    q.put(s)
                    if self.triggers.configured and isinstance(s.payload, dict) and \
                            self.infos[s.stream].kind.value == "gps":
                        self.triggers.on_fix(s.t_ns, s.payload)
                    for tap in self.taps:
                        tap(s)
                    backoff = 0.2
                if self._stopping.is_set() or not d.is_live:
                    return
                # a live driver's iterator ended without close(): treat as a disconnect
                raise DriverError("sample stream ended")
            except Exception as e:  # never let a device take the agent down
                if self._stopping.is_set():
                    return
                self.driver_failures[d.name] = self.driver_failures.get(d.name, 0) + 1
                d.counters.inc("errors")
                log.warning("%s: %s; reopening in %.1f s", d.name, e, backoff)
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, 5.0)
                try:
                    d.close()
                    d.open()
                    d.counters.inc("reconnects")
                except Exception as e2:
                    log.warning("%s: reopen failed: %s", d.name, e2)

    def wait_sources_done(self, timeout_s: float | None = None) -> bool:
        """For recorded sources: block until every reader thread has ended."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Stop capture: close drivers, join readers, then drain and close the recorder."""
        self._stopping.set()
        if self.labelers is not None:
            self.labelers.stop()
        for d in self.drivers:
            try:
                d.close()
            except Exception:
                log.exception("%s: close failed", d.name)
        for t in self._threads:
            t.join(5.0)
        if self.recorder is not None:
            self.recorder.stop()
            self.retention.stop()
        self._unlock_out_dir()
        self.timebase.close()

    # -- status -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot for status lines, metrics and the watchdog (any thread)."""
        out: dict[str, Any] = {"session_id": self.session_id, "streams": {}}
        for name, q in self.queues.items():
            if self.infos[name].kind.value == "clock":
                continue  # the clock stage's own quality records, not a data stream
            drv = self._driver_of.get(name)
            out["streams"][name] = {"enqueued": q.put_count, "queue_drops": q.dropped,
                                    "queue_depth": len(q),
                                    **(drv.counters.as_dict() if drv else {})}
        if self.recorder is not None:
            r = self.recorder.stats()
            out.update({k: v for k, v in r.items() if k != "streams"})
            out["retention"] = self.retention.stats()
        return out
