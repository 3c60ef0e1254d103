from __future__ import annotations

import pytest
import torch
from torch import nn

from quorum.trainer.errors import ConfigError
from quorum.trainer.models import create, list_archs
from quorum.trainer.models.mlp import BatchedMLP

SMALL_KWARGS = {
    "mlp": dict(num_modules=6, hidden=5, in_shape=(784,), num_classes=10),
    "convnet": dict(num_modules=3, in_shape=(1, 12, 12), filters="4,6,5", strides="1,2,1"),
    "treenet": dict(num_modules=3, in_shape=(3, 12, 12), filters="4,6,5", strides="1,2,1", split=1),
    "densenet_bc": dict(num_modules=3, in_shape=(3, 8, 8), num_classes=7, depth=10, growth=3),
}


def test_every_architecture_has_test_kwargs():
    assert set(list_archs()) <= set(SMALL_KWARGS), "add the new architecture to SMALL_KWARGS"


@pytest.mark.parametrize("arch", list_archs())
def test_batched_model_equals_its_modules_run_separately(arch):
    torch.manual_seed(0)
    model = create(arch, **SMALL_KWARGS[arch])
    with torch.no_grad():  # BatchNorm with statistics and affine parameters that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            model(torch.randn(16, *model.in_shape) * 2 + 1)
    model.eval()
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


def test_batched_convnet_equals_separate_convnets_in_training_and_in_eval():
    """M plain nn.Sequential ConvNets, their weights loaded into one BatchedConvNet: same logits
    with batch statistics (training) and with running statistics (eval)."""
    torch.manual_seed(3)
    M = 3

    def plain() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
        )  # fmt: skip

    seqs = [plain() for _ in range(M)]
    model = create("convnet", num_modules=M, in_shape=(1, 10, 10), filters="4,6", strides="1,2", padding=0)
    model.convs[1].padding = (1, 1)
    with torch.no_grad():
        for layer, (conv, bn) in enumerate(((0, 1), (3, 4))):
            model.convs[layer].weight.copy_(torch.cat([s[conv].weight for s in seqs]))
            for name in ("weight", "bias"):
                getattr(model.bns[layer], name).copy_(torch.cat([getattr(s[bn], name) for s in seqs]))
        model.head.weight.copy_(torch.stack([s[8].weight.T for s in seqs]))
        model.head.bias.copy_(torch.stack([s[8].bias for s in seqs]))
    x = torch.randn(8, 1, 10, 10)
    for mode in (True, False):
        model.train(mode)
        for s in seqs:
            s.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), torch.stack([s(x) for s in seqs], 1), rtol=1e-5, atol=1e-5)


def test_densenet_presets_have_the_papers_sizes():
    from quorum.trainer.models.densenet import DENSENET_PRESETS

    # Joint-training paper Table 4 (CIFAR-100): 3.2M, 2.1M and 1.7M parameters per ensemble.
    for name, params in (("DN-100-12-4", 3.2e6), ("DN-82-8-8", 2.1e6), ("DN-64-6-16", 1.7e6)):
        depth, growth, m = DENSENET_PRESETS[name]
        one = create("densenet_bc", num_modules=1, in_shape=(3, 32, 32), num_classes=100, depth=depth, growth=growth)
        assert m * one.module_params() == pytest.approx(params, rel=0.1), name


def test_treenet_shares_its_trunk():
    model = create("treenet", **SMALL_KWARGS["treenet"])
    assert model.trunk() is not None and model.trunk_flops() > 0
    convnet = create("convnet", **SMALL_KWARGS["convnet"])
    assert convnet.trunk() is None


@pytest.mark.parametrize("hidden", ["5,4", "6,5,4", "6,5,4,3"])
def test_a_deep_mlp_ensemble_equals_its_modules_run_separately(hidden):
    torch.manual_seed(2)
    model = create("mlp", num_modules=3, hidden=hidden, in_shape=(784,), num_classes=10)
    x = torch.randn(9, 784)
    with torch.no_grad():
        batched = model(x)  # (B, M, K)
        for j in range(3):
            torch.testing.assert_close(batched[:, j], model.module(j)(x), rtol=1e-5, atol=1e-5)
    widths = [int(w) for w in hidden.split(",")]
    linears = [m for m in model.module(0).modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [*widths, 10]
    assert model.module_params() == sum(p.numel() for p in model.module(0).parameters())


def test_hidden_takes_one_width_or_one_per_layer():
    from quorum.trainer.config import TrainConfig
    from quorum.trainer.models import arch_info

    one, deep = TrainConfig(hidden="4", modules=8), TrainConfig(hidden="64, 64", modules=6)
    assert one.hidden == 4 and one.name == "8-M-4-H" and arch_info("mlp").packable(one.arch_params())
    assert deep.hidden == "64,64" and deep.name == "6-M-64.64-H" and not arch_info("mlp").packable(deep.arch_params())
    for bad in ("0", "4,x", "8,8,8,8,8"):
        with pytest.raises(ConfigError, match="--hidden"):
            TrainConfig(hidden=bad)
