"""The per-bundle data-quality report.

A :class:`QualityMonitor` is fed every sample the recorder writes (on the writer thread;
``observe`` is cheap: costly checks such as camera blur run on a sampled subset, at most
``camera_check_hz`` frames per second per camera, decoded at reduced size on a checker
thread) and produces,
per segment, the ``quality`` section of the manifest:

- completeness: every configured stream present at its nominal rate, gaps and their causes;
- alignment: clock quality per stream (from the clock stage);
- noise: camera blur (variance of the Laplacian, judged against the camera's own recent
  sharpness, so a low-texture scene is not "blurred") and over/under exposure; audio
  clipping, dead silence and dropouts (runs of digital zeros in live audio); LiDAR empty or
  low-return scans; GPS fix quality and HDOP;
- near-duplicates: repeated camera frames (a frozen camera: flagged) and the share of the
  segment the vehicle stood still (GPS speed; reported for curation, not flagged);
- provenance and consent, from the config (plus speech seen by a labeler).

Each check has a one-word verdict: ``ok``, ``warn`` or ``fail`` (``n/a`` when the check
does not apply), and ``flags`` lists every check that is not ok. Camera image defects need
at least ``camera_min_bad`` bad checked frames in a segment: one odd frame (a flash, a
passing headlight) is an event, not a defect of the segment.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import Sample, StreamInfo, StreamKind


@dataclass
class QualityThresholds:
    # blurred: Laplacian variance (1/4-size grey image) below blur_rel × the camera's
    # recent sharpness (median of its last blur_history sharp, well-exposed checks), or
    # below the absolute floor blur_laplacian_var whatever the history
    blur_laplacian_var: float = 8.0
    blur_rel: float = 0.15
    blur_history: int = 60
    overexposed_mean: float = 235.0
    underexposed_mean: float = 20.0
    clip_share: float = 0.01  # share of samples at clip_level or beyond: clipped
    #: |sample| at or above 0.99 of full scale (int16) counts as clipped: a flat top at
    #: full scale comes back through a resampling sound server as a ripple just under it
    clip_level: int = 32_440
    silence_rms: float = 2.0  # int16 RMS below: dead silence
    lidar_min_points_share: float = 0.2  # of the stream's median scan
    gps_max_hdop: float = 5.0
    completeness_warn: float = 0.95
    completeness_fail: float = 0.8
    still_speed_mps: float = 0.3
    camera_check_hz: float = 2.0
    camera_min_bad: int = 2  # bad checked frames before a camera defect is a segment's
    silence_warn: float = 0.2  # share of dead-silent audio blocks: warn / fail
    silence_fail: float = 0.8
    # a dropout: a run of this many exact digital zeros inside live audio (a live mic's
    # noise floor is never exactly 0 for a few ms; a buffer underrun or a lost packet is)
    dropout_run: int = 96
    dropout_warn: float = 0.01  # share of blocks with a dropout: warn / fail
    dropout_fail: float = 0.1
    # a stream's first acquisition after start-up (never locked yet, no jump) is ok while
    # its stated uncertainty is within this: half a 30 fps frame, so every sample still
    # pairs with the right frame of another stream; later acquisitions (after a jump or a
    # device restart) always warn
    alignment_warmup_ns: int = 16_000_000


@dataclass
class _StreamQ:
    info: StreamInfo
    n: int = 0
    # camera
    frames_checked: int = 0
    blurred: int = 0
    over: int = 0
    under: int = 0
    repeated: int = 0
    checks_skipped: int = 0
    last_digest: bytes = b""
    last_check_ns: int = 0
    blur_values: list[float] = field(default_factory=list)
    # audio
    audio_samples: int = 0
    clipped: int = 0
    silent_blocks: int = 0
    dropout_blocks: int = 0
    live: bool = False  # the last audio block was not silent
    blocks: int = 0
    # lidar
    scan_points: list[int] = field(default_factory=list)
    incomplete: int = 0
    # gps
    fixes: int = 0
    no_fix: int = 0
    hdop: list[float] = field(default_factory=list)
    still: int = 0
    speech: int = 0


def _verdict(bad: float, warn: float, fail: float) -> str:
    return "fail" if bad >= fail else "warn" if bad >= warn else "ok"


class QualityMonitor:
    """Accumulates quality facts for the segment being written; ``report`` closes one
    segment's section and resets. Called only from the recorder's writer thread."""

    def __init__(self, infos: dict[str, StreamInfo], provenance: dict[str, Any],
                 required: set[str] | None = None,
                 thresholds: QualityThresholds | None = None):
        self.infos = infos
        self.provenance = provenance
        self.required = required if required is not None else {
            n for n, i in infos.items() if i.kind in (StreamKind.CAMERA, StreamKind.AUDIO,
                                                      StreamKind.LIDAR, StreamKind.GPS)}
        self.th = thresholds or QualityThresholds()
        self._acc: dict[str, dict[str, _StreamQ]] = {}
        self._first_t: dict[str, int] = {}
        self._sharp: dict[str, deque[float]] = {}  # per camera, across segments
        self._locked_once: set[str] = set()  # streams whose clock has locked this session
        self._checks: queue.Queue[tuple[_StreamQ, Any]] = queue.Queue(maxsize=2)
        self._checker: threading.Thread | None = None
        self._lock = threading.Lock()

    def _q(self, seg: str, s: Sample) -> _StreamQ | None:
        info = self.infos.get(s.stream)
        if info is None:
            return None
        acc = self._acc.setdefault(seg, {})
        q = acc.get(s.stream)
        if q is None:
            q = acc[s.stream] = _StreamQ(info)
        return q

    def observe(self, seg: str, s: Sample) -> None:
        q = self._q(seg, s)
        if q is None:
            return
        q.n += 1
        if s.stream not in self._first_t:
            self._first_t[s.stream] = s.t_ns
        kind = q.info.kind
        if kind == StreamKind.CAMERA:
            self._camera(q, s)
        elif kind == StreamKind.AUDIO:
            self._audio(q, s)
        elif kind == StreamKind.LIDAR:
            q.scan_points.append(len(s.payload) if isinstance(s.payload, np.ndarray) else 0)
            q.incomplete += bool(s.meta.get("incomplete"))
        elif kind == StreamKind.GPS and isinstance(s.payload, dict):
            q.fixes += 1
            fq = s.payload.get("fix_quality", 1)
            if not fq:
                q.no_fix += 1
            if s.payload.get("hdop") is not None:
                q.hdop.append(float(s.payload["hdop"]))
            sp = s.payload.get("speed_mps")
            if sp is not None and sp < self.th.still_speed_mps:
                q.still += 1
        elif kind == StreamKind.LABEL and (
                s.meta.get("privacy") == "speech"
                or (isinstance(s.payload, dict) and s.payload.get("privacy") == "speech")
                or any(d.get("privacy") == "speech" for d in s.meta.get("detections", ()))):
            q.speech += 1

    def _camera(self, q: _StreamQ, s: Sample) -> None:
        p = s.payload
        if isinstance(p, (bytes, bytearray, memoryview)):
            # repeated frames: identical JPEG bytes (a frozen camera re-sending one frame);
            # the middle and the end of the entropy-coded data stand for the whole frame
            # (a flat region, e.g. the road under the hood, can encode alike in two frames)
            mid = len(p) // 2
            digest = hashlib.blake2b(bytes(p[mid - 2048:mid + 2048]) + bytes(p[-4096:]),
                                     digest_size=8).digest()
            if digest == q.last_digest:
                q.repeated += 1
            q.last_digest = digest
        if s.t_ns - q.last_check_ns < 1e9 / self.th.camera_check_hz:
            return
        q.last_check_ns = s.t_ns
        # decode + Laplacian run on the checker thread (OpenCV releases the GIL, so they
        # overlap with the writer); a check that finds the checker busy is skipped
        if not self._checks.full():
            self._checks.put_nowait((q, p))
            self._ensure_checker()
        else:
            q.checks_skipped += 1

    def _ensure_checker(self) -> None:
        if self._checker is None:
            self._checker = threading.Thread(target=self._check_loop, daemon=True,
                                             name="edgecap-quality")
            self._checker.start()

    def _check_loop(self) -> None:
        import cv2

        while True:
            q, payload = self._checks.get()
            try:
                grey = _grey_small(payload, q.info.encoding)
                if grey is None:
                    continue
                lv = float(cv2.Laplacian(grey, cv2.CV_32F).var())
                mean = float(grey.mean())
            except Exception:  # a corrupt frame: not a quality fact
                continue
            finally:
                self._checks.task_done()
            with self._lock:
                q.frames_checked += 1
                q.blur_values.append(lv)
                over, under = mean > self.th.overexposed_mean, mean < self.th.underexposed_mean
                q.over += over
                q.under += under
                if not (over or under):  # an exposure defect is not also a blur
                    q.blurred += self._is_blurred(q.info.name, lv)

    def drain(self) -> None:
        """Wait until the camera checks queued so far are done (their facts counted)."""
        if self._checker is not None:
            self._checks.join()

    def _is_blurred(self, stream: str, lv: float) -> bool:
        """Judge one well-exposed frame's sharpness ``lv`` against the camera's history
        (checker thread, under ``_lock``); sharp frames join the history."""
        hist = self._sharp.setdefault(stream, deque(maxlen=self.th.blur_history))
        ref = float(np.median(hist)) if len(hist) >= 5 else None
        blurred = lv < self.th.blur_laplacian_var or (
            ref is not None and lv < self.th.blur_rel * ref)
        if not blurred:
            hist.append(lv)
        return blurred

    def _audio(self, q: _StreamQ, s: Sample) -> None:
        pcm = np.asarray(s.payload)
        if pcm.size == 0:
            return
        q.blocks += 1
        q.audio_samples += pcm.size
        lvl = self.th.clip_level
        q.clipped += int(np.count_nonzero((pcm >= lvl) | (pcm <= -lvl)))
        rms = math.sqrt(float(np.mean(np.square(pcm, dtype=np.float64))))
        silent = rms < self.th.silence_rms
        q.silent_blocks += silent
        if not silent:
            q.dropout_blocks += has_zero_run(pcm.reshape(-1), self.th.dropout_run)
        elif q.live and not pcm.any():
            q.dropout_blocks += 1  # live audio cut to digital zeros: a dropout begins
        q.live = not silent

    # -- report -----------------------------------------------------------------------
    def report(self, seg: str, span_ns: tuple[int, int] | None, streams_manifest: dict[str, Any],
               clock: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``quality`` section for segment named ``seg`` (then forgotten).
        ``span_ns`` is the part of the timebase the segment actually covers (a session
        starts and ends inside a window); a stream is judged from its first sample ever
        on, with one sample of slack for the boundaries."""
        self.drain()  # the segment's pending camera checks count in it
        with self._lock:
            acc = self._acc.pop(seg, {})
        th = self.th
        checks: dict[str, dict[str, Any]] = {}
        # completeness
        comp: dict[str, Any] = {}
        worst = "ok"
        for name in sorted(self.required):
            info = self.infos[name]
            st = streams_manifest.get(name, {})
            n = st.get("messages", 0)
            expected = None
            if info.rate_hz and span_ns is not None:
                start = max(span_ns[0], self._first_t.get(name, span_ns[0]))
                expected = info.rate_hz * max(0, span_ns[1] - start) / 1e9
            if expected:
                share = 1.0 - max(0.0, expected - n - 1) / expected
            else:
                share = 1.0 if n else 0.0
            dev = st.get("device", {})
            v = "fail" if n == 0 else ("ok" if share >= th.completeness_warn else
                                       "warn" if share >= th.completeness_fail else "fail")
            causes = {k: dev.get(k, 0) for k in ("gaps", "corrupt", "truncated", "garbage",
                                                 "garbage_bytes", "reconnects") if dev.get(k)}
            if st.get("queue_drops"):
                causes["queue_drops"] = st["queue_drops"]
            if causes and v == "ok":
                v = "warn"
            comp[name] = {"messages": n, "expected": expected, "share": round(share, 4),
                          "causes": causes, "verdict": v}
            worst = max(worst, v, key=_rank)
        checks["completeness"] = {"streams": comp, "verdict": worst}
        # alignment
        al: dict[str, Any] = {}
        worst = "ok"
        for name, q in clock.items():
            if name not in self.required:
                continue
            state = str(q.get("state") or "unlocked")
            unc = q.get("uncertainty_ns")
            # locked or exact: ok; the start-up acquisition within alignment_warmup_ns: ok
            # (said as warmup); any other acquiring, arrival-time only or unlocked: warn
            warmup = (state == "acquiring" and name not in self._locked_once
                      and not q.get("jumps") and unc is not None
                      and unc <= th.alignment_warmup_ns)
            if state in ("locked", "device=timebase"):
                self._locked_once.add(name)
            v = "ok" if state in ("locked", "device=timebase") or warmup else "warn"
            al[name] = {"source": q.get("source"), "state": state, "uncertainty_ns": unc,
                        "jitter_ns": q.get("jitter_ns"), "jumps": q.get("jumps", 0),
                        "verdict": v}
            if warmup:
                al[name]["warmup"] = True
            worst = max(worst, v, key=_rank)
        checks["alignment"] = {"streams": al, "verdict": worst if al else "n/a"}
        # noise, per modality
        noise: dict[str, Any] = {}
        dup: dict[str, Any] = {}
        for name, q in sorted(acc.items()):
            k = q.info.kind
            if k == StreamKind.CAMERA and q.frames_checked:
                fc = q.frames_checked

                def image(bad: int) -> str:
                    return _verdict(bad / fc, 0.2, 0.5) if bad >= th.camera_min_bad else "ok"

                v = max(image(q.blurred), image(q.over), image(q.under), key=_rank)
                noise[name] = {"frames_checked": fc, "checks_skipped": q.checks_skipped,
                               "blurred": q.blurred,
                               "overexposed": q.over, "underexposed": q.under,
                               "laplacian_var_median": float(np.median(q.blur_values)),
                               "verdict": v}
                dup[name] = {"repeated_frames": q.repeated,
                             "verdict": _verdict(q.repeated / max(q.n, 1), 0.05, 0.3)}
            elif k == StreamKind.AUDIO and q.blocks:
                clip = q.clipped / max(q.audio_samples, 1)
                sil = q.silent_blocks / q.blocks
                drop = q.dropout_blocks / q.blocks
                v = max(_verdict(clip, th.clip_share, 10 * th.clip_share),
                        _verdict(sil, th.silence_warn, th.silence_fail),
                        _verdict(drop, th.dropout_warn, th.dropout_fail), key=_rank)
                noise[name] = {"clipped_share": round(clip, 5), "silent_share": round(sil, 4),
                               "dropout_share": round(drop, 4), "verdict": v}
            elif k == StreamKind.LIDAR and q.scan_points:
                med = float(np.median(q.scan_points)) or 1.0
                empty = sum(1 for p in q.scan_points if p == 0)
                low = sum(1 for p in q.scan_points if p < th.lidar_min_points_share * med)
                share = (empty + low) / len(q.scan_points)
                noise[name] = {"scans": len(q.scan_points), "empty": empty,
                               "low_return": low, "incomplete": q.incomplete,
                               "median_points": med,
                               "verdict": max(_verdict(share, 0.05, 0.3),
                                              _verdict(q.incomplete / len(q.scan_points),
                                                       0.05, 0.3), key=_rank)}
            elif k == StreamKind.GPS and q.fixes:
                hd = float(np.median(q.hdop)) if q.hdop else None
                v = _verdict(q.no_fix / q.fixes, 0.1, 0.5)
                if hd is not None and hd > th.gps_max_hdop:
                    v = max(v, "warn", key=_rank)
                noise[name] = {"fixes": q.fixes, "no_fix": q.no_fix, "hdop_median": hd,
                               "verdict": v}
                # reported for curation (the seconds at a red light are near-duplicates),
                # never flagged: standing still is not a defect of the data
                dup[name] = {"standing_still_share": round(q.still / q.fixes, 3),
                             "verdict": "ok"}
        checks["noise"] = {"streams": noise,
                           "verdict": _worst(v["verdict"] for v in noise.values())}
        checks["near_duplicates"] = {"streams": dup,
                                     "verdict": _worst(v["verdict"] for v in dup.values())}
        speech = sum(q.speech for q in acc.values())
        consent = self.provenance.get("consent_status", "unknown")
        pv = "ok" if consent in ("obtained", "not_required") else "warn"
        if speech and consent not in ("obtained",):
            pv = "warn"
        checks["provenance"] = {**self.provenance, "speech_detected": speech > 0,
                                "verdict": pv}
        flags = sorted(f"{c}:{s}" if s else c for c, body in checks.items()
                       for s in ([k for k, v in body.get("streams", {}).items()
                                  if v.get("verdict") in ("warn", "fail")] or [""])
                       if body["verdict"] in ("warn", "fail"))
        return {"checks": checks, "flags": flags,
                "verdict": _worst(b["verdict"] for b in checks.values())}


_RANKS = {"n/a": -1, "ok": 0, "warn": 1, "fail": 2}


def _rank(v: str) -> int:
    return _RANKS.get(v, 0)


def _worst(vs: Any) -> str:
    vs = list(vs)
    return max(vs, key=_rank) if vs else "n/a"


def has_zero_run(x: np.ndarray, run: int) -> bool:
    """Whether ``x`` holds ``run`` or more consecutive exact zeros."""
    z = x == 0
    if int(z.sum()) < run:
        return False
    edges = np.flatnonzero(np.diff(np.concatenate(([0], z.view(np.int8), [0]))))
    return bool(((edges[1::2] - edges[0::2]) >= run).any())


def _grey_small(payload: Any, encoding: str) -> np.ndarray | None:
    import cv2

    if encoding in ("jpeg", "png"):
        buf = np.frombuffer(bytes(payload), np.uint8)
        return cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if isinstance(payload, np.ndarray) and payload.ndim >= 2:
        img = payload if payload.ndim == 2 else cv2.cvtColor(payload, cv2.COLOR_BGR2GRAY)
        return cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4))
    return None
