"""Choosing the anytime order and the class specialists: the product's algorithms against the
reference ones they replaced (tests/exporter/reference_selection.py), side by side in one run.

    python bench/selection.py                       # the demo run's validation logits, as `quorum export` sees them
    python bench/selection.py --run runs/demo --save-logits /tmp/demo-val.npz
    python bench/selection.py --logits /tmp/demo-val.npz --float64-reference

  order        `classifier_anytime_order` (what `quorum export` ships) against the reference in
               float32 (the old order, bit for bit) and, with --float64-reference, in float64
               (where float32 rounding no longer decides near-ties); where two orders differ, the
               first step at which they choose differently and both choices' float64 losses
  specialists  `select_specialists` (k = 20, every class) against the reference; the subsets
               and their F1 must be identical
  side by side the two together, as `quorum export` runs them (one thread each on 2 cores)

Times are wall-clock seconds on this process's torch threads (--threads), each algorithm run
once, the reference and the product alternately (--rounds). On a shared machine read the
ratios, measured side by side, rather than the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the reference algorithms live beside the tests that check against them

from quorum.exporter._candidates import side_by_side  # noqa: E402
from quorum.exporter.selection import classifier_anytime_order  # noqa: E402
from quorum.exporter.specialists import select_specialists  # noqa: E402
from tests.exporter.reference_selection import (  # noqa: E402
    first_divergence,
    reference_classifier_order,
    reference_specialists,
    validation_logits,
)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(
    name: str, reference: Callable[[], Any], product: Callable[[], Any], rounds: int
) -> tuple[Any, Any, float, float]:
    """Run reference and product alternately `rounds` times; their results and median seconds."""
    ref_s, new_s = [], []
    for _ in range(rounds):
        s, ref = timed(reference)
        ref_s.append(s)
        s, new = timed(product)
        new_s.append(s)
        print(f"  {name}: reference {ref_s[-1]:.1f} s, new {new_s[-1]:.1f} s", flush=True)
    return ref, new, statistics.median(ref_s), statistics.median(new_s)


def describe(a: list[int], b: list[int], logits: np.ndarray, y: np.ndarray) -> str:
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    if not differ:
        return "identical"
    where = first_divergence(a, b, logits, y)
    assert where is not None
    pos, ja, jb, la, lb = where
    better = "new" if lb < la else "reference" if la < lb else "neither"
    return (
        f"{len(differ)} of {len(a)} positions differ ({differ[:8]}{' ...' if len(differ) > 8 else ''}); first "
        f"divergent step at position {pos}: reference {ja}, new {jb}, float64 losses {la:.10g} and {lb:.10g} "
        f"(gap {abs(la - lb):.2e}; {better}'s choice is the better)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a trained run; its validation logits are scored")
    p.add_argument("--logits", help="an .npz with `logits` (N, M, K) and `labels` (N,) instead of --run")
    p.add_argument("--save-logits", help="write the logits and labels to this .npz for later runs")
    p.add_argument("--parts", nargs="+", choices=["order", "specialists"], default=["order", "specialists"])
    p.add_argument("--float64-reference", action="store_true", help="also run the reference order in float64")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the median is reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.logits:
        with np.load(args.logits) as f:
            logits, y = f["logits"], f["labels"]
    else:
        logits, y = validation_logits(args.run)
    if args.save_logits:
        np.savez(args.save_logits, logits=logits, labels=y)
    n, m, k = logits.shape
    print(f"{m} modules, {k} classes, {n} validation images; {torch.get_num_threads()} torch threads")

    rows = []
    if "order" in args.parts:
        ref, new, ref_s, new_s = compare(
            "order",
            lambda: reference_classifier_order(logits, y),
            lambda: classifier_anytime_order(logits, y),
            args.rounds,
        )
        rows.append(("anytime order", ref_s, new_s, describe(ref, new, logits, y)))
        if args.float64_reference:
            s, exact = timed(lambda: reference_classifier_order(logits, y, dtype=torch.float64))
            rows.append(("order, float64 reference", s, new_s, describe(exact, new, logits, y)))
    if "specialists" in args.parts:
        ref, new, ref_s, new_s = compare(
            "specialists",
            lambda: reference_specialists(logits, y, 20),
            lambda: select_specialists(logits, y, 20),
            args.rounds,
        )
        same = [(s.modules, s.f1) for s in ref] == [(s.modules, s.f1) for s in new]
        rows.append(("specialists", ref_s, new_s, "identical" if same else "DIFFERENT"))

    print(f"\n{'part':26} {'reference s':>12} {'new s':>8} {'ref/new':>8}  result")
    for name, ref_s, new_s, result in rows:
        print(f"{name:26} {ref_s:12.1f} {new_s:8.1f} {ref_s / new_s:8.1f}  {result}")
    if {"order", "specialists"} <= set(args.parts):
        ref_total = sum(r[1] for r in rows if not r[0].startswith("order, float64"))
        new_total = sum(r[2] for r in rows if not r[0].startswith("order, float64"))
        print(f"{'both':26} {ref_total:12.1f} {new_total:8.1f} {ref_total / new_total:8.1f}")

        def both_side_by_side() -> None:  # as `quorum export` runs them
            with side_by_side() as side:
                specialists = side.submit(select_specialists, logits, y, 20)
                classifier_anytime_order(logits, y)
                specialists.result()

        s, _ = timed(both_side_by_side)
        print(f"{'both, side by side':26} {ref_total:12.1f} {s:8.1f} {ref_total / s:8.1f}  as quorum export runs them")


if __name__ == "__main__":
    main()
