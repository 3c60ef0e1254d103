"""Trials of `quorum robustness` pooled by λ: the paper's "λ = 0.99 with 90 % of the modules
removed is as accurate as λ = 1 with 50 % removed", measured over several independently trained
bundles of each λ rather than one.

Reads one or more robustness.json (a bundle name met again in a later file is skipped), keeps
the bundles whose names match --match, groups them by λ and prints, per λ, the mean ± standard
error over bundles (trials) of the random-removal accuracy at the two removal shares compared,
the difference of the two with its standard error, the same per trial where the two λ share a
seed (the name's "seedN", seed 0 where it has none: the same split and initial weights), and
for each bundle the budgets where the anytime order does not beat the random mean. Writes a PNG:
mean ± standard error over trials against the share of modules removed, random and ordered.

    python scripts/robustness_trials.py reports/robustness-lr/robustness.json --match lr0.0067 \
        --compare 0.99:0.9 1:0.5 --out docs/results/robustness-lr/trials.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from typing import Any

import numpy as np


def _at(bundle: dict[str, Any], share: float, key: str = "mean") -> float:
    """`key` of the point (the curve's or the summary's: 50 % and 90 % removed) nearest `share` removed."""
    m = bundle["num_modules"]
    point = min(bundle["summary"] + bundle["curve"], key=lambda p: abs(p["removed"] / m - share))
    return float(point[key])


def _mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="robustness.json files written by `quorum robustness`")
    parser.add_argument("--match", default="", help="regular expression the bundle names must contain")
    parser.add_argument(
        "--compare",
        nargs=2,
        default=["0.99:0.9", "1:0.5"],
        metavar="LAM:SHARE",
        help="two (λ, share of modules removed) points to compare (default: 0.99:0.9 1:0.5)",
    )
    parser.add_argument("--out", help="PNG to write (default: none)")
    args = parser.parse_args()

    bundles: list[dict[str, Any]] = []
    for path in args.reports:
        with open(path) as f:
            seen = {b["name"] for b in bundles}
            bundles += [
                b for b in json.load(f)["bundles"] if re.search(args.match, b["name"]) and b["name"] not in seen
            ]
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for b in bundles:
        groups[b["lam"]].append(b)
    if not groups:
        raise SystemExit(f"no bundle in {', '.join(args.reports)} matches {args.match!r}")

    (lam_a, share_a), (lam_b, share_b) = ((float(x) for x in c.split(":")) for c in args.compare)
    for lam in (lam_a, lam_b):
        if lam not in groups:
            raise SystemExit(f"no bundle with λ = {lam:g}; have {sorted(groups)}")
    a = [_at(b, share_a) for b in groups[lam_a]]
    b = [_at(b, share_b) for b in groups[lam_b]]
    (ma, sa), (mb, sb) = _mean_se(a), _mean_se(b)
    for lam, share, values, (mean, se) in ((lam_a, share_a, a, (ma, sa)), (lam_b, share_b, b, (mb, sb))):
        listed = ", ".join(f"{x:.4f}" for x in values)
        print(f"λ = {lam:g}, {share:.0%} removed at random: {mean:.4f} ± {se:.4f} over {len(values)} trials ({listed})")
    print(f"difference: {ma - mb:+.4f} ± {math.hypot(sa, sb):.4f} (standard error, trials independent)")

    def key(name: str) -> str:
        found = re.search(r"seed(\d+)", name)
        return f"seed {found.group(1) if found else 0}"

    by_key = {key(x["name"]): x for x in groups[lam_b]}
    pairs = [(x, by_key[key(x["name"])]) for x in groups[lam_a] if key(x["name"]) in by_key]
    if pairs:
        diffs = [_at(x, share_a) - _at(y, share_b) for x, y in pairs]
        md, sd = _mean_se(diffs)
        wins = sum(d > 0 for d in diffs)
        each = ", ".join(f"{key(x['name'])} {d:+.4f}" for (x, _), d in zip(pairs, diffs, strict=True))
        print(f"paired by seed: {md:+.4f} ± {sd:.4f}; λ = {lam_a:g} ahead in {wins} of {len(pairs)} pairs: {each}")
    for x in bundles:
        lost = [p["modules"] for p in x["curve"] if p["removed"] > 0 and p["ordered"] <= p["mean"]]
        worst = min(p["ordered"] - p["mean"] for p in x["curve"] if p["removed"] > 0)
        line = f"{x['name']}: the anytime order loses to random at budgets {lost or 'none'}; worst margin {worst:+.4f}"
        if "ordered_worse_at" in x:  # reports since the margin's standard error was added
            line += f"; worse by more than the 95 % interval at {x['ordered_worse_at'] or 'none'}"
        print(line)

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.6), constrained_layout=True)
        for i, (lam, members) in enumerate(sorted(groups.items())):
            share = np.array([p["removed"] for p in members[0]["curve"]]) / members[0]["num_modules"]
            for field, style, what in (("mean", "-", "random removal"), ("ordered", "--", "anytime order")):
                values = np.array([[p[field] for p in x["curve"]] for x in members])
                mean = values.mean(0)
                se = values.std(0, ddof=1) / math.sqrt(len(members)) if len(members) > 1 else 0 * mean
                ax.plot(
                    share,
                    mean,
                    style,
                    color=f"C{i}",
                    marker="." if field == "mean" else None,
                    label=f"λ = {lam:g}, {what} ({len(members)} trials)",
                )
                ax.fill_between(share, mean - se, mean + se, color=f"C{i}", alpha=0.2, linewidth=0)
        for lam, share, value in ((lam_a, share_a, ma), (lam_b, share_b, mb)):
            ax.annotate(
                f"λ = {lam:g}, {share:.0%} removed: {value:.3f}",
                (share, value),
                textcoords="offset points",
                xytext=(-150, -30),
                arrowprops={"arrowstyle": "->"},
                fontsize="small",
            )
        ax.set(
            xlabel="share of modules removed",
            ylabel="test accuracy",
            title="mean ± standard error over independently trained bundles",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
