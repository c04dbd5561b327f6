"""Occlusion and LIME against captum; SLIC superpixels; the weighted ridge against scikit-learn.

Conventions: occlusion sets the window to 0 in model space (captum ``baselines=0``) with
captum's window layout (positions ``0, s, 2s, ...``, the last one cropped), so raw equals
captum's ``Occlusion`` with a ``(3, w, w)`` window. LIME is compared with captum's ``Lime`` fed
the same binary samples, the same kernel and ``SkLearnRidge(alpha=1)``; captum has no superpixel
algorithm, so both use our SLIC segments as the feature mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import Lime, Occlusion
from sklearn.linear_model import Ridge

from cnnexplain.explain.saliency import METHODS, Context, MethodOptions
from cnnexplain.explain.saliency.perturbation import (lime_kernel, occlusion_geometry, slic,
                                                      weighted_ridge)
from test_saliency_common import build, inputs, rel_err

TOL = 1e-5


@pytest.mark.parametrize("name,window,stride", [("resnet18", 8, 4), ("smallcnn", 8, 3),
                                               ("smallcnn", 5, 5), ("smallcnn", 7, 2)])
def test_occlusion_equals_captum(name, window, stride):
    model = build(name)
    x = inputs(name)
    t = torch.tensor([1, 3])
    ctx = Context(options=MethodOptions(occlusion_window=window, occlusion_stride=stride,
                                        internal_batch_size=37))
    ours = METHODS["occlusion"].attribute(model, x, t, context=ctx)
    theirs = Occlusion(model).attribute(x, target=t, sliding_window_shapes=(3, window, window),
                                        strides=(3, stride, stride), baselines=0,
                                        perturbations_per_eval=50)
    assert rel_err(ours.raw, theirs) < TOL
    torch.testing.assert_close(ours.map, ours.raw[:, 0])


def test_occlusion_geometry_covers_every_pixel():
    for h, w, win, st in [(32, 32, 8, 3), (33, 20, 5, 4), (16, 16, None, None)]:
        _, _, rows, cols = occlusion_geometry(h, w, win, st)
        assert rows.any(0).all() and cols.any(0).all()
        assert rows.shape[1] == h and cols.shape[1] == w


def test_lime_equals_captum_with_the_same_samples():
    model = build("smallcnn")
    x = inputs("smallcnn")
    t = torch.tensor([1, 3])
    opts = MethodOptions(lime_samples=40, lime_segments=12, internal_batch_size=16)
    ctx = Context(options=opts, seed=3)
    method = METHODS["lime"]
    ours = method.attribute(model, x, t, context=ctx)
    segments = method.segments(x, ctx)
    gens = ctx.generators(2, "lime")
    for i in range(2):
        k = int(segments[i].max()) + 1
        samples = iter(method.samples(40, k, gens[i]))
        lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0),
                    similarity_func=lambda orig, pert, interp, **kw: lime_kernel(interp, 0.25),
                    perturb_func=lambda inp, **kw: next(samples)[None])
        theirs = lime.attribute(x[i:i + 1], target=int(t[i]), baselines=0.0, n_samples=40,
                                feature_mask=segments[i][None, None].expand(1, 3, 32, 32),
                                perturbations_per_eval=8)
        assert rel_err(ours.raw[i], theirs[0]) < TOL
    # pixels of one superpixel share its coefficient
    for s in range(int(segments[0].max()) + 1):
        vals = ours.map[0][segments[0] == s]
        assert torch.allclose(vals, vals[0].expand_as(vals))


def test_weighted_ridge_equals_sklearn():
    rng = np.random.default_rng(0)
    x = (rng.random((60, 9)) < 0.5).astype(float)
    y = rng.normal(size=60)
    w = rng.random(60)
    coef, intercept = weighted_ridge(torch.tensor(x), torch.tensor(y), torch.tensor(w), alpha=1.0)
    ref = Ridge(alpha=1.0).fit(x, y, sample_weight=w)
    np.testing.assert_allclose(coef.numpy(), ref.coef_, atol=1e-10)
    assert abs(float(intercept) - ref.intercept_) < 1e-10


def test_lime_kernel_matches_lime_definition():
    z = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    w = lime_kernel(z, 0.25)
    cos = torch.tensor([1.0, 2 / (2 ** 0.5 * 2), 0.0])
    expected = torch.sqrt(torch.exp(-((1 - cos) ** 2) / 0.25 ** 2)).double()
    torch.testing.assert_close(w, expected)


def test_slic_follows_colour_edges():
    img = torch.zeros(3, 32, 32)
    img[0, :, :16] = 1.0  # red left half, black right half
    labels = slic(img, 8)
    assert labels.shape == (32, 32) and labels.min() == 0
    assert int(labels.max()) + 1 >= 4
    for s in range(int(labels.max()) + 1):
        cols = torch.nonzero(labels == s)[:, 1]
        assert bool((cols < 16).all()) or bool((cols >= 16).all())  # no superpixel straddles
    # deterministic
    assert torch.equal(labels, slic(img, 8))


def test_lime_and_occlusion_agree_on_a_model_that_reads_one_region():
    """A model whose logit is the mean of the top-left quadrant: both methods put their
    mass there."""
    class Quadrant(torch.nn.Module):
        def forward(self, x):
            q = x[:, :, :16, :16].mean((1, 2, 3))
            return torch.stack([q, -q], dim=1)

    model = Quadrant().eval()
    x = torch.rand(1, 3, 32, 32) + 0.5
    t = torch.tensor([0])
    opts = MethodOptions(occlusion_window=8, occlusion_stride=8, lime_samples=64, lime_segments=16)
    for name in ("occlusion", "lime"):
        m = METHODS[name].attribute(model, x, t, context=Context(options=opts)).map[0]
        assert m[:16, :16].mean() > 5 * m[16:, 16:].abs().mean() + 1e-9, name
