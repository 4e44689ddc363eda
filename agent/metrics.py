"""Prometheus metrics of a running agent (prometheus-client), read at scrape time.

    scrape ──HTTP thread──▶ PipelineCollector.collect()
                              ├─ pipeline.stats()         counts, drops, gaps, queue depths
                              ├─ pipeline.clock.summary() lock, offset, jitter per stream
                              ├─ statvfs(out_dir)         disk total/free (cached 5 s)
                              └─ spool walk               segments without .uploaded (cached 5 s)
    labelers ──observe_label_latency()──▶ histogram        uploader ──set_upload_rate()──▶ gauge

No count is kept twice: counters come straight from the pipeline, so a scrape after
``Pipeline.stop()`` equals the totals in the session's manifests. Rates are derived from
those counters between scrapes (:class:`agent.health.RateMeter`). ``collect`` runs on the
HTTP server's thread and never blocks the pipeline (it takes each queue's lock briefly).

The endpoint listens on ``[operations] metrics_bind:metrics_port`` (default
127.0.0.1:9108; port 0 disables it). Metric names are listed in docs/operations.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .health import (CachedValue, RateMeter, clock_drift_ppm, clock_jitter_s, clock_locked,
                     clock_offset_s, disk_usage, spool_backlog)

log = logging.getLogger("edgecap.metrics")

#: process-wide metrics that other parts set directly (labelers, uploader); every
#: endpoint of this process serves them next to its pipeline's metrics
SHARED = CollectorRegistry(auto_describe=True)
LABEL_LATENCY = Histogram(
    "edgecap_label_latency_seconds",
    "Time from a sample's arrival (host_rx_ns) to its labels being queued.",
    ["labeler"], registry=SHARED,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
ProcessCollector(namespace="edgecap", registry=SHARED)


class _UploadCollector(Collector):
    """Upload gauges, exported only once something in this process set them (an agent
    without an in-process uploader must not claim a rate of 0)."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.backlog: float | None = None

    def collect(self) -> Iterable[Any]:
        if self.rate is not None:
            yield GaugeMetricFamily("edgecap_upload_rate_bytes_per_second", "Goodput of the "
                                    "uploader over its last measurement window.",
                                    value=self.rate)
        if self.backlog is not None:
            yield GaugeMetricFamily("edgecap_upload_backlog_bytes", "Bytes the uploader "
                                    "still has to send (its own view).", value=self.backlog)


UPLOAD = _UploadCollector()
SHARED.register(UPLOAD)


def observe_label_latency(labeler: str, seconds: float) -> None:
    """Record one label latency (any thread, never blocks). ``seconds`` = now − the
    labeled sample's ``host_rx_ns``, both on ``time.monotonic_ns()``."""
    if seconds >= 0:
        LABEL_LATENCY.labels(labeler=labeler).observe(seconds)


def set_upload_rate(bytes_per_s: float, backlog_bytes: float | None = None) -> None:
    """The uploader's current goodput (and its backlog), any thread."""
    UPLOAD.rate = max(0.0, float(bytes_per_s))
    if backlog_bytes is not None:
        UPLOAD.backlog = max(0.0, float(backlog_bytes))


_DEVICE_COUNTERS = {
    "received": "Samples the driver received from the device.",
    "gaps": "Samples lost on the device side (frame-counter jumps, missing packets).",
    "corrupt": "Samples the driver received but could not decode.",
    "errors": "Driver errors (failed reads, samples for unknown streams).",
    "reconnects": "Times the driver was reopened after a failure.",
}


class PipelineCollector(Collector):
    """Prometheus collector over one :class:`agent.pipeline.Pipeline`.

    ``health``: optional callable returning the latest :class:`agent.notify.Health`
    (exports ``edgecap_ready``/``edgecap_healthy``). ``spool_dir``: where closed segments
    wait for upload (default ``sync.spool_dir`` or the recorder's out_dir).
    """

    def __init__(self, pipe: Any, health: Callable[[], Any] | None = None,
                 spool_dir: str | Path | None = None, cache_s: float = 5.0):
        self.pipe = pipe
        self.health = health
        spool = spool_dir or getattr(pipe.cfg.sync, "spool_dir", None) or pipe.out_dir
        self.spool_dir = Path(spool)
        self.rates = RateMeter(window_s=10.0, min_span_s=0.5)
        self.created_ns = time.monotonic_ns()
        self._disk = CachedValue(lambda: disk_usage(pipe.out_dir), cache_s)
        self._spool = CachedValue(lambda: spool_backlog(self.spool_dir), cache_s)

    def describe(self) -> Iterable[Any]:
        return []  # names depend on nothing at registration; skip the duplicate check

    def collect(self) -> Iterable[Any]:
        pipe = self.pipe
        st = pipe.stats()
        now = time.monotonic_ns()
        streams: dict[str, dict[str, Any]] = st.get("streams", {})
        required = {s.name for s in pipe.cfg.streams if s.required}

        info = InfoMetricFamily("edgecap_agent", "The running agent and its session.")
        info.add_metric([], {"version": __version__, "device_id": pipe.cfg.device_id,
                             "session_id": str(st.get("session_id", "")),
                             "config_digest": pipe.cfg.digest[:16],
                             "timebase": pipe.timebase.kind})
        yield info
        yield GaugeMetricFamily("edgecap_uptime_seconds", "Seconds since the collector began.",
                                value=(now - self.created_ns) / 1e9)

        counts = {n: int(s.get("enqueued", 0)) for n, s in streams.items()}
        self.rates.observe(counts, now)
        rates = self.rates.rates()
        elapsed = (now - self.created_ns) / 1e9

        lab = ["stream"]
        samples = CounterMetricFamily("edgecap_stream_samples", "Samples that entered the "
                                      "stream's queue (after the clock stage).", labels=lab)
        qdrops = CounterMetricFamily("edgecap_stream_queue_drops", "Samples dropped by a full "
                                     "queue (drop policy).", labels=lab)
        dev = {k: CounterMetricFamily(f"edgecap_stream_{k}", h, labels=lab)
               for k, h in _DEVICE_COUNTERS.items()}
        depth = GaugeMetricFamily("edgecap_stream_queue_depth", "Samples waiting in the "
                                  "queue.", labels=lab)
        qbytes = GaugeMetricFamily("edgecap_stream_queue_bytes", "Bytes waiting in the queue.",
                                   labels=lab)
        rate = GaugeMetricFamily("edgecap_stream_rate_hz", "Measured sample rate (last ~10 s; "
                                 "lifetime average until two scrapes exist).", labels=lab)
        nominal = GaugeMetricFamily("edgecap_stream_nominal_rate_hz", "Configured or "
                                    "device-reported rate.", labels=lab)
        req = GaugeMetricFamily("edgecap_stream_required", "1 when the watchdog waits for "
                                "this stream.", labels=lab)
        for name, s in streams.items():
            samples.add_metric([name], s.get("enqueued", 0))
            qdrops.add_metric([name], s.get("queue_drops", 0))
            for k, fam in dev.items():
                if k in s:
                    fam.add_metric([name], s[k])
            depth.add_metric([name], s.get("queue_depth", 0))
            q = pipe.queues.get(name)
            if q is not None:
                qbytes.add_metric([name], q.depth_bytes)
            r = rates.get(name)
            if r is None and elapsed >= 0.5:
                r = counts[name] / elapsed
            if r is not None:
                rate.add_metric([name], r)
            inf = pipe.infos.get(name)
            if inf is not None and inf.rate_hz:
                nominal.add_metric([name], inf.rate_hz)
            req.add_metric([name], 1.0 if name in required else 0.0)
        yield from (samples, qdrops, *dev.values(), depth, qbytes, rate, nominal, req)

        yield from self._clock()
        yield from self._recorder(st)
        yield from self._disk_and_spool()
        if self.health is not None:
            h = self.health()
            if h is not None:
                yield GaugeMetricFamily("edgecap_ready", "1 once every required stream "
                                        "delivered (sd_notify READY).", value=float(h.ready))
                yield GaugeMetricFamily("edgecap_healthy", "1 while the watchdog conditions "
                                        "hold.", value=float(h.healthy))
                yield GaugeMetricFamily("edgecap_degraded", "1 while unhealthy but kept "
                                        "alive by degraded_ok.", value=float(h.degraded))

    def _clock(self) -> Iterable[Any]:
        try:
            summary = self.pipe.clock.summary()
        except Exception as e:  # the clock stage is another module's; never fail a scrape
            log.warning("clock summary failed: %s", e)
            summary = {}
        lab = ["stream"]
        locked = GaugeMetricFamily("edgecap_clock_locked", "1 when the stream's clock mapping "
                                   "is locked (or has nothing to lock).", labels=lab)
        off = GaugeMetricFamily("edgecap_clock_offset_seconds", "Estimated device→timebase "
                                "offset.", labels=lab)
        jit = GaugeMetricFamily("edgecap_clock_jitter_seconds", "Residual timing jitter.",
                                labels=lab)
        drift = GaugeMetricFamily("edgecap_clock_drift_ppm", "Estimated device clock drift.",
                                  labels=lab)
        csamp = CounterMetricFamily("edgecap_clock_samples", "Samples stamped by the clock "
                                    "stage.", labels=lab)
        for name, e in summary.items():
            if not isinstance(e, dict):
                continue
            locked.add_metric([name], 1.0 if clock_locked(e) else 0.0)
            for fam, v in ((off, clock_offset_s(e)), (jit, clock_jitter_s(e)),
                           (drift, clock_drift_ppm(e))):
                if v is not None:
                    fam.add_metric([name], v)
            if isinstance(e.get("samples"), int):
                csamp.add_metric([name], e["samples"])
        yield from (locked, off, jit, drift, csamp)

    def _recorder(self, st: dict[str, Any]) -> Iterable[Any]:
        yield CounterMetricFamily("edgecap_segments_closed", "Segments closed with a manifest.",
                                  value=st.get("closed_segments", 0))
        yield GaugeMetricFamily("edgecap_segments_open", "Segments being written.",
                                value=st.get("open_segments", 0))
        yield CounterMetricFamily("edgecap_disk_drops", "Samples lost because the disk "
                                  "could not take them.", value=st.get("disk_drops", 0))
        rec = getattr(self.pipe, "recorder", None)
        yield CounterMetricFamily("edgecap_recorder_alerts", "Recorder alerts raised.",
                                  value=len(getattr(rec, "alerts", []) or []))

    def _disk_and_spool(self) -> Iterable[Any]:
        d = self._disk.get()
        if d is not None:
            lab = ["path"]
            p = str(self.pipe.out_dir)
            for n, v, h in (("total", d.total_bytes, "Size of the filesystem of out_dir."),
                            ("free", d.free_bytes, "Bytes available to the agent there."),
                            ("used", d.used_bytes, "Bytes not available there.")):
                g = GaugeMetricFamily(f"edgecap_disk_{n}_bytes", h, labels=lab)
                g.add_metric([p], v)
                yield g
        b = self._spool.get()
        yield GaugeMetricFamily("edgecap_spool_backlog_segments", "Closed segments not yet "
                                "marked .uploaded.", value=b.segments)
        yield GaugeMetricFamily("edgecap_spool_backlog_bytes", "Bytes of those segments.",
                                value=b.bytes)
        yield GaugeMetricFamily("edgecap_spool_uploaded_segments", "Segments marked "
                                ".uploaded still on disk.", value=b.uploaded)


class _Registry(Collector):
    """What one endpoint serves: its collectors plus the process-wide :data:`SHARED`."""

    def __init__(self, *collectors: Collector):
        self.collectors = collectors

    def collect(self) -> Iterable[Any]:
        for c in (*self.collectors, SHARED):
            yield from c.collect()


class MetricsServer:
    """An HTTP ``/metrics`` endpoint (prometheus-client's WSGI server on a daemon thread).

    ``start()`` binds and returns the port (``port=0`` picks a free one, for tests);
    raises OSError when the address is taken — callers decide whether that is fatal.
    ``stop()`` is idempotent. Owner thread only."""

    def __init__(self, *collectors: Collector, port: int = 9108, bind: str = "127.0.0.1"):
        self.registry = _Registry(*collectors)
        self.port = port
        self.bind = bind
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> int:
        self._server, self._thread = start_http_server(self.port, self.bind, self.registry)
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", self.bind, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}/metrics"
