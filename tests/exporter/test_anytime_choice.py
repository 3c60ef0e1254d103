from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quorum.core.tasks import get_task
from quorum.exporter.anytime import choose_anytime_order, prefix_errors
from quorum.exporter.export import export_run
from quorum.runtime.manifest import MANIFEST_FILE, Manifest
from quorum.trainer.config import TrainConfig
from quorum.trainer.train import train

CLASSES = get_task("classification")


def _logits(m: int, n: int = 400, k: int = 5, worst_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Modules that see the label through noise; module j's noise grows with j (or falls, `worst_first`)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, k, (n,), generator=g)
    noise = torch.linspace(0.5, 4.0, m)
    if worst_first:
        noise = noise.flip(0)
    logits = torch.nn.functional.one_hot(y, k).float().unsqueeze(1) * 2 + noise.view(1, m, 1) * torch.randn(
        n, m, k, generator=g
    )
    return logits, y


def test_prefix_errors_are_the_error_of_each_prefix_mean():
    logits, y = _logits(6)
    order = [4, 1, 0, 5, 2, 3]
    got = prefix_errors(logits, y, order, CLASSES)
    expected = [float((logits[:, order[:b]].mean(1).argmax(-1) != y).double().mean()) for b in (1, 2, 4, 6)]
    assert got == pytest.approx(expected)


def test_a_run_that_trained_no_order_ships_the_greedy_one():
    logits, y = _logits(6)
    choice = choose_anytime_order(logits, y, CLASSES, trained=False)
    assert choice.source == "greedy" and choice.order == choice.greedy_order and choice.trained_val is None
    assert "Brier" in choice.criterion


@pytest.mark.parametrize("worst_first", [False, True])
def test_the_trained_order_is_shipped_only_where_it_validates_better(worst_first):
    logits, y = _logits(8, worst_first=worst_first)
    choice = choose_anytime_order(logits, y, CLASSES, trained=True)
    assert choice.trained_val == pytest.approx(prefix_errors(logits, y, list(range(8)), CLASSES))
    trained_better = np.mean(choice.trained_val) < np.mean(choice.greedy_val)
    assert choice.source == ("trained" if trained_better else "greedy")
    assert choice.order == (list(range(8)) if trained_better else choice.greedy_order)
    if worst_first:  # the noisiest module first: greedy selection does better
        assert choice.source == "greedy"


def test_a_manifest_without_anytime_source_reads_as_greedy(bundle_dir: Path):
    data = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    assert data.pop("anytime_source") == "greedy"
    assert Manifest.model_validate(data).anytime_source == "greedy"


@pytest.mark.slow
def test_a_prefix_trained_run_exports_the_order_that_validates_better(tmp_path: Path, data_dir: Path):
    cfg = TrainConfig(
        modules=8, hidden=4, lam=0.99, loss="prefix", prefix_weights="small", epochs=1, subset=1000, val_size=1000,
        data_dir=str(data_dir), command="pytest",
    )  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    m = export_run(tmp_path / "run", tmp_path / "bundle", progress=False)
    assert Manifest.load(tmp_path / "bundle").anytime_source == m.anytime_source
    if m.anytime_source == "trained":
        assert m.anytime_order == list(range(8)) and "trained by the prefix-aware loss" in m.anytime_criterion
    else:
        assert "Brier" in m.anytime_criterion
