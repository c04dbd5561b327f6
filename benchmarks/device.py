"""The device a benchmark times on: one place for "is it CUDA" and for synchronizing before a
clock is read (CUDA kernels run asynchronously)."""

from __future__ import annotations

import torch


def is_cuda(device: str | torch.device) -> bool:
    """``"cuda"``, ``"cuda:1"`` or a CUDA ``torch.device``."""
    return torch.device(device).type == "cuda"


def sync(device: str | torch.device) -> None:
    """Wait until ``device`` has run its queued work (a no-op off CUDA)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
