"""Training-time augmentation (``augment``, :data:`~cnnexplain.config.train.AUGMENTATIONS`)
drawn per global batch, so resumed and distributed runs see the same augmented images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator, start: int = 0,
                  total: int | None = None) -> torch.Tensor:
    """Augment ``x`` [B, 3, H, W] (in [0, 1], before normalization) with the draws of a global
    batch of ``total`` images from ``g`` (this rank's rows start at ``start``), so resumed and
    distributed runs see the same augmented images."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    total = total or b
    flips = torch.rand(total, generator=g)[start:start + b] < 0.5
    pad = max(1, h // 8)
    shifts = torch.randint(0, 2 * pad + 1, (total, 2), generator=g)[start:start + b]
    if kind == "flip-crop":
        padded = F.pad(x, (pad, pad, pad, pad))
        x = torch.stack([padded[i, :, int(dy):int(dy) + h, int(dx):int(dx) + w]
                         for i, (dy, dx) in enumerate(shifts.tolist())])
    flips = flips.to(x.device)
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    if kind == "dihedral" and h == w:
        turns = torch.randint(0, 4, (total,), generator=g)[start:start + b].tolist()
        x = torch.stack([torch.rot90(x[i], int(k), dims=(-2, -1)) for i, k in enumerate(turns)])
    return x
