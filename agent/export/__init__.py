"""Exports of recorded sessions into labeling tools: COCO (:mod:`.coco`), Label Studio
(:mod:`.labelstudio`) and CVAT (:mod:`.cvat`), over one session view (:mod:`.common`).

    export(session_uri, "coco" | "labelstudio" | "cvat", ExportOptions(out_dir=...))
"""

from __future__ import annotations

from typing import Any, Callable

from .common import ExportError, ExportOptions

FORMATS = ("coco", "labelstudio", "cvat")


def exporter(fmt: str) -> Callable[..., dict[str, Any]]:
    """The export function of a format; raises ExportError for an unknown one."""
    if fmt == "coco":
        from .coco import export_coco

        return export_coco
    if fmt == "labelstudio":
        from .labelstudio import export_labelstudio

        return export_labelstudio
    if fmt == "cvat":
        from .cvat import export_cvat

        return export_cvat
    raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")


def export(uri: str, fmt: str, opts: ExportOptions, **kw: Any) -> dict[str, Any]:
    """Export a session (see the format modules for layouts); returns a summary dict."""
    return exporter(fmt)(uri, opts, **kw)


__all__ = ["FORMATS", "ExportError", "ExportOptions", "export", "exporter"]
