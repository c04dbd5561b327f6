"""Shared inputs of the Quantus oracle tests: a tiny CNN (random weights, and the same CNN
trained on the synthetic world until it clearly learned), images with their object masks, and
gradient maps, all small enough for two CPU cores.

    world()          -> (x [N, 3, 16, 16] float32 in model space, y [N] int64, masks [N, 16, 16] uint8)
    random_model()   -> TinyCNN with seeded random weights (eval mode)
    trained_model()  -> TinyCNN trained on the world's train split (eval mode, accuracy checked)
    gradient_maps(model, x, y) -> [N, 16, 16] float32 (sum over channels of d logit_y / d x)

Everything is seeded and built once per process (``functools.cache``); one thread for the
training so that the weights are the same on every run.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import nn

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig

WORLD = "synthetic:n=1500,res=16,ntest=48,seed=5,classes=circle+square+cross+ring"
PREP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
NUM_CLASSES = 4
EPOCHS = 25


class TinyCNN(nn.Module):
    """conv(3->16, 3x3) ReLU conv(16->32, 3x3, stride 2) ReLU conv(32->32, 3x3) ReLU GAP linear(32->4)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _split(split: str, limit: int | None = None):
    ds = SyntheticDataset(WorldConfig.from_spec(WORLD), split, PREP, limit=limit)
    items = [ds[i] for i in range(len(ds))]
    x = PREP.normalize(torch.stack([it["image"] for it in items]))
    y = torch.stack([it["label"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    return x.float(), y, masks


@cache
def world():
    """The test split: ``(x [48, 3, 16, 16], y [48], masks [48, 16, 16] uint8)``."""
    return _split("test")


@cache
def random_model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@cache
def trained_model() -> TinyCNN:
    """TinyCNN after EPOCHS epochs of Adam (lr 3e-3, batch 32) on 1,500 training images; asserts a
    test accuracy of at least 0.6 (chance 0.25), so the oracle tests run on a model that
    learned."""
    x, y, _ = _split("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for epoch in range(EPOCHS):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for s in range(0, len(x), 32):
                i = order[s:s + 32]
                loss = nn.functional.cross_entropy(model(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    xt, yt, _ = world()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert acc >= 0.6, f"the oracle tests' model did not learn (test accuracy {acc:.3f})"
    return model


def gradient_maps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]``: the gradient of the target logit, summed over colour channels."""
    x = x.clone().requires_grad_(True)
    out = model(x).gather(1, y.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(out, x)
    return g.sum(dim=1).detach()


def numpy_inputs(x, y, maps, masks=None) -> dict:
    """The arrays Quantus takes: ``x_batch``, ``y_batch``, ``a_batch`` ``[N, 1, H, W]`` and
    ``s_batch`` ``[N, 1, H, W]`` (when masks are given)."""
    out = {"x_batch": np.asarray(x, dtype=np.float32), "y_batch": np.asarray(y),
           "a_batch": np.asarray(maps, dtype=np.float32)[:, None]}
    if masks is not None:
        out["s_batch"] = np.asarray(masks, dtype=np.float32)[:, None]
    return out
