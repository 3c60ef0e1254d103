"""A run killed at any point of an epoch's writes resumes to the run it would have been: each
write point is hit by a real SIGKILL of a real training process, then the run is resumed and
compared with one that was never interrupted. Torn metrics lines and checkpoints that hold
anything but tensors and plain data are handled too."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quorum.trainer.checkpoint import load_checkpoint, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import RunDirError
from quorum.trainer.run import load_run
from quorum.trainer.train import BEST_NEXT, train

TINY = dict(modules=8, hidden=4, lam=0.95, subset=600, val_size=1000, batch_size=100, epochs=3)

# Runs `train` and SIGKILLs itself right after the n-th write of the run's checkpoints and log.
KILLER = """
import json, os, signal, sys
from pathlib import Path
import quorum.trainer.train as t
from quorum.trainer.config import TrainConfig

out, kill_at, config = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
writes = [0]

def counted(write):
    def wrapped(*args, **kwargs):
        result = write(*args, **kwargs)
        writes[0] += 1
        if writes[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

t.atomic_torch_save = counted(t.atomic_torch_save)
t.append_jsonl = counted(t.append_jsonl)
Path.replace = counted(Path.replace)
t.train(TrainConfig(**config), out, progress=False)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(TrainConfig(**TINY), out, progress=False)
    return out


def _writes_per_epoch(run: Path) -> list[int]:
    """Writes of each epoch: staged best, metrics line, last.pt, promotion (an improving epoch),
    or metrics line and last.pt."""
    best = float("inf")
    counts = []
    for record in read_jsonl(run / "metrics.jsonl"):
        improved = record["val_error"] < best
        best = min(best, record["val_error"])
        counts.append(4 if improved else 2)
    return counts


@pytest.mark.slow
def test_a_kill_between_any_two_writes_resumes_to_the_uninterrupted_run(straight: Path, tmp_path: Path):
    per_epoch = _writes_per_epoch(straight)
    first = per_epoch[0]  # the kills fall in epoch 2 (and at its start): epoch 1 is committed
    points = range(first + 1, first + per_epoch[1] + 1)
    assert len(points) == 4, "epoch 2 of the run improves, so that each of its four writes is a kill point"
    expected_metrics = read_jsonl(straight / "metrics.jsonl")
    expected_last = load_checkpoint(straight / "last.pt")
    expected_best = load_checkpoint(straight / "best.pt")
    for kill_at in points:
        run = tmp_path / f"killed-{kill_at}"
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(run), str(kill_at), json.dumps(TINY)], capture_output=True, timeout=300
        )
        assert proc.returncode == -9, (kill_at, proc.stderr[-2000:])
        # Right after the kill, best.pt is the best epoch that last.pt committed, whatever was cut short.
        committed = load_checkpoint(run / "last.pt")
        assert load_run(run, "best").epoch == committed["best_epoch"], f"kill at {kill_at}"
        cfg = TrainConfig.load(run / "config.json")
        train(cfg, run, resume=True, progress=False)
        assert not (run / BEST_NEXT).exists()
        assert [r["val_error"] for r in read_jsonl(run / "metrics.jsonl")] == [r["val_error"] for r in expected_metrics]
        last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
        assert (last["epoch"], last["best_epoch"], best["epoch"]) == (
            3,
            expected_last["best_epoch"],
            expected_best["epoch"],
        )
        for name, weights in expected_best["model"].items():
            torch.testing.assert_close(best["model"][name], weights, rtol=0, atol=1e-6, msg=f"kill at {kill_at}")
        for name, weights in expected_last["model"].items():
            torch.testing.assert_close(last["model"][name], weights, rtol=0, atol=1e-6, msg=f"kill at {kill_at}")


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_on_resume(straight: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1}), run, progress=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "val_err')  # a kill in the middle of an append
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    train(TrainConfig.load(run / "config.json").resumed_with({"epochs": 3}), run, resume=True, progress=False)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert load_run(run, "last").epoch == 3


def test_a_damaged_line_before_the_last_is_an_error(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(RunDirError, match="line 2 is not JSON"):
        read_jsonl(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file's own pickle
def test_a_checkpoint_that_holds_code_is_refused(tmp_path: Path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "last.pt"
    with path.open("wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(RunDirError, match="cannot read"):
        load_checkpoint(path)
