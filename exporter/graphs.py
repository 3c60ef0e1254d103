"""ONNX graphs without torch: the names and opset every module graph uses, checked serialization,
and the CPU session that parity checks run on. The packed graph and `quorum pack` need only this."""

from __future__ import annotations

import hashlib

import onnx
import onnxruntime as ort

from quorum.exporter.errors import ExportError
from quorum.runtime.providers import session_options

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "cpu_session", "serialize"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18


def serialize(proto: onnx.ModelProto) -> tuple[bytes, str]:
    """Check the graph and return its bytes and their sha256."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails onnx.checker: {e}") from e
    data = proto.SerializeToString()
    return data, hashlib.sha256(data).hexdigest()


def cpu_session(data: bytes) -> ort.InferenceSession:
    """A CPU session over a serialized graph, set up as the runtime sets up its own, for parity checks."""
    return ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
