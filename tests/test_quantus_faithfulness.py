"""The faithfulness metrics (removal curves, SRG, faithfulness correlation, ROAD, IROF,
infidelity) against Quantus 0.6.0 as an oracle, on a random-weight and a trained TinyCNN, and
known answers on the trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

quantus = pytest.importorskip("quantus")

from cnnexplain.metrics.faithfulness import logit_score, probability_score  # noqa: E402
from cnnexplain.metrics.faithfulness_correlation import faithfulness_correlation  # noqa: E402
from cnnexplain.metrics.infidelity import infidelity, infidelity_gaussian  # noqa: E402
from cnnexplain.metrics.irof import irof, irof_curves  # noqa: E402
from cnnexplain.metrics.removal import (pixel_flipping, region_perturbation,  # noqa: E402
                                        symmetric_relevance_gain)
from cnnexplain.metrics.road import noisy_linear_imputation, road  # noqa: E402
from quantus_support import (gradient_maps, numpy_inputs, random_model,  # noqa: E402
                                   trained_model, world)

N = 12
MODELS = {"random": random_model, "trained": trained_model}
RTOL, ATOL = 1e-5, 1e-6


def _inputs(kind: str, n: int = N, crop: int | None = None):
    x, y, _ = world()
    x, y = x[:n], y[:n]
    if crop:
        x = x[:, :, :crop, :crop].contiguous()
    model = MODELS[kind]()
    return model, x, y, gradient_maps(model, x, y)


def _kw(**extra):
    return dict(normalise=False, abs=False, disable_warnings=True, **extra)


def _call(metric, model, x, y, a, softmax, batch_size=None, **extra):
    return metric(model=model, **numpy_inputs(x, y, a), channel_first=True, softmax=softmax,
                  batch_size=batch_size or len(x), device="cpu", **extra)


def _close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64),
                               np.asarray(theirs, dtype=np.float64), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- faithfulness correlation

def _replay_choice(seed, n, runs, features, size):
    """Quantus's draws: per run, per image ``np.random.choice(features, size, replace=False)``."""
    np.random.seed(seed)
    out = np.zeros((n, runs, size), dtype=np.int64)
    for r in range(runs):
        for i in range(n):
            out[i, r] = np.random.choice(features, size, replace=False)
    return out


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_faithfulness_correlation_equals_quantus(kind):
    model, x, y, a = _inputs(kind)
    runs, size = 20, 24
    np.random.seed(7)
    theirs = _call(quantus.FaithfulnessCorrelation(
        nr_runs=runs, subset_size=size, perturb_baseline=0.0, return_aggregate=False, **_kw()),
        model, x, y, a, softmax=False)
    subsets = _replay_choice(7, len(x), runs, x[0].numel(), size)
    ours = faithfulness_correlation(logit_score(model), x, a, y, subsets=subsets, elements=True,
                                    batch_size=37)
    _close(ours, theirs)


def test_faithfulness_correlation_pixel_subsets_are_all_channel_element_subsets():
    model, x, y, a = _inputs("trained", n=6)
    gen = torch.Generator().manual_seed(0)
    pix = torch.stack([torch.stack([torch.randperm(256, generator=gen)[:10] for _ in range(15)])
                       for _ in range(len(x))])
    elem = torch.cat([pix + c * 256 for c in range(3)], dim=2)
    ours = faithfulness_correlation(logit_score(model), x, a, y, subsets=pix)
    as_elements = faithfulness_correlation(logit_score(model), x, a, y, subsets=elem, elements=True)
    np.testing.assert_allclose(ours, as_elements, rtol=1e-10)
    drawn = [faithfulness_correlation(logit_score(model), x, a, y, runs=15, subset_size=10,
                                      generator=torch.Generator().manual_seed(3), batch_size=b)
             for b in (4, 256)]
    np.testing.assert_array_equal(drawn[0], drawn[1])


# ---------------------------------------------------------------- region perturbation, PF, SRG

@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("patch", [4, 3])  # 3: Quantus pads 16 -> 18, border blocks are cut
def test_region_perturbation_equals_quantus(kind, patch):
    model, x, y, a = _inputs(kind)
    ours = region_perturbation(probability_score(model), x, a, y, patch_size=patch, regions=None,
                               batch_size=50)
    blocks = (-(-16 // patch)) ** 2
    assert ours.morf.shape == (len(x), blocks + 1)
    for order, drop in (("morf", ours.drop_morf), ("lerf", ours.drop_lerf)):
        theirs = _call(quantus.RegionPerturbation(
            patch_size=patch, order=order, regions_evaluation=1000, perturb_baseline=0.0, **_kw()),
            model, x, y, a, softmax=True)
        _close(drop[:, 1:], theirs)
    np.testing.assert_allclose(ours.aopc_morf, ours.drop_morf.sum(1) / (blocks + 1))
    short = region_perturbation(probability_score(model), x, a, y, patch_size=patch, regions=5)
    _close(short.morf, ours.morf[:, :6])


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("pixels", [1, 4])
def test_pixel_flipping_equals_quantus(kind, pixels):
    # 12 x 12 crops: Quantus needs H W to be a multiple of features_in_step = 3 * pixels
    model, x, y, a = _inputs(kind, crop=12)
    ours = pixel_flipping(probability_score(model), x, a, y, pixels_per_step=pixels, batch_size=64)
    theirs = _call(quantus.PixelFlipping(features_in_step=3 * pixels, perturb_baseline=0.0,
                                         **_kw()), model, x, y, a, softmax=True)
    assert ours.morf.shape == (len(x), 144 // pixels + 1)
    _close(ours.morf[:, 1:], theirs)


def _srg_reference(model, x, y, a, features_in_step, baseline):
    """Quantus PR #374 ``SymmetricRelevanceGain`` in numpy: stable descending argsort of the
    broadcast map (MIF), its reverse (LIF), both curves from f(x), features copied from the
    baseline image; SRG = mean over k >= 1 of LIF_k - MIF_k."""
    xb = x.numpy().astype(np.float64)
    n = len(xb)
    ab = np.broadcast_to(a.numpy()[:, None], xb.shape).reshape(n, -1)
    mif = np.argsort(-ab, axis=1, kind="stable")
    base = np.full(xb.reshape(n, -1).shape, baseline)

    def predict(arr):
        with torch.no_grad():
            p = torch.softmax(model(torch.as_tensor(arr.reshape(xb.shape), dtype=torch.float32)), 1)
        return p[torch.arange(n), y].double().numpy()

    curves = []
    for order in (mif, mif[:, ::-1]):
        cur = xb.reshape(n, -1).copy()
        vals = [predict(cur)]
        for s in range(0, ab.shape[1], features_in_step):
            idx = order[:, s:s + features_in_step]
            cur[np.arange(n)[:, None], idx] = base[np.arange(n)[:, None], idx]
            vals.append(predict(cur))
        curves.append(np.stack(vals, 1))
    return (curves[1][:, 1:] - curves[0][:, 1:]).mean(1)


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_symmetric_relevance_gain_equals_pr374_definition(kind):
    model, x, y, a = _inputs(kind, n=8)
    ours = symmetric_relevance_gain(probability_score(model), x, a, y, pixels_per_step=8,
                                    baseline=0.25)
    _close(ours, _srg_reference(model, x, y, a, 24, 0.25))
    curves = pixel_flipping(probability_score(model), x, a, y, pixels_per_step=8, baseline=0.25)
    L = curves.morf.shape[1] - 1
    np.testing.assert_allclose(curves.srg, (curves.aopc_morf - curves.aopc_lerf) * (L + 1) / L)


# ---------------------------------------------------------------- ROAD

class Grey(nn.Module):
    """One-channel model: the grey image copied into the three channels of a TinyCNN."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.expand(-1, 3, -1, -1))


def test_noisy_linear_imputation_equals_quantus():
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_nli

    x, _, _ = world()
    x = x[:6].double()
    n, c, h, w = x.shape
    rng = np.random.default_rng(0)
    for frac in (0.05, 0.5, 0.95):
        k = int(h * w * frac)
        idx = [rng.permutation(h * w)[:k] for _ in range(n)]
        removed = torch.zeros(n, h * w, dtype=torch.bool)
        draws = torch.zeros(n, c, h * w, dtype=torch.float64)
        np.random.seed(11)
        theirs = np.stack([quantus_nli(x[i].numpy(), idx[i], noise=0.05) for i in range(n)])
        np.random.seed(11)
        for i in range(n):
            removed[i, idx[i]] = True
            draws[i][:, torch.as_tensor(idx[i])] = torch.as_tensor(np.random.randn(c, k))
        ours = noisy_linear_imputation(x, removed.view(n, h, w), noise=0.05,
                                       draws=draws.view(n, c, h, w))
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-8)
        plain = noisy_linear_imputation(x, removed.view(n, h, w), noise=0.0)
        np.testing.assert_allclose(plain[~removed.view(n, 1, h, w).expand_as(x)].numpy(),
                                   x[~removed.view(n, 1, h, w).expand_as(x)].numpy())


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_road_equals_quantus_on_one_channel(kind):
    # Quantus 0.6.0 ROAD crashes for C > 1 (reference section 4), so compare on grey images
    model, x, y, a = _inputs(kind)
    grey, x1 = Grey(model).eval(), x.mean(1, keepdim=True)
    pct = [10, 30, 50, 70, 90]
    ours = road(grey, x1, a, y, percentages=pct, noise=0.0, batch_size=23)
    theirs = _call(quantus.ROAD(percentages=pct, noise=0.0, **_kw()), grey, x1, y, a,
                   softmax=False)
    _close(ours.accuracy_morf.mean(0), [theirs[p] for p in pct])
    # with noise: replay Quantus's np.random.randn(C, k) per percentage and image, in rank order
    noise, seed = 0.3, 5
    np.random.seed(seed)
    noisy = _call(quantus.ROAD(percentages=pct, noise=noise, **_kw()), grey, x1, y, a,
                  softmax=False)
    np.random.seed(seed)
    draws = torch.zeros(len(x), 2, len(pct), 1, 256, dtype=torch.float64)
    order = torch.argsort(-a.reshape(len(x), -1), dim=1, stable=True)
    for j, p in enumerate(pct):
        k = int(256 * p / 100)
        for i in range(len(x)):
            draws[i, 0, j, 0, order[i, :k]] = torch.as_tensor(np.random.randn(1, k)[0])
    ours = road(grey, x1, a, y, percentages=pct, noise=noise, draws=draws.view(len(x), 2, len(pct),
                                                                              1, 16, 16))
    _close(ours.accuracy_morf.mean(0), [noisy[p] for p in pct])


def test_road_curves_and_orders():
    model, x, y, a = _inputs("trained", n=8)
    out = road(model, x, a, y, noise=0.0, batch_size=30)
    assert out.probability_morf.shape == (8, 9) and list(out.percentages) == list(range(10, 100, 10))
    # LeRF at 30 % imputes the 30 % lowest-ranked pixels
    rank = torch.argsort(torch.argsort(-a.reshape(8, -1), dim=1, stable=True), dim=1)
    removed = (rank >= 256 - int(256 * 0.3)).view(8, 16, 16)
    with torch.no_grad():
        p = torch.softmax(model(noisy_linear_imputation(x, removed, 0.0)).double(), 1)
    np.testing.assert_allclose(out.probability_lerf[:, 2], p[torch.arange(8), y].numpy(),
                               rtol=1e-6)
    same = [road(model, x, a, y, percentages=[20, 60], generator=torch.Generator().manual_seed(1),
                 batch_size=b).probability_morf for b in (3, 64)]
    np.testing.assert_array_equal(same[0], same[1])


# ---------------------------------------------------------------- IROF

def _skimage_segments(x):
    from skimage.segmentation import slic

    return np.stack([slic(np.moveaxis(xi, 0, -1).astype("double"), start_label=0)
                     for xi in x.numpy()])


def _broadcast_mask_replacement(arr, mask, **kwargs):
    """Quantus's ``baseline_replacement_by_mask`` with the (B, 1, H, W) mask broadcast to the
    channels: Quantus 0.6.0 IROF asserts equal shapes and so fails for C > 1."""
    from quantus.functions.perturb_func import baseline_replacement_by_mask

    return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_irof_equals_quantus(kind, monkeypatch):
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)  # removed in numpy 2.4
    model, x, y, a = _inputs(kind, n=4)
    segments = _skimage_segments(x)
    counts = [len(np.unique(s)) for s in segments]
    assert len(set(counts)) > 1  # the padding matters on these inputs
    metric = quantus.IROF(perturb_baseline=0.0, perturb_func=_broadcast_mask_replacement,
                          return_aggregate=False, **_kw())
    batch = _call(metric, model, x, y, a, softmax=True)
    single = _call(metric, model, x, y, a, softmax=True, batch_size=1)
    score = probability_score(model)
    _close(irof(score, x, a, y, segments=segments, pad_curves=True, batch_size=100), batch)
    _close(irof(score, x, a, y, segments=segments, batch_size=100), single)
    r, count = irof_curves(score, x, a, y, segments=segments + 5)  # ids need not start at 0
    np.testing.assert_array_equal(count, counts)
    assert np.isnan(r[np.argmin(counts), -1])


def test_irof_default_segments_run():
    model, x, y, a = _inputs("trained", n=2)
    out = irof(probability_score(model), x, a, y, n_segments=20)
    assert out.shape == (2,) and np.isfinite(out).all()


# ---------------------------------------------------------------- infidelity

@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("baseline", [0.0, "black"])
def test_infidelity_equals_quantus(kind, baseline):
    model, x, y, a = _inputs(kind)
    theirs = _call(quantus.Infidelity(perturb_baseline=baseline, n_perturb_samples=2,
                                      perturb_patch_sizes=[4, 8], **_kw()),
                   model, x, y, a, softmax=False)
    ours = infidelity(logit_score(model), x, a, y, patch_sizes=(4, 8), baseline=baseline,
                      batch_size=40)
    _close(ours, theirs)


def test_infidelity_gaussian_is_zero_for_the_exact_linear_attribution():
    x, y, _ = world()
    x, y = x[:4], y[:4]
    wmap = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).expand(4, -1, -1)

    def linear(xx, t):  # f = sum_c,h,w w_hw x_chw, whose exact per-pixel attribution is w
        return (xx * wmap[0]).sum((1, 2, 3))

    zero = infidelity_gaussian(linear, x, wmap, y, sigma=0.1, samples=8, batch_size=1000)
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    off = infidelity_gaussian(linear, x, torch.zeros_like(wmap), y, sigma=0.1, samples=4000,
                              generator=torch.Generator().manual_seed(0), batch_size=4000)
    expected = 0.01 * 3 * (wmap ** 2).sum((1, 2)).numpy()  # E[(w . I)^2] = sigma^2 C |w|^2
    np.testing.assert_allclose(off, expected, rtol=0.1)


# ---------------------------------------------------------------- known answers (trained model)

def _trained_maps():
    x, y, masks = world()
    model = trained_model()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, y.view(-1, 1)).sum(), xg)
    gxi = (g * x).sum(1).detach()
    rand = torch.rand(gxi.shape, generator=torch.Generator().manual_seed(1))
    return model, x, y, masks, gxi, rand


def test_known_answers_removal_orders():
    model, x, y, masks, gxi, rand = _trained_maps()
    score = probability_score(model)
    good = region_perturbation(score, x, gxi, y, patch_size=2, regions=None)
    assert good.aopc_morf.mean() > good.aopc_lerf.mean() + 0.05
    assert good.srg.mean() > 0.05
    flips = symmetric_relevance_gain(score, x, gxi, y, pixels_per_step=4)
    assert flips.mean() > 0.05
    noise = region_perturbation(score, x, rand, y, patch_size=2, regions=None)
    assert abs(noise.srg.mean()) < 0.5 * good.srg.mean()
    # the object mask (ties broken by a tiny random map) beats a random map on MoRF, while the
    # removed area (8 blocks of 2 x 2 = 12.5 %) stays within the objects (30 % of the pixels)
    mask = region_perturbation(score, x, masks.float() + 1e-3 * rand, y, patch_size=2,
                               regions=8)
    random_short = region_perturbation(score, x, rand, y, patch_size=2, regions=8)
    assert mask.aopc_morf.mean() > random_short.aopc_morf.mean() + 0.05


def test_known_answers_correlation_and_road():
    model, x, y, masks, gxi, rand = _trained_maps()
    gen = torch.Generator().manual_seed(0)
    good = faithfulness_correlation(logit_score(model), x, gxi, y, runs=40, subset_size=16,
                                    generator=gen)
    noise = faithfulness_correlation(logit_score(model), x, rand, y, runs=40, subset_size=16,
                                     generator=gen)
    assert np.nanmean(good) > 0.3
    assert abs(np.nanmean(noise)) < 0.1
    curves = road(model, x[:24], gxi[:24], y[:24], percentages=[20, 50, 80], noise=0.0)
    assert curves.gap.mean() > 0.1
