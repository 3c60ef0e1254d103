from __future__ import annotations

import pytest
import torch

from quorum.core.tasks import get_task
from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import ConfigError
from quorum.trainer.prefix import prefix_coefficients, prefix_lengths, prefix_loss, prefix_objective
from quorum.trainer.train import loss_for_epoch

B, M, K = 6, 5, 4
TASKS = {"categorical": get_task("classification"), "gaussian": get_task("regression"), "poisson": get_task("count")}


def _batch(family: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Module outputs `shape` = (B, M, K) or (B, M) and targets of the family, float64."""
    g = torch.Generator().manual_seed(2)
    eta = torch.randn(shape, generator=g, dtype=torch.float64)
    if family == "categorical":
        return 3 * eta, torch.randint(0, shape[-1], (shape[0],), generator=g)
    target_shape = shape[:1] + shape[2:]
    if family == "gaussian":
        return 2 * eta, 2 * torch.randn(target_shape, generator=g, dtype=torch.float64)
    return 0.5 * eta, torch.poisson(torch.full(target_shape, 2.0, dtype=torch.float64), generator=g)


def _by_hand(family: str, eta: torch.Tensor, y: torch.Tensor, lam: float, order: list[int]) -> torch.Tensor:
    """L_λ plus each prefix's NLL, one prefix at a time, with the coefficients of prefix_coefficients."""
    task = TASKS[family]
    lengths, coefs = prefix_coefficients(eta.shape[1], "small", 0.7)
    total = task.modular_loss(eta, y, lam)
    for b, c in zip(lengths, coefs, strict=True):
        mean = eta[:, order[:b]].mean(dim=1)  # (B, K) or (B,)
        if family == "categorical":
            nll = -torch.log_softmax(mean, -1)[torch.arange(len(y)), y]
        elif family == "gaussian":
            nll = 0.5 * (y - mean) ** 2
        else:
            nll = mean.exp() - y * mean
        total = total + c * (nll.sum(-1) if nll.dim() == 2 else nll).mean()
    return total


def test_prefix_lengths_double_up_to_m_and_end_at_m():
    assert prefix_lengths(1) == [1]
    assert prefix_lengths(8) == [1, 2, 4, 8]
    assert prefix_lengths(5) == [1, 2, 4, 5]
    assert len(prefix_lengths(256)) == 9


@pytest.mark.parametrize("weights", ["uniform", "small"])
def test_weights_sum_to_one_before_the_length_factor(weights):
    lengths, coefs = prefix_coefficients(256, weights, 2.0)
    assert sum(c * 256 / b for b, c in zip(lengths, coefs, strict=True)) == pytest.approx(2.0)


def test_small_weighting_counts_every_prefix_nll_the_same_and_uniform_grows_with_length():
    _, small = prefix_coefficients(64, "small")
    _, uniform = prefix_coefficients(64, "uniform")
    assert max(small) == pytest.approx(min(small))
    assert uniform == sorted(uniform) and uniform[-1] == pytest.approx(64 * uniform[0])


@pytest.mark.parametrize("family,shape", [("categorical", (B, M, K)), ("gaussian", (B, M)), ("gaussian", (B, M, 3)),
                                          ("poisson", (B, M)), ("poisson", (B, M, 3))])  # fmt: skip
@pytest.mark.parametrize("lam", [0.0, 0.99, 1.0])
def test_prefix_loss_equals_its_formula_and_its_gradient_is_autograds(family, shape, lam):
    eta, y = _batch(family, shape)
    task = TASKS[family]
    lengths_list, coefs_list = prefix_coefficients(shape[1], "small", 0.7)
    lengths, coefs = torch.tensor(lengths_list), torch.tensor(coefs_list, dtype=torch.float64)
    order = [3, 0, 4, 1, 2]
    for perm in (None, torch.tensor(order)):
        expected = _by_hand(family, eta, y, lam, order if perm is not None else list(range(M)))
        torch.testing.assert_close(prefix_loss(task, eta, y, lam, lengths, coefs, perm), expected)
        # the gradient of the one-cumsum implementation against autograd of the hand-written one
        a = eta.clone().requires_grad_(True)
        prefix_loss(task, a, y, lam, lengths, coefs, perm).backward()
        h = eta.clone().requires_grad_(True)
        _by_hand(family, h, y, lam, order if perm is not None else list(range(M))).backward()
        torch.testing.assert_close(a.grad, h.grad)
        assert torch.autograd.gradcheck(
            lambda e, p=perm: prefix_loss(task, e, y, lam, lengths, coefs, p), (eta.clone().requires_grad_(True),)
        )


def test_prefix_gradient_reaches_early_modules_more_and_matches_the_closed_form():
    """∂/∂η_j of Σ_b c_b CE(prefix b) = Σ_{b > j} (c_b / b)(softmax(mean_b) − onehot) / B: the first
    module is in every prefix."""
    eta, y = _batch("categorical", (B, M, K))
    task = TASKS["categorical"]
    lengths_list, coefs_list = prefix_coefficients(M, "uniform")
    a = eta.clone().requires_grad_(True)
    extra = prefix_loss(task, a, y, 1.0, torch.tensor(lengths_list), torch.tensor(coefs_list, dtype=torch.float64))
    (extra - task.modular_loss(a, y, 1.0)).backward()
    onehot = torch.nn.functional.one_hot(y, K).to(eta.dtype)
    expected = torch.zeros_like(eta)
    for b, c in zip(lengths_list, coefs_list, strict=True):
        expected[:, :b] += (c / b) * (torch.softmax(eta[:, :b].mean(1), -1) - onehot).unsqueeze(1) / B
    torch.testing.assert_close(a.grad, expected)


def test_dropout_draws_a_new_order_each_step_from_its_generator_alone():
    eta, y = _batch("categorical", (B, M, K))
    task = TASKS["categorical"]
    first = prefix_objective(task, 0.99, M, "uniform", 1.0, torch.Generator().manual_seed(5))
    again = prefix_objective(task, 0.99, M, "uniform", 1.0, torch.Generator().manual_seed(5))
    steps = [first(eta, y) for _ in range(4)]
    assert [float(v) for v in steps] == [float(again(eta, y)) for _ in range(4)]  # reproducible on resume
    assert len({round(float(v), 12) for v in steps}) > 1  # and not one fixed order
    fixed = prefix_objective(task, 0.99, M, "uniform", 1.0)
    assert float(fixed(eta, y)) == float(fixed(eta, y))


def test_loss_for_epoch_builds_each_registered_loss():
    eta, y = _batch("categorical", (B, M, K))
    eta = eta.float()
    for loss in ("modular", "mcl", "prefix", "dropout"):
        cfg = TrainConfig(loss=loss, modules=M, dataset="fashion-mnist")
        value = loss_for_epoch(cfg, 0)(eta, y)
        assert value.dim() == 0 and torch.isfinite(value)
    base = loss_for_epoch(TrainConfig(modules=M), 0)(eta, y)
    assert float(loss_for_epoch(TrainConfig(loss="prefix", modules=M), 0)(eta, y)) > float(base)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"prefix_weights": "small"}, "apply to --loss prefix or dropout"),
        ({"loss": "prefix", "prefix_weights": "big"}, "--prefix-weights"),
        ({"loss": "prefix", "prefix_scale": -1.0}, "--prefix-scale"),
    ],
)
def test_prefix_options_are_checked(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**options)


def test_prefix_losses_train_regression_and_counts_but_mcl_does_not():
    TrainConfig(loss="prefix", dataset="diabetes", modules=4)
    TrainConfig(loss="dropout", dataset="linnerud", modules=4)
    with pytest.raises(ConfigError, match="modular loss"):
        TrainConfig(loss="mcl", dataset="diabetes", modules=4)
