"""BatchNorm with global statistics under torch.distributed (CPU/gloo and CUDA/nccl)."""

from __future__ import annotations

import types

import torch
from torch import nn


def _global_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the global batch of all ranks: per-channel sum, sum of squares and count
    are all-reduced (autograd-aware, so gradients flow across ranks as in SyncBatchNorm)."""
    import torch.distributed.nn.functional as dnn

    if not self.training:
        return type(self).forward(self, x)
    dims = [0, *range(2, x.dim())]
    c = x.shape[1]
    xf = x.float()
    count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
    stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
    stats = dnn.all_reduce(stats)
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
    if self.affine:
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp_min(1))
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(unbiased.detach() * m)
    return y.to(x.dtype)


def sync_batchnorm_(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` use global batch statistics across the ranks of
    the process group (torch's SyncBatchNorm refuses CPU modules). State dict unchanged.
    Returns the number of layers patched."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_global_bn_forward, m)
            n += 1
    return n
