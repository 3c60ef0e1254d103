from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quorum.core.errors import QuorumError
from quorum.core.tasks import get_task, list_tasks, task_of_family
from quorum.trainer.config import TrainConfig
from quorum.trainer.diagnostics import oracle_accuracy
from quorum.trainer.errors import ConfigError
from quorum.trainer.loss import check_lambda, ensemble_logits, mcl_loss, modular_loss

REGRESSION, COUNT, CLASSIFICATION = get_task("regression"), get_task("count"), get_task("classification")

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


# --- Gaussian and Poisson targets --------------------------------------------------------------

GLM = {"gaussian": (REGRESSION.modular_loss, lambda e: e), "poisson": (COUNT.modular_loss, torch.exp)}  # loss, g
D = 3


def _glm_batch(family: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Module outputs `shape` = (B, M) or (B, M, D) and targets (B,) or (B, D), float64."""
    g = torch.Generator().manual_seed(1)
    eta = torch.randn(shape, generator=g, dtype=torch.float64)
    target_shape = shape[:1] + shape[2:]
    if family == "gaussian":
        return 2 * eta, 2 * torch.randn(target_shape, generator=g, dtype=torch.float64)
    return 0.5 * eta, torch.poisson(torch.full(target_shape, 2.0, dtype=torch.float64), generator=g)


@pytest.mark.parametrize("shape", [(B, M), (B, M, D)])
@pytest.mark.parametrize("family", sorted(GLM))
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9, 1.0])
def test_glm_gradient_matches_eq_8(family, shape, lam):
    """∂L/∂η_j = (1/M)((1−λ) g(η_j) + λ g(η̄) − y), per example and output; the batch mean adds 1/B."""
    loss, g = GLM[family]
    eta, y = _glm_batch(family, shape)
    eta.requires_grad_(True)
    loss(eta, y, lam).backward()
    y = y.unsqueeze(1)  # (B, 1) or (B, 1, D)
    expected = ((1 - lam) * g(eta) + lam * g(eta.mean(1, keepdim=True)) - y).detach() / M / B
    torch.testing.assert_close(eta.grad, expected)
    assert torch.autograd.gradcheck(lambda e: loss(e, y.squeeze(1), lam), (eta.detach().requires_grad_(True),))


@pytest.mark.parametrize("shape", [(B, M), (B, M, D)])
@pytest.mark.parametrize("family", sorted(GLM))
def test_glm_extremes_are_the_ensemble_and_the_member_nll(family, shape):
    """λ = 1: NLL of the combined η̄; λ = 0: mean of the members' NLLs (sum over outputs, batch mean)."""
    loss, _ = GLM[family]
    eta, y = _glm_batch(family, shape)
    eta_bar, y_m = eta.mean(1), y.unsqueeze(1).expand_as(eta)
    if family == "gaussian":
        joint, members = 0.5 * (eta_bar - y).square(), 0.5 * (eta - y_m).square()
    else:  # torch's Poisson NLL with log_input is exp(η) − y·η
        joint = F.poisson_nll_loss(eta_bar, y, log_input=True, reduction="none")
        members = F.poisson_nll_loss(eta, y_m, log_input=True, reduction="none")
    n_out = eta.shape[2] if eta.dim() == 3 else 1
    torch.testing.assert_close(loss(eta, y, 1.0), joint.mean() * n_out)
    torch.testing.assert_close(loss(eta, y, 0.0), members.mean() * n_out)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_gaussian_loss_is_ncl(lam):
    """Ambiguity form for squared loss: mean_j (η_j − y)²/2 − λ · mean_j (η_j − η̄)²/2."""
    eta, y = _glm_batch("gaussian", (B, M))
    members = 0.5 * (eta - y.unsqueeze(1)).square().mean(1)
    ambiguity = 0.5 * (eta - eta.mean(1, keepdim=True)).square().mean(1)
    torch.testing.assert_close(REGRESSION.modular_loss(eta, y, lam), (members - lam * ambiguity).mean())


def test_each_family_has_one_task_that_owns_its_loss(batch):
    logits, y = batch
    torch.testing.assert_close(CLASSIFICATION.modular_loss(logits, y, 0.5), modular_loss(logits, y, 0.5))
    for family, (loss, _) in GLM.items():
        assert task_of_family(family).modular_loss == loss
    assert {task_of_family(f).kind for f in ("categorical", "gaussian", "poisson")} == set(list_tasks())
    with pytest.raises(QuorumError, match="categorical, gaussian, poisson"):
        task_of_family("bernoulli")
    with pytest.raises(QuorumError, match="classification, count, regression"):
        get_task("ranking")


def test_mean_prediction_is_the_inverse_link_of_the_mean_parameter(batch):
    logits, _ = batch
    probs = CLASSIFICATION.mean_prediction(logits)  # (B, K)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, dtype=torch.float64))
    # normalized geometric mean of the members' probabilities
    geo = torch.softmax(logits, -1).log().mean(1).exp()
    torch.testing.assert_close(probs, geo / geo.sum(-1, keepdim=True))
    eta, _ = _glm_batch("poisson", (B, M, D))
    torch.testing.assert_close(REGRESSION.mean_prediction(eta), eta.mean(1))
    # the Poisson ensemble rate is the geometric mean of the members' rates
    torch.testing.assert_close(COUNT.mean_prediction(eta), eta.exp().prod(1) ** (1 / M))


# --- Multiple Choice Learning -------------------------------------------------------------------


def _member_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, M): each member's CE on each example, one member at a time."""
    return torch.stack([F.cross_entropy(logits[:, j], y, reduction="none") for j in range(logits.shape[1])], 1)


def test_mcl_with_k_equal_m_is_independent_training(batch):
    logits, y = batch
    torch.testing.assert_close(mcl_loss(logits, y, M), _member_ce(logits, y).mean())
    torch.testing.assert_close(mcl_loss(logits, y, M), modular_loss(logits, y, 0.0))


def test_mcl_on_a_hand_computed_example():
    """CE of p(y) = 1/2, 3/4, 1/4 is log 2, log 4/3, log 4; sorted per example: log 4/3, log 2, log 4."""
    t = math.log(3)
    y = torch.tensor([0, 1])
    logits = torch.tensor(
        [
            [[0.0, 0.0], [t, 0.0], [0.0, t]],  # target 0: CE log 2, log 4/3, log 4
            [[0.0, t], [0.0, 0.0], [t, 0.0]],  # target 1: CE log 4/3, log 2, log 4
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    assert mcl_loss(logits, y, 1).item() == pytest.approx(math.log(4 / 3))
    assert mcl_loss(logits, y, 2).item() == pytest.approx(math.log(8 / 3) / 2)
    assert mcl_loss(logits, y, 3).item() == pytest.approx(math.log(32 / 3) / 3)
    mcl_loss(logits, y, 1).backward()
    assert logits.grad is not None
    trained = logits.grad.abs().sum(-1) > 0  # (B, M)
    assert trained.tolist() == [[False, True, False], [True, False, False]]
    # the chosen member gets (softmax − one-hot) / B: p = (3/4, 1/4) against class 0, (1/4, 3/4) against 1
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([-0.125, 0.125], dtype=torch.float64))
    torch.testing.assert_close(logits.grad[1, 0], torch.tensor([0.125, -0.125], dtype=torch.float64))


@pytest.mark.parametrize("k", range(1, M + 1))
def test_mcl_trains_only_the_k_lowest_loss_members(batch, k):
    logits, y = batch
    eta = logits.clone().requires_grad_(True)
    mcl_loss(eta, y, k).backward()
    assert eta.grad is not None
    ce = _member_ce(logits, y)  # (B, M)
    chosen = torch.zeros(B, M, dtype=torch.bool).scatter_(1, ce.argsort(1)[:, :k], True)
    assert torch.equal(eta.grad.abs().sum(-1) > 0, chosen)
    one_member = (torch.softmax(logits, -1) - F.one_hot(y, K).unsqueeze(1)) / (B * k)  # (B, M, K)
    torch.testing.assert_close(eta.grad, one_member * chosen.unsqueeze(-1))
    if k == 1:
        torch.testing.assert_close(mcl_loss(logits, y, 1), ce.min(1).values.mean())  # Lee's oracle set-loss


def test_mcl_reads_module_major_logits(batch):
    """The batched models return (B, M, K) views of (M, K, B) tensors."""
    logits, y = batch
    module_major = logits.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert not module_major.is_contiguous()
    for k in (1, 3, M):
        torch.testing.assert_close(mcl_loss(module_major, y, k), mcl_loss(logits.contiguous(), y, k))


@pytest.mark.parametrize("k", [0, -1, M + 1])
def test_mcl_refuses_k_outside_one_to_m(batch, k):
    logits, y = batch
    with pytest.raises(ConfigError, match=rf"need 1 <= k <= {M}, got k = {k}"):
        mcl_loss(logits, y, k)


# --- Oracle accuracy (the metric MCL optimizes) -------------------------------------------------


def test_oracle_accuracy_is_any_member_right_not_the_lowest_loss_member():
    y = torch.tensor([0, 0, 0, 0])
    p = torch.tensor(
        [
            [[0.8, 0.2, 0.0], [0.1, 0.2, 0.7]],  # member 0 right
            [[0.40, 0.30, 0.30], [0.45, 0.55, 0.0]],  # member 0 right; member 1 has the lower CE but is wrong
            [[0.4, 0.5, 0.1], [0.4, 0.1, 0.5]],  # nobody right, yet the mean of the logits picks class 0
            [[0.1, 0.9, 0.0], [0.1, 0.8, 0.1]],  # nobody right
        ],
        dtype=torch.float64,
    )
    logits = (p + 1e-3).log()  # (N, M, K)
    assert oracle_accuracy(logits, y) == pytest.approx(0.5)
    lowest_loss = _member_ce(logits, y).argmin(1)  # (N,)
    assert lowest_loss[1] == 1 and logits[1, 1].argmax() != 0
    # so the ensemble-mean accuracy (0.75) can even exceed the oracle's on a batch
    assert ensemble_logits(logits).argmax(-1).tolist() == [0, 0, 0, 1]


def test_oracle_accuracy_bounds_member_and_ensemble_accuracy_on_random_data():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(500, M, 10, generator=g)
    y = torch.randint(0, 10, (500,), generator=g)
    oracle = oracle_accuracy(logits, y)
    members = (logits.argmax(-1) == y.unsqueeze(1)).double().mean(0)  # (M,)
    assert oracle >= members.max().item()  # always: any member right includes member j right
    # not a per-example bound (see the example above), but it holds by far on random logits
    assert oracle > (ensemble_logits(logits).argmax(-1) == y).double().mean().item()


# --- Coupled ensembles (supplement §D) -----------------------------------------------------------


def test_coupled_ensembles_ll_and_sm_are_independent_training_scaled_by_one_over_m(batch):
    """Dutt et al.'s 'LL' (mean_m CE_m) and 'SM' (NLL of mean_m log_softmax, un-normalized) losses."""
    logits, y = batch
    independent = torch.zeros_like(logits)
    for j in range(M):
        eta_j = logits[:, j].clone().requires_grad_(True)
        F.cross_entropy(eta_j, y).backward()
        assert eta_j.grad is not None
        independent[:, j] = eta_j.grad

    ll = logits.clone().requires_grad_(True)
    torch.stack([F.cross_entropy(ll[:, m], y) for m in range(M)]).mean().backward()
    sm = logits.clone().requires_grad_(True)
    mean_log_probs = torch.log_softmax(sm, -1).mean(1)  # (B, K), as in Dutt et al.'s code
    assert not torch.allclose(mean_log_probs.logsumexp(-1), torch.zeros(B, dtype=torch.float64))  # un-normalized
    F.nll_loss(mean_log_probs, y).backward()

    torch.testing.assert_close(ll.grad, independent / M)
    torch.testing.assert_close(sm.grad, independent / M)
