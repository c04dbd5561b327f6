"""Gradient methods against captum and zennit on random-weight models.

Conventions that differ from the peers (and how the tests bridge them):
- captum ``Saliency`` takes ``abs=True`` by default; ours is the signed gradient: compared with
  ``abs=False``. Our *map* is max |grad| over channels (Simonyan et al.), captum has no map.
- captum / zennit guided backprop and DeconvNet only override ``nn.ReLU`` modules: on DenseNet
  (functional ``F.relu`` before pooling) captum is compared on an equivalent model whose head
  uses an ``nn.ReLU`` module, and on MobileNetV2 (``ReLU6`` modules) zennit is compared with its
  ReLU rules mapped onto ``nn.ReLU6`` too.
- captum's ``riemann_trapezoid`` weights sum to ``(n - 1) / n``; ours is the trapezoid rule on
  [0, 1], so captum's result is ours times ``(n - 1) / n``.
- captum ``NoiseTunnel`` draws its own noise; SmoothGrad is compared with captum at sigma = 0
  and, for sigma > 0, with an explicit mean over the same per-image noise.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import (Deconvolution, GuidedBackprop, InputXGradient, IntegratedGradients,
                         NoiseTunnel, Saliency)
from torch import nn
from zennit.attribution import Gradient as ZennitGradient
from zennit.composites import LayerMapComposite
from zennit.rules import ReLUDeconvNet, ReLUGuidedBackprop

from cnnexplain.explain.saliency import METHODS, Context, MethodOptions
from cnnexplain.explain.saliency.gradients import ig_quadrature
from cnnexplain.explain.saliency.relu_rules import relu_rule
from test_saliency_common import build, inputs, rel_err

TOL = 1e-5

BACKBONES = ["smallcnn", "resnet18", "vgg11_bn", "alexnet"]


def _pair(name):
    model = build(name)
    x = inputs(name)
    t = torch.tensor([1, 3])
    return model, x, t


@pytest.mark.parametrize("name", BACKBONES)
def test_gradient_and_input_x_gradient_equal_captum(name):
    model, x, t = _pair(name)
    ours = METHODS["gradient"].attribute(model, x, t)
    theirs = Saliency(model).attribute(x, target=t, abs=False)
    assert rel_err(ours.raw, theirs) < TOL
    torch.testing.assert_close(ours.map, theirs.abs().amax(1))
    ixg = METHODS["input-x-gradient"].attribute(model, x, t).raw
    assert rel_err(ixg, InputXGradient(model).attribute(x, target=t)) < TOL


@pytest.mark.parametrize("name", BACKBONES + ["resnet50"])
def test_guided_backprop_and_deconvnet_equal_captum(name):
    """Where captum is correct (ReLU modules; ResNet's reused self.relu included)."""
    model, x, t = _pair(name)
    gb = METHODS["guided-backprop"].attribute(model, x, t).raw
    assert rel_err(gb, GuidedBackprop(model).attribute(x, target=t)) < TOL
    dc = METHODS["deconvnet"].attribute(model, x, t).raw
    assert rel_err(dc, Deconvolution(model).attribute(x, target=t)) < TOL


class _ModuleHeadDenseNet(nn.Module):
    """torchvision's DenseNet with its functional relu / pooling head as modules (same output)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.net.classifier(torch.flatten(self.pool(self.relu(self.net.features(x))), 1))


def test_guided_backprop_handles_functional_relu_densenet():
    model, x, t = _pair("densenet121")
    rewritten = _ModuleHeadDenseNet(model).eval()
    with torch.no_grad():
        assert torch.equal(model(x), rewritten(x))
    for ours, Peer in (("guided-backprop", GuidedBackprop), ("deconvnet", Deconvolution)):
        mine = METHODS[ours].attribute(model, x, t).raw
        assert rel_err(mine, Peer(rewritten).attribute(x, target=t)) < TOL
        # the pitfall: captum on the original model misses the functional relu
        assert rel_err(mine, Peer(model).attribute(x, target=t)) > 1e-3


def test_guided_backprop_handles_relu6_mobilenet():
    model, x, t = _pair("mobilenet_v2")
    for ours, rule in (("guided-backprop", ReLUGuidedBackprop), ("deconvnet", ReLUDeconvNet)):
        composite = LayerMapComposite([(nn.ReLU6, rule()), (nn.ReLU, rule())])
        with ZennitGradient(model=model, composite=composite) as attributor:
            _, theirs = attributor(x, torch.eye(5)[t])
        assert rel_err(METHODS[ours].attribute(model, x, t).raw, theirs) < TOL


def test_relu_rule_covers_every_spelling():
    x = torch.tensor([[-1.0, 0.5, 7.0]], requires_grad=True)
    g = torch.tensor([[2.0, -3.0, 4.0]])
    spellings = [torch.relu, nn.functional.relu, lambda v: v.relu(), nn.ReLU(), nn.ReLU(inplace=True),
                 lambda v: nn.functional.relu(v.clone(), inplace=True)]
    for fn in spellings:
        with relu_rule("guided") as mode:
            (grad,) = torch.autograd.grad(fn(x * 1.0), x, g)
        assert mode.calls == 1
        assert grad.tolist() == [[0.0, 0.0, 4.0]]
    with relu_rule("guided"):
        (grad,) = torch.autograd.grad(nn.ReLU6()(x * 1.0), x, g)
    assert grad.tolist() == [[0.0, 0.0, 0.0]]  # 7 > 6 is saturated
    with relu_rule("deconvnet"):
        (grad,) = torch.autograd.grad(torch.relu(x * 1.0), x, g)
    assert grad.tolist() == [[2.0, 0.0, 4.0]]
    # outside the block the plain gradient is back
    (grad,) = torch.autograd.grad(torch.relu(x * 1.0), x, g)
    assert grad.tolist() == [[0.0, -3.0, 4.0]]


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_left",
                                    "riemann_middle"])
def test_integrated_gradients_equal_captum(method):
    model, x, t = _pair("resnet18")
    ctx = Context(options=MethodOptions(ig_steps=8, ig_method=method, internal_batch_size=5))
    ours = METHODS["integrated-gradients"].attribute(model, x, t, context=ctx).raw
    theirs = IntegratedGradients(model).attribute(x, target=t, n_steps=8, method=method,
                                                  internal_batch_size=7)
    assert rel_err(ours, theirs) < TOL


def test_integrated_gradients_trapezoid_vs_captum_convention():
    model, x, t = _pair("smallcnn")
    n = 6
    ctx = Context(options=MethodOptions(ig_steps=n, ig_method="riemann_trapezoid"))
    ours = METHODS["integrated-gradients"].attribute(model, x, t, context=ctx).raw
    theirs = IntegratedGradients(model).attribute(x, target=t, n_steps=n,
                                                  method="riemann_trapezoid")
    assert rel_err(ours * (n - 1) / n, theirs) < TOL
    alphas, weights = ig_quadrature(n, "riemann_trapezoid")
    assert abs(weights.sum() - 1.0) < 1e-12 and alphas[0] == 0 and alphas[-1] == 1


def test_integrated_gradients_completeness():
    model, x, t = _pair("smallcnn")
    ctx = Context(options=MethodOptions(ig_steps=64, ig_method="gausslegendre"))
    raw = METHODS["integrated-gradients"].attribute(model, x, t, context=ctx).raw
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(raw.sum((1, 2, 3)), gap, rtol=2e-2, atol=1e-4)


def test_smoothgrad_equals_captum_at_zero_noise_and_manual_mean_otherwise():
    model, x, t = _pair("resnet18")
    zero = Context(options=MethodOptions(smoothgrad_sigma=0.0, smoothgrad_samples=3))
    ours = METHODS["smoothgrad"].attribute(model, x, t, context=zero).raw
    theirs = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=3,
                                                    stdevs=0.0, target=t, abs=False)
    assert rel_err(ours, theirs) < TOL
    opts = MethodOptions(smoothgrad_sigma=0.2, smoothgrad_samples=5, internal_batch_size=3,
                         smoothgrad_base="input-x-gradient")
    ctx = Context(options=opts, seed=7).with_ids(torch.tensor([4, 9]))
    ours = METHODS["smoothgrad"].attribute(model, x, t, context=ctx)
    gens = ctx.generators(2, "smoothgrad")
    manual = torch.zeros_like(x)
    for i in range(2):
        sigma = 0.2 * float(x[i].max() - x[i].min())
        for _ in range(5):
            noisy = x[i:i + 1] + torch.randn(x.shape[1:], generator=gens[i]) * sigma
            manual[i] += InputXGradient(model).attribute(noisy, target=t[i:i + 1])[0] / 5
    assert rel_err(ours.raw, manual) < TOL
    torch.testing.assert_close(ours.map, ours.raw.sum(1))  # the base's reduction
    # the noise does something, and the seed decides it
    other = METHODS["smoothgrad"].attribute(model, x, t, context=Context(options=opts, seed=8))
    assert rel_err(other.raw, ours.raw) > 1e-3


def test_smoothgrad_refuses_a_non_gradient_base():
    from cnnexplain.errors import UsageError

    model, x, t = _pair("smallcnn")
    ctx = Context(options=MethodOptions(smoothgrad_base="gradcam"))
    with pytest.raises(UsageError, match="`smoothgrad_base`"):
        METHODS["smoothgrad"].attribute(model, x, t, context=ctx)


def test_a_cpu_pass_holds_at_most_eight_224px_images_of_perturbed_copies():
    """``pass_size``: ``internal_batch_size`` bounds every device; on a CPU a pixel budget of
    8 images of 224 x 224 also applies (larger passes measured slower per image there), and
    integrated gradients really runs its path points in passes of that size."""
    from cnnexplain.explain.saliency.base import CPU_PIXELS_PER_PASS, pass_size

    assert CPU_PIXELS_PER_PASS == 8 * 224 * 224
    assert pass_size(64, torch.zeros(1, 3, 224, 224)) == 8
    assert pass_size(64, torch.zeros(1, 3, 112, 112)) == 32
    assert pass_size(64, torch.zeros(1, 3, 32, 32)) == 64      # the option is the cap
    assert pass_size(5, torch.zeros(1, 3, 112, 112)) == 5
    assert pass_size(64, torch.zeros(1, 3, 1024, 1024)) == 1   # never zero
    assert pass_size(64, torch.zeros(1, 3, 224, 224, device="meta")) == 64  # not a CPU

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    sizes = []
    model[0].register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 2])
    big = METHODS["integrated-gradients"].attribute(
        model, x, t, context=Context(options=MethodOptions(ig_steps=10, internal_batch_size=64)))
    assert sizes == [8, 8, 4]
    one = METHODS["integrated-gradients"].attribute(
        model, x, t, context=Context(options=MethodOptions(ig_steps=10, internal_batch_size=1)))
    assert rel_err(big.raw, one.raw) < 1e-5
