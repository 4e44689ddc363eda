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
                                                          (a hard link to its file in
                                                          images/: written once; a copy
                                                          where links are not possible)
    OUT/pointcloud/annotations/default.json               "Datumaro 3D" JSON: cuboid_3d per
                                                          3D pre-label (position, rotation,
                                                          scale; score attribute)

Zip ``OUT/pointcloud/{pointcloud,related_images}`` as the data of a CVAT 3D task (CVAT's
layout for point clouds with context images) and import ``annotations/default.json`` with
the "Datumaro 3D 1.0" format; zip ``images/`` for the image task and import
``annotations.xml`` as "CVAT 1.1". PCD is binary by default (``ascii`` on request).
"""

from __future__ import annotations

import functools
import math
import os
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from agent.types import StreamKind

from .common import (NS, ExportOptions, FileWriter, Frame, Progress, SessionView, image_data,
                     json_bytes, slug)

PCD_FIELDS = ("x", "y", "z", "intensity")


def _xyzi(pts: np.ndarray) -> np.ndarray:
    """N×4 float32 ``x y z intensity`` without non-finite rows."""
    from agent.schemas import POINT_DTYPE

    if pts.dtype == POINT_DTYPE:  # x y z intensity are the first 4 of 6 words: one copy
        xyzi = np.ascontiguousarray(pts.view(np.float32).reshape(-1, 6)[:, :4])
    elif pts.dtype.names:
        xyzi = np.empty((len(pts), 4), np.float32)
        for k, f in enumerate(PCD_FIELDS):
            xyzi[:, k] = pts[f]
    else:
        xyzi = np.asarray(pts, np.float32).reshape(-1, 4)
    if not np.isfinite(xyzi).all():
        xyzi = xyzi[np.isfinite(xyzi).all(axis=1)]
    return xyzi


def _pcd_header(n: int, ascii: bool) -> bytes:
    return ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
            f"FIELDS {' '.join(PCD_FIELDS)}\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
            f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
            f"DATA {'ascii' if ascii else 'binary'}\n").encode("ascii")


def pcd_bytes(pts: np.ndarray) -> bytes | memoryview:
    """A binary PCD v0.7 (``x y z intensity`` float32) of a point array (see
    :func:`write_pcd`)."""
    from agent.schemas import POINT_DTYPE

    if pts.dtype == POINT_DTYPE:  # gathered straight into the file's buffer: one copy
        head = _pcd_header(len(pts), False)
        # not zeroed first (every byte is written), and numpy fills it without the GIL
        # (a bytearray's zeroing held it: ~1/3 of the exporting thread's time while a
        # writer thread made PCDs)
        buf = np.empty(len(head) + 16 * len(pts), np.uint8)
        buf[:len(head)] = np.frombuffer(head, np.uint8)
        body = np.frombuffer(buf, "<f4", offset=len(head)).reshape(-1, 4)
        body[:] = pts.view(np.float32).reshape(-1, 6)[:, :4]
        if np.isfinite(body).all():
            return memoryview(buf)
    xyzi = _xyzi(pts)
    return _pcd_header(len(xyzi), False) + np.ascontiguousarray(xyzi, "<f4").tobytes()


def write_pcd(path: Path, pts: np.ndarray, ascii: bool = False) -> int:
    """Write ``x y z intensity`` of a point array (any structured array with those
    fields, or N×4 floats) as PCD v0.7; returns the point count. Non-finite points are
    dropped."""
    xyzi = _xyzi(pts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(_pcd_header(len(xyzi), ascii))
        if ascii:
            np.savetxt(f, xyzi, fmt="%.6g")
        else:
            f.write(np.ascontiguousarray(xyzi, "<f4").tobytes())
    return len(xyzi)


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
    view = SessionView(uri, opts, (StreamKind.CAMERA, StreamKind.LIDAR))
    out = Path(opts.out_dir)
    out_s = str(out)
    images = _XmlImages()
    classes_2d: set[str] = set()
    classes_3d: set[str] = set()
    items3d: list[dict[str, Any]] = []
    # recent camera frames per stream (time, exported file, extension, size; for related
    # images) and scans waiting for a later camera frame that may be nearer in time
    recent: dict[str, deque[tuple[int, str, str, tuple[int, int]]]] = {}
    waiting: deque[tuple[Frame, dict[str, Any]]] = deque()
    cam_period: dict[str, int] = {n: int(NS / i.rate_hz) if i.rate_hz else 100_000_000
                                  for n, i in view.infos.items() if i.kind == StreamKind.CAMERA
                                  and n in view.sensor_streams}
    bar = Progress(view.expected_records(), "CVAT export", opts.progress)
    files = FileWriter()
    try:
        for ev in view.events(bar.advance):
            if not isinstance(ev, Frame):
                continue
            if ev.info.kind == StreamKind.CAMERA:
                got = image_data(ev)
                if got is None:
                    view.counts["decode_errors"] += 1
                    continue
                data, ext, size = got
                size = size or (0, 0)
                rel = f"images/{slug(ev.stream)}/{ev.t_ns}{ext}"
                files.write(os.path.join(out_s, rel), data)
                images.add(rel, size, ev, classes_2d)
                recent.setdefault(ev.stream, deque(maxlen=8)).append((ev.t_ns, rel, ext, size))
                _settle(waiting, recent, cam_period, out_s, ev.t_ns, files)
            elif ev.info.kind == StreamKind.LIDAR and isinstance(ev.sample.payload, np.ndarray):
                item = _scan(ev, out_s, pcd_ascii, classes_3d, files)
                items3d.append(item)
                waiting.append((ev, item))
                _settle(waiting, recent, cam_period, out_s, ev.t_ns, files)
        _settle(waiting, recent, cam_period, out_s, None, files)
        bar.close()
        # encoded while the last files are written; renamed once all are
        files.write_last(out / "annotations.xml", _xml_text(
            images, sorted(classes_2d), view.metadata()["session_id"]).encode())
        labels3d = sorted(classes_3d)
        lid = {n: i for i, n in enumerate(labels3d)}
        for it in items3d:
            for a in it["annotations"]:
                a["label_id"] = lid[a.pop("cls")]
        if items3d:
            files.write_last(out / "pointcloud" / "annotations" / "default.json", json_bytes({
                "info": {"edgecap": view.metadata()},
                "categories": {"label": {"labels": [{"name": n, "parent": "", "attributes":
                                                      ["score", "model"]} for n in labels3d],
                                         "attributes": ["occluded"]},
                               "points": {"items": []}},
                "items": items3d}))
    finally:
        bar.close()
        files.close()
    return {"format": "cvat", "out": str(out), "images": len(images.parts),
            "boxes": images.boxes, "pointclouds": len(items3d),
            "cuboids": sum(len(i["annotations"]) for i in items3d),
            "related_images": sum(len(i.get("related_images", [])) for i in items3d),
            "images_copied": files.copied, **view.counts}


class _XmlImages:
    """The ``<image>`` elements of the CVAT XML, made as frames come (one pass over the
    boxes; labels and models, a handful of strings, are escaped once)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.boxes = 0
        self._quoted: dict[str, str] = {}
        self._escaped: dict[str, str] = {}

    def add(self, rel: str, size: tuple[int, int], fr: Frame, classes: set[str]) -> None:
        head = (f"  <image id=\"{len(self.parts)}\" name={quoteattr(rel)} "
                f"width=\"{size[0]}\" height=\"{size[1]}\"")
        lines = [head + ">"]
        for ls in fr.labels:
            model = self._escaped.get(ls.model_version)
            if model is None:
                model = self._escaped[ls.model_version] = escape(ls.model_version)
            for d in ls.detections:
                box = d.get("box")
                if not box:
                    continue
                cls = d["cls"]
                classes.add(cls)
                lab = self._quoted.get(cls)
                if lab is None:
                    lab = self._quoted[cls] = quoteattr(cls)
                x0, y0, x1, y1 = map(float, box)
                lines.append(f"    <box label={lab} source=\"auto\" occluded=\"0\" "
                             f"xtl=\"{x0:.2f}\" ytl=\"{y0:.2f}\" xbr=\"{x1:.2f}\" "
                             f"ybr=\"{y1:.2f}\" z_order=\"0\">\n"
                             f"      <attribute name=\"score\">{float(d['score']):.4f}"
                             "</attribute>\n"
                             f"      <attribute name=\"model\">{model}</attribute>\n"
                             "    </box>")
        if len(lines) == 1:
            self.parts.append(head + " />")
            return
        self.boxes += len(lines) - 1
        lines.append("  </image>")
        self.parts.append("\n".join(lines))


def _scan(fr: Frame, out: str, ascii: bool, classes: set[str],
          files: FileWriter) -> dict[str, Any]:
    name = f"{slug(fr.stream)}_{fr.t_ns}"
    path = os.path.join(out, "pointcloud", "pointcloud", f"{name}.pcd")
    if ascii:
        write_pcd(Path(path), fr.sample.payload, ascii=True)
    else:  # gathered on a writer thread
        files.write(path, functools.partial(pcd_bytes, fr.sample.payload))
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
            recent: dict[str, deque[tuple[int, str, str, tuple[int, int]]]],
            period: dict[str, int], out: str, now_ns: int | None, files: FileWriter) -> None:
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
            t, image_rel, ext, size = best
            rel = f"related_images/{item['id']}_pcd/{slug(cam)}{ext}"
            # the path the image was queued under: linked once it is written
            files.link(os.path.join(out, image_rel), os.path.join(out, "pointcloud", rel))
            related.append({"path": rel, "size": [size[1], size[0]], "stream": cam, "t_ns": t})
        if related:
            item["related_images"] = related


def _xml_text(images: _XmlImages, labels: list[str], name: str) -> str:
    """CVAT for images 1.1 XML (built as text: ElementTree costs ~5× more)."""
    out = ["<?xml version='1.0' encoding='utf-8'?>", "<annotations>",
           "  <version>1.1</version>", "  <meta>", "    <task>",
           f"      <name>{escape(name)}</name>", f"      <size>{len(images.parts)}</size>",
           "      <mode>annotation</mode>", "      <labels>"]
    for lab in labels:
        out += ["        <label>", f"          <name>{escape(lab)}</name>",
                "          <type>rectangle</type>", "          <attributes>",
                "            <attribute>", "              <name>score</name>",
                "              <mutable>False</mutable>",
                "              <input_type>number</input_type>",
                "              <default_value>0</default_value>",
                "              <values>0;1;0.0001</values>", "            </attribute>",
                "            <attribute>", "              <name>model</name>",
                "              <mutable>False</mutable>",
                "              <input_type>text</input_type>",
                "              <default_value />", "              <values />",
                "            </attribute>", "          </attributes>", "        </label>"]
    out += ["      </labels>", "    </task>", "  </meta>"]
    out += images.parts
    out.append("</annotations>")
    return "\n".join(out) + "\n"


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
