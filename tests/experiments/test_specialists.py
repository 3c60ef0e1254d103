"""`quorum specialists` on the session's small bundle (M = 40, one epoch) and real test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quorum.cli import main
from quorum.experiments.specialists import METHODS, SpecialistsConfig, compare_specialists, halves

LIMIT = 2000


def test_halves_split_every_image_once():
    sel, rep = halves(11, seed=3)
    assert len(sel) == 5 and len(rep) == 6
    assert sorted([*sel, *rep]) == list(range(11))
    assert np.array_equal(halves(11, seed=3)[0], sel) and not np.array_equal(halves(11, seed=4)[0], sel)


def test_compare_on_planted_experts_ranks_the_methods():
    # 12 noise modules; 2, 5 and 9 are experts on class 1. With k = 3, ours finds them and
    # beats the typical random subset and the single module on class 1.
    rng = np.random.default_rng(0)
    n, m, k = 2000, 12, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, m, k)).astype(np.float32)
    logits[np.arange(n), :, y] += 0.3
    for j in (2, 5, 9):
        logits[:, j, 1] += np.where(y == 1, 3.0, -3.0)
    f1, subsets = compare_specialists(logits, y, SpecialistsConfig(k=3, tries=20))
    assert set(f1) == set(METHODS) and all(len(v) == k for v in f1.values())
    assert sorted(subsets["ours"][1]) == [2, 5, 9]
    assert f1["ours"][1] >= f1["best_of_random"][1] and f1["ours"][1] > f1["random"][1] > f1["single"][1]


def test_command_writes_json_markdown_and_png(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = ["specialists", str(bundle_dir), "--out", str(tmp_path), "--limit", str(LIMIT), "-k", "5"]
    assert main([*args, "--tries", "20", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| small | 0 | 40 |" in out
    doc = json.loads((tmp_path / "specialists.json").read_text())
    (b,) = doc["bundles"]
    assert (doc["images"], b["modules"], b["k"]) == (LIMIT, 40, 5)
    for key in METHODS:
        assert len(b["f1"][key]) == 10 and 0 <= b["mean"][key] <= 1
        assert b["mean"][key] == pytest.approx(np.mean(b["f1"][key]))
    assert all(len(s) == len(set(s)) == 5 for s in b["subsets"]["ours"])
    assert (tmp_path / "specialists.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "specialists.md").read_text() in out


def test_bad_k_is_a_clear_error(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["specialists", str(bundle_dir), "--out", str(tmp_path), "-k", "0"]) == 2
    assert "quorum specialists: error: -k must be >= 1, got 0" in capsys.readouterr().err
