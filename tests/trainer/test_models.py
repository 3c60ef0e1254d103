from __future__ import annotations

import pytest
import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models import create, list_archs
from quorum.trainer.models.mlp import BatchedMLP

SMALL_KWARGS = {"mlp": dict(num_modules=6, hidden=5, in_shape=(784,), num_classes=10)}


def test_every_architecture_has_test_kwargs():
    assert set(list_archs()) <= set(SMALL_KWARGS), "add the new architecture to SMALL_KWARGS"


@pytest.mark.parametrize("arch", list_archs())
def test_batched_model_equals_its_modules_run_separately(arch):
    torch.manual_seed(0)
    model = create(arch, **SMALL_KWARGS[arch]).eval()
    x = torch.randn(9, *model.in_shape)
    with torch.no_grad():
        batched = model(x)  # (B, M, K)
        assert batched.shape == (9, model.num_modules, model.num_classes)
        for j in range(model.num_modules):
            torch.testing.assert_close(batched[:, j], model.module(j)(x), rtol=1e-5, atol=1e-5)


def test_batched_mlp_equals_separate_sequentials_with_the_same_weights():
    """Build M plain nn.Sequential MLPs, load their weights into one BatchedMLP, compare logits."""
    torch.manual_seed(1)
    M, H = 8, 4
    seqs = [nn.Sequential(nn.Linear(784, H), nn.ReLU(), nn.Linear(H, 10)) for _ in range(M)]
    model = BatchedMLP(num_modules=M, hidden=H)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.cat([s[0].weight for s in seqs]))
        model.fc1.bias.copy_(torch.cat([s[0].bias for s in seqs]))
        model.w2.copy_(torch.stack([s[2].weight.T for s in seqs]))
        model.b2.copy_(torch.stack([s[2].bias for s in seqs]))
        x = torch.randn(16, 784)
        expected = torch.stack([s(x) for s in seqs], dim=1)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_batched_mlp_gradients_equal_separate_training():
    """One backward pass through the batched model gives each module the gradient it would get alone."""
    torch.manual_seed(2)
    M, H = 4, 3
    model = BatchedMLP(num_modules=M, hidden=H)
    x, y = torch.randn(10, 784), torch.randint(0, 10, (10,))
    logits = model(x)
    sum(nn.functional.cross_entropy(logits[:, j], y) for j in range(M)).backward()
    for j in range(M):
        alone = model.module(j).train()
        nn.functional.cross_entropy(alone(x), y).backward()
        torch.testing.assert_close(model.w2.grad[j], alone[3].weight.grad.T)
        torch.testing.assert_close(model.fc1.weight.grad[j * H : (j + 1) * H], alone[1].weight.grad)


def test_module_counts_match_a_plain_mlp():
    model = BatchedMLP(num_modules=3, hidden=4)
    plain = nn.Sequential(nn.Linear(784, 4), nn.ReLU(), nn.Linear(4, 10))
    assert model.module_params() == sum(p.numel() for p in plain.parameters())
    assert model.module_flops() == 2 * (784 * 4 + 4 * 10)
    # The papers' configurations share ~815K parameters: 256-M-4-H and 1-M-1024-H.
    assert 256 * BatchedMLP(256, 4).module_params() == pytest.approx(815_000, rel=0.01)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mlp"):
        create("resnet9000", num_modules=2)


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError):
        BatchedMLP(num_modules=0, hidden=4)
