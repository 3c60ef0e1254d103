from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quorum.trainer.config import TrainConfig
from quorum.trainer.errors import ConfigError
from quorum.trainer.loss import check_lambda, modular_loss

B, M, K = 7, 5, 4


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, M, K, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, K, (B,), generator=g)
    return logits, target


def _formula(logits: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """λ·CE(softmax(mean_j η_j), y) + (1−λ)·mean_j CE(softmax(η_j), y), written out by hand."""
    logq_bar = torch.log_softmax(logits.mean(1), -1)  # (B, K)
    logq = torch.log_softmax(logits, -1)  # (B, M, K)
    joint = -logq_bar[torch.arange(B), y].mean()
    members = -torch.stack([logq[torch.arange(B), j, y] for j in range(M)]).mean()
    return lam * joint + (1 - lam) * members


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.95, 0.99, 1.0])
def test_loss_equals_its_formula(batch, lam):
    logits, y = batch
    torch.testing.assert_close(modular_loss(logits, y, lam), _formula(logits, y, lam))


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
def test_loss_equals_its_ambiguity_form(batch, lam):
    """Supplementary eq. (3): L = mean_j D(p‖q_j) − λ·mean_j D(q̄‖q_j)."""
    logits, y = batch
    logq = torch.log_softmax(logits, -1)  # (B, M, K)
    logq_bar = torch.log_softmax(logits.mean(1), -1).unsqueeze(1)  # (B, 1, K)
    ce_members = -logq.gather(-1, y.view(B, 1, 1).expand(B, M, 1)).squeeze(-1)  # (B, M)
    kl = (logq_bar.exp() * (logq_bar - logq)).sum(-1)  # (B, M): D(q̄ ‖ q_j)
    ambiguity_form = (ce_members.mean(1) - lam * kl.mean(1)).mean()
    torch.testing.assert_close(modular_loss(logits, y, lam), ambiguity_form)


def _grad(logits: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    eta = logits.clone().requires_grad_(True)
    modular_loss(eta, y, lam).backward()
    assert eta.grad is not None
    return eta.grad


def test_lambda_zero_is_independent_training_scaled_by_one_over_m(batch):
    logits, y = batch
    grad = _grad(logits, y, 0.0)
    for j in range(M):
        eta_j = logits[:, j].clone().requires_grad_(True)
        F.cross_entropy(eta_j, y).backward()
        torch.testing.assert_close(grad[:, j], eta_j.grad / M)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_gradient_matches_eq_8(batch, lam):
    """∂L/∂η_j = (1/M)(ŷ_j − y − λ(ŷ_j − ȳ)), per example; the batch mean adds 1/B."""
    logits, y = batch
    y_hat = torch.softmax(logits, -1)  # (B, M, K)
    y_bar = torch.softmax(logits.mean(1), -1).unsqueeze(1)  # (B, 1, K)
    onehot = F.one_hot(y, K).to(logits.dtype).unsqueeze(1)  # (B, 1, K)
    expected = (y_hat - onehot - lam * (y_hat - y_bar)) / M / B
    torch.testing.assert_close(_grad(logits, y, lam), expected)


@pytest.mark.parametrize("lam", [1.0001, 1.5, 2.0])
def test_lambda_above_one_is_refused_citing_theorem_1(lam):
    with pytest.raises(ConfigError, match="Theorem 1"):
        check_lambda(lam)
    with pytest.raises(ConfigError, match="Theorem 1"):
        TrainConfig(lam=lam)


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf")])
def test_lambda_outside_unit_interval_is_refused(lam):
    with pytest.raises(ConfigError):
        check_lambda(lam)


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.99])
def test_lambda_bounds_are_accepted(lam):
    assert check_lambda(lam) == lam
