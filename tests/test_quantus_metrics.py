"""The non-removal metrics (robustness, complexity, localisation by relevance, random logit,
completeness) against Quantus 0.6.0 as an oracle, on the random-weight and the trained TinyCNN
with gradient maps, plus known answers. Quantus's numpy RNG draws are replayed (same seed, same
order) and passed to our functions explicitly, so the stochastic metrics compare exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")
from quantus_support import (
    NUM_CLASSES,
    gradient_maps,
    numpy_inputs,
    random_model,
    trained_model,
    world,
)
from skimage.metrics import structural_similarity

from cnnexplain.metrics import axiomatic, complexity, randomization, robustness
from cnnexplain.metrics.faithfulness import logit_score
from cnnexplain.metrics.localization import (
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from cnnexplain.metrics.preprocess import prepare, prepared

N = 12
PER_SAMPLE = {"normalise_axes": [1, 2, 3]}
MODELS = {"random": random_model, "trained": trained_model}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _inputs(n=N):
    x, y, masks = world()
    return x[:n], y[:n], masks[:n]


def _explain(model):
    return lambda xx, tt: gradient_maps(model, xx, tt)


def _quantus_explain(model, inputs, targets, **kwargs):
    x = torch.as_tensor(np.asarray(inputs)).float()
    return gradient_maps(model, x, torch.as_tensor(np.asarray(targets)).long()).numpy()[:, None]


def _call(metric, model, x, y, maps, masks=None, explain=True):
    kwargs = dict(model=model, channel_first=True, batch_size=64, **numpy_inputs(x, y, maps, masks))
    if explain:
        kwargs["explain_func"] = _quantus_explain
    return np.asarray(metric(**kwargs), dtype=np.float64)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _replayed(seed, draws, n, draw):
    """Quantus's draws: ``np.random.seed(seed)``, then one ``draw(size=(n, 3*H*W))`` per step."""
    np.random.seed(seed)
    noise = np.stack([draw(size=(n, 3 * 16 * 16)) for _ in range(draws)])
    return torch.as_tensor(noise).float().reshape(draws, n, 3, 16, 16)


# -- preprocessing -------------------------------------------------------------------------------

def test_prepare_per_sample_then_abs_torch_and_numpy():
    a = np.array([[[-4.0, 2.0]], [[0.5, -0.25]], [[0.0, 0.0]]])
    want = np.array([[[1.0, 0.5]], [[1.0, 0.5]], [[0.0, 0.0]]])
    assert np.allclose(prepare(a, True, True), want)
    assert np.allclose(prepare(a, True, False), [[[-1, 0.5]], [[1, -0.5]], [[0, 0]]])
    t = prepare(torch.as_tensor(a, dtype=torch.float32), True, True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert np.allclose(t.numpy(), want)
    assert prepare(a, False, False) is a
    f = prepared(lambda x, t: x, True, True)
    assert np.allclose(f(torch.as_tensor(a), None).numpy(), want)
    # Quantus's normalise_by_max with per-sample axes, then abs
    q = np.abs(quantus.normalise_func.normalise_by_max(a[:2, None], normalise_axes=[1, 2, 3]))
    assert np.allclose(prepare(a[:2], True, True), q[:, 0])


# -- robustness ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(MODELS))
def test_sensitivity_matches_quantus(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    maps = gradient_maps(model, x, y)
    draws = 4
    noise = _replayed(3, draws, N, lambda size: np.random.uniform(-0.2, 0.2, size=size))
    mx, avg = robustness.sensitivity(_explain(model), x, maps, y, noise=noise, batch_size=5)
    np.random.seed(3)
    q_max = _call(quantus.MaxSensitivity(nr_samples=draws, disable_warnings=True), model, x, y, maps)
    np.random.seed(3)
    q_avg = _call(quantus.AvgSensitivity(nr_samples=draws, disable_warnings=True), model, x, y, maps)
    assert mx.shape == (N,) and mx.dtype == np.float64
    assert _rel(mx, q_max) < 1e-5 and _rel(avg, q_avg) < 1e-5
    assert np.all(mx >= avg) and np.all(avg > 0)


@pytest.mark.parametrize("which", sorted(MODELS))
def test_local_lipschitz_matches_quantus(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    maps = gradient_maps(model, x, y)
    draws = 4
    noise = _replayed(4, draws, N, lambda size: np.random.normal(0.0, 0.1, size=size))
    # Quantus's LLE default normalise=True (per sample here, both the maps and the re-explanations)
    lle = robustness.local_lipschitz_estimate(prepared(_explain(model), True, False), x,
                                              prepare(maps, True, False), y, noise=noise,
                                              batch_size=7)
    np.random.seed(4)
    q = _call(quantus.LocalLipschitzEstimate(nr_samples=draws, normalise_func_kwargs=PER_SAMPLE,
                                             disable_warnings=True), model, x, y, maps)
    assert _rel(lle, q) < 1e-5


def test_shared_distances_and_generator():
    model = random_model()
    x, y, _ = _inputs(6)
    maps = gradient_maps(model, x, y)
    explain = _explain(model)
    noise = robustness.uniform_noise(x, 3, 0.2, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 6, 3, 16, 16) and float(noise.abs().max()) <= 0.2
    dist, dx = robustness.perturbation_distances(explain, x, maps, y, noise, batch_size=4)
    assert dist.shape == dx.shape == (3, 6)
    mx, avg = robustness.sensitivity_scores(maps, dist)
    assert np.allclose((mx, avg), robustness.sensitivity(explain, x, maps, y, noise=noise))
    assert np.allclose(robustness.lipschitz_scores(dist, dx),
                       robustness.local_lipschitz_estimate(explain, x, maps, y, noise=noise))
    # draws from a generator: reproducible, independent of batch_size
    a = robustness.sensitivity(explain, x, maps, y, samples=3,
                               generator=torch.Generator().manual_seed(1), batch_size=2)
    b = robustness.sensitivity(explain, x, maps, y, samples=3,
                               generator=torch.Generator().manual_seed(1), batch_size=64)
    assert np.allclose(a, b, rtol=1e-6)


def test_sensitivity_of_an_input_independent_explanation_is_zero():
    x, y, _ = _inputs(8)
    table = torch.rand(NUM_CLASSES, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    explain = lambda xx, tt: table[tt]
    mx, avg = robustness.sensitivity(explain, x, table[y], y, samples=5,
                                     generator=torch.Generator().manual_seed(0), batch_size=3)
    lle = robustness.local_lipschitz_estimate(explain, x, table[y], y, samples=5)
    assert np.all(mx == 0) and np.all(avg == 0) and np.all(lle == 0)


# -- complexity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(MODELS))
def test_sparseness_and_complexity_match_quantus(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    maps = gradient_maps(model, x, y)
    inp = numpy_inputs(x, y, maps)
    kwargs = {"model": None, "channel_first": True, "x_batch": inp["x_batch"], "y_batch": inp["y_batch"]}
    q_s = quantus.Sparseness(normalise_func_kwargs=PER_SAMPLE, disable_warnings=True)(
        a_batch=inp["a_batch"].copy(), **kwargs)  # Quantus modifies a_batch in place
    q_c = quantus.Complexity(normalise_func_kwargs=PER_SAMPLE, disable_warnings=True)(
        a_batch=inp["a_batch"].copy(), **kwargs)
    ready = prepare(maps, True, True)  # Quantus's defaults abs=True, normalise=True
    assert _rel(complexity.sparseness(ready), q_s) < 1e-5
    assert _rel(complexity.complexity(ready), q_c) < 1e-5
    assert np.allclose(complexity.sparseness(ready.numpy()), complexity.sparseness(ready))


def test_gini_and_entropy_known_answers():
    _, _, masks = _inputs()
    n = 16 * 16
    constant = np.full((3, 16, 16), 0.7)
    one_hot = np.zeros((3, 16, 16))
    one_hot[:, 4, 5] = 1.0
    assert np.allclose(complexity.sparseness(constant), 0.0, atol=1e-12)
    assert np.allclose(complexity.sparseness(one_hot), (n - 1) / n, atol=n * 1e-7)  # the 1e-7 shift
    rand = torch.rand(len(masks), 16, 16, generator=torch.Generator().manual_seed(0))
    assert np.all(complexity.sparseness(rand) < complexity.sparseness(one_hot[:1]))
    assert np.allclose(complexity.complexity(one_hot), 0.0, atol=1e-9)
    assert np.allclose(complexity.complexity(constant), np.log(n))
    mask_maps = masks.float()
    assert np.allclose(complexity.complexity(mask_maps), np.log(masks.sum(dim=(1, 2)).numpy()))
    assert np.all(complexity.complexity(mask_maps) < complexity.complexity(rand))
    assert np.all(complexity.sparseness(mask_maps) > complexity.sparseness(rand))


# -- localisation by relevance -------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(MODELS))
def test_relevance_mass_and_rank_accuracy_match_quantus(which):
    model = MODELS[which]()
    x, y, masks = _inputs()
    maps = gradient_maps(model, x, y)
    q_mass = _call(quantus.RelevanceMassAccuracy(normalise_func_kwargs=PER_SAMPLE, disable_warnings=True),
                   model, x, y, maps, masks, explain=False)
    q_rank = _call(quantus.RelevanceRankAccuracy(normalise_func_kwargs=PER_SAMPLE, disable_warnings=True),
                   model, x, y, maps, masks, explain=False)
    ready = prepare(maps, True, False)  # Quantus's defaults abs=False, normalise=True
    # Quantus sums in float32; signed gradient maps can nearly cancel, hence the tolerance
    assert _rel(relevance_mass_accuracy(ready, masks), q_mass) < 1e-4
    assert np.array_equal(relevance_rank_accuracy(ready, masks), q_rank)
    # |a|: the common usage
    q_abs = _call(quantus.RelevanceMassAccuracy(abs=True, normalise_func_kwargs=PER_SAMPLE,
                                                disable_warnings=True), model, x, y, maps, masks,
                  explain=False)
    assert _rel(relevance_mass_accuracy(prepare(maps, True, True), masks), q_abs) < 1e-5


def test_relevance_known_answers():
    _, _, masks = _inputs()
    mask_maps = masks.float()
    assert np.allclose(relevance_mass_accuracy(mask_maps, masks), 1.0)
    assert np.allclose(relevance_rank_accuracy(mask_maps, masks), 1.0)  # K tied ones rank first
    rand = torch.rand(len(masks), 16, 16, generator=torch.Generator().manual_seed(0))
    frac = masks.float().mean(dim=(1, 2)).numpy()
    assert np.all(relevance_mass_accuracy(rand, masks) < 0.9)
    assert abs(float(np.mean(relevance_rank_accuracy(rand, masks) - frac))) < 0.15
    empty = masks.clone()
    empty[0] = 0
    assert np.isnan(relevance_mass_accuracy(rand, empty)[0])
    assert np.isnan(relevance_rank_accuracy(rand, empty)[0])
    assert not np.isnan(relevance_rank_accuracy(rand, empty)[1:]).any()


# -- random logit --------------------------------------------------------------------------------

def test_ssim_1d_equals_skimage():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(6, 256)), g.normal(size=(6, 256))
    b[1] = a[1] + 0.1 * b[1]
    b[2] = a[2]
    for win in (7, 5, 11):
        ours = randomization.ssim_1d(torch.as_tensor(a), b, win_size=win)
        for i in range(len(a)):
            both = np.concatenate([a[i], b[i]])
            want = structural_similarity(a[i], b[i], win_size=None if win == 7 else win,
                                         data_range=float(both.max() - both.min()))
            assert abs(ours[i] - want) < 1e-12
    assert abs(randomization.ssim_1d(a, a)[0] - 1.0) < 1e-12


def test_other_classes():
    y = torch.arange(NUM_CLASSES).repeat(250)
    o = randomization.other_classes(y, NUM_CLASSES, torch.Generator().manual_seed(0))
    assert bool((o != y).all()) and o.min() >= 0 and o.max() < NUM_CLASSES
    counts = torch.bincount(o[y == 0], minlength=NUM_CLASSES)
    assert counts[0] == 0 and counts[1:].min() > 60
    # Quantus: the index-th of the other classes in ascending order
    assert randomization.other_classes(torch.tensor([2, 2, 2, 0]), 4,
                                       indices=[0, 1, 2, 0]).tolist() == [0, 1, 3, 1]


@pytest.mark.parametrize("which", sorted(MODELS))
def test_random_logit_matches_quantus(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    maps = gradient_maps(model, x, y)
    np.random.seed(42)  # Quantus's RandomLogit: seed(42) per batch, then randint(0, K - 1, B)
    other = randomization.other_classes(y, NUM_CLASSES, indices=np.random.randint(0, NUM_CLASSES - 1, N))
    ours = randomization.random_logit(prepared(_explain(model), True, False), x,
                                      prepare(maps, True, False), y, NUM_CLASSES,
                                      other_targets=other, batch_size=5)
    q = _call(quantus.RandomLogit(num_classes=NUM_CLASSES, normalise_func_kwargs=PER_SAMPLE,
                                  disable_warnings=True), model, x, y, maps)
    assert np.max(np.abs(ours - q)) < 1e-5  # skimage computes SSIM in float32 here
    # the map for the target itself is identical: SSIM 1
    same = randomization.ssim_1d(prepare(maps, True, False), prepare(maps, True, False))
    assert np.allclose(same, 1.0)


# -- completeness --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(MODELS))
def test_completeness_matches_quantus(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    maps = gradient_maps(model, x, y)
    base = torch.zeros_like(x)
    seen = {}

    def output_func(delta):
        seen["delta"] = np.asarray(delta, dtype=np.float64)
        return delta

    # Quantus with the whole image replaced (its default replaces only channel 0, see the module)
    metric = quantus.Completeness(normalise=False, output_func=output_func, disable_warnings=True,
                                  perturb_func=lambda arr, indices, **kw: base.numpy().reshape(len(arr), -1))
    q = _call(metric, model, x, y, maps, explain=False).astype(bool)
    rel, err = axiomatic.completeness(logit_score(model), x, maps, y, base, batch_size=5)
    want = np.abs(maps.double().sum(dim=(1, 2)).numpy() - seen["delta"])
    assert np.max(np.abs(err - want)) < 1e-5 * max(1.0, float(np.abs(want).max()))
    assert np.allclose(rel, err / np.abs(seen["delta"]), rtol=1e-5)
    assert np.array_equal(axiomatic.is_complete(rel, err, rtol=0.0), q)  # all False: gradients


@pytest.mark.parametrize("which", sorted(MODELS))
def test_completeness_known_answers(which):
    model = MODELS[which]()
    x, y, _ = _inputs()
    score = logit_score(model)
    base = torch.zeros_like(x)
    fx, fb = score(x, y).double(), score(base, y).double()
    complete = ((fx - fb) / (16 * 16)).view(-1, 1, 1).expand(-1, 16, 16)  # sums to the delta
    rel, err = axiomatic.completeness(score, x, complete, y, base)
    assert np.all(rel < 1e-6) and axiomatic.is_complete(rel, err).all()
    conserving = (fx / (16 * 16)).view(-1, 1, 1).expand(-1, 16, 16)  # LRP: sums to f(x)
    rel, err = axiomatic.completeness(score, x, conserving, y, reference="zero")
    assert np.all(rel < 1e-6)
    rel, err = axiomatic.completeness(score, x, conserving, y, reference=fb.numpy())
    assert np.allclose(err, np.abs(fb.numpy()), rtol=1e-5)
    assert not axiomatic.is_complete(*axiomatic.completeness(score, x, 2 * complete, y, base)).any()
    with pytest.raises(ValueError):
        axiomatic.completeness(score, x, complete, y)
