"""The permAVG thesis's Fashion-MNIST comparison (Fig. 3, Fig. 11), and compressing a budget prefix
of a λ-ensemble into one module.

For each run (an ensemble of independently trained MLP modules: `quorum train --lam 0`) and each
ensemble size n, the first n modules are merged by every method of `quorum compress`; the
submodels' mean error, the deep ensemble's (mean logits) and each merged network's test error
are recorded with the seconds each method took. For each bundle, the first --budget modules of
its anytime order are merged the same way. Results go to OUT/compress.json after every case (a
rerun skips the cases already there), then OUT/compress.md (the tables) and OUT/compress.png.

    python scripts/compress_study.py --runs runs/compress-study/h*-s* --sizes 2,4,6 \
        --bundles bundles/lam0 bundles/demo --budget 8 --out docs/results/compress

Cases split over processes (each with its own --out) are joined by `--merge A/compress.json ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quorum.experiments.compress import METHODS, CompressConfig, Source, compress, load_source

# Fig. 11 (FMNIST), test accuracy % by (dense layers, submodels): deepEns, permAVG, KD, submodels
THESIS = {
    (2, 2): (88.23, 88.77, 87.65, 86.92), (2, 4): (88.87, 88.52, 88.04, 87.25), (2, 6): (89.19, 88.28, 88.28, 87.29),
    (3, 2): (88.39, 89.09, 86.76, 87.07), (3, 4): (89.05, 88.56, 85.56, 87.19), (3, 6): (89.14, 88.12, 87.65, 87.05),
    (4, 2): (88.19, 88.17, 88.10, 86.87), (4, 4): (88.88, 86.06, 87.44, 86.68), (4, 6): (89.13, 81.65, 87.85, 86.64),
}  # fmt: skip
COLUMNS = ("submodels", "ensemble", "naive", "match", "permavg", "distill")


def _case(source: Source, members: list[int], configs: dict[str, CompressConfig]) -> dict[str, Any]:
    row: dict[str, Any] = {"members": members}
    for method, cfg in configs.items():
        r = compress(source, members, cfg, progress=False)
        row[method] = {"test_error": r.test[0], "val_error": r.val[0], "seconds": r.seconds}
        row["ensemble"] = {"test_error": r.members_test[0], "val_error": r.members_val[0], "seconds": 0.0}
        row["submodels"] = {"test_error": float(np.mean(r.member_test_errors)), "seconds": 0.0}
    return row


def _mean_se(values: list[float]) -> str:
    a = 100 * (1 - np.asarray(values))  # accuracy %
    se = a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return f"{a.mean():.2f} ± {se:.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def _tables(results: dict[str, Any]) -> str:
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in results["runs"].values():
        groups[(row["layers"], len(row["members"]))].append(row)
    head = "| layers | n | " + " | ".join(COLUMNS) + " | thesis: submodels / deepEns / permAVG / KD |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    secs = ["| layers | n | " + " | ".join(COLUMNS[2:]) + " |", "|" + " --- |" * (len(COLUMNS))]
    for (layers, n), rows in sorted(groups.items()):
        cells = [_mean_se([r[c]["test_error"] for r in rows]) for c in COLUMNS]
        de, pa, kd, sub = THESIS.get((layers, n), (math.nan,) * 4)
        lines.append(f"| {layers} | {n} | " + " | ".join(cells) + f" | {sub} / {de} / {pa} / {kd} |")
        secs.append(
            f"| {layers} | {n} | "
            + " | ".join(f"{np.mean([r[c]['seconds'] for r in rows]):.1f}" for c in COLUMNS[2:])
            + " |"
        )
    seeds = max((len(rows) for rows in groups.values()), default=0)
    lines += ["", f"Seconds per method (mean over {seeds} seeds):", "", *secs]
    if results["bundles"]:
        lines += ["", "| source | λ | modules | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 3)]
        for name, row in results["bundles"].items():
            cells = [f"{100 * (1 - row[c]['test_error']):.2f}" for c in COLUMNS]
            lines.append(f"| {name} | {row['lam']} | {len(row['members'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layers"] for r in results["runs"].values()})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), sharey=True, squeeze=False)
    for ax, L in zip(axes[0], layers, strict=True):
        rows = [r for r in results["runs"].values() if r["layers"] == L]
        sizes = sorted({len(r["members"]) for r in rows})
        for c in COLUMNS:
            acc = [np.mean([100 * (1 - r[c]["test_error"]) for r in rows if len(r["members"]) == n]) for n in sizes]
            ax.plot(sizes, acc, marker="o", label=c)
        ax.plot(sizes, [THESIS[(L, n)][1] for n in sizes], "k--", lw=1, label="thesis permAVG")
        ax.set_title(f"{L}-layer MLPs")
        ax.set_xlabel("submodels merged")
        ax.set_xticks(sizes)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].set_ylim(60, 90.5)  # naive averaging falls below (to chance at 6 submodels)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="run directories of independent MLP ensembles")
    p.add_argument("--sizes", default="2,4,6", help="ensemble sizes: the first n modules of each run")
    p.add_argument("--bundles", nargs="*", default=[], help="bundles whose anytime prefix is merged")
    p.add_argument("--budget", type=int, default=8, help="modules of each bundle's anytime order to merge")
    p.add_argument("--permavg-epochs", type=int, default=20)
    p.add_argument("--permavg-batch", type=int, default=100)
    p.add_argument("--distill-epochs", type=int, default=None, help="default: the run's training epochs")
    p.add_argument("--merge", nargs="*", default=[], help="compress.json files of other processes to add")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compress.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}, "bundles": {}}
    for other in map(json.loads, map(Path.read_text, map(Path, args.merge))):
        results["runs"].update(other["runs"])
        results["bundles"].update(other["bundles"])
        results.setdefault("protocol", other["protocol"])
    configs = {
        "naive": CompressConfig("naive"),
        "match": CompressConfig("match"),
        "permavg": CompressConfig("permavg", epochs=args.permavg_epochs, batch_size=args.permavg_batch),
        "distill": CompressConfig("distill", epochs=args.distill_epochs),
    }
    assert set(configs) == set(METHODS)
    if args.runs or args.bundles:
        results["protocol"] = {k: v for k, v in vars(args).items() if k not in ("runs", "bundles", "out", "merge")}
    t0 = time.perf_counter()
    for run in args.runs:
        source = load_source(run)
        for n in map(int, args.sizes.split(",")):
            key = f"{Path(run).name}/n{n}"
            if key in results["runs"]:
                continue
            row = _case(source, list(range(n)), configs)
            row["layers"] = len(source.modules[0])
            results["runs"][key] = row
            path.write_text(json.dumps(results, indent=1))
            print(f"{time.perf_counter() - t0:7.0f} s  {key}: " + ", ".join(
                f"{c} {100 * (1 - row[c]['test_error']):.2f}" for c in COLUMNS), flush=True)  # fmt: skip
    for bundle in args.bundles:
        name = Path(bundle).name
        if name in results["bundles"]:
            continue
        source = load_source(bundle)
        row = _case(source, source.members(budget=args.budget), configs)
        row["lam"] = source.training.lam
        results["bundles"][name] = row
        path.write_text(json.dumps(results, indent=1))
        print(f"{time.perf_counter() - t0:7.0f} s  {name}: " + ", ".join(
            f"{c} {100 * (1 - row[c]['test_error']):.2f}" for c in COLUMNS), flush=True)  # fmt: skip
    path.write_text(json.dumps(results, indent=1))
    (out / "compress.md").write_text(_tables(results))
    if results["runs"]:
        _plot(results, out / "compress.png")
    print((out / "compress.md").read_text())


if __name__ == "__main__":
    main()
