"""Feature visualization: ours versus lucent (torch-lucent, the PyTorch port of lucid) on the
same model, layer, channels, image side and number of Adam steps, in one run.

Both optimize each channel's mean activation (lucent's ``objectives.channel``) with the same
parameterization (decorrelated Fourier image, sd 0.01, sigmoid), Adam at lr 0.05 and ImageNet
normalization, each with its own standard transforms (lucent's fixed pad 12 / jitter 8 / scale
/ rotate / jitter 4 at any size; ours scaled to the image side) and at the model's own side
(lucent's ``fixed_image_size``, otherwise it would upsample to 224). The reached objective is
measured the same way for both: the channel's mean at the layer on the final image, without
transforms. Wall time per image: lucent renders one channel per call; ours runs all channels in
one batch ("ours (batched)") and one at a time ("ours (one unit)").

Reported, never asserted: ``objective / lucent's`` (target >= 1) and ``lucent's time / ours``
(target >= 1). The model is a random-weight resnet18 with the small stem and randomized
BatchNorm statistics, in eval mode; lucent gets a fresh copy per call (v0.1.x never removes its
hooks, so they would pile up). ``size="small"``: 32 px, 3 channels, 32 steps; ``"full"``: 64
px, 8 channels, 256 steps.

lucent is a test-only peer installed with ``pip install --no-deps torch-lucent`` (its metadata
pins kornia<=0.4.1, which does not install with our torch) plus ``decorator`` and ``kornia``;
its ``render`` module imports ``IPython.display`` for notebook display only, so a stub stands
in when IPython is absent, and kornia's ``get_rotation_matrix2d`` / ``warp_affine``, which
lucent calls at kornia's top level (kornia < 0.5), are aliased to their current place,
``kornia.geometry.transform``. Without lucent the peer's row says why and the ratios are empty.
"""

from __future__ import annotations

import copy
import random
import sys
import time
import types
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.visualize.objectives import one_hot
from cnnexplain.explain.visualize.optimize import Goal, Settings, capture, optimize, run_model
from benchmarks.models import resnet18_with_bn_statistics

SIZES = {"small": (32, 3, 32), "full": (64, 8, 256)}  # side, channels, steps
LAYER = "layer3"
PREP = Preprocessing()  # ImageNet's mean / std, as lucent's preprocess=True


def _model(device) -> nn.Module:
    return resnet18_with_bn_statistics(small_stem=True).to(device)


def _lucent():
    """lucent's render, param, transform and objectives modules, or the reason they are not
    importable."""
    try:
        import IPython.display  # noqa: F401
    except ImportError:  # lucent.misc.io imports it for notebook display only
        stub = types.ModuleType("IPython")
        stub.display = types.ModuleType("IPython.display")
        sys.modules.setdefault("IPython", stub)
        sys.modules.setdefault("IPython.display", stub.display)
    try:
        import kornia
        from lucent.optvis import objectives, param, render, transform
    except ImportError as exc:
        return None, (f"skipped: lucent is not importable ({exc}); pip install --no-deps "
                      "torch-lucent decorator kornia")
    for name in ("get_rotation_matrix2d", "warp_affine"):  # top-level before kornia 0.5
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kornia.geometry.transform, name))
    return (render, param, transform, objectives), None


def _channel_values(model, images: torch.Tensor, channels, device) -> list[float]:
    """Each channel's mean at LAYER on its image ``[N, 3, H, W]`` in [0, 1], no transforms."""
    with torch.no_grad(), capture(model, LAYER, stop=True) as store:
        acts, _ = run_model(model, PREP.normalize(images.to(device)), store)
    return [float(acts[i, c].mean()) for i, c in enumerate(channels)]


def run(size: str = "small") -> pd.DataFrame:
    """Rows: ours (batched), ours (one unit), lucent; mean objective reached, seconds per
    image, and the same-run ratios against lucent."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    side, n_channels, steps = SIZES[size]
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(device)
    with torch.no_grad(), capture(model, LAYER, stop=True) as store:
        k = run_model(model, torch.zeros(1, 3, side, side, device=device), store)[0].shape[1]
    channels = list(range(0, k, k // n_channels))[:n_channels]
    goals = [Goal("channel", one_hot(c, k), key=f"bench|{c}", group=i, unit=str(c))
             for i, c in enumerate(channels)]
    settings = Settings(steps=steps, lr=0.05, side=side, batch_size=len(goals))
    rows = []

    def ours(label, fn):
        optimize(model, LAYER, goals[:1], Settings(steps=2, side=side), normalize=PREP.normalize,
                 device=device)  # warm-up
        start = time.perf_counter()
        images = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        values = _channel_values(model, images, channels, device)
        rows.append({"implementation": label, "channels": len(channels), "steps": steps,
                     "side": side, "device": device, "objective": float(np.mean(values)),
                     "min_objective": float(np.min(values)),
                     "s_per_image": seconds / len(channels), "note": ""})

    ours("ours (batched)", lambda: optimize(model, LAYER, goals, settings,
                                            normalize=PREP.normalize, device=device).images)
    ours("ours (one unit)", lambda: torch.cat([
        optimize(model, LAYER, [g], settings, normalize=PREP.normalize, device=device).images
        for g in goals]))
    mods, why = _lucent()
    if mods is None:
        rows.append({"implementation": "lucent", "channels": len(channels), "steps": steps,
                     "side": side, "device": device, "objective": float("nan"),
                     "min_objective": float("nan"), "s_per_image": float("nan"), "note": why})
    else:
        render, param, transform, objectives = mods
        images, seconds = [], 0.0
        for i, c in enumerate(channels):
            peer = copy.deepcopy(model)
            torch.manual_seed(i)
            np.random.seed(i)
            random.seed(i)
            start = time.perf_counter()
            out = render.render_vis(peer, objectives.channel(LAYER, c),
                                    lambda: param.image(side), thresholds=(steps,),
                                    transforms=list(transform.standard_transforms),
                                    preprocess=True, fixed_image_size=side, show_image=False,
                                    progress=False)
            seconds += time.perf_counter() - start
            images.append(torch.from_numpy(out[-1]).permute(0, 3, 1, 2).float())
        values = _channel_values(model, torch.cat(images), channels, device)
        rows.append({"implementation": "lucent", "channels": len(channels), "steps": steps,
                     "side": side, "device": device, "objective": float(np.mean(values)),
                     "min_objective": float(np.min(values)),
                     "s_per_image": seconds / len(channels), "note": "torch-lucent"})
    frame = pd.DataFrame(rows)
    peer = frame[frame.implementation == "lucent"].iloc[0]
    frame["objective_vs_lucent"] = frame["objective"] / peer["objective"]
    frame["lucent_time_over_ours"] = peer["s_per_image"] / frame["s_per_image"]
    return frame
