"""In-process inference: packed vs isolated vs a naive loop vs the hand-fused floor, side by side.

    python bench/inference.py --bundle bundles/demo

For each batch size and budget b (the first b modules of the anytime order), times:

  floor     one ONNX graph holding exactly those b modules, weights as constants (built here)
  packed    the bundle's packed.onnx: all M modules, the b chosen by an index input
  cached    the same, for a subset asked for before: its gathered weights fed to packed_core.onnx
  isolated  one session per module, run by the runtime's worker pool under a deadline
  naive     one session per module, called one after another on this thread

on already-normalized inputs (graph execution and combining only), then the engine's full
`predict` (validation, normalization, planning, execution, the task's head, counters) for
packed and isolated. Variants are interleaved round by round, and each figure is the median
over rounds.

Then the request path alone, the two interleaved without the other variants (whose thread
pools and sessions would crowd the caches of both):

  hand      what a user would write by hand: numpy normalization, the floor graph, numpy softmax
            (at the bundle's temperature for b modules, where it has one)
  plain     the engine's `predict` on the packed executor without the modules' disagreement
            (`disagreement=False`): the price of the engine's checks, planning, fault handling
            and counters
  predict   the same with it (the default): the difference is what mutual information and vote
            share cost

Then what budget=auto's exit signal adds: the members' sums of a stage with and without their
products s s^T (`MemberSums.of(..., squares=True)`, which only budget=auto asks for), beside
`predict` of that many modules.

Last, the packed graph at batch 64 with 1 and 2 intra-op threads, with and without spinning.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from quorum.core.datasets import load_raw, resolve_data_dir
from quorum.exporter.graphs import OPSET
from quorum.exporter.packed import mlp_weights
from quorum.runtime.confidence import MemberSums
from quorum.runtime.engine import Engine
from quorum.runtime.providers import session_options

CPU = ["CPUExecutionProvider"]


def fused_graph(protos: list[onnx.ModelProto], input_name: str, output_name: str) -> bytes:
    """The floor: exactly these modules as one graph of two GEMMs, weights as constants."""
    W1, b1, W2, b2 = (
        np.stack(ws) for ws in zip(*(mlp_weights(p, input_name, output_name) for p in protos), strict=True)
    )
    b, H, D = W1.shape
    inits = [
        numpy_helper.from_array(W1.reshape(b * H, D), "W1"),
        numpy_helper.from_array(b1.reshape(b * H), "B1"),
        numpy_helper.from_array((W2.transpose(0, 2, 1).reshape(b * H, -1) / np.float32(b)).astype(np.float32), "W2"),
        numpy_helper.from_array(b2.mean(axis=0).astype(np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("Gemm", [input_name, "W1", "B1"], ["pre"], transB=1),
        helper.make_node("Relu", ["pre"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "W2", "B2"], [output_name]),
    ]
    x_in = protos[0].graph.input[0]
    graph = helper.make_graph(nodes, "fused", [x_in], [protos[0].graph.output[0]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = protos[0].ir_version
    return model.SerializeToString()


def median_us(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of the mean time per call, variants interleaved within each round."""
    for fn in fns.values():
        fn()  # warm up: first-run allocations
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/demo", help="an exported bundle with packed.onnx")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    p.add_argument("--target-ms", type=float, default=40.0, help="time per variant per round")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    engines = {name: Engine.load(args.bundle, device="cpu", executor=name) for name in ("packed", "isolated")}
    packed_engine, isolated_engine = engines["packed"], engines["isolated"]
    # the same without the modules' disagreement in its answers: what the uncertainty costs
    plain_engine = Engine.load(args.bundle, device="cpu", executor="packed", disagreement=False)
    m = packed_engine.manifest
    order = m.anytime_order
    sessions = {
        j: ort.InferenceSession(str(Path(args.bundle) / e.file), session_options(), providers=CPU)
        for j, e in enumerate(m.modules)
    }
    protos = [onnx.load(Path(args.bundle) / e.file) for e in m.modules]
    name_in, name_out = m.input.name, m.output.name
    packed = packed_engine.bundle.packed
    assert packed is not None, f"{args.bundle} has no packed graph that verifies: {packed_engine.packed_note}"
    # the manifest's normalization, as a user would write it: x = (raw * scale - mean) / std
    scale, mean, std = np.float32(m.input.scale), np.float32(m.input.mean[0]), np.float32(m.input.std[0])
    images = load_raw(resolve_data_dir())["test"][0]
    budgets = [b for b in args.budgets if b <= len(order)]

    print(
        f"bundle {args.bundle}: {len(order)} modules; {platform.processor() or platform.machine()}, "
        f"onnxruntime {ort.__version__}; median of {args.rounds} interleaved rounds (µs per call)\n"
    )
    rows = []
    header = (
        f"{'batch':>5} {'budget':>6} {'floor':>7} {'packed':>7} {'cached':>7} {'isolated':>8} {'naive':>8}  "
        f"{'packed/floor':>12} {'cached/floor':>12} {'naive/packed':>12} {'naive/cached':>12}  "
        f"{'predict packed':>14} {'predict isolated':>16}"
    )
    print(header)
    for n in args.batches:
        raw = images[:n]
        x = packed_engine.preprocess(raw)
        for b in budgets:
            ids = order[:b]
            index = np.array(ids, dtype=np.int64)
            fused = ort.InferenceSession(
                fused_graph([protos[j] for j in ids], name_in, name_out), session_options(), providers=CPU
            )

            def naive(ids=ids, x=x) -> np.ndarray:
                return np.mean([sessions[j].run([name_out], {name_in: x})[0] for j in ids], axis=0)

            def isolated(ids=ids, x=x) -> np.ndarray:
                return np.mean([r.logits for r in isolated_engine.bundle.isolated.run(ids, x)], axis=0)

            fns: dict[str, Callable[[], object]] = {
                "floor": lambda fused=fused, x=x: fused.run([name_out], {name_in: x}),
                "packed": lambda index=index, x=x: packed.run(index, x),
                "cached": lambda index=index, x=x: packed.run(index, x, cacheable=True),
                "isolated": isolated,
                "naive": naive,
                "predict_packed": lambda b=b, raw=raw: packed_engine.predict(raw, budget=b),
                "predict_isolated": lambda b=b, raw=raw: isolated_engine.predict(raw, budget=b),
            }
            once = time.perf_counter()
            naive()
            calls = max(3, int(args.target_ms / 1e3 / max(time.perf_counter() - once, 1e-6) / 4))
            t = median_us(fns, args.rounds, calls)
            np.testing.assert_allclose(fused.run([name_out], {name_in: x})[0], naive(), atol=1e-4, rtol=1e-5)
            row = {"batch": n, "budget": b, **{k: round(v, 1) for k, v in t.items()}}
            row["packed_over_floor"] = round(t["packed"] / t["floor"], 2)
            row["naive_over_packed"] = round(t["naive"] / t["packed"], 1)
            row["cached_over_floor"] = round(t["cached"] / t["floor"], 2)
            row["naive_over_cached"] = round(t["naive"] / t["cached"], 1)
            rows.append(row)
            print(
                f"{n:>5} {b:>6} {t['floor']:>7.1f} {t['packed']:>7.1f} {t['cached']:>7.1f} {t['isolated']:>8.1f} "
                f"{t['naive']:>8.1f}  {row['packed_over_floor']:>12.2f} {row['cached_over_floor']:>12.2f} "
                f"{row['naive_over_packed']:>12.1f} {row['naive_over_cached']:>12.1f}  "
                f"{t['predict_packed']:>14.1f} {t['predict_isolated']:>16.1f}"
            )

    print(
        "\nthe request path: predict (packed) against the hand-written path, interleaved alone (µs per call); "
        "plain = predict without the modules' disagreement (mutual information, vote share)"
    )
    print(f"{'batch':>5} {'budget':>6} {'hand':>7} {'plain':>8} {'predict':>8} {'plain/hand':>10} {'predict/hand':>12}")
    request_path = []
    for n in args.batches:
        raw = images[:n]
        for b in budgets:
            ids = order[:b]
            fused = ort.InferenceSession(
                fused_graph([protos[j] for j in ids], name_in, name_out), session_options(), providers=CPU
            )

            temperature = np.float32(packed_engine.temperature(b))

            def hand(fused=fused, raw=raw, temperature=temperature) -> np.ndarray:
                z = fused.run([name_out], {name_in: (raw.astype(np.float32) * scale - mean) / std})[0] / temperature
                e = np.exp(z - z.max(axis=-1, keepdims=True))
                return e / e.sum(axis=-1, keepdims=True)

            np.testing.assert_allclose(packed_engine.predict(raw, budget=b).probabilities, hand(), atol=1e-5)
            once = time.perf_counter()
            hand()
            calls = max(3, int(args.target_ms / 1e3 / max(time.perf_counter() - once, 1e-6) / 2))
            t = median_us(
                {
                    "hand": hand,
                    "plain": lambda b=b, raw=raw: plain_engine.predict(raw, budget=b),
                    "predict": lambda b=b, raw=raw: packed_engine.predict(raw, budget=b),
                },
                3 * args.rounds,
                calls,
            )
            ratio = round(t["predict"] / t["hand"], 2)
            plain_ratio = round(t["plain"] / t["hand"], 2)
            request_path.append(
                {
                    "batch": n,
                    "budget": b,
                    "hand": round(t["hand"], 1),
                    "plain": round(t["plain"], 1),
                    "predict": round(t["predict"], 1),
                    "plain_over_hand": plain_ratio,
                    "predict_over_hand": ratio,
                }
            )
            print(
                f"{n:>5} {b:>6} {t['hand']:>7.1f} {t['plain']:>8.1f} {t['predict']:>8.1f} {plain_ratio:>10.2f} "
                f"{ratio:>12.2f}"
            )

    print(
        "\nbudget=auto's exit signal: the members' sums of a stage without and with their products (µs per call), "
        "beside predict of that many modules"
    )
    print(f"{'batch':>5} {'budget':>6} {'sums':>8} {'+products':>10} {'predict':>9} {'products/predict':>16}")
    products = []
    for n in args.batches:
        raw = images[:n]
        x = packed_engine.preprocess(raw)
        for b in budgets:
            _, members = packed.run_members(np.array(order[:b], dtype=np.int64), x)  # (b, K, N)
            assert members is not None, "the packed graph does not expose the members' logits"
            t = median_us(
                {
                    "sums": lambda members=members: MemberSums.of(members, classes_first=True),
                    "products": lambda members=members: MemberSums.of(members, classes_first=True, squares=True),
                    "predict": lambda b=b, raw=raw: packed_engine.predict(raw, budget=b),
                },
                args.rounds,
                20,
            )
            share = round((t["products"] - t["sums"]) / t["predict"], 3)
            products.append({"batch": n, "budget": b, **{k: round(v, 1) for k, v in t.items()}, "share": share})
            print(f"{n:>5} {b:>6} {t['sums']:>8.1f} {t['products']:>10.1f} {t['predict']:>9.1f} {share:>16.1%}")

    print("\npacked graph: intra-op threads and spinning (µs per call)")
    sessions_by_threads = {}
    for intra in (1, 2):
        for spin in ("0", "1"):
            opts = session_options()
            opts.intra_op_num_threads = intra
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            sessions_by_threads[f"threads={intra} spinning={spin}"] = ort.InferenceSession(
                str(Path(args.bundle) / "packed.onnx"), opts, providers=CPU
            )
    threads: dict[str, dict[str, float]] = {}
    for n, b in ((1, 32), (64, len(order))):
        x = packed_engine.preprocess(images[:n])
        index = np.array(order[:b], dtype=np.int64)
        fns = {
            name: (lambda s=s, x=x, index=index: s.run([name_out], {name_in: x, "modules": index}))
            for name, s in sessions_by_threads.items()
        }
        threads[f"batch {n}, budget {b}"] = t = median_us(fns, args.rounds, 20)
        print(f"  batch {n}, budget {b}: " + ", ".join(f"{name} {us:.0f}" for name, us in t.items()))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"inference": rows, "request_path": request_path, "products": products, "threads": threads}, indent=2
            )
            + "\n"
        )
    for e in (*engines.values(), plain_engine):
        e.close()


if __name__ == "__main__":
    main()
