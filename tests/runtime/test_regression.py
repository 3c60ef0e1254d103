"""The engine on regression and count bundles (tests/conftest.py builds them): real ONNX
Runtime sessions of linear modules fitted on scikit-learn's diabetes and linnerud data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn import datasets

from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest
from quorum.runtime.faults import FaultPlan
from quorum.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def diabetes() -> tuple[np.ndarray, np.ndarray]:
    """Raw features (442, 10) and disease progression (442,)."""
    bunch = datasets.load_diabetes(scaled=False)
    return bunch.data, bunch.target


@pytest.fixture(scope="module")
def linnerud() -> tuple[np.ndarray, np.ndarray]:
    """Body measures (20, 3) and exercise counts (20, 3)."""
    bunch = datasets.load_linnerud()
    return bunch.target, bunch.data


@pytest.fixture(scope="module")
def regression(regression_bundle: Path) -> Engine:
    return Engine.load(regression_bundle, device="cpu")


@pytest.fixture(scope="module")
def count(count_bundle: Path) -> Engine:
    return Engine.load(count_bundle, device="cpu")


def _reference(bundle: Path, x_raw: np.ndarray, ids: list[int]) -> np.ndarray:
    """The manifest's combiner by hand: numpy preprocessing, one plain session per module."""
    m = Manifest.load(bundle)
    x = ((x_raw * m.input.scale - np.array(m.input.mean)) / np.array(m.input.std)).astype(np.float32)  # (N, F)
    outputs = [ort.InferenceSession(str(bundle / m.modules[j].file)).run(None, {"input": x})[0] for j in ids]
    mean = np.mean(outputs, axis=0)  # (N, D)
    if m.output.combiner == "mean_exp":
        return np.exp(mean)
    assert m.output.target_scale is not None and m.output.target_shift is not None
    return mean * np.array(m.output.target_scale) + np.array(m.output.target_shift)


@pytest.mark.parametrize("budget", [2, None])
def test_regression_values_are_the_scaled_mean_of_the_modules(
    regression: Engine, regression_bundle: Path, diabetes, budget
):
    x, _ = diabetes
    r = regression.predict(x[:64], budget=budget)
    assert r.task == "regression" and r.used == [0, 1, 2, 3, 4][:budget] and not r.degraded
    assert r.values.shape == (64, 1) and r.values.dtype == np.float32
    np.testing.assert_allclose(r.values, _reference(regression_bundle, x[:64], r.used), rtol=1e-5)
    # no classes: the classification view is empty
    assert r.probabilities.shape == (64, 0) and r.labels.size == 0 and r.class_names == []


def test_the_full_regression_ensemble_explains_diabetes_progression(regression: Engine, diabetes):
    x, y = diabetes
    values = regression.predict(x).values[:, 0]
    r2 = 1 - ((values - y) ** 2).mean() / y.var()
    assert r2 > 0.45  # ordinary least squares on all 10 features reaches 0.52


@pytest.mark.parametrize("budget", [2, None])
def test_count_values_are_the_exp_of_the_mean_of_the_modules(count: Engine, count_bundle: Path, linnerud, budget):
    x, y = linnerud
    r = count.predict(x, budget=budget)
    assert r.task == "count" and r.values.shape == (20, 3) and (r.values > 0).all()
    np.testing.assert_allclose(r.values, _reference(count_bundle, x, r.used), rtol=1e-5)
    assert count.manifest.task.target_names == ["Chins", "Situps", "Jumps"]
    if budget is None:  # the expected counts are of the data's order of magnitude
        np.testing.assert_allclose(r.values.mean(axis=0), y.mean(axis=0), rtol=0.2)


def test_tabular_inputs_are_normalized_per_feature(regression: Engine, diabetes):
    x, _ = diabetes
    m = regression.manifest.input
    assert m.shape == [10] and len(m.mean) == 10 and m.raw_range is None
    np.testing.assert_allclose(
        regression.preprocess(x[:8]), (x[:8] - np.array(m.mean)) / np.array(m.std), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InvalidRequest, match=r"shape \(N, 10\)"):
        regression.predict(x[:2, :9])


def test_drop_and_failing_modules_leave_a_degraded_answer_of_the_rest(
    regression: Engine, regression_bundle: Path, diabetes
):
    x, _ = diabetes
    r = regression.predict(x[:16], drop=2, seed=3)
    assert len(r.dropped) == 2 and len(r.used) == 3 and r.degraded
    np.testing.assert_allclose(r.values, _reference(regression_bundle, x[:16], r.used), rtol=1e-5)

    r = regression.predict(x[:16], faults=FaultPlan(fail=frozenset({1}), nan=frozenset({3})))
    assert r.used == [0, 2, 4] and r.degraded and r.requested == 5
    assert {(f.id, f.kind, f.injected) for f in r.failed} == {(1, "error", True), (3, "nonfinite", True)}
    np.testing.assert_allclose(r.values, _reference(regression_bundle, x[:16], [0, 2, 4]), rtol=1e-5)


def test_specialists_are_refused_on_bundles_without_classes(regression: Engine, count: Engine, diabetes):
    x, _ = diabetes
    with pytest.raises(InvalidRequest, match=r"specialists answer class questions.*regression model of progression"):
        regression.predict_specialist(x[:2], 0)
    with pytest.raises(InvalidRequest, match="count model"):
        count.predict_specialist(x[:2, :3], "Chins")
    with pytest.raises(InvalidRequest, match="no classes"):
        regression.class_index(0)


def test_counts_that_overflow_float32_are_refused(count: Engine, linnerud):
    x, _ = linnerud
    # Hundreds of standard deviations out, either way (within the inputs' bound): the modules'
    # log-rates are finite, and on one side of the data their exp is not.
    far = x.mean(axis=0) + 900 * x.std(axis=0) * np.array([[1.0], [-1.0]])  # (2, 3)
    assert np.isfinite(count.module_logits(far)).all()
    with pytest.raises(InvalidRequest, match="overflows float32"):
        count.predict(far)
    with pytest.raises(InvalidRequest, match="within 1000 standard deviations"):
        count.predict(x.mean(axis=0) + 1e4 * x.std(axis=0) * np.ones((1, 3)))


def test_module_outputs_are_the_natural_parameters(regression: Engine, regression_bundle: Path, diabetes):
    x, _ = diabetes
    out = regression.module_logits(x[:4], [0, 1])  # (N, M, D)
    assert out.shape == (4, 2, 1)
    scale, shift = 77.0, 152.0
    np.testing.assert_allclose(
        out.mean(axis=1) * scale + shift, _reference(regression_bundle, x[:4], [0, 1]), rtol=1e-5
    )
