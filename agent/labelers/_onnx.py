"""onnxruntime sessions built the same way everywhere (labelers, benchmarks, tests).

``session(path, threads)`` runs on the CPU provider with ``threads`` intra-op threads, one
inter-op thread and thread spinning off: on a 2-core edge box a spinning pool would steal
the CPU that capture needs. The benchmark's bare loop uses this same function, so the
comparison is like for like.
"""

from __future__ import annotations

import ast
import os
from typing import Any

import onnxruntime as ort

from . import LabelerError


def session(path: str | os.PathLike[str], threads: int = 1) -> ort.InferenceSession:
    """Open an ONNX model; raises LabelerError naming the file when it cannot be loaded."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise LabelerError(f"model file not found: {p}")
    try:
        return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise LabelerError(f"cannot load model {p}: {e}") from None


def metadata(sess: ort.InferenceSession) -> dict[str, str]:
    """The model's ``metadata_props`` (Ultralytics stores ``names``, ``imgsz``, ``version``)."""
    return dict(sess.get_modelmeta().custom_metadata_map)


def parse_names(value: Any) -> list[str]:
    """Class names from a metadata string or config value: ``"{0: 'car', 1: 'person'}"``
    (Ultralytics), a JSON/Python list, a dict or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise LabelerError(f"cannot read class names from {value!r}")
