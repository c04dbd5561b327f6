"""Models the benchmarks share: a ResNet-18 whose BatchNorm layers carry non-trivial statistics
(a random-weight model with running means 0 and variances 1 would make BN an identity)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def resnet18_with_bn_statistics(num_classes: int = 10, small_stem: bool = False) -> nn.Module:
    """torchvision's ResNet-18 (seed 0), in eval mode, with random running statistics and BN
    biases (seed 1); ``small_stem``: the 32-64 px stem cnnexplain builds (3x3 stride-1, no
    max-pool)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    if small_stem:
        from cnnexplain.models.zoo import _resnet_small_stem

        _resnet_small_stem(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()
