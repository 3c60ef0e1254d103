"""Blocks of modules (module-parallel training): every architecture of the registry cuts into
blocks that compute exactly their modules' outputs, and joins back into the whole ensemble,
weights and optimizer state alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quorum.trainer.blocks import (
    block_bounds,
    block_of,
    join_optimizer_states,
    join_states,
    module_rows,
    slice_optimizer_state,
    slice_state,
)
from quorum.trainer.distributed import Launch
from quorum.trainer.errors import ConfigError
from quorum.trainer.models import create, list_archs
from tests.trainer.test_models import SMALL_KWARGS


def _build(arch: str):
    kwargs = {k: v for k, v in SMALL_KWARGS[arch].items() if k != "num_modules"}
    return lambda m: create(arch, num_modules=m, **kwargs)


def _trained_looking(model: nn.Module) -> nn.Module:
    """BatchNorm affine parameters and running statistics away from their initial values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(16, *model.in_shape) * 2 + 1)
    return model


def test_blocks_are_contiguous_in_rank_order_and_the_first_ranks_hold_the_remainder():
    assert block_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert block_bounds(256, 2) == [(0, 128), (128, 256)]
    assert block_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    assert block_bounds(4, 1) == [(0, 4)]
    with pytest.raises(ConfigError, match="at most 3 processes"):
        block_bounds(3, 4)


@pytest.mark.parametrize("arch", list_archs())
def test_only_a_treenets_trunk_and_batchnorm_counters_are_shared(arch):
    rows = {n: r for n, r in module_rows(_build(arch)).items() if not n.endswith("num_batches_tracked")}
    shared = {name for name, r in rows.items() if r is None}
    assert shared == ({n for n in rows if n.startswith(("convs.0.", "bns.0."))} if arch == "treenet" else set())
    assert all(r is None or r >= 1 for r in rows.values())


@pytest.mark.parametrize("arch", list_archs())
@pytest.mark.parametrize("training", [True, False])
def test_a_block_computes_its_modules_outputs_of_the_whole_ensemble(arch, training):
    build = _build(arch)
    torch.manual_seed(0)
    full = _trained_looking(build(5)).train(training)
    rows = module_rows(build)
    x = torch.randn(6, *full.in_shape)
    with torch.no_grad():
        expected = full(x)  # (B, 5, K)
        for start, stop in block_bounds(5, 3):
            block = block_of(full, build, rows, start, stop).train(training)
            torch.testing.assert_close(block(x), expected[:, start:stop], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list_archs())
def test_blocks_join_back_into_the_whole_ensemble_exactly(arch):
    build = _build(arch)
    torch.manual_seed(1)
    full = _trained_looking(build(5))
    rows = module_rows(build)
    opt = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    full(torch.randn(4, *full.in_shape)).square().mean().backward()
    opt.step()  # momentum buffers, one per parameter
    names = [n for n, _ in full.named_parameters()]
    bounds = block_bounds(5, 2)
    states = [slice_state(full.state_dict(), rows, a, b) for a, b in bounds]
    joined = join_states(states, rows)
    assert joined.keys() == full.state_dict().keys()
    for name, t in full.state_dict().items():
        assert torch.equal(joined[name], t), name
    opt_states = [slice_optimizer_state(opt.state_dict(), names, rows, a, b) for a, b in bounds]
    # each block's optimizer state loads into an optimizer of that block
    block = block_of(full, build, rows, *bounds[1])
    block_opt = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
    block_opt.load_state_dict(opt_states[1])
    assert block_opt.state_dict()["state"][0]["momentum_buffer"].shape == next(block.parameters()).shape
    whole = join_optimizer_states(opt_states, names, rows)
    assert whole["param_groups"] == opt.state_dict()["param_groups"]
    for i, entry in opt.state_dict()["state"].items():
        assert torch.equal(whole["state"][i]["momentum_buffer"], entry["momentum_buffer"]), names[i]


def test_the_launch_is_read_from_torchruns_environment():
    assert Launch.from_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert Launch.from_env(env) == Launch(rank=3, world_size=4, local_rank=1, restarts=2)
    assert Launch.from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Launch(0, 1, 0, 0)
