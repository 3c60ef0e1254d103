"""Selection algorithms on small constructed logits whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quorum.core.tasks import get_task
from quorum.exporter.selection import classifier_anytime_order, greedy_anytime_order
from quorum.exporter.specialists import (
    best_of_random_specialist,
    ensemble_f1,
    f1_score,
    greedy_specialist,
    one_vs_all_counts,
    select_specialists,
)

N, M, K = 600, 12, 4


def _noise(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits of M weak modules: a small push towards the true class plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, N)
    logits = rng.normal(0, 1, (N, M, K)).astype(np.float32)
    logits[np.arange(N), :, y] += 0.3
    return logits, y


def test_planted_strong_module_comes_first():
    logits, y = _noise()
    logits[np.arange(N), 7, y] += 4.0  # module 7 is nearly always right and confident
    order = greedy_anytime_order(logits, y)
    assert order[0] == 7
    assert sorted(order) == list(range(M))


def test_order_prefers_a_complementary_module_to_a_copy():
    # modules 0 and 1 are identical and good; module 2 is as good but errs elsewhere:
    # after one of the twins, adding 2 helps the pair more than adding the other twin.
    logits, y = _noise(1)
    right = np.zeros((N, K), np.float32)
    right[np.arange(N), y] = 3.0
    half = np.arange(N) < N // 2
    logits[:, 0] = logits[:, 1] = np.where(half[:, None], right, 0.0)
    logits[:, 2] = np.where(~half[:, None], right, 0.0)
    for score in ("brier", "nll"):
        first_two = set(greedy_anytime_order(logits, y, score=score)[:2])
        assert 2 in first_two and len(first_two & {0, 1}) == 1


def test_order_is_the_same_in_chunks_and_from_torch():
    logits, y = _noise(2)
    assert greedy_anytime_order(logits, y) == greedy_anytime_order(torch.from_numpy(logits), y, chunk_elems=N * K)


def test_brier_order_is_not_decided_by_a_few_confident_mistakes():
    # module 0 is right and sure on 99 % of the images and absurdly sure of a wrong class on 1 %;
    # module 1 is right everywhere but less sure. The log-likelihood starts with 1 (module 0
    # costs 50 nats on each of its mistakes); the Brier score, bounded at 2 per image, with 0.
    rng = np.random.default_rng(5)
    y = rng.integers(0, K, N)
    logits = np.zeros((N, 2, K), np.float32)
    logits[np.arange(N), 0, y] = 8.0
    bad = np.arange(N) < N // 100
    logits[bad, 0] = 0.0
    logits[bad, 0, (y[bad] + 1) % K] = 50.0
    logits[np.arange(N), 1, y] = 2.5  # p(y) = 0.80: NLL 0.22 against module 0's 0.5; Brier 0.05 against 0.02
    assert greedy_anytime_order(logits, y)[0] == 0
    assert greedy_anytime_order(logits, y, score="nll")[0] == 1


def test_candidate_losses_match_their_definitions():
    from quorum.exporter._candidates import as_slabs
    from quorum.exporter.selection import _candidate_losses

    logits, y = _noise(6)
    lt, yt = torch.from_numpy(logits), torch.from_numpy(y)
    lt[:, 5] *= 60.0  # a module sure enough that exp underflows far below its top class
    total = lt[:, :3].sum(1)  # (N, K): a prefix of three modules; every module a candidate fourth
    exact, exact_total = lt.double(), total.double()
    p = torch.softmax((exact_total.unsqueeze(1) + exact) / 4, -1)  # (N, M, K)
    onehot = torch.nn.functional.one_hot(yt, K).double()  # (N, K)
    target = torch.softmax(exact.mean(1), -1)  # (N, K)
    classes = get_task("classification")
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        slabs = as_slabs(lt).to(dtype)

        def losses(score: str, against: torch.Tensor, sign: int = 1, size: int = 4, slabs=slabs, dtype=dtype):
            args = (total.T.to(dtype), slabs, sign, size, against.T.to(dtype).contiguous(), torch.empty_like(slabs))
            return _candidate_losses(classes, score, *args).double()

        expected = ((p - onehot.unsqueeze(1)) ** 2).sum(-1).mean(0)  # the Brier score
        torch.testing.assert_close(losses("brier", onehot), expected, rtol=tol, atol=0)
        expected = -(p.log() * onehot.unsqueeze(1)).sum(-1).mean(0)
        torch.testing.assert_close(losses("nll", onehot), expected, rtol=tol, atol=0)
        expected = ((p - target.unsqueeze(1)) ** 2).sum(-1).mean(0)
        torch.testing.assert_close(losses("brier", target), expected, rtol=tol, atol=0)
        pairs = torch.softmax((exact_total.unsqueeze(1) - exact[:, :3]) / 2, -1)  # each of the three left out
        expected = ((pairs - onehot.unsqueeze(1)) ** 2).sum(-1).mean(0)
        torch.testing.assert_close(losses("brier", onehot, -1, 2, slabs=slabs[:3]), expected, rtol=tol, atol=0)
    with pytest.raises(ValueError, match="score"):
        greedy_anytime_order(logits, y, score="accuracy")


def test_class_losses_without_a_pass_for_the_largest_term_match_their_definitions():
    from quorum.exporter._candidates import as_slabs, flush_subnormals
    from quorum.exporter.selection import _LOG2E, _class_losses

    logits, y = _noise(8)
    lt, yt = torch.from_numpy(logits), torch.from_numpy(y)
    lt[:, 5] *= 60.0  # exponents far below the largest: subnormal without the flush, and still exact
    slabs = as_slabs(lt)  # (M, K, N)
    total = lt[:, :3].sum(1).double().T  # (K, N): a prefix of three modules
    onehot = torch.nn.functional.one_hot(yt, K).double()  # (N, K)
    target = torch.softmax(lt.double().mean(1), -1)  # (N, K)
    label = yt * N + torch.arange(N)

    def expected(sign: int, size: int, against: torch.Tensor, nll: bool = False) -> torch.Tensor:
        p = torch.softmax((total.T.unsqueeze(1) + sign * lt.double()) / size, -1)  # (N, M, K)
        if nll:
            return -(p.log() * against.unsqueeze(1)).sum(-1).mean(0)
        return ((p - against.unsqueeze(1)) ** 2).sum(-1).mean(0)

    def losses(score: str, sign: int, size: int, against: torch.Tensor, by_label: torch.Tensor | None):
        cands = slabs - (slabs.amax(1, keepdim=True) if sign > 0 else slabs.amin(1, keepdim=True))
        scale = _LOG2E / size
        shifted = (total - total.amax(0, keepdim=True)).mul(scale).float()
        target32 = against.T.float().contiguous()
        with flush_subnormals():
            got = _class_losses(score, shifted, cands, sign * scale, target32, by_label, torch.empty_like(cands))
        assert got is not None
        return got.double()

    for sign, size in ((1, 4), (-1, 2)):
        torch.testing.assert_close(
            losses("brier", sign, size, onehot, label), expected(sign, size, onehot), rtol=1e-5, atol=0
        )
        nll = expected(sign, size, onehot, nll=True)
        torch.testing.assert_close(losses("nll", sign, size, onehot, label), nll, rtol=1e-5, atol=0)
        torch.testing.assert_close(
            losses("brier", sign, size, target, None), expected(sign, size, target), rtol=1e-5, atol=0
        )
    # a candidate sure of class 1 added to a set sure of class 0: every term lies 2^-144 below the bound 0
    far = torch.full((1, K, N), -200.0 * _LOG2E / 2)
    far[:, 1] = 0.0
    shifted = torch.full((K, N), -200.0 * _LOG2E / 2)
    shifted[0] = 0.0
    assert _class_losses("brier", shifted, far, 1.0, onehot.T.float(), label, torch.empty_like(far)) is None
    from tests.exporter.reference_selection import reference_anytime_order

    planted = logits[:, :6].copy()  # two modules sure of different classes: their sums take the slow path
    planted[:, 0, 0] += 1000.0
    planted[:, 1, 1] += 1000.0
    for steps in ({}, {"labelled": 2, "backward_above": 3}):
        assert greedy_anytime_order(planted, y, **steps) == reference_anytime_order(
            planted, y, dtype=torch.float64, **steps
        )


def test_steps_after_the_labelled_ones_match_the_whole_ensemble():
    # modules 0 and 1 lean to the true class, module 2 to one wrong class, module 3 says nothing.
    # Against the labels the order is 0, 1, 3, 2. After one labelled step every step brings the
    # prefix's probabilities closest to those of all four, which are far less sure than module 0:
    # module 2 comes second, to soften it (0, 2, 1, 3), and the labels no longer matter.
    logits, y = _noise(7)
    logits = logits[:, :4].copy()
    logits[np.arange(N), 0, y] += 3.0
    logits[np.arange(N), 1, y] += 2.0
    logits[np.arange(N), 2, (y + 1) % K] += 3.0
    logits[:, 3] = 0.0
    by_labels = greedy_anytime_order(logits, y)
    assert by_labels[0] == 0
    assert greedy_anytime_order(logits, y, labelled=M) == by_labels  # more labelled steps than modules
    matched = greedy_anytime_order(logits, y, labelled=1)
    assert matched[0] == by_labels[0] and matched[1:] != by_labels[1:]
    lt = torch.from_numpy(logits)
    p_all = torch.softmax(lt.mean(1), -1)
    total = lt[:, matched[0]].clone()
    for t, j in enumerate(matched[1:], start=2):  # each later step: the closest prefix, no label used
        rest = [r for r in range(4) if r not in matched[: t - 1]]
        dist = [float(((torch.softmax((total + lt[:, r]) / t, -1) - p_all) ** 2).sum(-1).mean()) for r in rest]
        assert j == rest[int(np.argmin(dist))]
        total += lt[:, j]
    shuffled = np.random.default_rng(0).permutation(y)
    assert greedy_anytime_order(logits, shuffled, labelled=0) == greedy_anytime_order(logits, y, labelled=0)
    with pytest.raises(ValueError, match="labelled"):
        greedy_anytime_order(logits, y, labelled=-1)
    with pytest.raises(ValueError, match="labelled"):
        greedy_anytime_order(logits, y.astype(np.float32)[:, None], task=get_task("regression"), labelled=1)


def test_backward_tail_leaves_out_what_the_whole_ensemble_needs_least():
    # module 7 is strong and comes first. Module 11 is the mean of the other eleven: all twelve
    # together say exactly what the other eleven say, so backward elimination removes it first
    # and it goes last.
    logits, y = _noise(8)
    logits[np.arange(N), 7, y] += 4.0
    logits[:, 11] = logits[:, :11].mean(axis=1)
    lt = torch.from_numpy(logits)
    forward = greedy_anytime_order(logits, y, labelled=1)
    order = greedy_anytime_order(logits, y, labelled=1, backward_above=1)
    assert sorted(order) == list(range(M))
    assert order[0] == forward[0] == 7  # the head is the forward order's
    assert order[-1] == 11
    p_all = torch.softmax(lt.mean(1), -1)
    total = lt.sum(1)
    for size in range(M, 1, -1):  # each tail step: the removal that moves the whole least
        j, rest = order[size - 1], order[1:size]
        dist = [float(((torch.softmax((total - lt[:, r]) / (size - 1), -1) - p_all) ** 2).sum(-1).mean()) for r in rest]
        assert j == rest[int(np.argmin(dist))]
        total -= lt[:, j]
    assert greedy_anytime_order(logits, y, labelled=1, backward_above=6)[:6] == forward[:6]
    assert greedy_anytime_order(logits, y, labelled=1, backward_above=M) == forward
    with pytest.raises(ValueError, match="backward_above"):
        greedy_anytime_order(logits, y, backward_above=0)
    with pytest.raises(ValueError, match="backward_above"):
        greedy_anytime_order(logits, y.astype(np.float32)[:, None], task=get_task("regression"), backward_above=1)


def test_first_by_error_takes_the_most_accurate_lone_module():
    # Module 3 says almost nothing (near-uniform probabilities); module 9 is right on 60 % of the
    # images but certain of every answer, wrong ones too. Alone, 3 has the better Brier score and
    # 9 by far the fewer errors.
    logits, y = _noise(3)
    rng = np.random.default_rng(3)
    logits[:, 3] = rng.normal(0, 1e-3, (N, K))
    wrong = (y + rng.integers(1, K, N)) % K
    logits[:, 9] = 20.0 * np.eye(K, dtype=np.float32)[np.where(rng.random(N) < 0.6, y, wrong)]
    lt, yt = torch.from_numpy(logits), torch.from_numpy(y)
    brier = ((torch.softmax(lt, -1) - torch.nn.functional.one_hot(yt, K)[:, None]) ** 2).sum(-1).mean(0)  # (M,)
    errors = (lt.argmax(-1) != yt[:, None]).sum(0)
    assert int(brier.argmin()) == 3 and int(errors.argmin()) == 9  # the premise
    assert greedy_anytime_order(logits, y)[0] == 3
    order = greedy_anytime_order(logits, y, labelled=3, backward_above=6, first_by_error=True)
    assert order[0] == 9 and sorted(order) == list(range(M))
    # the second step is the Brier step from module 9: the module whose mean with it scores best
    pair = torch.softmax((lt[:, 9:10] + lt) / 2, -1)  # (N, M, K)
    pair_brier = ((pair - torch.nn.functional.one_hot(yt, K)[:, None]) ** 2).sum(-1).mean(0)
    pair_brier[9] = float("inf")
    assert order[1] == int(pair_brier.argmin())
    with pytest.raises(ValueError, match="first_by_error"):
        greedy_anytime_order(logits, y.astype(np.float32)[:, None], task=get_task("regression"), first_by_error=True)


def test_f1_from_counts_and_one_vs_all():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    tp, fp, fn = one_vs_all_counts(pred, y, 0)
    assert (int(tp), int(fp), int(fn)) == (1, 1, 1)
    assert float(f1_score(tp, fp, fn)) == pytest.approx(0.5)
    tp, fp, fn = one_vs_all_counts(pred, y, 1)  # precision 2/3, recall 1
    assert float(f1_score(tp, fp, fn)) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert float(f1_score(0, 0, 0)) == 0.0  # nothing positive, nothing predicted
    # columns of candidates at once
    both = np.stack([pred, y], axis=1)
    assert f1_score(*one_vs_all_counts(both, y, 0)).tolist() == pytest.approx([0.5, 1.0])


def test_ensemble_f1_averages_logits_before_the_argmax():
    y = np.array([0, 1])
    logits = np.zeros((2, 2, 2), np.float32)
    logits[:, 0] = [[3, 0], [3, 0]]  # says class 0 strongly, always
    logits[:, 1] = [[0, 1], [0, 5]]  # says class 1, strongly on the second image
    assert ensemble_f1(logits, y, 1) == pytest.approx(1.0)  # mean: [1.5, .5] -> 0; [1.5, 2.5] -> 1
    assert ensemble_f1(logits, y, 1, subset=[0]) == 0.0


def _planted_specialists(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Modules 2, 5 and 9 are experts on class 1 (strong evidence for and against it); others are noise."""
    logits, y = _noise(seed)
    for j in (2, 5, 9):
        logits[:, j, 1] += np.where(y == 1, 3.0, -3.0)
    return logits, y


def test_greedy_specialist_finds_the_planted_experts():
    logits, y = _planted_specialists()
    spec = greedy_specialist(logits, y, c=1, k=3)
    assert sorted(spec.modules) == [2, 5, 9]
    assert spec.f1 == pytest.approx(ensemble_f1(logits, y, 1, spec.modules))
    assert spec.f1 > ensemble_f1(logits, y, 1)  # the experts beat the whole ensemble on class 1


def test_best_of_random_is_reproducible_and_no_better_than_greedy_here():
    logits, y = _planted_specialists()
    a = best_of_random_specialist(logits, y, c=1, k=3, tries=50, seed=4)
    b = best_of_random_specialist(logits, y, c=1, k=3, tries=50, seed=4)
    assert a == b and len(set(a.modules)) == 3
    assert a.f1 == pytest.approx(ensemble_f1(logits, y, 1, a.modules))
    assert greedy_specialist(logits, y, c=1, k=3).f1 >= a.f1


def test_swaps_repair_a_greedy_start():
    # Greedy's first pick is the module with the best F1 alone: module 0, a decent generalist.
    # The best pair is two complementary experts (1 and 2), each right on half the positives;
    # only a swap can drop module 0 again.
    logits, y = _noise(5)
    pos = np.flatnonzero(y == 0)
    first, second = pos[: len(pos) // 2], pos[len(pos) // 2 :]
    logits[:, 0, 0] += np.where(y == 0, 2.5, -0.4)
    for j, part in ((1, first), (2, second)):
        logits[:, j, 0] -= 2.0
        logits[part, j, 0] += 8.0
    without = greedy_specialist(logits, y, c=0, k=2, max_swap_rounds=0)
    with_swaps = greedy_specialist(logits, y, c=0, k=2)
    assert without.modules[0] == 0 and sorted(with_swaps.modules) == [1, 2]
    assert with_swaps.f1 > without.f1 + 0.1
    assert with_swaps.f1 == pytest.approx(ensemble_f1(logits, y, 0, with_swaps.modules))


def test_k_larger_than_m_takes_every_module_and_select_covers_every_class():
    logits, y = _noise(6)
    assert sorted(greedy_specialist(logits, y, c=0, k=50).modules) == list(range(M))
    specs = select_specialists(logits, y, k=2)
    assert [s.class_index for s in specs] == list(range(K)) and all(len(s.modules) == 2 for s in specs)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"logits \(N, M, K\)"):
        greedy_anytime_order(np.zeros((4, 3)), np.zeros(4))


def test_export_selection_matches_the_reference_algorithms_on_a_trained_run(run_dir):
    # The reference is the algorithm these replaced (tests/exporter/reference_selection.py). In
    # float64 it decides every step exactly as the product does; in float32 (the old product) it
    # may differ only where its rounding decides a near-tie, and there the product's choice is the
    # better one in float64. The specialists are identical bit for bit.
    from tests.exporter.reference_selection import (
        first_divergence,
        reference_classifier_order,
        reference_specialists,
        validation_logits,
    )

    logits, y = validation_logits(run_dir)
    logits, y = logits[:4000], y[:4000]  # of the 10,000: the float64 reference is slow
    order = classifier_anytime_order(logits, y)
    assert order == reference_classifier_order(logits, y, dtype=torch.float64)
    where = first_divergence(reference_classifier_order(logits, y), order, logits, y)
    if where is not None:
        _, _, _, old_loss, new_loss = where
        assert new_loss <= old_loss <= new_loss + 1e-6 * abs(new_loss)
    new, old = select_specialists(logits, y, 20), reference_specialists(logits, y, 20)
    assert [(s.modules, s.f1) for s in new] == [(s.modules, s.f1) for s in old]
