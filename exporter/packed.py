"""The packed graph: every module of a bundle in one ONNX graph that runs any subset in one call.

    packed.onnx:       input (N, D) float32, modules (b,) int64  ->  logits (N, K), *gathered weights
    packed_core.onnx:  input (N, D) float32, *gathered weights    ->  logits (N, K)

`logits` is the mean of the chosen modules' logits, exactly what the runtime combines from
per-module graphs. The graph gathers the chosen modules' weights from stacked (M, ...)
initializers and evaluates them as one wide network:

    h      = relu(x @ W1[idx].reshape(b·H, D)ᵀ + b1[idx].reshape(b·H))     one GEMM, (N, b·H)
    logits = h @ (W2ᵀ[idx].reshape(b·H, K) / b) + mean(b2[idx])             one GEMM, (N, K)

because the sum over modules of h_j @ W2_jᵀ is the product of the concatenated hidden units
with the stacked second layers. Arithmetic grows with b; the fixed cost is one runtime call.
The core is the graph's second half: fed the weights the packed graph gathered for a subset
before, it gives the same logits without gathering them again (the runtime's cache).

The weights are read from the per-module graphs themselves (after their checksums are
verified), so the packed graph holds exactly what the per-module files hold; the runtime
checks that again at load, module by module, before it trusts the packed graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quorum.exporter.errors import ExportError
from quorum.exporter.graphs import OPSET, cpu_session, int8_symmetric, serialize, to_float16
from quorum.runtime.manifest import PARITY_ATOL, PARITY_RTOL, Manifest, PackedEntry, probe_input

__all__ = [
    "CORE_FILE",
    "INDEX_NAME",
    "PACKED_FILE",
    "WEIGHTS",
    "build_packed",
    "mlp_weights",
    "module_protos",
    "pack_bundle",
    "packed_parity",
    "write_packed",
]

PACKED_FILE = "packed.onnx"
CORE_FILE = "packed_core.onnx"
INDEX_NAME = "modules"
WEIGHTS = ["W1_rows", "B1_rows", "W2_mean", "mean_b2"]  # the core's inputs after the data


def mlp_weights(proto: onnx.ModelProto, input_name: str, output_name: str) -> tuple[np.ndarray, ...]:
    """(W1 (H, D), b1 (H,), W2 (K, H), b2 (K,)) of a per-module `[Flatten] Gemm Relu Gemm` graph."""
    nodes = [n for n in proto.graph.node if n.op_type != "Flatten"]
    ops = [n.op_type for n in proto.graph.node]
    if [n.op_type for n in nodes] != ["Gemm", "Relu", "Gemm"] or ops[: len(ops) - 3] not in ([], ["Flatten"]):
        raise ExportError(f"no packed graph for modules of ops {ops}: packing knows the mlp architecture only")
    for gemm in (nodes[0], nodes[2]):
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        plain = attrs.get("transB") == 1 and attrs.get("transA", 0) == 0 and len(gemm.input) == 3
        if not plain or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ExportError(f"unexpected Gemm attributes {attrs} (inputs {list(gemm.input)}) in the module graph")
    if nodes[2].output[0] != output_name or not proto.graph.input or proto.graph.input[0].name != input_name:
        raise ExportError(f"module graph does not map {input_name!r} to {output_name!r}")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    try:
        return tuple(inits[name] for name in (*nodes[0].input[1:], *nodes[2].input[1:]))
    except KeyError as e:
        raise ExportError(f"module graph's Gemm reads {e}, which is not an initializer") from None


def build_packed(
    protos: Sequence[onnx.ModelProto], input_name: str, output_name: str, *, int8_weights: bool = False
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The packed graph of the modules `protos` (module j = protos[j]), and its core.

    The packed graph gathers the indexed modules' weights (also returned as outputs) and
    computes their mean logits; the core graph computes the same from weights given as inputs,
    node for node, so a runtime that keeps the gathered weights of a frequent subset skips the
    gather and gets bit-identical logits. With `int8_weights`, the two weight matrices are stored
    as int8 with one scale per module and output unit and dequantized after the gather: a quarter
    of the bytes, the same float arithmetic (and the same core) as int8 module graphs.
    """
    if not protos:
        raise ExportError("no modules to pack")
    weights = [mlp_weights(p, input_name, output_name) for p in protos]
    shapes = {tuple(w.shape for w in ws) for ws in weights}
    if len(shapes) != 1:
        raise ExportError(f"modules differ in shape ({len(shapes)} shapes); packing needs one architecture")
    W1, b1, W2, b2 = (np.ascontiguousarray(np.stack(ws), dtype=np.float32) for ws in zip(*weights, strict=True))
    M, H, D = W1.shape
    K = W2.shape[1]
    W2t = np.ascontiguousarray(W2.transpose(0, 2, 1))  # (M, H, K): rows of module j's layer 2, stacked
    flat = len(protos[0].graph.input[0].type.tensor_type.shape.dim) > 2  # (N, C, H, W) -> (N, D)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    gather = [
        # 1/b for the mean, b = len(idx)
        helper.make_node("Shape", [INDEX_NAME], ["b_shape"]),
        helper.make_node("Cast", ["b_shape"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Reciprocal", ["b_float"], ["inv_b"]),  # (1,)
        # the chosen modules' rows of every layer, stacked
        *_gather_rows("W1", "shape_rows_D", WEIGHTS[0], int8_weights),  # W1_rows (b·H, D)
        helper.make_node("Gather", ["B1", INDEX_NAME], ["B1_b"], axis=0),  # (b, H)
        helper.make_node("Reshape", ["B1_b", "shape_flat"], [WEIGHTS[1]]),  # B1_rows (b·H,)
        *_gather_rows("W2t", "shape_rows_K", "W2_rows", int8_weights),  # (b·H, K)
        helper.make_node("Mul", ["W2_rows", "inv_b"], [WEIGHTS[2]]),  # W2_mean (b·H, K): the 1/b of the mean
        helper.make_node("Gather", ["B2", INDEX_NAME], ["B2_b"], axis=0),  # (b, K)
        helper.make_node("ReduceMean", ["B2_b", "axis0"], [WEIGHTS[3]], keepdims=0),  # mean_b2 (K,)
    ]
    x_in = protos[0].graph.input[0]
    # (N, C, H, W) inputs are flattened to (N, D) first
    first = [helper.make_node("Flatten", [input_name], ["x2d"], axis=1)] if flat else []
    x2d = "x2d" if flat else input_name
    core = [
        *first,
        helper.make_node("Gemm", [x2d, WEIGHTS[0], WEIGHTS[1]], ["pre"], transB=1),  # (N, b·H): one GEMM
        helper.make_node("Relu", ["pre"], ["hidden"]),
        # layer 2 averaged over modules: the concatenated hidden units times the stacked rows / b
        helper.make_node("Gemm", ["hidden", WEIGHTS[2], WEIGHTS[3]], [output_name]),  # (N, K)
    ]
    weight_info = [
        helper.make_tensor_value_info(WEIGHTS[0], TensorProto.FLOAT, ["bH", D]),
        helper.make_tensor_value_info(WEIGHTS[1], TensorProto.FLOAT, ["bH"]),
        helper.make_tensor_value_info(WEIGHTS[2], TensorProto.FLOAT, ["bH", K]),
        helper.make_tensor_value_info(WEIGHTS[3], TensorProto.FLOAT, [K]),
    ]
    logits = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [_batch_dim(x_in), K])
    packed = helper.make_graph(
        gather + core,
        "quorum_packed",
        [x_in, helper.make_tensor_value_info(INDEX_NAME, TensorProto.INT64, ["b"])],
        [logits, *weight_info],  # the gathered weights too, for the runtime's cache
        [
            *(_int8_rows("W1", W1, (2,)) if int8_weights else [const("W1", W1)]),
            const("B1", b1),
            *(_int8_rows("W2t", W2t, (1,)) if int8_weights else [const("W2t", W2t)]),
            const("B2", b2),
            const("shape_rows_D", np.array([-1, D], np.int64)),
            const("shape_rows_K", np.array([-1, K], np.int64)),
            const("shape_flat", np.array([-1], np.int64)),
            const("axis0", np.array([0], np.int64)),
        ],
    )
    core_graph = helper.make_graph(core, "quorum_packed_core", [x_in, *weight_info], [logits])
    models = []
    for graph, doc in (
        (packed, f"Quorum packed graph: {M} modules of {D}-{H}-{K}; mean logits of the modules indexed"),
        (core_graph, "Quorum packed core: mean logits from gathered weights (the packed graph's second half)"),
    ):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="quorum")
        model.ir_version = protos[0].ir_version  # what the per-module graphs use, and ONNX Runtime reads
        model.doc_string = doc
        models.append(model)
    return models[0], models[1]


def _gather_rows(name: str, shape: str, out: str, int8: bool) -> list[onnx.NodeProto]:
    """Nodes that gather the indexed modules' (H, C) rows of the stacked weights `name` (M, H, C)
    into `out` (b·H, C) float; int8 weights are multiplied by their gathered scales, as the module
    graphs' DequantizeLinear does (one float product per weight: the same values)."""
    if not int8:
        return [
            helper.make_node("Gather", [name, INDEX_NAME], [f"{name}_b"], axis=0),  # (b, H, C)
            helper.make_node("Reshape", [f"{name}_b", shape], [out]),
        ]
    return [
        helper.make_node("Gather", [f"{name}_q", INDEX_NAME], [f"{name}_qb"], axis=0),  # (b, H, C) int8
        helper.make_node("Cast", [f"{name}_qb"], [f"{name}_qf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{name}_scale", INDEX_NAME], [f"{name}_sb"], axis=0),  # (b, H, 1) or (b, 1, C)
        helper.make_node("Mul", [f"{name}_qf", f"{name}_sb"], [f"{name}_b"]),  # (b, H, C)
        helper.make_node("Reshape", [f"{name}_b", shape], [out]),
    ]


def _int8_rows(name: str, w: np.ndarray, axes: tuple[int, ...]) -> list[onnx.TensorProto]:
    """The initializers `name`_q (M, H, C) int8 and `name`_scale of the stacked weights `w`, one scale
    per module and output unit as the module graphs hold them (`int8_module`): W1 (M, H, 1), W2ᵀ (M, 1, K)."""
    q, scale = int8_symmetric(w, axes)
    return [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale")]


def _batch_dim(value: onnx.ValueInfoProto) -> str | int:
    """The batch dimension of a graph input, as a name or a number."""
    dim = value.type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def pack_bundle(bundle_dir: str | Path) -> Manifest:
    """Add `packed.onnx` to a bundle exported before packed graphs existed; list it in the manifest.

    Every module file must match its checksum: the packed graph is made from them. Parity is
    measured against the module graphs on random inputs in the raw range (no dataset needed).
    """
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.load(bundle_dir)
    protos = module_protos(bundle_dir, manifest, "packing")
    x = probe_input(manifest.input, n=256)
    module_logits = np.stack(
        [cpu_session(p.SerializeToString()).run(None, {manifest.input.name: x})[0] for p in protos]
    )
    packed = write_packed(bundle_dir, protos, manifest.input.name, manifest.output.name, x, module_logits)
    manifest = manifest.model_copy(update={"packed": packed})
    manifest.dump(bundle_dir)
    return manifest


def module_protos(bundle_dir: Path, manifest: Manifest, purpose: str) -> list[onnx.ModelProto]:
    """Every module graph of a bundle, each checked against its checksum (ExportError if not)."""
    protos = []
    for entry in manifest.modules:
        data = (bundle_dir / entry.file).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ExportError(f"{entry.file} does not match its checksum; re-export the bundle before {purpose} it")
        protos.append(onnx.load_from_string(data))
    return protos


def write_packed(
    bundle_dir: Path,
    protos: Sequence[onnx.ModelProto],
    input_name: str,
    output_name: str,
    x: np.ndarray,
    module_logits: np.ndarray,
    *,
    precision: str = "fp32",
    rtol: float = PARITY_RTOL,
) -> PackedEntry:
    """Build, check and write packed.onnx and packed_core.onnx into `bundle_dir`; their manifest entry.

    Checked on x against the module graphs' logits (M, N, K): the packed graph's mean logits
    within the parity tolerance (PARITY_ATOL + rtol·max|logit|), and the core's bit-identical to
    the packed graph's. `precision`: fp32; int8 (int8 weights, float arithmetic); fp16 (float16
    inside, float32 inputs and outputs).
    """
    packed, core = build_packed(protos, input_name, output_name, int8_weights=precision == "int8")
    if precision == "fp16":
        packed, core = to_float16(packed), to_float16(core)
    packed_bytes, packed_digest = serialize(packed)
    core_bytes, core_digest = serialize(core)
    parity = packed_parity(packed_bytes, x, module_logits, rtol)
    index = np.arange(len(protos), dtype=np.int64)
    logits, *weights = cpu_session(packed_bytes).run(None, {input_name: x, INDEX_NAME: index})
    again = cpu_session(core_bytes).run(None, {input_name: x, **dict(zip(WEIGHTS, weights, strict=True))})[0]
    if not np.array_equal(logits, again):
        raise ExportError("the packed core does not reproduce the packed graph's logits")
    for name, data in ((PACKED_FILE, packed_bytes), (CORE_FILE, core_bytes)):
        tmp = bundle_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(bundle_dir / name)
    return PackedEntry(
        file=PACKED_FILE,
        sha256=packed_digest,
        index_input=INDEX_NAME,
        parity=parity,
        core_file=CORE_FILE,
        core_sha256=core_digest,
        weights=WEIGHTS,
    )


def packed_parity(packed: bytes, x: np.ndarray, module_logits: np.ndarray, rtol: float = PARITY_RTOL) -> float:
    """Max |Δ| of the packed graph's mean logits on x against the module graphs' (M, N, K), for
    the full ensemble and its two halves; ExportError beyond the parity tolerance."""
    session = cpu_session(packed)
    inputs = [i.name for i in session.get_inputs()]
    M, worst = module_logits.shape[0], 0.0
    for ids in (np.arange(M), np.arange(0, M, 2), np.arange(1, M, 2)):
        if not len(ids):
            continue
        got = session.run(None, {inputs[0]: x, inputs[1]: ids.astype(np.int64)})[0]  # logits come first
        diff = float(np.abs(got - module_logits[ids].mean(axis=0)).max()) if np.isfinite(got).all() else np.inf
        if not diff <= PARITY_ATOL + rtol * float(np.abs(module_logits[ids]).max()):
            raise ExportError(f"the packed graph's mean logits differ from the module graphs' by {diff:.2e}")
        worst = max(worst, diff)
    return worst
