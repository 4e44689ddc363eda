"""The labeler pool: feeds captured samples to labelers without ever slowing capture.

    reader thread ──tap: offer(sample)──▶ sampling policy (every_n, max_rate_hz)
        ──▶ bounded per-labeler queue (full: the oldest waiting sample is skipped, counted)
    worker thread (one per labeler; + a prepare thread if pipelined) ──label()──▶ labels
        ──▶ pipeline.push
                                                        ├──▶ latest/nearest store
                                                        ├──▶ subscribers (triggers)
                                                        └──▶ chained labelers (fusion)

``offer`` is the pipeline tap: called in driver reader threads, it takes one short lock per
labeler and returns; it never waits for a worker. Raw capture therefore never depends on
labeling speed: labels are skipped (``skipped``) before a raw sample could be held up.
Latency of a label is ``time.monotonic_ns()`` when it is ready minus the source sample's
``host_rx_ns`` (both host monotonic), kept for the last 4096 labels per labeler.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from agent.config import LabelerConfig, RigConfig
from agent.types import Sample, StreamInfo

from . import UNSET, Labeler, LabelerError, create

log = logging.getLogger("edgecap.labelers")

Subscriber = Callable[[Sample, list[dict[str, Any]]], None]

LABEL_QUEUE_ITEMS = 512
LABEL_QUEUE_BYTES = 32 << 20


@dataclass
class _Route:
    """One input stream of one labeler, with its sampling state (reader-thread owned)."""

    stream: str
    every_n: int
    period_ns: int  # 0: no rate limit
    seen: int = 0
    last_t_ns: int | None = None
    offered: int = 0
    sampled_out: int = 0
    skipped: int = 0
    labeled: int = 0


@dataclass
class _Worker:
    labeler: Labeler
    cfg: LabelerConfig
    name: str
    routes: dict[str, _Route] = field(default_factory=dict)
    queue: deque[Sample] = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None
    prep_thread: threading.Thread | None = None
    handoff: queue.Queue[Any] | None = None
    labeled: int = 0
    labels_out: int = 0
    errors: int = 0
    busy_ns: int = 0
    cpu_ns: int = 0        # CPU time of label() on the model thread (thread_time)
    prep_cpu_ns: int = 0   # CPU time of prepare() on the prepare thread
    latencies_ns: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    high_water: int = 0


class LabelerPool:
    """Labelers of a rig, their queues and worker threads.

    Lifecycle: ``LabelerPool.from_config(cfg)`` (loads models; raises LabelerError) →
    ``attach(pipeline)`` after ``pipeline.open()`` (declares label streams, registers the
    tap) or ``plan(infos)`` + ``push=`` for use without a pipeline → ``start()`` →
    ``stop()`` before ``pipeline.stop()`` (drains what is queued, within a timeout).
    """

    def __init__(self, labelers: list[Labeler], push: Callable[[Sample], None] | None = None):
        self.workers = [_Worker(lab, lab.cfg, f"{lab.cfg.kind}#{i}")
                        for i, lab in enumerate(labelers)]
        self.push = push or (lambda s: None)
        self.infos: dict[str, StreamInfo] = {}
        self.outputs: list[StreamInfo] = []
        self._routes: dict[str, list[tuple[_Worker, _Route]]] = {}
        self._producer: dict[str, _Worker] = {}
        self._subs: list[Subscriber] = []
        self._history: dict[str, deque[tuple[Sample, list[dict[str, Any]]]]] = {}
        self._hist_lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._drain_deadline = 0.0
        self.subscriber_errors = 0
        self.flags: dict[str, dict[str, int]] = {}  # privacy flag -> source stream -> count

    @classmethod
    def from_config(cls, cfg: RigConfig | list[LabelerConfig],
                    push: Callable[[Sample], None] | None = None) -> "LabelerPool":
        cfgs = cfg.labelers if isinstance(cfg, RigConfig) else cfg
        labs: list[Labeler] = []
        try:
            for i, lc in enumerate(cfgs):
                try:
                    labs.append(create(lc))
                except LabelerError as e:
                    raise LabelerError(f"labelers[{i}] ({lc.kind}): {e}") from None
        except BaseException:
            for lab in labs:
                lab.close()
            raise
        return cls(labs, push)

    # -- set-up ---------------------------------------------------------------------
    def plan(self, infos: Iterable[StreamInfo]) -> list[StreamInfo]:
        """Route input streams to labelers and return the label streams they will write.

        A labeler takes a stream named in its ``streams`` — or a label stream whose source
        is named there (so ``fusion.project`` on ``/lidar/top`` takes the ``lidar.clusters``
        labels of ``/lidar/top``) — when ``accepts`` says yes. Raises LabelerError when a
        configured stream is absent or no labeler input matched.
        """
        self.infos = {i.name: i for i in infos}
        self._routes, self._producer = {}, {}
        ctx = _Context(self)
        for w in self.workers:
            w.labeler.context = ctx
            w.routes = {}
        self.outputs = []
        done: set[tuple[str, str]] = set()
        changed = True
        while changed:  # label streams may feed later labelers: repeat until stable
            changed = False
            for w in self.workers:
                for info in list(self.infos.values()):
                    key = (w.name, info.name)
                    src = info.params.get("source") if info.kind.value == "label" else None
                    if key in done or not (info.name in w.cfg.streams or src in w.cfg.streams):
                        continue
                    if not w.labeler.accepts(info):
                        continue
                    done.add(key)
                    stateful = w.labeler.stateful
                    route = _Route(info.name, 1 if stateful else w.cfg.every_n,
                                   0 if stateful or not w.cfg.max_rate_hz
                                   else int(1e9 / w.cfg.max_rate_hz))
                    w.routes[info.name] = route
                    self._routes.setdefault(info.name, []).append((w, route))
                    for out in w.labeler.outputs(info):
                        if out.name not in self.infos:
                            self.infos[out.name] = out
                            self.outputs.append(out)
                            self._producer[out.name] = w
                            changed = True
        for w in self.workers:
            for s in w.cfg.streams:
                if s not in self.infos:
                    raise LabelerError(f"{w.name}: stream {s} does not exist; streams: "
                                       f"{sorted(self.infos)}")
                if not any(r == s or self.infos[r].params.get("source") == s
                           for r in w.routes):
                    i = self.infos[s]
                    hint = getattr(w.labeler, "requires", "")
                    raise LabelerError(f"{w.name} cannot label {s} ({i.kind.value}, "
                                       f"{i.encoding})" + (f"; it needs {hint}" if hint
                                                          else ""))
        return list(self.outputs)

    def attach(self, pipeline: Any) -> list[StreamInfo]:
        """Wire into an opened (not yet started) :class:`agent.pipeline.Pipeline`: declare
        the label streams, register them with the recorder, add the tap, push labels into
        the pipeline. Returns the label streams."""
        outs = self.plan(list(pipeline.infos.values()))
        rec = getattr(pipeline, "recorder", None)
        for info in outs:
            q = pipeline.add_stream(info, LABEL_QUEUE_ITEMS, LABEL_QUEUE_BYTES, "drop_oldest")
            if rec is not None:  # the recorder was made in open(): register late streams
                rec.add_stream(info, q, counters=lambda n=info.name: self.counters(n))
                rec.metadata.setdefault("edgecap.streams", {})[info.name] = json.dumps(
                    {"kind": info.kind.value, "encoding": info.encoding,
                     "rate_hz": info.rate_hz,
                     "params": {k: v for k, v in info.params.items()
                                if isinstance(v, (int, float, str))}})
        if rec is not None:
            rec.metadata["edgecap.labelers"] = {
                w.name: json.dumps({"kind": w.cfg.kind, "streams": w.cfg.streams,
                                    "model": w.labeler.model.as_dict()})
                for w in self.workers}
        self.push = pipeline.push
        pipeline.taps.append(self.offer)
        return outs

    def start(self) -> None:
        """Start one worker thread per labeler; a ``pipelined`` labeler gets a second one
        that runs ``prepare`` (decode, resize) for the next sample while the first runs
        the model on the current one."""
        if self._started:
            return
        self._started = True
        self._stopping.clear()
        for w in self.workers:
            if w.labeler.pipelined:
                w.handoff = queue.Queue(maxsize=1)
                w.prep_thread = threading.Thread(target=self._prepare_loop, args=(w,),
                                                 daemon=True, name=f"labeler-prep:{w.name}")
                w.prep_thread.start()
                target = self._infer_loop
            else:
                target = self._run
            w.thread = threading.Thread(target=target, args=(w,), daemon=True,
                                        name=f"labeler:{w.name}")
            w.thread.start()

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop taking samples, label what is queued (up to ``drain_timeout_s``), join the
        workers and close the labelers. Call before ``pipeline.stop()``."""
        deadline = time.monotonic() + drain_timeout_s
        self._drain_deadline = deadline
        self._stopping.set()
        for w in self.workers:
            with w.cond:
                w.cond.notify_all()
        for w in self.workers:
            for t in (w.prep_thread, w.thread):
                if t is not None:
                    t.join(max(0.0, deadline - time.monotonic()) + 1.0)
        for w in self.workers:
            with w.cond:  # whatever did not get labeled in time is counted as skipped
                for s in w.queue:
                    r = w.routes.get(s.stream)
                    if r is not None:
                        r.skipped += 1
                w.queue.clear()
            try:
                w.labeler.close()
            except Exception:
                log.exception("%s: close failed", w.name)
        self._started = False

    # -- the tap (reader threads) -----------------------------------------------------
    def offer(self, sample: Sample) -> None:
        """Offer a sample to every labeler routed to its stream. Never blocks."""
        routes = self._routes.get(sample.stream)
        if not routes:
            return
        stopping = self._stopping.is_set()
        for w, r in routes:
            r.offered += 1
            if stopping:  # after stop(): not labeled, and counted as such
                with w.cond:
                    r.skipped += 1
                continue
            r.seen += 1
            if r.every_n > 1 and (r.seen - 1) % r.every_n:
                r.sampled_out += 1
                continue
            if r.period_ns:
                t = sample.t_ns or sample.host_rx_ns
                # 5 % tolerance so that jitter does not halve a rate equal to the limit
                if r.last_t_ns is not None and t - r.last_t_ns < r.period_ns * 0.95:
                    r.sampled_out += 1
                    continue
                r.last_t_ns = t
            with w.cond:
                if len(w.queue) >= w.cfg.queue_size:
                    old = w.queue.popleft()
                    ro = w.routes.get(old.stream)
                    if ro is not None:
                        ro.skipped += 1
                w.queue.append(sample)
                if len(w.queue) > w.high_water:
                    w.high_water = len(w.queue)
                w.cond.notify()

    # -- workers ----------------------------------------------------------------------
    def _next(self, w: _Worker) -> Sample | None:
        """The next queued sample; None when stopping and drained (or out of time)."""
        with w.cond:
            while not w.queue and not self._stopping.is_set():
                w.cond.wait(0.5)
            if not w.queue:
                return None
            if self._stopping.is_set() and time.monotonic() > self._drain_deadline:
                return None  # stop() counts what is left as skipped
            return w.queue.popleft()

    def _run(self, w: _Worker) -> None:
        while (s := self._next(w)) is not None:
            self._label_one(w, s, UNSET)
        self._flush(w)

    def _prepare_loop(self, w: _Worker) -> None:
        assert w.handoff is not None
        while (s := self._next(w)) is not None:
            c0 = time.thread_time_ns()
            try:
                prepared = w.labeler.prepare(s)
            except Exception as e:
                self._failed(w, s, e)
                continue
            finally:
                w.prep_cpu_ns += time.thread_time_ns() - c0
            w.handoff.put((s, prepared))  # waits only for this labeler's own model thread
        w.handoff.put(None)

    def _infer_loop(self, w: _Worker) -> None:
        assert w.handoff is not None
        while (item := w.handoff.get()) is not None:
            self._label_one(w, item[0], item[1])
        self._flush(w)

    def _flush(self, w: _Worker) -> None:
        try:
            self._publish(w, w.labeler.flush(), None)
        except Exception:
            w.errors += 1
            log.exception("%s: flush failed", w.name)

    def _failed(self, w: _Worker, s: Sample, e: Exception) -> None:
        w.errors += 1
        if w.errors <= 5 or w.errors % 1000 == 0:
            log.warning("%s: labeling %s failed (%d so far): %s", w.name, s.stream,
                        w.errors, e)

    def _label_one(self, w: _Worker, s: Sample, prepared: Any) -> None:
        t0, c0 = time.monotonic_ns(), time.thread_time_ns()
        try:
            labels = w.labeler.label(s) if prepared is UNSET else w.labeler.label(s, prepared)
        except Exception as e:  # a labeler bug must not take the agent down
            self._failed(w, s, e)
            return
        now = time.monotonic_ns()
        w.busy_ns += now - t0
        w.cpu_ns += time.thread_time_ns() - c0
        w.labeled += 1
        r = w.routes.get(s.stream)
        if r is not None:
            r.labeled += 1
        rx = s.meta.get("source_host_rx_ns") or s.host_rx_ns
        if rx:
            w.latencies_ns.append(now - rx)
        self._publish(w, labels, s)

    def _publish(self, w: _Worker, labels: list[Sample], s: Sample | None) -> None:
        now = time.monotonic_ns()
        for lab in labels:
            lab.host_rx_ns = now
            if not lab.t_ns and s is not None:
                lab.t_ns = s.t_ns
            dets = lab.meta.get("detections", [])
            w.labels_out += 1
            try:
                self.push(lab)
            except Exception:
                w.errors += 1
                log.exception("%s: push failed", w.name)
            self._remember(lab, dets)
            for sub in list(self._subs):
                try:
                    sub(lab, dets)
                except Exception:
                    self.subscriber_errors += 1
                    log.exception("label subscriber failed")
            if lab.stream in self._routes:
                self.offer(lab)

    def _remember(self, lab: Sample, dets: list[dict[str, Any]]) -> None:
        with self._hist_lock:
            h = self._history.get(lab.stream)
            if h is None:
                h = self._history[lab.stream] = deque(maxlen=64)
            h.append((lab, dets))
            for d in dets:
                flag = d.get("privacy")
                if flag:
                    per = self.flags.setdefault(flag, {})
                    per[d["stream"]] = per.get(d["stream"], 0) + 1

    # -- consumers (any thread) -------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(label_sample, detections)`` for every label, on the worker thread
        that made it (keep it short; exceptions are counted and logged). ``detections`` are
        plain dicts (see :func:`agent.labelers.detection`). Returns an unsubscribe function."""
        self._subs.append(callback)
        return lambda: self._subs.remove(callback) if callback in self._subs else None

    def latest(self, label_stream: str) -> tuple[Sample, list[dict[str, Any]]] | None:
        """The newest label of a label stream and its detections, or None."""
        with self._hist_lock:
            h = self._history.get(label_stream)
            return h[-1] if h else None

    def nearest(self, label_stream: str, t_ns: int, max_dt_ns: int
                ) -> tuple[Sample, list[dict[str, Any]]] | None:
        """The remembered label (last 64) closest in ``t_ns`` within ``max_dt_ns``."""
        with self._hist_lock:
            h = list(self._history.get(label_stream, ()))
        best = min(h, key=lambda e: abs(e[0].t_ns - t_ns), default=None)
        if best is None or abs(best[0].t_ns - t_ns) > max_dt_ns:
            return None
        return best

    def counters(self, label_stream: str) -> dict[str, int]:
        """Loss counters behind ``label_stream`` (the recorder puts them in each manifest
        beside the stream): samples of its source offered to the labeler, labeled, skipped
        (queue full or stopping), sampled out by policy; the labeler's errors and bad
        input."""
        w = self._producer.get(label_stream)
        if w is None:
            return {}
        src = self.infos[label_stream].params.get("source", "")
        rs = [r for name, r in w.routes.items()
              if name == src or self.infos[name].params.get("source") == src]
        return {"offered": sum(r.offered for r in rs), "labeled": sum(r.labeled for r in rs),
                "skipped": sum(r.skipped for r in rs),
                "sampled_out": sum(r.sampled_out for r in rs), "errors": w.errors,
                "bad_input": w.labeler.bad_input}

    def queued(self) -> int:
        return sum(len(w.queue) for w in self.workers)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Block until every queue is empty and no worker is mid-sample (tests, replay)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.queued() and all(self._idle(w) for w in self.workers):
                return True
            time.sleep(0.01)
        return False

    def _idle(self, w: _Worker) -> bool:
        done = w.labeled + w.errors
        taken = sum(r.offered - r.sampled_out - r.skipped for r in w.routes.values())
        return done >= taken - len(w.queue)

    def stats(self) -> dict[str, Any]:
        """Counters per labeler and per input stream, latency p50/p99 (ms), busy share."""
        out: dict[str, Any] = {}
        for w in self.workers:
            lat = np.asarray(w.latencies_ns, dtype=np.float64)
            out[w.name] = {
                "kind": w.cfg.kind, "model": w.labeler.model.as_dict(),
                "offered": sum(r.offered for r in w.routes.values()),
                "sampled_out": sum(r.sampled_out for r in w.routes.values()),
                "skipped": sum(r.skipped for r in w.routes.values()),
                "labeled": w.labeled, "labels_out": w.labels_out, "errors": w.errors,
                "bad_input": w.labeler.bad_input, "queue_depth": len(w.queue),
                "queue_high_water": w.high_water,
                "busy_s": round(w.busy_ns / 1e9, 3), "cpu_s": round(w.cpu_ns / 1e9, 3),
                "prepare_cpu_s": round(w.prep_cpu_ns / 1e9, 3),
                "latency_ms_p50": round(float(np.percentile(lat, 50)) / 1e6, 2) if lat.size
                else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)) / 1e6, 2) if lat.size
                else None,
                "streams": {r.stream: {"offered": r.offered, "sampled_out": r.sampled_out,
                                       "skipped": r.skipped, "labeled": r.labeled}
                            for r in w.routes.values()},
            }
        return out


class _Context:
    """What labelers may ask the pool (see :class:`agent.labelers.LabelContext`)."""

    def __init__(self, pool: LabelerPool):
        self._pool = pool

    @property
    def infos(self) -> dict[str, StreamInfo]:
        return self._pool.infos

    def nearest(self, label_stream: str, t_ns: int, max_dt_ns: int
                ) -> tuple[Sample, list[dict[str, Any]]] | None:
        return self._pool.nearest(label_stream, t_ns, max_dt_ns)
