"""Dataset examples beside the optimized images (Olah et al. 2017, "Feature Visualization",
Distill: "dataset examples show the whole activation spectrum"; optimization isolates what
causes the unit, examples show it in context).

The objective of every dataset image for every unit comes from the cached activations of
:func:`cnnexplain.activations.compute_activations`: mean-pooled ``[N, K]`` where the objective
is the plain mean of the activations (channel, direction, logits: exact), full maps
``[N, K, h, w]`` otherwise (neuron, layer). :func:`rank` takes the top-k and bottom-k images
per unit; :func:`example_maps` runs the model again on those few images for the unit's map
``[h, w]`` (drawn over each example, upsampled bilinearly) and the objective evaluated on them
the way it is evaluated on the optimized images (``top_example_objective``: the best one's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnexplain.explain.visualize.objectives import Objective
from cnnexplain.explain.visualize.optimize import capture, evaluate, run_model


def pool_for(objective: Objective) -> str | None:
    """The pooling of the dataset's cached activations that gives ``objective`` exactly:
    ``mean`` for a plain mean of the activations, None (full maps) otherwise."""
    return "mean" if objective.linear else None


def dataset_values(acts, layer: str, objective: Objective, weights: torch.Tensor,
                   position: tuple[int, int] | None = None, chunk_rows: int = 256) -> np.ndarray:
    """float32 ``[N, U]``: the objective of each of the N images of an
    :class:`~cnnexplain.activations.ActivationSet` for each of U units (``weights`` ``[U,
    K]``), read in chunks of ``chunk_rows`` images."""
    out = np.zeros((len(acts), len(weights)), np.float32)
    for start, block in acts.chunks(layer, chunk_rows):
        t = torch.from_numpy(block)
        feats = t if (acts.pool is not None and t.dim() == 2) else objective.feature(t, position)
        out[start:start + len(t)] = objective.values(feats, weights).numpy()
    return out


def mean_activation(acts, layer: str, chunk_rows: int = 256) -> np.ndarray:
    """float64 ``[K]``: each channel's activation averaged over the map and the dataset (the
    ranking of ``units=top:K``)."""
    total = None
    for _, block in acts.chunks(layer, chunk_rows):
        b = block.reshape(block.shape[0], block.shape[1], -1).mean(axis=2).astype(np.float64)
        total = b.sum(0) if total is None else total + b.sum(0)
    return total / len(acts)


def rank(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` ``[N, U]`` -> ``(top, bottom)``, int64 ``[U, min(k, N)]`` image indices: the
    highest first, the lowest first (ties by index)."""
    k = min(int(k), values.shape[0])
    order = np.argsort(-values, axis=0, kind="stable")[:k].T
    low = np.argsort(values, axis=0, kind="stable")[:k].T
    return order.astype(np.int64), low.astype(np.int64)


def example_maps(model: nn.Module, layer: str | None, objective: Objective,
                 images: torch.Tensor, weights: torch.Tensor, *, normalize,
                 position: tuple[int, int] | None = None, device="cpu",
                 batch_size: int = 32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For M images ``[M, 3, H, W]`` in [0, 1], each paired with a unit (``weights`` ``[M,
    K]``): ``(maps [M, h, w] or None for logits, values [M])``, the unit's map and objective
    (eval mode, no gradient)."""
    maps, values = [], []
    was_training = model.training
    model.eval()
    read = layer if objective.source == "layer" else None
    try:
        with torch.no_grad(), capture(model, read, stop=objective.source == "layer") as store:
            for s in range(0, len(images), batch_size):
                x = images[s:s + batch_size].to(device).float()
                w = weights[s:s + batch_size].to(device)
                acts, logits = run_model(model, normalize(x), store)
                values.append(evaluate(objective, acts, logits, w, position).float().cpu())
                m = objective.maps(acts, w) if acts is not None else None
                if m is not None:
                    maps.append(m.float().cpu())
    finally:
        model.train(was_training)
    return (torch.cat(maps) if maps else None), torch.cat(values)


@dataclass
class UnitExamples:
    """Per unit u: the dataset indices of its ``top`` and ``bottom`` examples ``[U, k]`` (best
    first), their objective values ``[U, k]``, their unit maps ``[U, k, h, w]`` (None for
    logits), and the images ``{dataset index: [3, H, W]}``."""

    top: np.ndarray
    bottom: np.ndarray
    top_values: np.ndarray
    bottom_values: np.ndarray
    top_maps: np.ndarray | None
    bottom_maps: np.ndarray | None
    images: dict

    def best(self, u: int, sign: float) -> float:
        """The objective on unit u's best example: its top one to maximize, its bottom one
        to minimize (NaN without examples)."""
        vals = self.top_values if sign > 0 else self.bottom_values
        return float(vals[u, 0]) if vals.shape[1] else float("nan")


def unit_examples(model: nn.Module, layer: str | None, objective: Objective, dataset,
                  values: np.ndarray, weights: torch.Tensor, k: int, *, normalize,
                  position=None, device="cpu", batch_size: int = 32) -> UnitExamples:
    """Top and bottom ``k`` examples of every unit (``values`` ``[N, U]`` from
    :func:`dataset_values`, ``weights`` ``[U, K]``), re-evaluated with their maps by
    :func:`example_maps`."""
    top, bottom = rank(values, k)
    need = sorted({int(i) for i in np.concatenate([top.ravel(), bottom.ravel()])})
    images = {i: dataset[i]["image"].float() for i in need}
    u_count, kk = top.shape
    out_vals, out_maps = {}, {}
    for name, idx in (("top", top), ("bottom", bottom)):
        if kk == 0:
            out_vals[name] = np.zeros((u_count, 0), np.float32)
            out_maps[name] = None
            continue
        flat = idx.ravel()
        stack = torch.stack([images[int(i)] for i in flat])
        w = weights.repeat_interleave(kk, dim=0)
        maps, vals = example_maps(model, layer, objective, stack, w, normalize=normalize,
                                  position=position, device=device, batch_size=batch_size)
        out_vals[name] = vals.numpy().reshape(u_count, kk)
        out_maps[name] = (maps.numpy().reshape(u_count, kk, *maps.shape[-2:])
                          if maps is not None else None)
    return UnitExamples(top=top, bottom=bottom, top_values=out_vals["top"],
                        bottom_values=out_vals["bottom"], top_maps=out_maps["top"],
                        bottom_maps=out_maps["bottom"], images=images)
