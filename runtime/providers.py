"""Choosing ONNX Runtime execution providers from what actually loads, quietly.

onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, and asking for
it there logs an error before falling back. We only ask when an NVIDIA driver is present,
and only keep CUDA if the first session really got it.
"""

from __future__ import annotations

import functools
import logging
import os

import onnxruntime as ort

from quorum.runtime.errors import BundleError

__all__ = ["requested_providers", "session_options"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@functools.cache
def _cuda_possible() -> bool:
    """True when the CUDA EP is built in and an NVIDIA driver is present; loads CUDA's libraries."""
    if CUDA not in ort.get_available_providers():
        return False
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        return False
    try:  # CUDA 13 / cuDNN 9 from the nvidia-* wheels that torch brings, without importing torch
        ort.preload_dlls()
    except Exception as e:  # pragma: no cover - depends on the machine
        log.info("CUDA libraries did not preload (%s); using the CPU", e)
        return False
    return True


def requested_providers(device: str) -> list[str]:
    """Providers to ask for: `auto` prefers CUDA where it can load, `cuda` insists on it."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return [CPU]
    if _cuda_possible():
        return [CUDA, CPU]
    if device == "cuda":
        raise BundleError("device=cuda asked for, but ONNX Runtime's CUDA provider cannot load here; use cpu or auto")
    return [CPU]


def session_options(*, fold_dequantize: bool = False) -> ort.SessionOptions:
    """Options for one small module session: no thread pool of its own, quiet logs.

    With one intra-op thread ONNX Runtime runs the graph on the calling thread, so many
    module sessions never oversubscribe the cores; concurrency comes from the caller.
    `fold_dequantize`: for graphs of int8 weights and float activations, dequantize the weights
    once at load (float in memory, int8 on disk) rather than at every run, which also lets
    ONNX Runtime lay out convolution weights for its fast kernels.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    # Prepacked constant weights take another summation order than weights computed in the
    # graph (the packed graph gathers them), which made the two executors differ by ~1e-6 of
    # the logit scale. Unpacked, a module gives bit-identical logits on both paths; the speed
    # of these small GEMMs is the same either way.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    if fold_dequantize:  # constant folding keeps DequantizeLinear for int8 kernels unless QDQ handling is off
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts
