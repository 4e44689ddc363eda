"""Label messages in Foxglove's well-known schemas, and back to detection dicts.

- Image labels: ``foxglove.ImageAnnotations``; one ``PointsAnnotation`` (LINE_LOOP of the 4
  box corners, or LINE_LIST for a projected 3D box) per detection with ``metadata``
  ``class``/``score`` (+ labeler extras), one ``TextAnnotation`` "class score" above it.
- 3D labels: ``foxglove.SceneUpdate``; a ``deletions`` entry of type ALL, then one
  ``SceneEntity`` per box with a ``CubePrimitive`` and ``metadata`` ``class``, ``score``,
  ``points`` (point count).
- Provenance: ImageAnnotations ``metadata`` and every SceneEntity's ``metadata`` carry
  ``labeler``, ``model``, ``model_version``, ``model_sha256`` and ``thresholds`` (JSON).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from foxglove_schemas_protobuf.Color_pb2 import Color
from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations
from foxglove_schemas_protobuf.KeyValuePair_pb2 import KeyValuePair
from foxglove_schemas_protobuf.PointsAnnotation_pb2 import PointsAnnotation
from foxglove_schemas_protobuf.SceneEntityDeletion_pb2 import SceneEntityDeletion
from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate

from . import ModelInfo

_PALETTE = [(0.95, 0.30, 0.25), (0.20, 0.65, 0.95), (0.30, 0.85, 0.35), (0.98, 0.80, 0.20),
            (0.75, 0.40, 0.95), (0.95, 0.55, 0.15), (0.40, 0.90, 0.85), (0.90, 0.90, 0.90)]


def color_for(cls: str, names: list[str] | None = None, alpha: float = 1.0) -> Color:
    i = names.index(cls) if names and cls in names else sum(map(ord, cls))
    r, g, b = _PALETTE[i % len(_PALETTE)]
    return Color(r=r, g=g, b=b, a=alpha)


def provenance(model: ModelInfo, kind: str, source: str) -> list[KeyValuePair]:
    return [KeyValuePair(key="labeler", value=kind), KeyValuePair(key="source", value=source),
            KeyValuePair(key="model", value=model.name),
            KeyValuePair(key="model_version", value=model.version),
            KeyValuePair(key="model_sha256", value=model.sha256),
            KeyValuePair(key="thresholds", value=json.dumps(model.thresholds, sort_keys=True))]


def _stamp(msg: Any, t_ns: int) -> None:
    msg.timestamp.seconds, msg.timestamp.nanos = divmod(int(t_ns), 1_000_000_000)


def image_annotations(t_ns: int, dets: Iterable[dict[str, Any]], model: ModelInfo, kind: str,
                      source: str, names: list[str] | None = None) -> ImageAnnotations:
    """Boxes (``det["box"] = [x0, y0, x1, y1]``) or projected 3D boxes (``det["corners_uv"]``,
    8×2) as annotations. Extra scalar keys of a detection go into its metadata."""
    msg = ImageAnnotations()
    msg.metadata.extend(provenance(model, kind, source))
    for d in dets:
        col = color_for(d["cls"], names)
        pa = msg.points.add()
        _stamp(pa, t_ns)
        pa.thickness = 2.0
        pa.outline_color.CopyFrom(col)
        corners = d.get("corners_uv")
        if corners is not None:
            pa.type = PointsAnnotation.LINE_LIST
            for a, b in _CUBE_EDGES:
                for k in (a, b):
                    p = pa.points.add()
                    p.x, p.y = float(corners[k][0]), float(corners[k][1])
        else:
            pa.type = PointsAnnotation.LINE_LOOP
            x0, y0, x1, y1 = d["box"]
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
                p = pa.points.add()
                p.x, p.y = float(x), float(y)
        meta = {"class": d["cls"], "score": f"{d['score']:.4f}"}
        meta.update({k: _scalar(v) for k, v in d.items()
                     if k not in ("stream", "t_ns", "kind", "cls", "score", "corners_uv")})
        pa.metadata.extend(KeyValuePair(key=k, value=v) for k, v in meta.items())
        ta = msg.texts.add()
        _stamp(ta, t_ns)
        x0, y0 = d["box"][0], d["box"][1]
        ta.position.x, ta.position.y = float(x0), float(max(0.0, y0 - 4))
        ta.text = d.get("text") or f"{d['cls']} {d['score']:.2f}"
        ta.font_size = 14.0
        ta.text_color.CopyFrom(col)
        ta.background_color.CopyFrom(Color(r=0, g=0, b=0, a=0.5))
    return msg


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"), default=float)
    return str(v)


_CUBE_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4),
               (0, 4), (1, 5), (2, 6), (3, 7)]


def scene_update(t_ns: int, frame_id: str, dets: Iterable[dict[str, Any]], model: ModelInfo,
                 kind: str, source: str, lifetime_ns: int = 0) -> SceneUpdate:
    """3D boxes (``det["bbox3d"] = {center, size, yaw}``) as cube entities."""
    msg = SceneUpdate()
    dl = msg.deletions.add()
    _stamp(dl, t_ns)
    dl.type = SceneEntityDeletion.ALL
    prov = provenance(model, kind, source)
    for i, d in enumerate(dets):
        b = d["bbox3d"]
        e = msg.entities.add()
        _stamp(e, t_ns)
        e.frame_id = frame_id
        e.id = f"{kind}/{i}"
        e.lifetime.seconds, e.lifetime.nanos = divmod(int(lifetime_ns), 1_000_000_000)
        e.metadata.extend(prov)
        e.metadata.extend([KeyValuePair(key="class", value=d["cls"]),
                           KeyValuePair(key="score", value=f"{d['score']:.4f}"),
                           KeyValuePair(key="points", value=str(d.get("points", 0)))])
        c = e.cubes.add()
        c.pose.position.x, c.pose.position.y, c.pose.position.z = map(float, b["center"])
        half = float(b.get("yaw", 0.0)) / 2
        c.pose.orientation.z, c.pose.orientation.w = math.sin(half), math.cos(half)
        c.size.x, c.size.y, c.size.z = map(float, b["size"])
        c.color.CopyFrom(color_for(d["cls"], alpha=0.4))
    return msg


# -- back to detections (bundles read later, tests) -------------------------------------

def detections_from_image_annotations(msg: ImageAnnotations, t_ns: int) -> list[dict[str, Any]]:
    """One dict per PointsAnnotation: ``cls``, ``score``, ``box`` (from the points),
    ``stream``/``kind`` from the message metadata."""
    head = {kv.key: kv.value for kv in msg.metadata}
    out = []
    for pa in msg.points:
        meta = {kv.key: kv.value for kv in pa.metadata}
        xs = [p.x for p in pa.points]
        ys = [p.y for p in pa.points]
        out.append({"stream": head.get("source", ""), "t_ns": int(t_ns),
                    "kind": head.get("labeler", ""), "cls": meta.get("class", ""),
                    "score": float(meta.get("score", 0.0)),
                    "box": [min(xs), min(ys), max(xs), max(ys)] if xs else None})
    return out


def detections_from_scene_update(msg: SceneUpdate, t_ns: int) -> list[dict[str, Any]]:
    out = []
    for e in msg.entities:
        meta = {kv.key: kv.value for kv in e.metadata}
        for c in e.cubes:
            yaw = 2 * math.atan2(c.pose.orientation.z, c.pose.orientation.w)
            out.append({"stream": meta.get("source", ""), "t_ns": int(t_ns),
                        "kind": meta.get("labeler", ""), "cls": meta.get("class", ""),
                        "score": float(meta.get("score", 0.0)),
                        "points": int(meta.get("points", 0)),
                        "bbox3d": {"center": [c.pose.position.x, c.pose.position.y,
                                              c.pose.position.z],
                                   "size": [c.size.x, c.size.y, c.size.z], "yaw": yaw}})
    return out
