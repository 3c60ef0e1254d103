from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quorum.cli import main
from quorum.experiments.report import dominance_from_metrics
from quorum.trainer.checkpoint import read_jsonl, write_jsonl
from quorum.trainer.diagnostics import Dominance, check_dominance, entropy_stats, oracle_accuracy, suggest_lambda

LN10 = math.log(10)

# One member nearly as accurate as the ensemble, the rest near chance (0.9 for 10 classes).
DOMINATED = [0.91, 0.12, 0.88, 0.90, 0.86, 0.89, 0.90, 0.87]
# 256-M-4-H at λ = 0.99 after epoch 3 on this machine: every member far from the ensemble.
HEALTHY = [0.38, 0.45, 0.52, 0.58, 0.61, 0.66, 0.72, 0.80]
# Independent modules (λ = 0): all close to each other and to the ensemble.
INDEPENDENT = [0.17, 0.18, 0.18, 0.19, 0.19, 0.20, 0.21, 0.22]


def test_dominance_fires_for_a_dominant_member():
    d = check_dominance(3, DOMINATED, ensemble_error=0.11)
    assert d is not None and d.warning
    assert d.best_module == 1 and d.best_error == 0.12 and d.median_error == pytest.approx(0.885)
    assert d.gap_ratio == pytest.approx(0.01 / 0.775)
    msg = d.message(lam=1.0)
    assert "over capacity" in msg and "--lam 0.5" in msg and "module 1" in msg


@pytest.mark.parametrize(("errors", "ensemble"), [(HEALTHY, 0.14), (INDEPENDENT, 0.16)])
def test_dominance_is_silent_for_healthy_ensembles(errors: list[float], ensemble: float):
    d = check_dominance(3, errors, ensemble_error=ensemble)
    assert d is not None and not d.warning
    assert d.message(0.99).startswith("no module dominance")


def test_dominance_checks_only_its_epoch_and_can_be_turned_off():
    assert check_dominance(2, DOMINATED, 0.11, dominance_epoch=3) is None
    assert check_dominance(4, DOMINATED, 0.11, dominance_epoch=3) is None
    assert check_dominance(3, DOMINATED, 0.11, dominance_epoch=0) is None
    assert check_dominance(1, [0.1], 0.1, dominance_epoch=1) is None  # one module cannot dominate others
    assert check_dominance(1, DOMINATED, 0.11, dominance_epoch=1).warning  # type: ignore[union-attr]


def test_dominance_survives_json_and_worse_than_ensemble_median():
    d = check_dominance(3, [0.2, 0.1, 0.1], ensemble_error=0.3)  # every module beats the ensemble
    assert d is not None and not d.warning and math.isinf(d.gap_ratio)
    back = Dominance.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back == d


def test_suggested_lambda_is_lower():
    assert suggest_lambda(1.0) == 0.5 and suggest_lambda(0.99) == 0.5 and suggest_lambda(0.5) == 0.0


def test_entropy_of_uniform_and_confident_logits():
    uniform = entropy_stats(torch.zeros(5, 3, 10))
    assert uniform.min == pytest.approx(LN10) and uniform.max == pytest.approx(LN10)
    assert uniform.ensemble == pytest.approx(LN10) and uniform.std == pytest.approx(0, abs=1e-12)

    y = torch.arange(5) % 10
    confident = 50.0 * torch.nn.functional.one_hot(y, 10).float().unsqueeze(1).expand(5, 3, 10)
    stats = entropy_stats(confident)
    assert stats.max < 1e-15 and stats.ensemble < 1e-15

    mixed = entropy_stats(torch.stack([torch.zeros(5, 10), 50.0 * torch.nn.functional.one_hot(y, 10)], dim=1))
    assert mixed.min == pytest.approx(0, abs=1e-15) and mixed.max == pytest.approx(LN10)
    assert mixed.mean == pytest.approx(LN10 / 2) and mixed.std == pytest.approx(LN10 / 2)
    assert len(mixed.per_module) == 2


def test_oracle_accuracy_counts_an_example_when_any_module_is_right():
    y = torch.tensor([0, 1, 2, 0])
    logits = torch.zeros(4, 2, 3)
    logits[:, 0] = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), 3)  # predicts 0, 0, 0, 1
    logits[:, 1] = torch.nn.functional.one_hot(torch.tensor([1, 1, 2, 2]), 3)  # predicts 1, 1, 2, 2
    # module 0 right on example 0, module 1 right on examples 1 and 2, nobody on example 3
    assert oracle_accuracy(logits, y) == pytest.approx(0.75)
    assert oracle_accuracy(logits[:, :1], y) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="labels"):
        oracle_accuracy(logits, y[:3])


def test_entropy_refuses_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, M, K\)"):
        entropy_stats(torch.zeros(5, 10))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("dominance") / "run"
    args = ["--modules", "8", "--hidden", "4", "--lam", "1", "--epochs", "1", "--subset", "600"]
    assert main(["train", "--out", str(out), "--quiet", "--val-size", "1000", "--dominance-epoch", "1", *args]) == 0
    return out


def test_training_records_module_errors_and_the_check(tiny_run: Path):
    (rec,) = read_jsonl(tiny_run / "metrics.jsonl")
    errors = rec["val_module_errors"]
    assert len(errors) == 8 and all(0 <= e <= 1 for e in errors)
    assert min(errors) == pytest.approx(rec["val_module_error_min"], abs=1e-5)
    assert sorted(errors)[3] <= rec["val_module_error_median"] <= sorted(errors)[4]
    dom = rec["dominance"]
    assert dom["epoch"] == 1 and isinstance(dom["warning"], bool)
    assert errors[dom["best_module"]] == pytest.approx(min(errors), abs=1e-5)


def test_report_writes_plot_and_entropy(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tiny_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((tmp_path / "report.json").read_text())
    h = rep["entropy_nats"]
    assert rep["entropy_max_nats"] == pytest.approx(LN10)
    for k in ("min", "max", "mean", "ensemble"):
        assert 0 <= h[k] <= LN10
    assert h["min"] <= h["mean"] <= h["max"] and len(h["per_module"]) == 8
    assert 0 <= rep["test_error"] <= 1 and rep["dominance_source"] == "recorded"
    # some module is right wherever the best module is, so the oracle is at least its accuracy
    assert 1 - min(rep["test_module_errors"]) <= rep["oracle_accuracy"] <= 1
    out = capsys.readouterr().out
    assert "entropy" in out and "dominance" in out and "oracle accuracy" in out


def test_report_of_an_older_run_falls_back_to_min_mean_max(tiny_run: Path, tmp_path: Path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    rows = read_jsonl(old / "metrics.jsonl")
    for r in rows:
        del r["val_module_errors"], r["val_module_error_median"], r["dominance"]
    write_jsonl(rows, old / "metrics.jsonl")
    dom, source = dominance_from_metrics(rows, dominance_epoch=1)
    assert source == "approximate" and dom is not None and dom.best_module == -1
    assert dom.median_error == rows[0]["val_module_error_mean"]
    assert main(["report", str(old)]) == 0
    assert (old / "report.png").exists() and json.loads((old / "report.json").read_text())["dominance_source"] == (
        "approximate"
    )


def test_report_on_a_missing_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "quorum report: error:" in capsys.readouterr().err
