"""MIS: the vectorized k-NN mutual information agrees with scikit-learn's mutual_info_classif."""

import numpy as np
import pytest
import torch

from cnnexplain.metrics.mis import (mis, mis_from_mi, mutual_information, sklearn_mutual_information,
                                    sklearn_preprocess)

pytest.importorskip("sklearn")


def _features(n=300, k=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(n, k)) + 1.5 * (y[:, None] == (np.arange(k) % c)[None])
    return x.astype(np.float32), y


def _close(ours, ref, tol=0.01):
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < tol, np.abs(ours - ref).max()


def test_agrees_with_sklearn_on_informative_features():
    x, y = _features()
    ref = sklearn_mutual_information(x, y, 4)
    ours = mutual_information(x, y, 4)
    _close(ours, ref)
    assert ref.max() > 0.1  # the features do carry information, so the check is not vacuous
    assert abs(mis_from_mi(ours) - float(ref.max(0).mean())) < 0.01


def test_ties_constant_and_relu_features():
    x, y = _features(n=400, k=8, c=5, seed=1)
    x[:, 0] = 3.0                       # constant feature
    x[:, 1] = np.round(x[:, 1])         # many exact ties
    x[:, 2] = np.maximum(x[:, 2], 0)    # a ReLU: half the values tie at 0
    x[:, 3] = 0.0                       # a dead channel
    x[:, 4] = np.round(x[:, 4] * 2) / 2 * 1e4  # large values with ties
    _close(mutual_information(x, y, 5), sklearn_mutual_information(x, y, 5))


@pytest.mark.parametrize("case", ["singleton", "pair", "absent"])
def test_tiny_and_absent_classes(case):
    x, y = _features(n=120, k=6, c=4, seed=2)
    y = y.copy()
    if case == "singleton":
        y[y == 3] = 2
        y[0] = 3                        # class 3 has one image: sklearn drops that point
    elif case == "pair":
        y[y == 3] = 2
        y[:2] = 3
    else:
        y[y == 3] = 2                   # class 3 never occurs
    _close(mutual_information(x, y, 4), sklearn_mutual_information(x, y, 4))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_other_neighbour_counts(k):
    x, y = _features(n=150, k=5, c=3, seed=3)
    _close(mutual_information(x, y, 3, n_neighbors=k),
           sklearn_mutual_information(x, y, 3, n_neighbors=k))


def test_small_n_and_tensor_inputs():
    x, y = _features(n=12, k=4, c=2, seed=4)
    ours = mutual_information(torch.from_numpy(x), torch.from_numpy(y), 2)
    _close(ours, sklearn_mutual_information(x, y, 2))


def test_preprocessing_matches_sklearn_scaling_and_noise():
    x, _ = _features(n=50, k=3)
    x[:, 1] = 7.0
    p = sklearn_preprocess(x, 0)
    assert np.allclose(p[:, 0].std(), 1.0, atol=1e-6)
    assert np.allclose(p[:, 1], 7.0, atol=1e-8) and p[:, 1].std() > 0  # unscaled, noise added


def test_mis_is_invariant_to_a_positive_scale_per_channel():
    x, y = _features(n=200, k=6, c=3, seed=5)
    scaled = x * np.array([1, 10, 0.1, 3, 49, 2], dtype=np.float32)  # sum vs mean pooling
    assert abs(mis(x, y, 3) - mis(scaled, y, 3)) < 1e-6


def test_class_specific_features_score_higher_than_entangled_ones():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 400)
    specific = rng.normal(size=(400, 8)) + 3.0 * (y[:, None] == (np.arange(8) % 4)[None])
    entangled = rng.normal(size=(400, 8)) + 0.3 * y[:, None]
    assert mis(specific, y, 4) > mis(entangled, y, 4) + 0.1
