"""Per-unit top-quantile thresholds: the exact streaming top-m against numpy, merging shards,
and the radix sketch's documented error bound on ordinary and adversarial data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnexplain.explain.dissect.quantiles import (
    RadixSketch, TopCandidates, exact_thresholds, key_to_float, ordered_keys, sketch_rank,
    top_count, virtual_index)

Q = [0.005, 0.05, 0.5, 0.9, 0.9999]


def data(kind: str, k: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, n)).astype(np.float32)
    if kind == "relu":            # mostly zeros, like post-ReLU maps
        x = np.maximum(x - 1.5, 0).astype(np.float32)
    elif kind == "ties":
        x = (np.round(x * 2) / 2).astype(np.float32)
    elif kind == "sorted":
        x = np.sort(x, axis=1)
    elif kind == "reversed":
        x = np.sort(x, axis=1)[:, ::-1].copy()
    elif kind == "constant":
        x[:] = 0.25
    elif kind == "signed_zeros":
        x = np.where(rng.random((k, n)) < 0.5, np.float32(-0.0), np.float32(0.0))
        x[:, : n // 10] = rng.standard_normal((k, n // 10)).astype(np.float32)
    elif kind == "tiny_negative":
        x = (-np.abs(x) * 1e-30).astype(np.float32)
    elif kind == "outlier":
        x[:, 0] = 3e38
    elif kind == "lognormal":
        x = np.exp(4 * x).astype(np.float32)
    return x


def stream(est, x: np.ndarray, batch: int) -> None:
    for s in range(0, x.shape[1], batch):
        est.update(torch.from_numpy(x[:, s:s + batch]))


def sketch_of(x: np.ndarray, q: float, batch: int = 97) -> RadixSketch:
    sk = RadixSketch(x.shape[0], x.shape[1], q)
    while not sk.done:
        stream(sk, x, batch)
        sk.finish_pass()
    return sk


KINDS = ["normal", "relu", "ties", "sorted", "reversed", "constant", "signed_zeros",
         "tiny_negative", "outlier", "lognormal"]


@pytest.mark.parametrize("q", Q)
@pytest.mark.parametrize("n", [1, 2, 9, 1000, 4099])
def test_top_count_and_virtual_index(q, n):
    i0, g = virtual_index(n, q)
    assert 0 <= i0 <= n - 1 and 0.0 <= g < 1.0
    assert top_count(n, q) == n - i0
    assert top_count(n, q) <= max(1, int(np.ceil(q * n)) + 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q", Q)
def test_exact_streaming_equals_numpy_quantile(kind, q):
    x = data(kind, 3, 2345, seed=len(kind))
    est = TopCandidates(3, top_count(x.shape[1], q))
    stream(est, x, batch=101)
    ours = est.thresholds(x.shape[1], q)
    ref = np.quantile(x.astype(np.float64), 1 - q, axis=1)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, np.percentile(x.astype(np.float64), 100 * (1 - q), axis=1),
                               rtol=1e-12)
    # the in-memory reference helper agrees with the stream ([N, K] layout)
    np.testing.assert_array_equal(exact_thresholds(torch.from_numpy(x.T.copy()), q), ref)


def test_exact_memory_stays_near_m():
    x = data("normal", 2, 200_000, seed=1)
    m = top_count(x.shape[1], 0.005)
    est = TopCandidates(2, m)
    biggest = 0
    for s in range(0, x.shape[1], 5000):
        est.update(torch.from_numpy(x[:, s:s + 5000]))
        biggest = max(biggest, sum(p.shape[1] for p in est._parts))
    assert biggest <= 2 * m + 8192 + 5000
    assert est.candidates().shape == (2, m)


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_exact_merge_of_shards_equals_one_stream(shards):
    x = data("relu", 4, 5000, seed=shards)
    q = 0.01
    n = x.shape[1]
    m = top_count(n, q)
    whole = TopCandidates(4, m)
    stream(whole, x, 333)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = TopCandidates(4, m)
        stream(part, x[:, a:b], 77)
        cand = part.candidates()
        pad = torch.full((4, m), -np.inf)      # what the distributed gather sends
        pad[:, :cand.shape[1]] = cand
        parts.append(pad)
    merged = TopCandidates(4, m)
    merged.merge(parts)
    np.testing.assert_array_equal(merged.thresholds(n, q), whole.thresholds(n, q))


def test_exact_needs_all_values():
    est = TopCandidates(1, top_count(100, 0.5))
    est.update(torch.zeros(1, 10))
    with pytest.raises(ValueError):
        est.thresholds(100, 0.5)


def test_ordered_keys_preserve_order_and_equality():
    v = np.array([-3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.5, 3e38], np.float32)
    keys = ordered_keys(torch.from_numpy(v)).numpy()
    assert (np.diff(keys[[0, 1, 2, 3, 5, 6, 7, 8]]) > 0).all()
    assert keys[3] == keys[4]                      # -0.0 == +0.0
    back = key_to_float(keys)
    np.testing.assert_array_equal(back, v.astype(np.float64) + 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q", Q)
def test_sketch_error_is_within_its_reported_bound(kind, q):
    """The documented bound: the masks a > T_sketch and a > T differ on at most rank_error[k]
    values of unit k, and T_sketch is at most 2**-15 relative below the nearest order
    statistic x_(j)."""
    x = data(kind, 3, 3001, seed=7 + len(kind))
    n = x.shape[1]
    sk = sketch_of(x, q)
    ts = sk.thresholds()
    t = np.quantile(x.astype(np.float64), 1 - q, axis=1)
    j = sketch_rank(n, q)
    for k in range(3):
        flips = int(((x[k] > ts[k]) != (x[k] > t[k])).sum())
        assert flips <= sk.rank_error[k], (k, flips, sk.rank_error[k])
        x_j = np.sort(x[k].astype(np.float64))[j]
        assert ts[k] <= x_j
        assert x_j - ts[k] <= 2.0 ** -15 * abs(x_j) + 1e-45   # 24 resolved bits


def test_sketch_is_tight_on_continuous_data():
    x = data("lognormal", 4, 50_000, seed=3)
    sk = sketch_of(x, 0.005, batch=4096)
    assert sk.rank_error.max() <= 3             # a 24-bit bucket holds almost nothing here
    t = np.quantile(x.astype(np.float64), 0.995, axis=1)
    np.testing.assert_allclose(sk.thresholds(), t, rtol=1e-3)


def test_sketch_memory_is_constant():
    small = RadixSketch(8, 10, 0.005)
    large = RadixSketch(8, 10**12, 0.005)
    assert small.counts.shape == large.counts.shape == (8, 4096)


def test_sketch_merges_by_addition_to_the_single_stream_result():
    x = data("relu", 3, 4000, seed=9)
    q = 0.005
    whole = sketch_of(x, q)
    a, b = x[:, :1700], x[:, 1700:]
    sa, sb = RadixSketch(3, 4000, q), RadixSketch(3, 4000, q)
    while not sa.done:
        stream(sa, a, 50)
        stream(sb, b, 50)
        total = sa.counts + sb.counts          # what all_reduce does
        sa.counts.copy_(total)
        sb.counts.copy_(total)
        sa.finish_pass()
        sb.finish_pass()
    np.testing.assert_array_equal(sa.thresholds(), whole.thresholds())
    np.testing.assert_array_equal(sb.thresholds(), whole.thresholds())
    np.testing.assert_array_equal(sa.rank_error, whole.rank_error)


def test_sketch_detects_a_short_pass():
    sk = RadixSketch(1, 100, 0.005)
    sk.update(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="fewer values"):
        sk.finish_pass()
