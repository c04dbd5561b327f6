"""Shared helpers for the saliency tests, and the registry contract every method follows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnnexplain.explain.saliency import METHODS, Context, MethodOptions, ModelInfo
from cnnexplain.explain.saliency.base import upsample
from cnnexplain.errors import UsageError
from cnnexplain.models import zoo

FAST = MethodOptions(smoothgrad_samples=2, ig_steps=3, occlusion_window=16, occlusion_stride=16,
                     lime_samples=8, lime_segments=4, internal_batch_size=32)
"""Options that keep the many-evaluation methods cheap in tests."""


def healthy(model: nn.Module, seed: int = 1) -> nn.Module:
    """Re-initialize a random model so that activations neither vanish nor stay homogeneous:
    He-normal convolutions, 1/sqrt(fan-in) linear layers, BatchNorm with random statistics,
    scales and shifts (torchvision's inits make MobileNetV2's logits ~1e-10 and BatchNorm the
    identity, which hides bias-dependent bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.05)
            elif isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.in_features ** 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def build(name: str, classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return healthy(zoo.build(name, num_classes=classes), seed + 1).eval()


def inputs(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = max(32, zoo.get_spec(name).min_size + 1) if name != "alexnet" else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def context(name: str, **kw) -> Context:
    spec = zoo.get_spec(name)
    return Context(classifier=spec.classifier, backbone=name, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def test_registry_lists_every_method_of_the_issue():
    expected = {"gradient", "input-x-gradient", "guided-backprop", "deconvnet", "smoothgrad",
                "integrated-gradients", "occlusion", "lime", "cam", "gradcam",
                "gradcam-counterfactual", "guided-gradcam", "lrp-epsilon", "lrp-alpha2beta1",
                "lrp-zplus", "clrp1", "clrp2", "gated-cam", "gated-cam-complement"}
    assert set(METHODS) == expected
    for m in METHODS.values():
        d = m.describe()
        assert d["description"] and d["sign"] and d["reduction"] and d["citation"]
        assert d["kind"] in ("pixel", "layer")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_shapes_and_no_side_effects(name):
    model = build("smallcnn", classes=4)
    before = state(model)
    x = inputs("smallcnn", batch=3)
    t = torch.tensor([0, 3, 1])
    clusters = torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    ctx = context("smallcnn", options=FAST, clusters=clusters)
    att = METHODS[name].attribute(model, x, t, layer="features", context=ctx)
    assert att.map.shape == (3, 32, 32)
    assert torch.isfinite(att.map).all()
    if METHODS[name].kind == "pixel":
        assert att.raw.shape == (3, 3, 32, 32)
    else:
        assert att.raw.shape == (3, 8, 8)
        torch.testing.assert_close(att.map, upsample(att.raw, (32, 32)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks(model)
    assert not model.training


@pytest.mark.parametrize("name", ["gradient", "smoothgrad", "gradcam", "lrp-zplus", "clrp2",
                                  "occlusion", "lime", "integrated-gradients"])
def test_batch_independence(name):
    """An image's map does not depend on the other images of its batch (per-image seeds)."""
    model = build("smallcnn", classes=4)
    x = inputs("smallcnn", batch=3)
    t = torch.tensor([2, 0, 1])
    ctx = context("smallcnn", options=FAST)
    whole = METHODS[name].attribute(model, x, t, layer="features",
                                    context=ctx.with_ids(torch.tensor([10, 11, 12]))).map
    single = METHODS[name].attribute(model, x[1:2], t[1:2], layer="features",
                                     context=ctx.with_ids(torch.tensor([11]))).map
    torch.testing.assert_close(whole[1:2], single, rtol=1e-4, atol=1e-6 * float(whole.abs().max()))


def test_requirements_are_declared_before_computing():
    info = ModelInfo("vgg16_bn", gap=False, gated=False, model_type=type(zoo.build("vgg11", 3)),
                     num_classes=3)
    problem, fix = METHODS["cam"].problem(info)
    assert "GAP" in problem and "vgg16_bn" in problem and "gradcam" in fix
    problem, fix = METHODS["gated-cam"].problem(info)
    assert "gated checkpoint" in problem and "train-gated" in fix
    eff = ModelInfo("efficientnet_b0", gap=False, gated=False,
                    model_type=type(zoo.build("efficientnet_b0", 3)), num_classes=3)
    problem, _ = METHODS["lrp-zplus"].problem(eff)
    assert "canonizer" in problem and "efficientnet_b0" in problem
    assert METHODS["gradcam"].problem(eff) is None
    res = ModelInfo("resnet18", gap=True, gated=False, model_type=type(zoo.build("resnet18", 3)),
                    num_classes=3)
    assert METHODS["cam"].problem(res) is None


def test_bad_inputs_are_refused():
    model = build("smallcnn")
    with pytest.raises(Exception, match="B, 3, H, W"):
        METHODS["gradient"].attribute(model, torch.zeros(2, 1, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(Exception, match="targets"):
        METHODS["gradient"].attribute(model, torch.zeros(2, 3, 32, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(UsageError, match="needs a layer"):
        METHODS["gradcam"].attribute(model, torch.zeros(1, 3, 32, 32), torch.tensor([0]))


def test_options_validation_names_the_field():
    with pytest.raises(UsageError, match="`smoothgrad_samples` must be at least 1"):
        MethodOptions(smoothgrad_samples=0).validate()
    with pytest.raises(UsageError, match="unknown `ig_method` 'simpson'"):
        MethodOptions(ig_method="simpson").validate()
    with pytest.raises(UsageError, match="`lrp_epsilon` must be greater than 0"):
        MethodOptions(lrp_epsilon=-1).validate()
    with pytest.raises(UsageError, match="finite"):
        MethodOptions(smoothgrad_sigma=float("nan")).validate()
    assert MethodOptions().validate() == MethodOptions()


def test_copy_of_model_is_not_needed_for_eval_mode():
    """Methods never switch the caller's model to train mode (dropout would randomize maps)."""
    model = build("vgg11")
    model.eval()
    ref = copy.deepcopy(model)
    x = inputs("vgg11", batch=1)
    a = METHODS["gradient"].attribute(model, x, torch.tensor([1])).map
    b = METHODS["gradient"].attribute(ref, x, torch.tensor([1])).map
    assert torch.equal(a, b) and not model.training
