"""Sanity check by cascading model-parameter randomization (Adebayo et al. 2018; seed
``002_d3d71848a193426f.txt``, "Sanity Checks for Saliency Maps").

The layers with parameters are re-initialized one group at a time, from the top (the
classifier) down, on a *copy* of the model (the caller's model is never touched); after each
step the saliency maps are recomputed and compared with the original maps by Spearman's rank
correlation, per image, both of the maps and of their absolute values. A method whose maps
barely change while the network it explains is destroyed fails the check: its maps do not
depend on what the network learned.

Layers are ordered by their first call in a forward pass of an example batch; ``steps`` groups
of about equal size are cut from that order (top group first). Re-initialization uses each
module's own ``reset_parameters()`` (PyTorch's default initialization; BatchNorm becomes the
identity transform with fresh statistics) under a seeded RNG.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from cnnexplain.metrics.faithfulness import spearman_rows


def parametrized_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Dotted names of the modules that own parameters and ``reset_parameters()``, in the order
    of their first call when ``model(example)`` runs."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    handles = []

    def hook(module, _inp, _out):
        name = names[module]
        if name not in order:
            order.append(name)

    for name, module in model.named_modules():
        if name and hasattr(module, "reset_parameters") \
                and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def cascade_groups(layers: list[str], steps: int) -> list[list[str]]:
    """Split ``layers`` (bottom-up order) into ``min(steps, len(layers))`` groups, top first."""
    top_down = list(reversed(layers))
    k = max(1, min(int(steps), len(top_down)))
    return [list(g) for g in np.array_split(np.array(top_down, dtype=object), k)]


@dataclass
class RandomizationStep:
    """One step of the cascade: ``step`` (1-based), ``layers`` re-initialized so far
    (cumulative, top-down), ``model`` the randomized copy at this step."""

    step: int
    layers: list[str]
    model: nn.Module


def cascading_randomization(model: nn.Module, example: torch.Tensor, steps: int = 5,
                            seed: int = 0) -> Iterator[RandomizationStep]:
    """Yield the progressively randomized copies (one deep copy, re-initialized further at
    each step). ``example`` ``[B, 3, H, W]`` fixes the layer order."""
    layers = parametrized_layers(model, example)
    groups = cascade_groups(layers, steps)
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    done: list[str] = []
    for i, group in enumerate(groups, start=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 10_007 + i)
            with torch.no_grad():
                for name in group:
                    modules[name].reset_parameters()
                    if isinstance(modules[name], nn.modules.batchnorm._BatchNorm):
                        modules[name].reset_running_stats()
        done.extend(group)
        yield RandomizationStep(step=i, layers=list(done), model=work)


def sanity_check(model: nn.Module, explain: Callable[[nn.Module, int], np.ndarray],
                 example: torch.Tensor, steps: int = 5, seed: int = 0,
                 original: np.ndarray | None = None) -> list[dict]:
    """Run the cascade: ``explain(model, step) -> maps [N, H, W]`` on the original (step 0,
    skipped when ``original`` is given) and on every randomized copy (step 1, 2, ...). Returns
    one row per step: ``step``, ``layers_randomized``, ``top_layer`` / ``last_layer`` (first and
    last re-initialized so far), ``spearman`` and ``spearman_abs`` (means over images whose
    correlation is defined)."""
    base = np.asarray(original if original is not None else explain(model, 0), dtype=np.float64)
    rows = []
    for st in cascading_randomization(model, example, steps=steps, seed=seed):
        maps = np.asarray(explain(st.model, st.step), dtype=np.float64)
        rho = spearman_rows(base, maps)
        rho_abs = spearman_rows(np.abs(base), np.abs(maps))
        rows.append({"step": st.step, "layers_randomized": len(st.layers),
                     "top_layer": st.layers[0], "last_layer": st.layers[-1],
                     "spearman": _nanmean(rho), "spearman_abs": _nanmean(rho_abs)})
    return rows


def _nanmean(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")
