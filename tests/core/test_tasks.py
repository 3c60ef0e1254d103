"""The task abstraction without torch: one registered task per kind, and how each turns the mean
of the modules' outputs into an answer."""

from __future__ import annotations

import numpy as np
import pytest

from quorum.core.errors import QuorumError
from quorum.core.tasks import get_task, list_tasks, softmax, task_of_family
from quorum.core.tasks.classification import SMALL


def test_every_kind_has_its_family_combiner_and_metric():
    table = {(t.kind, t.family, t.combiner, t.metric, t.has_classes) for t in map(get_task, list_tasks())}
    assert table == {
        ("classification", "categorical", "mean_logits_softmax", "error", True),
        ("regression", "gaussian", "mean", "RMSE", False),
        ("count", "poisson", "mean_exp", "RMSE", False),
    }
    assert task_of_family("poisson") is get_task("count")
    with pytest.raises(QuorumError, match="known tasks: classification, count, regression"):
        get_task("survival")


@pytest.mark.parametrize("n", [1, 3, SMALL // 10 + 1, 200])  # below and above the Python-float path
def test_classification_answers_the_softmax_of_the_mean_logits(n):
    mean = np.random.default_rng(n).normal(0, 8, (n, 10)).astype(np.float32)
    reference = softmax(mean.astype(np.float64))
    probs = get_task("classification").combine(mean.copy(), np.ones((1, 10)), np.zeros((1, 10)))
    assert probs.dtype == np.float32 and probs.shape == (n, 10)
    np.testing.assert_allclose(probs, reference, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(probs.argmax(1), reference.argmax(1))


def test_softmax_is_stable_for_large_logits():
    z = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    np.testing.assert_allclose(softmax(z), [[1 / (1 + np.e**-1), 1 / (1 + np.e), 0.0]], rtol=1e-6)


def test_regression_undoes_the_standardization_and_counts_exponentiate():
    mean = np.array([[0.5, -1.0]], np.float32)
    scale, shift = np.array([[10.0, 2.0]], np.float32), np.array([[100.0, 0.0]], np.float32)
    np.testing.assert_allclose(get_task("regression").combine(mean, scale, shift), [[105.0, -2.0]])
    np.testing.assert_allclose(get_task("count").combine(mean, scale, shift), np.exp(mean), rtol=1e-6)
