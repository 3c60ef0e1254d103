from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quorum.trainer.checkpoint import load_checkpoint, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.distributed import train_distributed
from quorum.trainer.errors import ConfigError, RunDirError
from quorum.trainer.schedule import lr_factor, make_scheduler
from quorum.trainer.train import train

TINY = dict(modules=6, hidden=4, lam=0.99, subset=400, val_size=300, batch_size=100, epochs=3, seed=1)


def test_cosine_warms_up_linearly_then_decays_to_zero_at_the_last_step():
    total, warm = 100, 10
    assert [lr_factor("cosine", s, total, warm) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor("cosine", warm - 1, total, warm) == 1.0
    assert lr_factor("cosine", warm, total, warm) == 1.0
    assert lr_factor("cosine", warm + 45, total, warm) == pytest.approx(0.5)
    assert lr_factor("cosine", total, total, warm) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_factor("cosine", s, total, warm) for s in range(warm, total)]
    assert decay == sorted(decay, reverse=True)
    assert all(lr_factor("constant", s, total, warm) == 1.0 for s in range(total))


def test_a_constant_schedule_has_no_scheduler_and_cosine_sets_the_first_steps_rate():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    assert make_scheduler(opt, "constant", 3, 10, 1.0) is None
    sched = make_scheduler(opt, "cosine", 3, 10, 1.0)
    assert sched is not None and opt.param_groups[0]["lr"] == pytest.approx(0.2)  # step 0 of 10 warmup steps


@pytest.mark.parametrize(
    "options,match",
    [
        ({"schedule": "linear"}, "--schedule"),
        ({"warmup_epochs": -1.0}, "--warmup-epochs"),
        ({"warmup_epochs": 4.0}, "--warmup-epochs"),
    ],
)
def test_schedule_options_are_checked(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(epochs=3, **options)


def test_a_cosine_run_keeps_its_epochs_when_resumed():
    cfg = TrainConfig(schedule="cosine", epochs=5)
    with pytest.raises(RunDirError, match="cosine schedule ends there"):
        cfg.resumed_with({"epochs": 8})
    assert TrainConfig(epochs=5).resumed_with({"epochs": 8}).epochs == 8  # a constant rate may train longer


@pytest.mark.parametrize("options", [{"loss": "prefix"}, {"loss": "dropout"}, {"schedule": "cosine"}])
def test_module_parallel_training_refuses_what_it_does_not_do_before_writing(options, tmp_path: Path):
    from quorum.trainer.distributed import Launch

    launch = Launch(rank=0, world_size=2, local_rank=0, restarts=0)
    with pytest.raises(ConfigError, match="one process only"):
        train_distributed(TrainConfig(**options), tmp_path / "run", launch=launch)
    assert not (tmp_path / "run").exists()


class _Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["modular", "dropout"])
def test_a_resumed_cosine_run_is_the_uninterrupted_run(loss, tmp_path: Path, data_dir: Path, monkeypatch):
    """The scheduler's step count (and dropout's per-epoch orders) survive --resume: the same weights to the bit."""
    import quorum.trainer.train as t

    cfg = TrainConfig(**TINY, schedule="cosine", warmup_epochs=1.0, loss=loss, data_dir=str(data_dir))
    train(cfg, tmp_path / "straight", progress=False)

    commit, commits = t.commit_epoch, [0]

    def killed_after_two(*args, **kwargs):
        commit(*args, **kwargs)
        commits[0] += 1
        if commits[0] == 2:
            raise _Killed

    monkeypatch.setattr(t, "commit_epoch", killed_after_two)
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(t, "commit_epoch", commit)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["scheduler"]["last_epoch"] == 2 * 4  # 4 steps/epoch
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    straight, resumed = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "resumed"))
    assert straight["scheduler"] == resumed["scheduler"] and straight["scheduler"]["last_epoch"] == 3 * 4
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    rates = [r["lr"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    assert rates == [r["lr"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    # the rate recorded after epoch e is the one of step 4e: 4 warmup steps, then 8 of decay
    expected = [cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * (4 * e - 4) / 8)) for e in (1, 2, 3)]
    assert rates == pytest.approx(expected, abs=1e-9)
