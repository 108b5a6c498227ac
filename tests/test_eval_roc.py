"""evaluation.roc.roc_points against sklearn's roc_curve: the same points, bit for bit."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from mixbct_jax.evaluation import roc


def _assert_same_as_sklearn(scores, labels):
    fpr, tpr = roc.roc_points(scores, labels)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores)
    assert fpr.dtype == np.float64 and tpr.dtype == np.float64
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 2, 1])  # distinct scores; many ties; ties across both groups
def test_matches_sklearn(dtype, decimals):
    rng = np.random.default_rng(0)
    labels = (rng.random(20000) < 0.02).astype(np.int64)
    scores = rng.standard_normal(labels.size) * 0.2 + 0.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    _assert_same_as_sklearn(scores.astype(dtype), labels)


def test_genuine_only_thresholds_and_extremes():
    # Genuine scores above, between and below all impostors, some tied with impostors, some not.
    scores = np.array([5.0, 0.3, 0.3, 0.1, 0.25, 0.2, 0.2, 0.1, -1.0, 0.0, 0.3], np.float32)
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0])
    _assert_same_as_sklearn(scores, labels)


@pytest.mark.parametrize(
    "scores, labels",
    [
        ([0.9, 0.1], [1, 0]),  # one of each: no point to drop
        ([0.5, 0.5, 0.5], [1, 0, 1]),  # a single threshold
        ([0.1, 0.9, 0.8, 0.2], [1, 0, 0, 1]),  # perfectly wrong order
        ([3, 1, 2, 2], [1, 0, 1, 0]),  # integer scores
    ],
)
def test_small_cases(scores, labels):
    _assert_same_as_sklearn(np.asarray(scores), np.asarray(labels))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="both genuine"):
        roc.roc_points(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="0 \\(impostor\\) or 1"):
        roc.roc_points(np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        roc.roc_points(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="one length"):
        roc.roc_points(np.array([0.1, 0.2]), np.array([1, 0, 1]))
