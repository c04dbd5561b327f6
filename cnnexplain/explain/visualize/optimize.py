"""The optimization loop of feature visualization (Olah et al. 2017, "Feature Visualization",
Distill): many units at once, seeded, in batches.

A batch holds ``units x directions x diversity`` images (:class:`Goal`: what one image is
optimized for). Every image has its own parameters (:mod:`.param`), its own random transforms
(:mod:`.transforms`) and its own terms of the loss, so the images of a batch do not interact
except within a diversity group (the images of one unit and direction): batching many units
gives the images one gets one unit at a time, and the same seed gives the same images (on
CPU; on CUDA the backward passes of ``grid_sample`` and bilinear resizing are not
deterministic). The loss of a batch is the sum over images of ``-sign * objective + tv * TV +
l2 * L2`` plus, per group of n images, ``n * diversity_weight * S`` (lucid's
``objective - w * diversity`` per group, with the objective averaged over the group; S in
:func:`.objectives.diversity`), minimized with Adam.

The model runs in eval mode with its weights frozen (``requires_grad_(False)``, restored
afterwards); when only the layer is needed the forward pass stops at the layer. The value
returned per image is its objective evaluated on the final image without transforms.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from cnnexplain.explain.visualize.objectives import Objective, diversity, get_objective, \
    l2_penalty, total_variation
from cnnexplain.explain.visualize.param import PARAMETERIZATIONS
from cnnexplain.explain.visualize.transforms import TRANSFORMS
from cnnexplain.models.layers import get_module
from cnnexplain.progress import silent


@dataclass(eq=False)
class Goal:
    """What one image is optimized for: ``objective`` (a registry name), the weight vector
    ``weights`` ``[K]`` of its linear functional (one-hot channel or class, a unit direction,
    ``1/K`` for a layer), ``sign`` (+1 max, -1 min), ``position`` ``(x, y)`` for ``neuron``,
    ``group`` (images of one group share the diversity term), ``replica`` (index in the group)
    and ``key``: a stable name of the image (its seed is derived from it and the run's seed,
    never from its place in a batch). ``unit``: the unit's name in outputs."""

    objective: str
    weights: torch.Tensor
    sign: float = 1.0
    position: tuple[int, int] | None = None
    group: int = 0
    replica: int = 0
    key: str = ""
    unit: str = ""
    index: int | None = None

    @property
    def direction(self) -> str:
        return "max" if self.sign > 0 else "min"


@dataclass(frozen=True)
class Settings:
    """How images are optimized (see the module docstring); ``side``: image side in pixels;
    ``param``: :data:`.param.PARAMETERIZATIONS` name; ``transforms``: :data:`.transforms.
    TRANSFORMS` name; ``batch_size``: images per batch (whole diversity groups)."""

    steps: int = 256
    lr: float = 0.05
    side: int = 32
    param: str = "fourier"
    decorrelate: bool = True
    transforms: str = "standard"
    diversity_weight: float = 1e2
    tv: float = 0.0
    l2: float = 0.0
    seed: int = 0
    batch_size: int = 32


@dataclass
class Rendered:
    """The optimized images ``[N, 3, H, W]`` in [0, 1] (CPU, float32, in goal order), their
    objective values ``[N]`` (without transforms), ``stalled`` ``[N]`` (no gradient at the
    first step: a unit that is zero around grey images, after a ReLU) and the wall time."""

    images: torch.Tensor
    values: torch.Tensor
    stalled: torch.Tensor
    seconds: float
    batches: int = 1
    history: list = field(default_factory=list)


def image_seed(seed: int, key: str, purpose: str) -> int:
    """A 63-bit seed for one image's ``purpose`` (``init``, ``transforms``) from the run's seed
    and the image's key (stable across processes and batch layouts)."""
    h = hashlib.blake2b(f"{int(seed)}|{purpose}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generators(seed: int, keys: Sequence[str], purpose: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, k, purpose)) for k in keys]


class _Reached(Exception):
    """Raised by the capture hook to stop a forward pass at the layer."""


@contextlib.contextmanager
def capture(model: nn.Module, layer: str | None, stop: bool) -> Iterator[dict]:
    """While the block runs, ``store["acts"]`` is ``layer``'s output of the last forward pass
    (cloned, so a following in-place ReLU cannot change it, and still differentiable); with
    ``stop`` the forward pass ends there (:func:`run_model` returns no logits)."""
    store: dict = {}
    if layer is None:
        yield store
        return

    def hook(_m, _inp, out):
        store["acts"] = (out[0] if isinstance(out, (tuple, list)) else out).clone()
        if stop:
            raise _Reached

    handle = get_module(model, layer).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_model(model: nn.Module, x: torch.Tensor, store: dict) -> tuple[torch.Tensor | None,
                                                                      torch.Tensor | None]:
    """``(layer activations, logits)`` of normalized inputs ``x`` ``[B, 3, H, W]`` under a
    :func:`capture` block (logits None when the pass stopped at the layer)."""
    store.pop("acts", None)
    try:
        logits = model(x)
    except _Reached:
        logits = None
    return store.get("acts"), logits


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with ``requires_grad`` off on every parameter (both restored)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def batches(goals: Sequence[Goal], batch_size: int) -> list[list[int]]:
    """Goal indices in batches of whole diversity groups, about ``batch_size`` images each (a
    group larger than ``batch_size`` is one batch)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(goals):
        groups.setdefault(g.group, []).append(i)
    out: list[list[int]] = []
    current: list[int] = []
    for members in groups.values():
        if current and len(current) + len(members) > batch_size:
            out.append(current)
            current = []
        current = current + members
    if current:
        out.append(current)
    return out


def evaluate(objective: Objective, acts, logits, weights: torch.Tensor,
             position: tuple[int, int] | None) -> torch.Tensor:
    """``[B]`` objective values of a batch from its activations or logits."""
    source = logits if objective.source == "logits" else acts
    return objective.value(objective.feature(source, position), weights)


def optimize(model: nn.Module, layer: str | None, goals: Sequence[Goal], settings: Settings, *,
             normalize: Callable[[torch.Tensor], torch.Tensor], device="cpu",
             progress=None) -> Rendered:
    """Optimize one image per goal (module docstring). ``model`` lives on ``device``; ``layer``
    is read for layer objectives and for diversity (None: logits alone); ``normalize`` maps
    [0, 1] images ``[B, 3, H, W]`` to model inputs (the model's preprocessing). All goals share
    one objective and one position. Returns :class:`Rendered`."""
    goals = list(goals)
    if not goals:
        raise ValueError("no goals to optimize")
    objective = get_objective(goals[0].objective)
    if any(g.objective != objective.name for g in goals):
        raise ValueError("all goals of one optimize() call share one objective")
    position = goals[0].position
    plan = batches(goals, settings.batch_size)
    images = [None] * len(goals)
    values = torch.zeros(len(goals))
    stalled = torch.zeros(len(goals), dtype=torch.bool)
    start = time.perf_counter()
    progress = progress or silent()
    uses_div = settings.diversity_weight > 0 and any(g.replica > 0 for g in goals)
    needs_logits = objective.source == "logits"
    read_layer = layer if (objective.source == "layer" or uses_div) else None
    with frozen(model), progress(total=settings.steps * len(plan),
                                 description=f"visualize {len(goals)} images") as bar:
        for members in plan:
            sub = [goals[i] for i in members]
            imgs, vals, stuck = _optimize_batch(model, read_layer, sub, objective, position,
                                                settings, normalize, device, uses_div,
                                                needs_logits, bar)
            for j, i in enumerate(members):
                images[i] = imgs[j]
                values[i] = vals[j]
                stalled[i] = stuck[j]
    return Rendered(images=torch.stack(images), values=values, stalled=stalled,
                    seconds=time.perf_counter() - start, batches=len(plan))


RESTART_SD = (0.1, 0.5, 1.0)
"""Initial standard deviations of the restarts of an image whose objective has no gradient at
the first step (lucid's sd 0.01 gives a near-grey image, on which a unit after a ReLU can be
zero everywhere): each restart draws from the image's own generator, so batching stays
invisible; an image still without gradient after the last is reported ``stalled``."""


def _no_gradient(grad: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[n]`` bool: images whose parameters got an all-zero (or no) gradient."""
    if grad is None:
        return torch.ones(n, dtype=torch.bool)
    return (grad.flatten(1).abs().sum(1) == 0).cpu()


def _optimize_batch(model, layer, goals, objective, position, s: Settings, normalize, device,
                    uses_div, needs_logits, bar):
    keys = [g.key for g in goals]
    param = PARAMETERIZATIONS[s.param](generators(s.seed, keys, "init"), s.side, s.side,
                                       decorrelate=s.decorrelate, device=device)
    transform = TRANSFORMS[s.transforms](s.side)
    draws = transform.draw(generators(s.seed, keys, "transforms"), s.steps).to(device)
    weights = torch.stack([g.weights for g in goals]).to(device)
    signs = torch.tensor([float(g.sign) for g in goals], device=device)
    groups: dict[int, list[int]] = {}
    for j, g in enumerate(goals):
        groups.setdefault(g.group, []).append(j)
    div_groups = [idx for idx in groups.values() if len(idx) > 1] if uses_div else []
    opt = torch.optim.Adam(param.params, lr=s.lr)
    with capture(model, layer, stop=not needs_logits) as store:

        def backward() -> None:
            opt.zero_grad(set_to_none=True)
            img = param()
            acts, logits = run_model(model, normalize(transform(img, draws[:, step])), store)
            loss = -(signs * evaluate(objective, acts, logits, weights, position)).sum()
            for idx in div_groups:
                loss = loss + s.diversity_weight * len(idx) * diversity(acts[idx])
            if s.tv:
                loss = loss + s.tv * total_variation(img).sum()
            if s.l2:
                loss = loss + s.l2 * l2_penalty(img).sum()
            loss.backward()

        for step in range(s.steps):
            backward()
            if step == 0:  # a unit that is zero around grey images (after a ReLU) gets no
                for attempt, sd in enumerate(RESTART_SD):  # gradient: start it from louder noise
                    stuck = _no_gradient(param.tensor.grad, len(goals))
                    if not stuck.any():
                        break
                    rows = stuck.nonzero().flatten().tolist()
                    param.redraw(rows, generators(s.seed, [keys[r] for r in rows],
                                                  f"restart{attempt}"), sd)
                    backward()
                stuck = _no_gradient(param.tensor.grad, len(goals))
            opt.step()
            bar.advance(1)
        with torch.no_grad():
            img = param()
            acts, logits = run_model(model, normalize(img), store)
            vals = evaluate(objective, acts, logits, weights, position)
    return img.detach().float().cpu(), vals.detach().float().cpu(), stuck
