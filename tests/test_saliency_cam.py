"""CAM family against captum and pytorch-grad-cam on random-weight models.

Conventions that differ from the peers:
- captum ``LayerGradCam`` returns ``[B, 1, h, w]``; ours is ``[B, h, w]`` with the ReLU applied
  (``relu_attributions=True``); the counterfactual variant equals captum on the negated logits.
- captum ``GuidedGradCam`` upsamples with ``interpolate_mode="nearest"`` by default; ours is
  bilinear (``align_corners=False``), compared with ``interpolate_mode="bilinear"``.
- pytorch-grad-cam returns min-max normalized maps resized to the input (OpenCV bilinear): equal
  to our map after the same min-max normalization.
- CAM (no peer installed here) equals captum's Grad-CAM without ReLU at the GAP input times
  the number of positions, and ``mean(raw) + bias`` is the logit.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedGradCam, LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from cnnexplain.errors import UsageError
from cnnexplain.explain.saliency import METHODS, Context
from test_saliency_common import build, context, inputs, rel_err

TOL = 1e-5

CASES = [("smallcnn", "features.9"), ("resnet18", "layer3"), ("vgg11_bn", "features.22"),
         ("alexnet", "features.9")]


def _pair(name, batch=2):
    model = build(name)
    x = inputs(name, batch=batch)
    t = torch.tensor([1, 3][:batch])
    return model, x, t


@pytest.mark.parametrize("name,layer", CASES)
def test_gradcam_and_counterfactual_equal_captum(name, layer):
    model, x, t = _pair(name)
    module = model.get_submodule(layer)
    ours = METHODS["gradcam"].attribute(model, x, t, layer=layer).raw
    theirs = LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)[:, 0]
    assert ours.abs().max() > 0
    assert rel_err(ours, theirs) < TOL
    cf = METHODS["gradcam-counterfactual"].attribute(model, x, t, layer=layer).raw
    negated = LayerGradCam(lambda z: -model(z), module).attribute(x, target=t,
                                                                 relu_attributions=True)[:, 0]
    assert rel_err(cf, negated) < TOL


@pytest.mark.parametrize("name,layer", CASES[:2])
def test_guided_gradcam_equals_captum(name, layer):
    model, x, t = _pair(name)
    ours = METHODS["guided-gradcam"].attribute(model, x, t, layer=layer).raw
    theirs = GuidedGradCam(model, model.get_submodule(layer)).attribute(
        x, target=t, interpolate_mode="bilinear")
    assert rel_err(ours, theirs) < TOL


@pytest.mark.parametrize("name,layer", [("resnet18", "layer3"), ("smallcnn", "features")])
def test_gradcam_equals_pytorch_grad_cam_after_its_normalization(name, layer):
    """(Not on a BatchNorm followed by an in-place ReLU, such as smallcnn's features.9: there
    pytorch-grad-cam's hook sees the activations after the in-place ReLU; ours, like captum's,
    the layer's real output; see test_inplace_op_after_the_layer_... below.)"""
    model, x, t = _pair(name)
    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        theirs = torch.tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t]))
    ours = METHODS["gradcam"].attribute(model, x, t, layer=layer).map
    ours = ours - ours.amin((1, 2), keepdim=True)
    ours = ours / (1e-7 + ours.amax((1, 2), keepdim=True))
    assert float((ours - theirs).abs().max()) < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "smallcnn", "densenet121"])
def test_cam_is_gradcam_without_relu_at_the_gap_input(name):
    model, x, t = _pair(name, batch=1)
    ctx = context(name)
    cam = METHODS["cam"].attribute(model, x, t, context=ctx).raw
    with torch.no_grad():
        logits = model(x)
    head = model.get_submodule(ctx.classifier)
    torch.testing.assert_close(cam.mean((1, 2)) + head.bias[t], logits.gather(1, t[:, None])[:, 0],
                               rtol=1e-4, atol=1e-5)
    if name != "densenet121":  # densenet pools relu(features): no module outputs the GAP input
        layer = model.get_submodule({"resnet18": "layer4", "smallcnn": "features"}[name])
        grad = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=False)[:, 0]
        assert rel_err(cam, grad * cam[0].numel()) < TOL


def test_cam_refuses_a_model_without_gap_at_run_time():
    model = build("vgg11")
    with pytest.raises(UsageError, match="GAP"):
        METHODS["cam"].attribute(model, inputs("vgg11"), torch.tensor([0, 1]),
                                 context=context("vgg11"))


def test_gated_cam_splits_gradcam_by_cluster():
    """cluster + complement partition the channels: their pre-ReLU sums add up to Grad-CAM's,
    a full cluster gives Grad-CAM, an empty one zero."""
    from cnnexplain.explain.saliency.cam import gradcam_terms, weighted_sum

    model, x, t = _pair("smallcnn")
    g = torch.Generator().manual_seed(3)
    clusters = torch.rand(5, 64, generator=g) > 0.6
    ctx = Context(clusters=clusters)
    inside = METHODS["gated-cam"].attribute(model, x, t, layer="features", context=ctx).raw
    outside = METHODS["gated-cam-complement"].attribute(model, x, t, layer="features", context=ctx).raw
    alpha, a = gradcam_terms(model, x, t, "features", "test")
    mask = clusters[t].float()
    torch.testing.assert_close(inside, torch.relu(weighted_sum(alpha * mask, a)))
    torch.testing.assert_close(outside, torch.relu(weighted_sum(alpha * (1 - mask), a)))
    full = Context(clusters=torch.ones(5, 64, dtype=torch.bool))
    torch.testing.assert_close(METHODS["gated-cam"].attribute(model, x, t, layer="features",
                                                              context=full).raw,
                               METHODS["gradcam"].attribute(model, x, t, layer="features").raw)
    empty = METHODS["gated-cam-complement"].attribute(model, x, t, layer="features", context=full)
    assert float(empty.raw.abs().max()) == 0.0


def test_gated_cam_checks_its_clusters():
    model, x, t = _pair("smallcnn")
    with pytest.raises(UsageError, match="gated checkpoint"):
        METHODS["gated-cam"].attribute(model, x, t, layer="features", context=Context())
    with pytest.raises(UsageError, match="channels"):
        METHODS["gated-cam"].attribute(model, x, t, layer="features",
                                       context=Context(clusters=torch.ones(5, 32, dtype=torch.bool)))


def test_layer_problems_are_usage_errors():
    model, x, t = _pair("resnet18")
    with pytest.raises(UsageError, match="runs 2 times"):
        METHODS["gradcam"].attribute(model, x, t, layer="layer1.0.relu")
    with pytest.raises(UsageError, match="convolutional"):
        METHODS["gradcam"].attribute(model, x, t, layer="fc")
    with pytest.raises(UsageError, match="does not exist"):
        METHODS["gradcam"].attribute(model, x, t, layer="layer9")


def test_inplace_op_after_the_layer_does_not_change_the_captured_activation():
    """DenseNet applies F.relu(features, inplace=True) after the default layer."""
    model, x, t = _pair("densenet121", batch=1)
    ours = METHODS["gradcam"].attribute(model, x, t, layer="features").raw
    store = {}

    def keep(_m, _i, out):
        store["a"] = out.clone()

    h = model.features.register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    h.remove()
    a = store["a"]
    assert (a < 0).any()  # BatchNorm output: the in-place ReLU would have clipped these
    feats = a.detach().requires_grad_(True)
    out = model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(feats), 1), 1))
    (grad,) = torch.autograd.grad(out[0, t[0]], feats)
    expected = torch.relu((grad.mean((2, 3))[:, :, None, None] * a).sum(1))
    assert rel_err(ours, expected) < TOL
