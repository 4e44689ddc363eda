"""COCO export: camera frames as image files plus one ``annotations.json`` with the 2D
pre-labels as detection results (``score`` on every annotation).

Layout::

    OUT/images/<camera_slug>/<t_ns>.jpg       JPEG bytes exactly as recorded
    OUT/annotations.json                       COCO: info, images, annotations, categories

Every image carries ``edgecap`` extras (stream, t_ns, seq); every annotation ``score``,
``model`` (name:version@sha8) and ``label_stream``. ``bbox`` is ``[x, y, width, height]``
in pixels. Categories are the classes seen, sorted by name (ids from 1). Loads with
``pycocotools.coco.COCO``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from agent.types import StreamKind

from .common import (ExportOptions, FileWriter, Frame, Progress, SessionView, image_data,
                     json_bytes, slug)


def export_coco(uri: str, opts: ExportOptions) -> dict[str, Any]:
    """Write the COCO export of a session into ``opts.out_dir``; returns a summary."""
    view = SessionView(uri, opts, (StreamKind.CAMERA,))
    out = Path(opts.out_dir)
    out_s = str(out)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    classes: set[str] = set()
    bar = Progress(view.expected_records(), "COCO export", opts.progress)
    files = FileWriter()
    try:
        for ev in view.events(bar.advance):
            if not isinstance(ev, Frame) or ev.info.kind != StreamKind.CAMERA:
                continue
            got = image_data(ev)
            if got is None:
                view.counts["decode_errors"] += 1
                continue
            data, ext, size = got
            size = size or (0, 0)
            rel = f"images/{slug(ev.stream)}/{ev.t_ns}{ext}"
            files.write(os.path.join(out_s, rel), data)
            img_id = len(images) + 1
            images.append({"id": img_id, "file_name": rel, "width": size[0],
                           "height": size[1],
                           "edgecap": {"stream": ev.stream, "t_ns": ev.t_ns,
                                       "seq": ev.sample.seq}})
            for ls in ev.labels:
                model = ls.model_version
                for d in ls.detections:
                    box = d.get("box")
                    if not box:
                        continue
                    x0, y0, x1, y1 = map(float, box)
                    w, h = max(0.0, x1 - x0), max(0.0, y1 - y0)
                    classes.add(d["cls"])
                    anns.append({"id": len(anns) + 1, "image_id": img_id, "cls": d["cls"],
                                 "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                                 "area": round(w * h, 2), "iscrowd": 0,
                                 "score": round(float(d["score"]), 4),
                                 "model": model, "label_stream": ls.stream})
        bar.close()
        cats = {name: i + 1 for i, name in enumerate(sorted(classes))}
        for a in anns:
            a["category_id"] = cats[a.pop("cls")]
        meta = view.metadata()
        doc = {
            "info": {"description": f"edgecap session {meta['session_id']}",
                     "version": "1.0", "contributor": meta["device_id"],
                     "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "edgecap": meta},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "object"}
                           for n, i in cats.items()],
        }
        # encoded while the last images are copied; renamed once all are written
        files.write_last(out / "annotations.json", json_bytes(doc))
    finally:
        bar.close()
        files.close()
    return {"format": "coco", "out": str(out), "images": len(images),
            "annotations": len(anns), "categories": len(cats), "images_copied": files.copied,
            **view.counts}
