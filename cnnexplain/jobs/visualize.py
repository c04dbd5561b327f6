"""``visualize``: feature visualization by optimization (Olah et al. 2017, "Feature
Visualization", Distill): for units of a layer (channels, a neuron, the whole layer as
DeepDream's objective, directions in channel space) or class logits, the images that maximize
or minimize them, beside the dataset images that do, with the unit's map over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cnnexplain.config.visualize import UnitSpec, VisualizeOptions
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.building_blocks import dissection_labels
from cnnexplain.jobs.resolve import Resolved, file_policy, resolve, resolve_classes

COMMAND = "visualize"
SIGNS = {"max": (1.0,), "min": (-1.0,), "both": (1.0, -1.0)}


@dataclass
class Unit:
    """One visualized unit: its name in outputs, its channel / class / direction index (None
    for a whole layer) and the weight vector ``[K]`` of its objective."""

    label: str
    index: int | None
    weights: torch.Tensor


@dataclass
class Plan:
    """Everything checked before anything is computed: the model and data (``resolved``), the
    layer read (``layer``) and its output shape at the image side, the objective, the units
    (``unit_spec`` for channels, ``classes`` for logits, ``vectors`` ``[D, K]`` for
    directions), the neuron ``position``, the signs, the optimization ``settings`` and the
    layer whose cached activations rank the dataset (``source_layer``)."""

    options: VisualizeOptions
    resolved: Resolved
    layer: str
    shape: tuple[int, ...]
    side: int
    objective: Any
    settings: Any
    source_layer: str
    signs: tuple[float, ...]
    unit_spec: UnitSpec | None = None
    classes: list[tuple[int, str]] = field(default_factory=list)
    vectors: np.ndarray | None = None
    position: tuple[int, int] | None = None

    @property
    def channels(self) -> int:
        return int(self.shape[0])


@dataclass
class Result:
    units: list[Unit]
    goals: list
    rendered: Any
    examples: Any
    top_mean: np.ndarray | None = None


def _data_side(data) -> int | None:
    if data is None or not len(data):
        return None
    img = data[0]["image"]
    return int(min(img.shape[-2], img.shape[-1]))


def probe(model, layer: str, side: int, device, extra: str | None = None) -> dict:
    """One forward pass of a grey ``side x side`` image: the layer's output shape ``[K]`` or
    ``[K, h, w]``, how often the layer runs, the logits' width and (``extra``) whether that
    layer's output is the model's output."""
    from cnnexplain.models.layers import get_module

    calls: list = []
    seen: dict = {}
    handles = [get_module(model, layer).register_forward_hook(
        lambda _m, _i, out: calls.append(tuple((out[0] if isinstance(out, (tuple, list))
                                                else out).shape[1:])))]
    if extra is not None:
        handles.append(get_module(model, extra).register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("extra", out)))
    p = next(model.parameters(), None)
    x = torch.full((1, 3, side, side), 0.5, device=device,
                   dtype=p.dtype if p is not None else torch.float32)
    try:
        with torch.no_grad():
            logits = model(x)
    except RuntimeError as exc:
        raise UsageError(f"the model does not run on {side}x{side} images "
                         f"({' '.join(str(exc).split())[:120]})",
                         "pass a larger `size` (or `resize`)") from None
    finally:
        for h in handles:
            h.remove()
    out = {"calls": len(calls), "shape": calls[0] if calls else None,
           "outputs": int(logits.shape[-1]) if isinstance(logits, torch.Tensor) else None}
    if extra is not None:
        out["extra_is_output"] = ("extra" in seen and isinstance(logits, torch.Tensor)
                                  and torch.equal(seen["extra"], logits))
    return out


def _direction_vectors(options: VisualizeOptions, k: int, layer: str, seed: int) -> np.ndarray:
    """``[D, K]`` unit rows: the ``direction_vector`` file's, else one random direction drawn
    with the run's seed."""
    from cnnexplain.explain.visualize.optimize import image_seed

    path = options.direction_vector
    if path is None:
        g = torch.Generator().manual_seed(image_seed(seed, f"direction|{layer}", "direction"))
        v = torch.randn(k, generator=g, dtype=torch.float64)
        return (v / v.norm()).numpy()[None]
    if not path.is_file():
        raise UsageError(f"`direction_vector` {path} does not exist",
                         "pass a .npy file of K floats (or D x K)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a .npy, or an object array (pickled)
        raise UsageError(f"`direction_vector` {path} is not a numeric .npy array "
                         f"({type(exc).__name__})", "save it with numpy.save(path, "
                         "array.astype('float32'))") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != k or not np.issubdtype(arr.dtype, np.number):
        raise UsageError(f"`direction_vector` has shape {list(arr.shape)}, but layer {layer!r} "
                         f"has {k} channels", f"pass K={k} floats, or D x {k}")
    arr = arr.astype(np.float64)
    norms = np.linalg.norm(arr, axis=1)
    if not np.isfinite(arr).all() or (norms == 0).any():
        raise UsageError("`direction_vector` has a zero, NaN or infinite row",
                         "pass finite, non-zero directions")
    return arr / norms[:, None]


def plan(options: VisualizeOptions, session: Session) -> Plan:
    """Load the model and the data, and check the layer, units, neuron, classes and
    directions against them (one-line UsageErrors; nothing is computed or written)."""
    from cnnexplain.explain.visualize.objectives import centre, get_objective
    from cnnexplain.explain.visualize.optimize import Settings
    from cnnexplain.models.layers import get_module

    o = options
    objective = get_objective(o.effective_objective())
    resolved = resolve(o.model, o.prep, o.data, device=session.device, seed=session.seed,
                       input_side=o.size, files=file_policy(o.files))
    loaded = resolved.loaded
    model, layer = loaded.model, resolved.layer
    data_side = _data_side(resolved.data)
    side = int(o.size or loaded.preprocessing.resize or data_side or 224)
    low = loaded.spec.min_size
    if side < low:
        raise UsageError(f"{loaded.backbone} needs images of at least {low} px, but "
                         f"`size` is {side}", f"pass `size={max(low, 32)}` or more")
    source = layer
    if objective.source == "logits":
        source = loaded.spec.classifier
        get_module(model, source)
    info = probe(model, layer, side, session.device,
                 extra=source if source != layer else None)
    if info["calls"] == 0:
        raise UsageError(f"layer {layer!r} does not run in the forward pass",
                         "choose a layer the model uses (see `cnnexplain layers`)")
    if info["calls"] > 1:
        raise UsageError(f"layer {layer!r} runs {info['calls']} times in one forward pass (a "
                         "shared module), so its output is ambiguous",
                         "choose a block or a conv, e.g. the backbone's default `layer`")
    shape = tuple(info["shape"])
    if len(shape) not in (1, 3):
        raise UsageError(f"layer {layer!r} has output shape {list(shape)}, neither K nor "
                         "K x h x w", "choose a convolutional or linear `layer`")
    k = int(shape[0])
    plan_ = Plan(options=o, resolved=resolved, layer=layer, shape=shape, side=side,
                 objective=objective, settings=None, source_layer=source,
                 signs=SIGNS[o.direction])
    if objective.units == "channel":
        spec = o.unit_spec()
        if spec.kind == "list":
            bad = [i for i in spec.indices if i >= k]
            if bad:
                raise UsageError(f"`units` {bad[0]} is out of range: layer {layer!r} has {k} "
                                 "channels", f"pass channels in 0..{k - 1}")
        elif spec.kind == "top" and spec.count > k:
            raise UsageError(f"`units=top:{spec.count}` asks for more channels than layer "
                             f"{layer!r} has ({k})", f"pass at most `units=top:{k}`")
        plan_.unit_spec = spec
    if objective.positional:
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        if h * w == 1:
            raise UsageError(f"layer {layer!r} has a 1x1 map at {side}x{side} inputs, so "
                             "`neuron` has a single position",
                             "use `objective=channel`, an earlier `layer` or a larger `size`")
        x, y = o.position() or centre(h, w)
        if not (0 <= x < w and 0 <= y < h):
            raise UsageError(f"`neuron={x},{y}` lies outside layer {layer!r}'s {w}x{h} map "
                             "(x: column, y: row)", f"pass x in 0..{w - 1} and y in 0..{h - 1}")
        if data_side is not None and data_side != side:
            other = probe(model, layer, data_side, session.device)["shape"]
            if tuple(other) != shape:
                raise UsageError(f"the layer's map is {w}x{h} at `size={side}` but "
                                 f"{other[-1]}x{other[-2]} on the dataset's {data_side}-px "
                                 "images, so `neuron` names different positions",
                                 f"leave out `size`, or pass `size={data_side}`")
        plan_.position = (x, y)
    if objective.source == "logits":
        if not info.get("extra_is_output", False):
            raise UsageError(f"the model's output is not that of its classifier layer "
                             f"{source!r}, so its logits cannot be ranked over the dataset",
                             "visualize units of a `layer` instead of `target`")
        plan_.classes = resolve_classes(o.targets(), resolved.class_names, loaded.num_classes)
    if objective.units == "direction":
        plan_.vectors = _direction_vectors(o, k, layer, session.seed)
    plan_.settings = Settings(steps=o.steps, lr=o.lr, side=side, param=o.param,
                              decorrelate=o.decorrelate, transforms=o.transforms,
                              diversity_weight=o.diversity_weight, tv=o.tv, l2=o.l2,
                              seed=session.seed, batch_size=o.data.batch_size)
    if resolved.data is None or not len(resolved.data):
        raise CnnexplainError("the dataset has no images", "check the dataset path and split")
    return plan_


def _units(p: Plan, acts) -> tuple[list[Unit], np.ndarray | None]:
    """The units to visualize (``top:K`` ranked on the dataset's mean activation)."""
    from cnnexplain.explain.visualize.examples import mean_activation
    from cnnexplain.explain.visualize.objectives import one_hot

    kind = p.objective.units
    k = p.channels
    if kind == "class":
        n = int(p.resolved.loaded.num_classes)
        return [Unit(name, i, one_hot(i, n)) for i, name in p.classes], None
    if kind == "none":
        return [Unit("all", None, torch.full((k,), 1.0 / k))], None
    if kind == "direction":
        return [Unit(f"direction:{d}", d, torch.from_numpy(v).float())
                for d, v in enumerate(p.vectors)], None
    spec = p.unit_spec
    means = None
    if spec.kind == "list":
        chosen = list(spec.indices)
    elif spec.kind == "all":
        chosen = list(range(k))
    else:
        means = mean_activation(acts, p.source_layer)
        chosen = [int(i) for i in np.argsort(-means, kind="stable")[:spec.count]]
    return [Unit(str(c), c, one_hot(c, k)) for c in chosen], means


def goals_for(p: Plan, units: list[Unit]) -> list:
    """One :class:`~cnnexplain.explain.visualize.optimize.Goal` per unit, sign and diversity
    replica, in that order; a goal's key names the objective, layer, unit, sign and replica."""
    from cnnexplain.explain.visualize.optimize import Goal

    out = []
    group = 0
    where = "logits" if p.objective.source == "logits" else p.layer
    for u in units:
        for sign in p.signs:
            for r in range(p.options.diversity):
                key = f"{p.objective.name}|{where}|{u.label}|{p.position}|{sign:+.0f}|{r}"
                out.append(Goal(p.objective.name, u.weights, sign=sign, position=p.position,
                                group=group, replica=r, key=key, unit=u.label, index=u.index))
            group += 1
    return out


def run(plan: Plan, session: Session) -> Result:
    """Dataset activations (cached) -> units -> optimized images -> examples."""
    from cnnexplain.activations import compute_activations
    from cnnexplain.explain.visualize.examples import dataset_values, pool_for, unit_examples
    from cnnexplain.explain.visualize.optimize import optimize

    p, o = plan, plan.options
    loaded = p.resolved.loaded
    acts = compute_activations(loaded.model, [p.source_layer], p.resolved.data,
                               model_fingerprint=loaded.fingerprint,
                               preprocessing=loaded.preprocessing, device=session.device,
                               batch_size=o.data.batch_size, pool=pool_for(p.objective),
                               cache=session.cache, progress=session.progress,
                               workers=o.data.workers)
    units, means = _units(p, acts)
    goals = goals_for(p, units)
    uses_layer = p.objective.source == "layer" or (o.diversity > 1 and o.diversity_weight > 0)
    rendered = optimize(loaded.model, p.layer if uses_layer else None, goals, p.settings,
                        normalize=loaded.preprocessing.normalize, device=session.device,
                        progress=session.progress)
    weights = torch.stack([u.weights for u in units])
    values = dataset_values(acts, p.source_layer, p.objective, weights, p.position)
    ex = unit_examples(loaded.model, p.layer, p.objective, p.resolved.data, values, weights,
                       max(1, o.examples), normalize=loaded.preprocessing.normalize,
                       position=p.position, device=session.device,
                       batch_size=o.data.batch_size)
    stalled = int(rendered.stalled.sum())
    if stalled:
        session.notice(f"{stalled} of {len(goals)} images got no gradient at the first step, "
                       "even restarted from louder noise (their unit is zero around such "
                       "images, as after a ReLU), so they stay grey; a pre-ReLU `layer` (e.g. "
                       "the BatchNorm before it) avoids this")
    if -1.0 in p.signs and p.objective.source == "layer" and (values >= 0).all():
        session.notice("the units are never negative on the dataset (an output after a ReLU?), "
                       "so a min visualization only shows what turns them off; a pre-ReLU "
                       "`layer` shows what drives them negative")
    return Result(units=units, goals=goals, rendered=rendered, examples=ex, top_mean=means)


COLUMNS = ("layer", "unit", "index", "direction", "objective", "replica", "x", "y",
           "objective_value", "top_example_objective", "image", "top_examples",
           "bottom_examples", "dissect_label", "dissect_category", "dissect_iou", "stalled",
           "seed", "steps", "size")
"""index.csv's columns (one row per optimized image). ``dissect_*``: the unit's Network
Dissection label (Bau et al. 2017) when a ``dissect`` run of the same model at the same layer
wrote its tally into the same run directory (empty otherwise)."""



def write(plan: Plan, result: Result, session: Session) -> Output:
    """visualize/images/*.png, examples/*.png, index.csv, grid.png and index.html
    (atomically, each)."""
    import pandas as pd

    from cnnexplain.explain.visualize import outputs as out
    from cnnexplain.io import write_bytes, write_csv, write_text

    p, o, layout = plan, plan.options, session.layout
    ex, r = result.examples, result.rendered
    root = layout.visualize
    k_show = min(o.examples, ex.top.shape[1])
    where = "logits" if p.objective.source == "logits" else p.layer
    rows, views, paths = [], [], []
    labels = (dissection_labels(layout, p.layer, p.resolved.loaded.fingerprint)
              if p.objective.units == "channel" else {})
    by_unit: dict[str, list[int]] = {}
    for i, g in enumerate(result.goals):
        by_unit.setdefault(g.unit, []).append(i)
    for u_i, unit in enumerate(result.units):
        name = out.slug(unit.label)
        title = (f"class {unit.label}" if p.objective.units == "class" else
                 f"{where} · {p.objective.name} {unit.label}")
        label = labels.get(unit.index) if unit.index is not None else None
        short = unit.label if p.objective.units == "class" else f"{p.objective.name} {unit.label}"
        if label is not None:
            title += f" · dissection: {label[0]} ({label[1]}, IoU {label[2]:.3f})"
            short += f"\n{label[0]} {label[2]:.2f}"
        view = out.UnitView(title=title, short=short, top_best=ex.best(u_i, 1.0),
                            bottom_best=ex.best(u_i, -1.0))
        strips = {}
        if k_show > 0:
            maps = [m for m in (ex.top_maps, ex.bottom_maps) if m is not None]
            lo = float(min(m[u_i, :k_show].min() for m in maps)) if maps else 0.0
            hi = float(max(m[u_i, :k_show].max() for m in maps)) if maps else 1.0
            for which, idx, m in (("top", ex.top, ex.top_maps), ("bottom", ex.bottom,
                                                                 ex.bottom_maps)):
                imgs = torch.stack([ex.images[int(j)] for j in idx[u_i, :k_show]])
                mm = torch.from_numpy(m[u_i, :k_show]) if m is not None else None
                arr = out.strip(out.overlay(imgs, mm, lo, hi))
                path = layout.visualize_examples / f"{u_i:03d}-{name}-{which}.png"
                data = out.png(arr)
                write_bytes(path, data)
                paths.append(path)
                strips[which] = path
                setattr(view, f"{which}_strip", data)
                if which == "top":
                    view.top_array = arr
        for i in by_unit[unit.label]:
            g = result.goals[i]
            png = out.png(out.to_uint8(r.images[i]))
            path = layout.visualize_images / f"{i:04d}-{name}-{g.direction}-{g.replica}.png"
            write_bytes(path, png)
            paths.append(path)
            view.images.append({"direction": g.direction, "replica": g.replica,
                                "objective_value": float(r.values[i]), "png": png})
            x, y = g.position if g.position is not None else (None, None)
            rows.append({"layer": where, "unit": unit.label, "index": unit.index,
                         "direction": g.direction, "objective": p.objective.name,
                         "replica": g.replica, "x": x, "y": y,
                         "objective_value": float(r.values[i]),
                         "top_example_objective": ex.best(u_i, g.sign),
                         "image": str(path.relative_to(root)),
                         "top_examples": str(strips["top"].relative_to(root))
                         if "top" in strips else "",
                         "bottom_examples": str(strips["bottom"].relative_to(root))
                         if "bottom" in strips else "",
                         "dissect_label": label[0] if label else "",
                         "dissect_category": label[1] if label else "",
                         "dissect_iou": label[2] if label else None,
                         "stalled": bool(r.stalled[i]), "seed": session.seed,
                         "steps": p.settings.steps, "size": p.side})
        views.append(view)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    write_csv(layout.visualize_index, frame)
    write_bytes(layout.visualize_grid, out.grid_png(views))
    loaded = p.resolved.loaded
    subtitle = (f"{loaded.backbone} ({loaded.source}), {p.objective.name} objective at {where}, "
                f"{p.settings.steps} Adam steps at lr {p.settings.lr:g}, {p.side} px, "
                f"{p.settings.param} parameterization, transforms {p.settings.transforms}, "
                f"seed {session.seed}; examples from {p.resolved.spec}")
    notes = ["Optimized images: Olah, Mordvintsev and Schubert 2017, Feature Visualization "
             "(Distill). The value under each image is its objective without transforms; "
             "'best' is the same objective on the unit's best dataset example."]
    write_text(layout.visualize_html, out.render_html("Feature visualization", subtitle,
                                                      views, notes))
    paths = [layout.visualize_index, layout.visualize_html, layout.visualize_grid, *paths]
    maxed = frame[frame["direction"] == "max"]
    reached = (float((maxed["objective_value"] >= maxed["top_example_objective"]).mean())
               if len(maxed) else None)
    summary = {"layer": where, "objective": p.objective.name,
               "units": [u.label for u in result.units], "images": len(result.goals),
               "steps": p.settings.steps, "size": p.side, "seconds": round(r.seconds, 3),
               "reached_best_example": reached, "stalled": int(r.stalled.sum()),
               "outputs": [str(x) for x in paths[:3]]}
    return Output(summary=summary, paths=paths, model=loaded, data=p.resolved.data,
                  result=result)
