"""LRP and CLRP: zennit as the oracle, relevance conservation, canonizer equivalence, and the
model left exactly as it was.

Conventions: every LRP method seeds ``onehot(target)`` (one unit of relevance; zennit's
default would seed with the whole output, captum's LRP with the logit), so conserving rules
sum to 1. ``lrp-epsilon`` / ``lrp-alpha2beta1`` are zennit's EpsilonPlusFlat /
EpsilonAlpha2Beta1Flat; ``lrp-zplus`` is seed 003's z+ / zB composite with biases bypassed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient as ZennitGradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (EpsilonAlpha2Beta1Flat, EpsilonPlusFlat,
                               SpecialFirstLayerMapComposite, layer_map_base)
from zennit.core import Composite
from zennit.rules import ZBox, ZPlus
from zennit.types import Convolution

from cnnexplain.errors import UsageError
from cnnexplain.explain.saliency import METHODS, Context
from cnnexplain.explain.saliency.lrp import (DenseNetCanonizer, MobileNetV2Canonizer,
                                             ResNetCanonizer, canonizers_for, make_composite,
                                             relevance)
from test_saliency_common import build, context, inputs, no_hooks, rel_err, state

TOL = 1e-5


def onehot(t):
    def seed(out):
        s = torch.zeros_like(out)
        s[torch.arange(len(t)), t] = 1.0
        return s
    return seed


def zennit(model, x, composite, seed):
    with ZennitGradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, seed)
    return rel


def seed003_composite(ctx: Context, model):
    """The z+ / zB composite written from zennit primitives (independent of lrp.py's)."""
    mean = torch.tensor(ctx.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(ctx.preprocessing.std).view(1, 3, 1, 1)
    return SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZPlus(zero_params=["bias"])),
                                      (nn.Linear, ZPlus(zero_params=["bias"]))],
        first_map=[(Convolution, ZBox(low=-mean / std, high=(1 - mean) / std, zero_params=["bias"]))],
        canonizers=canonizers_for(type(model)))


ORACLE = {"lrp-epsilon": lambda ctx, m: EpsilonPlusFlat(canonizers=canonizers_for(type(m))),
          "lrp-alpha2beta1": lambda ctx, m: EpsilonAlpha2Beta1Flat(canonizers=canonizers_for(type(m))),
          "lrp-zplus": seed003_composite}


@pytest.mark.parametrize("name,method", [
    (n, m) for n in ("smallcnn", "resnet18", "vgg11_bn", "densenet121", "mobilenet_v2")
    for m in sorted(ORACLE) if m == "lrp-zplus" or n in ("smallcnn", "resnet18", "mobilenet_v2")])
def test_lrp_equals_zennit(name, method):
    model = build(name)
    x = inputs(name, batch=1 if name in ("densenet121", "mobilenet_v2") else 2)
    t = torch.tensor([1, 3][:len(x)])
    ctx = context(name)
    ours = METHODS[method].attribute(model, x, t, context=ctx).raw
    theirs = zennit(model, x, ORACLE[method](ctx, model), onehot(t))
    assert ours.abs().max() > 0
    assert rel_err(ours, theirs) < TOL


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "resnet50", "vgg11_bn", "alexnet",
                                  "densenet121"])
def test_lrp_zplus_conserves_relevance(name):
    model = build(name)
    x = inputs(name, batch=1)
    rel = METHODS["lrp-zplus"].attribute(model, x, torch.tensor([2]), context=context(name)).raw
    assert abs(float(rel.sum()) - 1.0) < 2e-3


def test_lrp_zplus_conserves_relevance_mobilenet_without_bn_shifts():
    """With BatchNorm shifts (merged biases) MobileNet's depthwise convolutions drop the
    relevance of units that only their bias switched on; without them z+ conserves exactly."""
    model = build("mobilenet_v2")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
    rel = METHODS["lrp-zplus"].attribute(model, inputs("mobilenet_v2", batch=1), torch.tensor([2]),
                                         context=context("mobilenet_v2")).raw
    assert abs(float(rel.sum()) - 1.0) < 2e-3


@pytest.mark.parametrize("name,canonizer", [("densenet121", DenseNetCanonizer),
                                            ("mobilenet_v2", MobileNetV2Canonizer),
                                            ("resnet18", ResNetCanonizer)])
def test_our_canonizers_keep_the_output_and_are_undone(name, canonizer):
    """Output-equivalent in float64 (float32 rounding alone reaches 1e-5 in MobileNet)."""
    model = build(name).double()
    x = inputs(name, batch=1).double()
    before = state(model)
    with torch.no_grad():
        ref = model(x)
    composite = Composite(canonizers=[canonizer()])
    with composite.context(model) as canonized:
        with torch.no_grad():
            out = canonized(x)
        added = [n for n, _ in canonized.named_modules() if "canonizer" in n]
        assert added
    assert rel_err(out, ref) < 1e-10  # (zennit's own merge: 1e-5 .. 1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any("canonizer" in n for n, _ in model.named_modules())
    assert "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_stock_zennit_resnet_canonizer_differs_only_by_its_merge_epsilon():
    """zennit's ResNetCanonizer leaves x / sqrt(1 + eps) at every merged BatchNorm; ours is
    exact. The relevance differs by about that much, nothing more."""
    from zennit.torchvision import ResNetCanonizer as StockResNetCanonizer

    model = build("resnet18")
    x = inputs("resnet18")
    t = torch.tensor([1, 3])
    ours = METHODS["lrp-epsilon"].attribute(model, x, t, context=context("resnet18")).raw
    stock = zennit(model, x, EpsilonPlusFlat(canonizers=[StockResNetCanonizer()]), onehot(t))
    assert 0 < rel_err(ours, stock) < 1e-3


def test_zennit_sequential_merge_is_wrong_for_densenet():
    """Why DenseNet needs its own canonizer: merging by registration order pairs a dense
    layer's conv2 with the next layer's norm1 (which normalizes a concatenation)."""
    model = build("densenet121")
    x = inputs("densenet121", batch=1)
    with torch.no_grad():
        ref = model(x)
    composite = Composite(canonizers=[SequentialMergeBatchNorm()])
    try:
        with composite.context(model) as canonized, torch.no_grad():
            broken = rel_err(canonized(x), ref) > 1e-3
    except RuntimeError:  # shape mismatch while merging
        broken = True
    assert broken


def _two_pass_clrp(model, x, t, ctx, head_name, kind):
    comp = lambda m: seed003_composite(ctx, m)  # noqa: E731
    r_target = zennit(model, x, comp(model), onehot(t))
    if kind == "clrp1":
        def dual(out):
            s = torch.full_like(out, 1.0 / (out.shape[1] - 1))
            s[torch.arange(len(t)), t] = 0.0
            return s
        r_dual = zennit(model, x, comp(model), dual)
    else:
        negated = copy.deepcopy(model)
        head = negated.get_submodule(head_name)
        with torch.no_grad():
            head.weight.neg_()
            head.bias.neg_()
        r_dual = zennit(negated, x, comp(negated), onehot(t))
    return (r_target - r_dual).clamp(min=0), r_target


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("kind", ["clrp1", "clrp2"])
def test_clrp_equals_two_zennit_passes(name, kind):
    model = build(name)
    x = inputs(name)
    t = torch.tensor([1, 3])
    ctx = context(name)
    before = state(model)
    ours = METHODS[kind].attribute(model, x, t, context=ctx).raw
    theirs, r_target = _two_pass_clrp(model, x, t, ctx, ctx.classifier, kind)
    assert (ours >= 0).all() and ours.abs().max() > 1e-3 * r_target.abs().max()
    # one pass computes R_t - R_d with other rounding than the subtraction of two passes
    assert float((ours - theirs).abs().max()) < TOL * float(r_target.abs().max())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert no_hooks(model)


def test_clrp_contrast_sums_to_zero_before_clipping():
    """Both the target and the dual concept carry one unit of relevance (conservation), so
    their difference sums to 0 before the negatives are clipped."""
    model = build("resnet18")
    x = inputs("resnet18", batch=1)
    ctx = context("resnet18")
    comp = make_composite("zplus", model, ctx, x.device, x.dtype)

    def contrast(out):
        s = torch.full_like(out, -1.0 / (out.shape[1] - 1))
        s[0, 2] = 1.0
        return s

    rel, _ = relevance(model, x, comp, contrast)
    assert abs(float(rel.sum())) < 2e-3 * float(rel.abs().sum())
    assert float(rel.abs().sum()) > 1e-3


def test_model_is_restored_even_when_lrp_fails():
    model = build("resnet18")
    x = inputs("resnet18", batch=1)
    before = state(model)
    comp = make_composite("zplus", model, context("resnet18"), x.device, x.dtype)

    def bad_seed(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        relevance(model, x, comp, bad_seed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert no_hooks(model)
    assert not any("canonizer" in n for n, _ in model.named_modules())


def test_lrp_refuses_models_without_a_canonizer():
    from cnnexplain.models import zoo

    model = zoo.build("efficientnet_b0", num_classes=3).eval()
    with pytest.raises(UsageError, match="canonizer"):
        METHODS["lrp-zplus"].attribute(model, torch.zeros(1, 3, 32, 32), torch.tensor([0]),
                                       context=Context(backbone="efficientnet_b0"))
