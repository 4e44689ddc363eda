"""On-device pre-labelers: models that turn captured samples into label samples.

A labeler is built from one ``[[labelers]]`` entry (:class:`agent.config.LabelerConfig`) by
:func:`create`, which looks its ``kind`` up in the registry (``camera.yolo``, ``audio.vad``,
``audio.onset``, ``lidar.clusters``, ``fusion.project``, ``privacy.faces``; tests register
fakes with :func:`register` exactly like the real ones). The :class:`~agent.labelers.pool.
LabelerPool` owns labelers, feeds them and publishes what they return:

    lab = create(cfg)                    # loads the model; raises LabelerError
    lab.context = ctx                    # set by the pool: stream infos, recent labels
    lab.accepts(info) -> bool            # can this stream be labeled by me?
    lab.outputs(info) -> [StreamInfo]    # the label streams I write for that input
    lab.label(sample) -> [Sample]        # one worker thread per labeler; may take CPU time
    lab.flush() -> [Sample]              # at stop: labels held back (open segments)
    lab.close()

Label samples carry the same ``t_ns`` as the sample they describe, their stream is
``/labels/<source without leading slash>/<suffix>`` (:func:`label_stream`) and every one
names its model, version, file sha256 and thresholds (:class:`ModelInfo`, written into the
message: ImageAnnotations/SceneEntity ``metadata`` or the JSON ``model`` field). Each label
sample also has ``meta["detections"]``: a list of plain dicts (:func:`detection`) that the
pool hands to subscribers such as triggers.
"""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.config import LabelerConfig
from agent.errors import EdgecapError
from agent.registry import LazyRegistry
from agent.types import Sample, StreamInfo, StreamKind

__all__ = ["UNSET", "Labeler", "LabelerError", "LabelerOptions", "LabelContext", "ModelInfo",
           "create", "detection", "get", "known_keys", "label_stream", "register"]


#: ``Labeler.label(sample)`` called without a prepared input
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


class LabelerError(EdgecapError):
    """A labeler cannot be built or attached (unknown kind, missing model file, bad options,
    a configured stream it cannot label). Bad *input samples* are counted, never raised."""


class LabelerOptions(BaseModel):
    """Base of every labeler's ``[labelers.options]`` model; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


# -- model provenance -----------------------------------------------------------------

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, cached by (path, size, mtime)."""
    p = os.fspath(path)
    st = os.stat(p)
    key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


@dataclass(frozen=True)
class ModelInfo:
    """What produced a label: model name, version, file sha256 (empty for a model without
    a file, such as the onset detector) and the thresholds in force."""

    name: str
    version: str
    sha256: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)
    path: str = ""

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], name: str | None = None,
                version: str = "", thresholds: dict[str, float] | None = None) -> "ModelInfo":
        p = os.fspath(path)
        return cls(name or os.path.splitext(os.path.basename(p))[0], version,
                   file_sha256(p), dict(thresholds or {}), p)

    def as_dict(self) -> dict[str, Any]:
        """The provenance record written into every label message."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "thresholds": dict(self.thresholds)}

    def stream_params(self) -> dict[str, Any]:
        """Scalar StreamInfo params (recorded in the session's ``edgecap.streams``)."""
        import json

        return {"model": self.name, "model_version": self.version,
                "model_sha256": self.sha256,
                "thresholds": json.dumps(self.thresholds, sort_keys=True)}


# -- names and detections -------------------------------------------------------------

def label_stream(source: str, suffix: str) -> str:
    """``/camera/front`` + ``yolo`` → ``/labels/camera/front/yolo``."""
    return "/labels/" + source.lstrip("/") + "/" + suffix


def detection(stream: str, t_ns: int, kind: str, cls: str, score: float,
              **extra: Any) -> dict[str, Any]:
    """One detection as subscribers see it. ``stream`` is the *source* stream (the camera,
    microphone or LiDAR), ``kind`` the labeler kind. Optional keys: ``box`` (image pixels
    ``[x0, y0, x1, y1]`` in the source image), ``bbox3d`` (``{center: [x,y,z], size:
    [l,w,h], yaw}`` in the sensor frame, m/rad), ``start_ns``/``end_ns`` (audio, shared
    timebase), ``points`` (LiDAR point count), ``privacy`` (``"speech"``/``"face"``)."""
    return {"stream": stream, "t_ns": int(t_ns), "kind": kind, "cls": cls,
            "score": round(float(score), 4), **extra}


class LabelContext(Protocol):
    """What a labeler may ask the pool (any thread, never blocks)."""

    infos: dict[str, StreamInfo]

    def nearest(self, label_stream: str, t_ns: int, max_dt_ns: int
                ) -> tuple[Sample, list[dict[str, Any]]] | None: ...


# -- the interface --------------------------------------------------------------------

class Labeler(ABC):
    """Base of every labeler. Subclasses set ``kind``, ``suffix`` and ``Options`` and
    implement ``accepts``, ``label`` and (if they write more than one stream per input, or
    a non-default encoding) ``outputs``.

    ``label`` is called by the pool's worker thread for this labeler only, one sample at a
    time, so per-stream state needs no lock. It returns label samples (possibly none) and
    must not raise for bad input: it counts it in ``bad_input`` and returns ``[]``.
    ``stateful`` labelers (audio) see every accepted sample of a stream in order; the pool
    never applies ``every_n``/``max_rate_hz`` to them.
    """

    kind: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    #: the pool runs ``prepare`` of the next sample on a second thread while ``label``
    #: runs the model (whose session releases the GIL) on the current one
    pipelined: ClassVar[bool] = False
    Options: ClassVar[type[LabelerOptions]] = LabelerOptions

    def __init__(self, cfg: LabelerConfig):
        self.cfg = cfg
        try:
            self.options = self.Options.model_validate(cfg.options)
        except ValidationError as e:
            raise LabelerError(f"{self.kind}: bad options: {e}") from None
        self.context: LabelContext | None = None
        self.model = ModelInfo(self.kind, "0")
        self.bad_input = 0

    @abstractmethod
    def accepts(self, info: StreamInfo) -> bool:
        """True when this labeler can label samples of ``info`` (kind and encoding)."""

    def outputs(self, info: StreamInfo) -> list[StreamInfo]:
        """Label streams written for input ``info`` (called once per accepted input before
        start). Default: one stream ``label_stream(info.name, suffix)`` encoded as
        :meth:`output_encoding` says."""
        return [self.make_output(info.name, info, self.suffix)]

    def make_output(self, source: str, info: StreamInfo, suffix: str) -> StreamInfo:
        enc, params = self.output_encoding()
        return StreamInfo(label_stream(source, suffix), StreamKind.LABEL, enc, info.rate_hz,
                          frame_id=info.frame_id,
                          params={**params, "labeler": self.kind, "source": source,
                                  **self.model.stream_params()})

    def output_encoding(self) -> tuple[str, dict[str, Any]]:
        """``(encoding, params)`` of this labeler's label streams."""
        from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations

        return "protobuf", {"proto_class": ImageAnnotations}

    def out_stream(self, source: str, suffix: str | None = None) -> str:
        return label_stream(source, suffix or self.suffix)

    def prepare(self, sample: Sample) -> Any:
        """Model-free work on a sample (decode, resize), for ``pipelined`` labelers: called
        on the pool's prepare thread, one sample ahead of ``label``. Returns what ``label``
        takes as ``prepared``; None for bad input. Default: nothing to prepare."""
        return None

    @abstractmethod
    def label(self, sample: Sample, prepared: Any = UNSET) -> list[Sample]:
        """Label one sample (worker thread; CPU-bound, never waits on I/O). ``prepared`` is
        what ``prepare`` returned for it, or ``UNSET`` when called alone (then the labeler
        prepares inline)."""

    def flush(self) -> list[Sample]:
        """Labels still held back (an open speech segment), asked for once at stop on the
        worker's thread after its queue is done. Default: none."""
        return []

    def close(self) -> None:
        """Release sessions and buffers (after the worker has stopped)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.cfg.streams}>"


def make_label(source: Sample, stream: str, payload: Any,
               detections: list[dict[str, Any]]) -> Sample:
    """A label sample describing ``source``: same ``t_ns`` and ``seq``; ``host_rx_ns`` is
    filled by the pool when the label is ready; ``meta["source_host_rx_ns"]`` keeps the
    arrival time of the raw sample at the root of a chain (latency is measured from it)."""
    rx = source.meta.get("source_host_rx_ns") or source.host_rx_ns
    return Sample(stream, payload, 0, device_t_ns=None, seq=source.seq, t_ns=source.t_ns,
                  meta={"detections": detections, "source_host_rx_ns": rx})


# -- registry -------------------------------------------------------------------------

#: key -> module that registers it when imported (lazy: no open3d import for a camera rig)
BUILTIN: dict[str, str] = {
    "camera.yolo": "agent.labelers.camera_yolo",
    "audio.vad": "agent.labelers.audio_vad",
    "audio.onset": "agent.labelers.audio_onset",
    "lidar.clusters": "agent.labelers.lidar_clusters",
    "fusion.project": "agent.labelers.fusion",
    "privacy.faces": "agent.labelers.privacy",
}

_REGISTRY: LazyRegistry[type[Labeler]] = LazyRegistry("labeler", BUILTIN, attr="kind")

#: ``@register("camera.yolo")`` makes a Labeler class available under that kind
register = _REGISTRY.register
known_keys = _REGISTRY.known_keys


def get(key: str) -> type[Labeler]:
    """The Labeler class for ``key``; raises LabelerError naming the known keys."""
    try:
        return _REGISTRY.get(key)
    except ImportError as e:
        raise LabelerError(f"cannot load labeler {key}: {e}") from None
    except KeyError as e:
        raise LabelerError(str(e.args[0])) from None


def create(cfg: LabelerConfig) -> Labeler:
    """Build the labeler of one ``[[labelers]]`` entry (loads its model)."""
    return get(cfg.kind)(cfg)
