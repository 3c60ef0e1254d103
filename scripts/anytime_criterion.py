"""Which greedy criterion makes the better anytime order: the Brier score, the log-likelihood or
accuracy, with forward selection throughout; backward elimination on the log-likelihood for the
larger budgets; or the whole ensemble's probabilities as the target, at every step or after the
first M/8 or M/4, forwards throughout or backwards from all M down to M/2?

Decided without the test set: each order is built on one half of a run's validation split and
scored on the other half, at every budget of the robustness grid (M - s, M - 2s, ..., 1; s = M/20),
against the mean of 20 random subsets of the same size. Prints, per run and criterion, the
budgets where the ordered prefix does not beat random, and the mean and worst margin.

    python scripts/anytime_criterion.py runs/a [runs/b ...] [--halvings 1 2 3] [--criteria NAME ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from quorum.exporter.selection import classifier_anytime_order, classifier_order_steps, greedy_anytime_order
from quorum.trainer.data import load_fashion_mnist
from quorum.trainer.evaluate import module_logits
from quorum.trainer.run import load_run


@torch.no_grad()
def greedy_accuracy_order(logits: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Greedy forward selection on the prefix ensemble's accuracy; NLL breaks ties."""
    n, m, _ = logits.shape
    target = y.view(n, 1, 1)
    chosen: list[int] = []
    remaining = list(range(m))
    total = torch.zeros(n, 1, logits.shape[2])
    while remaining:
        z = (total + logits[:, remaining]) / (len(chosen) + 1)
        acc = (z.argmax(-1) == y.view(n, 1)).double().mean(0)
        nll = -torch.log_softmax(z, -1).gather(2, target.expand(n, len(remaining), 1)).mean(dim=(0, 2)).double()
        j = remaining.pop(int(torch.argmax(acc - 1e-9 * nll)))
        chosen.append(j)
        total += logits[:, j : j + 1]
    return chosen


@torch.no_grad()
def backward_tail_order(logits: torch.Tensor, y: torch.Tensor, keep: int) -> list[int]:
    """Backward elimination on the NLL from all M modules down to `keep`, which are then ordered by
    forward selection (NLL) among themselves; the eliminated modules follow, last removed first."""
    n, m, _ = logits.shape
    remaining, removed = list(range(m)), list[int]()
    total = logits.sum(1, keepdim=True)
    target = y.view(n, 1, 1)
    while len(remaining) > keep:
        z = (total - logits[:, remaining]) / (len(remaining) - 1)
        nll = -torch.log_softmax(z, -1).gather(2, target.expand(n, len(remaining), 1)).mean(dim=(0, 2))
        j = remaining.pop(int(torch.argmin(nll)))
        removed.append(j)
        total -= logits[:, j : j + 1]
    head = greedy_anytime_order(logits[:, remaining], y, score="nll")
    return [remaining[i] for i in head] + removed[::-1]


def margins(order: list[int], logits: torch.Tensor, y: torch.Tensor, trials: int = 20) -> list[tuple[int, float]]:
    """(budget, prefix accuracy - mean accuracy of random subsets of that size) on the grid."""
    m = logits.shape[1]
    step = max(1, round(m / 20))
    rng = np.random.default_rng(0)

    def accuracy(ids: list[int] | np.ndarray) -> float:
        return float((logits[:, list(ids)].mean(1).argmax(-1) == y).double().mean())

    budgets = sorted({*range(m - step, 0, -step), 1}, reverse=True)  # the robustness grid's, one module included
    return [
        (b, accuracy(order[:b]) - float(np.mean([accuracy(rng.choice(m, b, replace=False)) for _ in range(trials)])))
        for b in budgets
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by `quorum train`")
    parser.add_argument("--criteria", nargs="*", help="only these criteria (default: all)")
    parser.add_argument(
        "--halvings", type=int, nargs="+", default=[1], help="seeds of the random halvings of each validation split"
    )
    parser.add_argument(
        "--checkpoint", choices=["best", "last"], default="best", help="the runs' best.pt (default) or last.pt"
    )
    args = parser.parse_args()
    lost: dict[str, int] = {}
    for run_dir, split in ((r, s) for r in args.runs for s in args.halvings):
        run = load_run(run_dir, args.checkpoint)
        cfg = run.config
        data = load_fashion_mnist(cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=cfg.seed)
        logits, y = module_logits(run.model, data.val.x), data.val.y
        perm = torch.from_numpy(np.random.default_rng(split).permutation(len(y)))
        a, b = perm[: len(y) // 2], perm[len(y) // 2 :]
        m = logits.shape[1]
        labelled, backward_above = classifier_order_steps(m)
        criteria: dict[str, Callable[[torch.Tensor, torch.Tensor], list[int]]] = {
            "Brier score": greedy_anytime_order,
            "log-likelihood": partial(greedy_anytime_order, score="nll"),
            "accuracy": greedy_accuracy_order,
            "log-likelihood, backward from M/2": partial(backward_tail_order, keep=m // 2),
            "match the full ensemble": partial(greedy_anytime_order, labelled=0),
            "Brier to M/8, then match": partial(greedy_anytime_order, labelled=m // 8),
            "Brier to M/4, then match": partial(greedy_anytime_order, labelled=labelled),
            "Brier to M/4, match to M/2, then backward": partial(
                greedy_anytime_order, labelled=labelled, backward_above=backward_above
            ),
            "fewest errors first, then Brier to M/4, match to M/2, backward": classifier_anytime_order,  # shipped
        }
        for name, build in criteria.items():
            if args.criteria and name not in args.criteria:
                continue
            result = margins(build(logits[a], y[a]), logits[b], y[b])
            losses = [budget for budget, d in result if d <= 0]
            lost[name] = lost.get(name, 0) + len(losses)
            mean, worst = np.mean([d for _, d in result]), min(d for _, d in result)
            print(
                f"{run_dir} (halving {split}) {name}: loses at budgets {losses}; margin mean {mean:+.4f}, "
                f"worst {worst:+.4f}",
                flush=True,
            )
    print("budgets lost over all runs:", ", ".join(f"{name} {n}" for name, n in lost.items()))


if __name__ == "__main__":
    main()
