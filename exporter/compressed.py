"""One-module bundles for `quorum compress`: an MLP bundle's modules read back as weights, and the
merged network written as a bundle of one module (the same manifest, with `compression` set).

    bundle_mlp_layers(bundle, manifest, j)  ->  [(W (out, in), b (out,)), ...] of module j
    write_compressed_bundle(out, module, ...)  ->  out/manifest.json, out/modules/m000.onnx
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from quorum.exporter.errors import ExportError
from quorum.exporter.graphs import INPUT_NAME, OUTPUT_NAME, cpu_session, serialize, staged_bundle
from quorum.exporter.onnx_graphs import export_graph
from quorum.runtime.manifest import (
    PARITY_ATOL,
    PARITY_RTOL,
    CompressionInfo,
    EnsembleMetrics,
    InputSpec,
    Manifest,
    ModuleEntry,
    OutputSpec,
    TaskSpec,
    TrainingInfo,
)

__all__ = ["COMPRESSED_ORDER", "bundle_mlp_layers", "write_compressed_bundle"]

COMPRESSED_ORDER = "one module: the source ensemble compressed (see `compression`)"


def bundle_mlp_layers(bundle_dir: Path, manifest: Manifest, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Module j's dense layers from its graph ([Flatten] Gemm (Relu Gemm)*), checksum verified."""
    entry = manifest.modules[j]
    data = (Path(bundle_dir) / entry.file).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ExportError(f"{entry.file} fails its checksum; re-export the bundle")
    graph = onnx.load_from_string(data).graph
    nodes = [n for n in graph.node if n.op_type not in ("Flatten", "Identity")]
    ops = [n.op_type for n in nodes]
    if not ops or ops != ["Gemm", "Relu"] * (len(ops) // 2) + ["Gemm"]:
        raise ExportError(f"module {j} is not an MLP (ops {ops}): compress knows --arch mlp bundles only")
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers = []
    for gemm in nodes[::2]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ExportError(f"module {j}: unexpected Gemm attributes {attrs}")
        w = inits[gemm.input[1]]
        layers.append((w if attrs.get("transB", 0) else w.T, inits[gemm.input[2]]))  # W (out, in), b (out,)
    return layers


def write_compressed_bundle(
    out_dir: Path,
    module: nn.Module,
    *,
    task: TaskSpec,
    input: InputSpec,
    output: OutputSpec,
    training: TrainingInfo,
    compression: CompressionInfo,
    metrics: EnsembleMetrics,
    x_parity: torch.Tensor,
    overwrite: bool = False,
) -> Manifest:
    """Write `module` (an eval-mode network (N, *input.shape) -> (N, K)) as a one-module bundle,
    checked against torch on `x_parity`; the bundle appears whole or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} exists; pass --overwrite to replace it, or choose another --out")
    data, digest = serialize(export_graph(module, x_parity[:2]))
    got = cpu_session(data).run([OUTPUT_NAME], {INPUT_NAME: x_parity.numpy()})[0]
    with torch.no_grad():
        expected = module(x_parity).numpy()
    diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    if not diff <= PARITY_ATOL + PARITY_RTOL * float(np.abs(expected).max()):
        raise ExportError(f"compressed module: ONNX Runtime and torch differ by {diff:.2e}")
    params = sum(p.numel() for p in module.parameters())
    flops = 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    manifest = Manifest(
        name=out_dir.name,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        task=task,
        input=input,
        output=output,
        training=training.model_copy(update={"num_modules": 1}),
        modules=[
            ModuleEntry(
                id=0,
                file="modules/m000.onnx",
                sha256=digest,
                params=params,
                flops=flops,
                val_error=metrics.val_error,
                parity=diff,
            )
        ],
        anytime_order=[0],
        anytime_criterion=COMPRESSED_ORDER,
        metrics=metrics,
        compression=compression,
    )
    with staged_bundle(out_dir) as tmp:
        (tmp / "modules").mkdir()
        (tmp / "modules" / "m000.onnx").write_bytes(data)
        manifest.dump(tmp)
    return manifest
