"""Every method runs on every backbone the issue names (random weights, one 32 px image, or
64 px for AlexNet), with the checks the CLI makes first: CAM only on GAP heads, LRP only with
a canonizer, gated-cam with (here synthetic) class clusters at the default layer."""

from __future__ import annotations

import pytest
import torch

from cnnexplain.explain.saliency import METHODS, Context, ModelInfo
from cnnexplain.models import zoo
from cnnexplain.models.layers import record
from test_saliency_common import FAST

BACKBONES = ["smallcnn", "resnet18", "resnet50", "vgg16_bn", "alexnet", "densenet121",
             "mobilenet_v2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_every_method_runs(name):
    torch.manual_seed(0)
    spec = zoo.get_spec(name)
    model = zoo.build(name, num_classes=4).eval()
    size = 64 if name == "alexnet" else 32
    x = torch.rand(1, 3, size, size)
    t = torch.tensor([2])
    with torch.no_grad(), record(model, [spec.default_layer]) as acts:
        model(x)
    channels = acts[spec.default_layer].shape[1]
    clusters = torch.rand(4, channels, generator=torch.Generator().manual_seed(0)) > 0.5
    info = ModelInfo(name, gap=spec.gap, gated=True, model_type=type(model), num_classes=4)
    ctx = Context(options=FAST, classifier=spec.classifier, clusters=clusters, backbone=name)
    ran = []
    for method_name, method in METHODS.items():
        if method.problem(info) is not None:
            assert method_name == "cam" and not spec.gap
            continue
        att = method.attribute(model, x, t, layer=spec.default_layer, context=ctx)
        assert att.map.shape == (1, size, size), method_name
        assert torch.isfinite(att.map).all() and torch.isfinite(att.raw).all(), method_name
        ran.append(method_name)
    assert len(ran) >= len(METHODS) - 1
