"""CVAT export: an image task with pre-annotations and a point-cloud task with its
related camera images and cuboid pre-labels.

Layout::

    OUT/images/<camera_slug>/<t_ns>.jpg                   image task data (JPEG as recorded)
    OUT/annotations.xml                                   "CVAT for images 1.1" XML: one
                                                          <image> per frame, <box> per 2D
                                                          pre-label (source="auto", score)
    OUT/pointcloud/pointcloud/<lidar_slug>_<t_ns>.pcd     PCD v0.7, fields x y z intensity
    OUT/pointcloud/related_images/<lidar_slug>_<t_ns>_pcd/<camera_slug>.jpg
                                                          the camera frame nearest the scan
    OUT/pointcloud/annotations/default.json               "Datumaro 3D" JSON: cuboid_3d per
                                                          3D pre-label (position, rotation,
                                                          scale; score attribute)

Zip ``OUT/pointcloud/{pointcloud,related_images}`` as the data of a CVAT 3D task (CVAT's
layout for point clouds with context images) and import ``annotations/default.json`` with
the "Datumaro 3D 1.0" format; zip ``images/`` for the image task and import
``annotations.xml`` as "CVAT 1.1". PCD is binary by default (``ascii`` on request).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from agent.types import StreamKind

from .common import (NS, ExportOptions, Frame, Progress, SessionView, image_bytes, image_size,
                     slug, write_json)

PCD_FIELDS = ("x", "y", "z", "intensity")


def write_pcd(path: Path, pts: np.ndarray, ascii: bool = False) -> int:
    """Write ``x y z intensity`` of a point array (any structured array with those
    fields, or N×4 floats) as PCD v0.7; returns the point count. Non-finite points are
    dropped."""
    if pts.dtype.names:
        xyzi = np.stack([np.asarray(pts[f], np.float32) for f in PCD_FIELDS], axis=1)
    else:
        xyzi = np.asarray(pts, np.float32).reshape(-1, 4)
    xyzi = xyzi[np.isfinite(xyzi).all(axis=1)]
    n = len(xyzi)
    head = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
            f"FIELDS {' '.join(PCD_FIELDS)}\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
            f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
            f"DATA {'ascii' if ascii else 'binary'}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head.encode("ascii"))
        if ascii:
            np.savetxt(f, xyzi, fmt="%.6g")
        else:
            f.write(np.ascontiguousarray(xyzi, "<f4").tobytes())
    return n


def read_pcd(path: Path) -> np.ndarray:
    """A PCD written by :func:`write_pcd` back to an N×4 float32 array (tests)."""
    raw = Path(path).read_bytes()
    end = raw.index(b"\nDATA ") + 1
    line_end = raw.index(b"\n", end)
    header = raw[:end].decode("ascii")
    kind = raw[end:line_end].split()[1].decode()
    n = int(next(ln.split()[1] for ln in header.splitlines() if ln.startswith("POINTS")))
    body = raw[line_end + 1:]
    if kind == "binary":
        return np.frombuffer(body, "<f4", count=n * 4).reshape(n, 4)
    return np.loadtxt(body.decode().splitlines(), dtype=np.float32, ndmin=2).reshape(n, 4)


def export_cvat(uri: str, opts: ExportOptions, pcd_ascii: bool = False) -> dict[str, Any]:
    """Write the CVAT export of a session into ``opts.out_dir``; returns a summary."""
    view = SessionView(uri, opts)
    out = Path(opts.out_dir)
    images: list[dict[str, Any]] = []
    classes_2d: set[str] = set()
    classes_3d: set[str] = set()
    items3d: list[dict[str, Any]] = []
    # recent camera frames per stream (for related images) and scans waiting for a later
    # camera frame that may be nearer in time
    recent: dict[str, deque[tuple[int, bytes, str, tuple[int, int]]]] = {}
    waiting: deque[tuple[Frame, dict[str, Any]]] = deque()
    cam_period: dict[str, int] = {n: int(NS / i.rate_hz) if i.rate_hz else 100_000_000
                                  for n, i in view.infos.items() if i.kind == StreamKind.CAMERA
                                  and n in view.sensor_streams}
    bar = Progress(view.expected_records(), "CVAT export", opts.progress)
    try:
        for ev in view.events(bar.advance):
            if not isinstance(ev, Frame):
                continue
            if ev.info.kind == StreamKind.CAMERA:
                got = image_bytes(ev)
                if got is None:
                    view.counts["decode_errors"] += 1
                    continue
                data, ext = got
                size = image_size(data, ev.info.encoding) or (0, 0)
                rel = f"images/{slug(ev.stream)}/{ev.t_ns}{ext}"
                p = out / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                images.append(_image_entry(len(images), rel, size, ev, classes_2d))
                recent.setdefault(ev.stream, deque(maxlen=8)).append((ev.t_ns, data, ext, size))
                _settle(waiting, recent, cam_period, out, ev.t_ns)
            elif ev.info.kind == StreamKind.LIDAR and isinstance(ev.sample.payload, np.ndarray):
                item = _scan(ev, out, pcd_ascii, classes_3d)
                items3d.append(item)
                waiting.append((ev, item))
                _settle(waiting, recent, cam_period, out, ev.t_ns)
        _settle(waiting, recent, cam_period, out, None)
    finally:
        bar.close()
    labels2d = sorted(classes_2d)
    _write_xml(out / "annotations.xml", images, labels2d, view.metadata()["session_id"])
    labels3d = sorted(classes_3d)
    lid = {n: i for i, n in enumerate(labels3d)}
    for it in items3d:
        for a in it["annotations"]:
            a["label_id"] = lid[a.pop("cls")]
    if items3d:
        write_json(out / "pointcloud" / "annotations" / "default.json", {
            "info": {"edgecap": view.metadata()},
            "categories": {"label": {"labels": [{"name": n, "parent": "", "attributes":
                                                  ["score", "model"]} for n in labels3d],
                                     "attributes": ["occluded"]},
                           "points": {"items": []}},
            "items": items3d})
    return {"format": "cvat", "out": str(out), "images": len(images),
            "boxes": sum(len(i["boxes"]) for i in images), "pointclouds": len(items3d),
            "cuboids": sum(len(i["annotations"]) for i in items3d),
            "related_images": sum(len(i.get("related_images", [])) for i in items3d),
            **view.counts}


def _image_entry(idx: int, rel: str, size: tuple[int, int], fr: Frame,
                 classes: set[str]) -> dict[str, Any]:
    boxes = []
    for ls in fr.labels:
        for d in ls.detections:
            if not d.get("box"):
                continue
            classes.add(d["cls"])
            x0, y0, x1, y1 = (float(v) for v in d["box"])
            boxes.append({"label": d["cls"], "xtl": x0, "ytl": y0, "xbr": x1, "ybr": y1,
                          "score": float(d["score"]), "model": ls.model_version})
    return {"id": idx, "name": rel, "width": size[0], "height": size[1], "boxes": boxes}


def _scan(fr: Frame, out: Path, ascii: bool, classes: set[str]) -> dict[str, Any]:
    name = f"{slug(fr.stream)}_{fr.t_ns}"
    write_pcd(out / "pointcloud" / "pointcloud" / f"{name}.pcd", fr.sample.payload, ascii)
    anns = []
    for ls in fr.labels:
        for d in ls.detections:
            b = d.get("bbox3d")
            if not b:
                continue
            classes.add(d["cls"])
            anns.append({"id": len(anns), "type": "cuboid_3d", "group": 0, "cls": d["cls"],
                         "position": [round(float(v), 4) for v in b["center"]],
                         "rotation": [0.0, 0.0, round(float(b.get("yaw", 0.0)), 6)],
                         "scale": [round(float(v), 4) for v in b["size"]],
                         "attributes": {"occluded": False,
                                        "score": round(float(d["score"]), 4),
                                        "model": ls.model_version}})
    return {"id": name, "annotations": anns,
            "attr": {"frame": 0, "stream": fr.stream, "t_ns": fr.t_ns, "seq": fr.sample.seq},
            "point_cloud": {"path": f"{name}.pcd"}}


def _settle(waiting: deque[tuple[Frame, dict[str, Any]]],
            recent: dict[str, deque[tuple[int, bytes, str, tuple[int, int]]]],
            period: dict[str, int], out: Path, now_ns: int | None) -> None:
    """Give each waiting scan the nearest frame of every camera once no nearer frame can
    come (time moved half a camera period past the scan, or the end)."""
    horizon = max(period.values(), default=0)
    while waiting and (now_ns is None or now_ns - waiting[0][0].t_ns > horizon):
        fr, item = waiting.popleft()
        related = []
        for cam, frames in sorted(recent.items()):
            best = min(frames, key=lambda f: abs(f[0] - fr.t_ns), default=None)
            if best is None or abs(best[0] - fr.t_ns) > period.get(cam, horizon):
                continue
            t, data, ext, size = best
            rel = f"related_images/{item['id']}_pcd/{slug(cam)}{ext}"
            p = out / "pointcloud" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            related.append({"path": rel, "size": [size[1], size[0]], "stream": cam, "t_ns": t})
        if related:
            item["related_images"] = related


def _write_xml(path: Path, images: list[dict[str, Any]], labels: list[str], name: str) -> None:
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    ET.SubElement(task, "name").text = name
    ET.SubElement(task, "size").text = str(len(images))
    ET.SubElement(task, "mode").text = "annotation"
    lab_el = ET.SubElement(task, "labels")
    for lab in labels:
        le = ET.SubElement(lab_el, "label")
        ET.SubElement(le, "name").text = lab
        ET.SubElement(le, "type").text = "rectangle"
        attrs = ET.SubElement(le, "attributes")
        a = ET.SubElement(attrs, "attribute")
        ET.SubElement(a, "name").text = "score"
        ET.SubElement(a, "mutable").text = "False"
        ET.SubElement(a, "input_type").text = "number"
        ET.SubElement(a, "default_value").text = "0"
        ET.SubElement(a, "values").text = "0;1;0.0001"
        a = ET.SubElement(attrs, "attribute")
        ET.SubElement(a, "name").text = "model"
        ET.SubElement(a, "mutable").text = "False"
        ET.SubElement(a, "input_type").text = "text"
        ET.SubElement(a, "default_value").text = ""
        ET.SubElement(a, "values").text = ""
    for img in images:
        ie = ET.SubElement(root, "image", {"id": str(img["id"]), "name": img["name"],
                                           "width": str(img["width"]),
                                           "height": str(img["height"])})
        for b in img["boxes"]:
            be = ET.SubElement(ie, "box", {
                "label": b["label"], "source": "auto", "occluded": "0",
                "xtl": f"{b['xtl']:.2f}", "ytl": f"{b['ytl']:.2f}",
                "xbr": f"{b['xbr']:.2f}", "ybr": f"{b['ybr']:.2f}", "z_order": "0"})
            ET.SubElement(be, "attribute", {"name": "score"}).text = f"{b['score']:.4f}"
            ET.SubElement(be, "attribute", {"name": "model"}).text = b["model"]
    ET.indent(root, space="  ")
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def parse_cvat_xml(path: Path) -> dict[str, Any]:
    """Read an ``annotations.xml`` back: ``{labels, images: [{name, width, height,
    boxes: [{label, xtl, ytl, xbr, ybr, attributes}]}]}`` (tests, round trips)."""
    root = ET.parse(path).getroot()
    if root.tag != "annotations" or root.findtext("version") != "1.1":
        raise ValueError(f"{path}: not CVAT for images 1.1")
    labels = [le.findtext("name") for le in root.iter("label")]
    images = []
    for ie in root.iter("image"):
        boxes = [{"label": b.get("label"), "source": b.get("source"),
                  **{k: float(b.get(k)) for k in ("xtl", "ytl", "xbr", "ybr")},
                  "attributes": {a.get("name"): a.text for a in b.iter("attribute")}}
                 for b in ie.iter("box")]
        images.append({"id": int(ie.get("id")), "name": ie.get("name"),
                       "width": int(ie.get("width")), "height": int(ie.get("height")),
                       "boxes": boxes})
    return {"labels": labels, "images": images}


def yaw_of(rotation: list[float]) -> float:
    """The yaw (rad) of a Datumaro ``rotation`` [rx, ry, rz] written here."""
    return float(rotation[2]) % (2 * math.pi)
