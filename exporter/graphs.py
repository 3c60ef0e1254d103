"""ONNX graphs without torch: the names and opset every module graph uses, checked serialization,
and the CPU session that parity checks run on. The packed graph and `quorum pack` need only this."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from quorum.exporter.errors import ExportError
from quorum.runtime.providers import session_options

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "cpu_session",
    "int8_symmetric",
    "serialize",
    "staged_bundle",
    "to_float16",
]

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


def to_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph computed in float16, its inputs and outputs kept float32 (Cast nodes inside), so that
    the runtime feeds and reads the same arrays at every precision."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # the converter changes the graph it is given
    converted: onnx.ModelProto = convert_float_to_float16(copy, keep_io_types=True, disable_shape_infer=True)
    OnnxModel(converted).topological_sort()  # the input Casts are appended last; a graph lists producers first
    return converted


@contextmanager
def staged_bundle(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to write a bundle into; moved into place (replacing an older
    one) when the block ends, removed if it raises, so a failed write never leaves half a bundle."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # same filesystem: rename is atomic
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an older bundle only once the new one is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def int8_symmetric(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of `w` with one scale per slice: max |w| over `axes` maps to 127.
    Returns (q int8 like w, scale float32 with `axes` kept as size 1), w ≈ q · scale."""
    absmax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale
