"""The TCAV run (Kim et al. 2018): :func:`run_tcav` trains the CAVs of every concept and of the
random baseline at each layer (:mod:`.cav`), scores them for every target class (:mod:`.scores`)
and tests the scores (:mod:`.stats`), whose module docstrings give the definitions.

Caching (:mod:`cnnexplain.cache`; the references key by concept name and layer only and serve
stale results, tcav.md): activations per (model weights, layer, image-set content, preprocessing)
through :func:`cnnexplain.activations.compute_activations`; CAVs (kind ``cav``) by the two
activation keys, the hyper-parameters, the subsample share and the CAV seed; class-logit
gradients (kind ``features``) by the class inputs' activation key, the class and the label
filter; the scores and CAV info of every CAV for one (layer, class) (kind ``tcav``) by the
gradient key, the CAV keys and the step. A changed image, weight or option changes the key, so
nothing stale is ever served. Keys are computed from fingerprints before anything is read, so a
warm run opens one score entry per (layer, class) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from cnnexplain.activations import KIND as ACTIVATIONS
from cnnexplain.activations import activation_parts, compute_activations
from cnnexplain.cache.store import Cache
from cnnexplain.config.tcav import TCAVConfig
from cnnexplain.data.base import ImageDataset, make_loader
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain.tcav.cav import (
    CAV,
    CAV_FIELDS,
    CAV_TYPES,
    SOLVER_VERSION,
    train_cav,
)
from cnnexplain.explain.tcav.scores import (
    class_log_probs,
    directional_derivatives,
    interventional_scores,
    logit_gradients,
    magnitude,
    sign_count,
)
from cnnexplain.explain.tcav.stats import summarize
from cnnexplain.fingerprint import digest_parts
from cnnexplain.models.layers import Split, get_module, split_at
from cnnexplain.progress import silent

ProgressLike = Callable[..., ContextManager]


@dataclass
class TCAVResult:
    """``table``: one row per (concept, class, layer) (columns in :data:`TABLE_COLUMNS`);
    ``runs``: one row per (CAV, class) with its scores (``role`` "concept" or "baseline";
    columns in :data:`RUN_COLUMNS`); ``cavs``: info of every CAV; ``stats``: cache hits and
    misses; ``n_tests``: rows tested (the Bonferroni factor)."""

    table: pd.DataFrame
    runs: pd.DataFrame
    cavs: list[dict]
    stats: dict
    n_tests: int


RUN_COLUMNS = ["concept", "negative", "role", "run", "class", "class_index", "layer",
               "sign_count", "n_positive", "magnitude", "i_plus", "i_minus",
               "sensitivity_mean", "cav_accuracy", "cav_n_train", "cav_pool", "cav_test_tp",
               "cav_test_fn", "cav_test_tn", "cav_test_fp", "cav_key", "n_class_inputs",
               "n_nonzero_gradients", "n_intervention_inputs", "gradient_spread"]


def cav_seed(seed: int, positive_key: str, negative_key: str) -> int:
    """The seed of one CAV's held-out split: from the run seed and the two sets' activation keys
    (content, not names or order)."""
    return int(digest_parts("cav-seed", int(seed), positive_key, negative_key)[:15], 16)


def _class_inputs(split: Split, model: nn.Module, layer: str, inputs: ImageDataset, act_set,
                  rows: np.ndarray, preprocessing: Preprocessing, device, batch_size: int,
                  workers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(a [n, *layer_shape], extras) of the class inputs on ``device``: from the cached
    activations when the tail needs nothing else, else by running the body on the images."""
    if split.n_extras == 0:
        a = torch.from_numpy(act_set.array(layer, rows)).to(device)
        return a, []
    outs: list[list[torch.Tensor]] = []
    loader = make_loader(Subset(inputs, rows.tolist()), batch_size=batch_size, workers=workers)
    with torch.no_grad():
        for batch in loader:
            res = split.body(preprocessing.normalize(batch["image"].to(device).float()))
            outs.append([r.detach() for r in res])
    cols = list(zip(*outs))
    return torch.cat(cols[0]), [torch.cat(c) for c in cols[1:]]


def check_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, Split]:
    """Validate ``layers`` before anything is computed or written: each exists and can be cut
    with :func:`~cnnexplain.models.layers.split_at` (traced, run once per forward pass).
    Returns layer -> Split (eval mode).

    A layer followed by an in-place operation (BatchNorm then ``ReLU(inplace=True)``, ResNet's
    ``out += identity``) is fine: recorded activations are copies
    (:func:`cnnexplain.models.layers.record`), the body returns the layer's output before the
    tail runs, and every call of a tail (gradients, I+ / I-) gets a copy of the activations
    and skip inputs, so an in-place first operation of the tail changes neither the stored
    activations nor an autograd leaf."""
    was_training = model.training
    model.eval()
    splits = {}
    try:
        for layer in dict.fromkeys(layers):
            get_module(model, layer)
            splits[layer] = split_at(model, layer).eval()
    finally:
        model.train(was_training)
    return splits


def run_tcav(model: nn.Module, layers: Sequence[str], concepts: Mapping[str, ImageDataset],
             randoms: Sequence[tuple[str, ImageDataset]], inputs: ImageDataset,
             targets: Sequence[tuple[int, str]], *, model_fingerprint: str,
             preprocessing: Preprocessing, config: TCAVConfig = TCAVConfig(),
             filter_by_label: bool = True, device: torch.device | str = "cpu",
             cache: Cache | None = None, progress: ProgressLike | None = None,
             batch_size: int = 64, workers: int = 0) -> TCAVResult:
    """TCAV for every (concept, target class, layer) (module docstring).

    ``model`` on ``device`` (eval mode); ``concepts``: name -> image set; ``randoms``: [(name,
    image set)], at least N + 1 = ``config.random_runs`` + 1 of them (extra ones are
    ignored): run k (1..N) trains each concept against ``randoms[k]`` and the baseline
    pseudo-concept ``randoms[k-1]`` against ``randoms[k]``; ``inputs``: the images whose
    sensitivities are counted -- with ``filter_by_label`` the class-c inputs are the images
    labelled c (labels as the dataset yields them), else every image serves every target; I+ /
    I- average over every image of ``inputs`` (``config.intervention_inputs="all"``: the test
    set D of their definition) or over the class-c inputs only (``"class"``);
    ``targets``: [(class index, name)]. Everything is cached in ``cache`` (None: a disabled
    cache). Every key is computed from content fingerprints first and entries are read only
    when needed: a warm run reads one score entry per (layer, class) and nothing else."""
    config.validate()
    device = torch.device(device)
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise UsageError("no layer given", "pass `layer` NAME[,NAME...]")
    if not concepts:
        raise UsageError("no concept given", "pass `concept` NAME[,NAME...]")
    if not targets:
        raise UsageError("no target class given", "pass `target` CLASS (name or index)")
    n_runs = int(config.random_runs)
    if len(randoms) < n_runs + 1:
        raise UsageError(f"{len(randoms)} random sets given, `random_runs` {n_runs} needs "
                         f"{n_runs + 1} (the baseline pairs random_0 with random_1, random_1 "
                         "with random_2, ...)",
                         f"pass `random_runs` {max(len(randoms) - 1, 2)} or add random sets")
    clash = [c for c in concepts if c in {r for r, _ in randoms}]
    if clash:
        raise UsageError(f"concept {clash[0]!r} is also a random set", "rename the concept")
    if len(inputs) == 0:
        raise CnnexplainError("the class-input dataset has no images", "check `dataset`/`split`")
    splits = check_layers(model, layers)
    was_training = model.training
    cache = cache if cache is not None else Cache(enabled=False)
    progress = progress or silent()
    used = list(randoms[:n_runs + 1])
    names = [r for r, _ in used]
    # run k: every concept against random_k; the baseline's pseudo-concept random_{k-1}
    order = [(c, names[k]) for c in concepts for k in range(1, n_runs + 1)]
    baseline = [(names[k - 1], names[k]) for k in range(1, n_runs + 1)]
    order += baseline
    run_of = {pair: names.index(pair[1]) for pair in order}
    # held-out negatives of a CAV beyond its own: the random sets it was not trained on
    extras = {pair: [r for r in names if r not in pair] for pair in order}
    roles = {pair: "baseline" if pair in baseline else "concept" for pair in order}
    stats = {"cav_trained": 0, "cav_cached": 0, "scores_computed": 0, "scores_cached": 0,
             "gradients_computed": 0, "gradients_cached": 0, "activations_read": 0}
    run_rows: list[dict] = []
    cav_infos: dict[str, dict] = {}
    trained_keys: set[str] = set()
    model.eval()
    try:
        for layer in layers:
            ctx = _LayerContext(model, layer, splits[layer], {**concepts, **dict(used)}, inputs,
                                model_fingerprint, preprocessing, device, batch_size, workers,
                                cache, progress, stats)
            cav_parts = {pair: _cav_parts(ctx.key(pair[0]), ctx.key(pair[1]), layer, config,
                                          [ctx.key(r) for r in extras[pair]])
                         for pair in order}
            cav_keys = {pair: cache.key("cav", **parts) for pair, parts in cav_parts.items()}
            cavs: dict[tuple[str, str], CAV] = {}

            def get_cavs() -> dict[tuple[str, str], CAV]:
                """Every CAV of the layer, loaded or trained (only when some scores miss)."""
                if not cavs:
                    ctx.check_shapes()
                    try:
                        with progress(total=len(order), description=f"CAVs at {layer}") as bar:
                            for pair in order:
                                cav = _cav(cache, cav_parts[pair], ctx, pair, extras[pair],
                                           layer, config, device, trained_keys)
                                cav.concept, cav.negative, cav.layer = pair[0], pair[1], layer
                                cavs[pair] = cav
                                cav_infos.setdefault(cav.key, cav.info())
                                bar.advance(1)
                                bar.update(acc=cav.accuracy)
                    finally:
                        ctx.release_arrays()
                return cavs

            for class_index, class_name in targets:
                scores, infos, n_inputs, n_nonzero, n_intervention, spread = _scores(
                    ctx, int(class_index), class_name, filter_by_label,
                    [cav_keys[p] for p in order], get_cavs, config)
                for pair, sc, info in zip(order, scores, infos):
                    key = cav_keys[pair]
                    cav_infos.setdefault(key, {"concept": pair[0], "negative": pair[1],
                                               "layer": layer, **info, "key": key})
                    run_rows.append({
                        "concept": pair[0], "negative": pair[1], "role": roles[pair],
                        "run": run_of[pair], "class": class_name,
                        "class_index": int(class_index), "layer": layer, **sc,
                        "cav_accuracy": info["accuracy"],
                        **{f"cav_{f}": info[f] for f in ("n_train", "pool", "test_tp",
                                                         "test_fn", "test_tn", "test_fp")},
                        "cav_key": key, "n_class_inputs": n_inputs,
                        "n_nonzero_gradients": n_nonzero,
                        "n_intervention_inputs": n_intervention,
                        "gradient_spread": spread})
    finally:
        model.train(was_training)
    stats["cav_cached"] = len(cav_infos) - len(trained_keys)
    stats["cav_trained"] = len(trained_keys)
    runs = pd.DataFrame(run_rows)
    table = summarize(runs, list(concepts), targets, layers, config)
    return TCAVResult(table=table, runs=runs[RUN_COLUMNS], cavs=list(cav_infos.values()),
                      stats=stats, n_tests=len(table))


class _LayerContext:
    """What one layer's computations share: the image sets, their activation keys (computed
    from fingerprints, no I/O) and the activations themselves (read or computed on demand)."""

    def __init__(self, model, layer, split, datasets: dict, inputs, model_fingerprint,
                 preprocessing, device, batch_size, workers, cache, progress, stats):
        self.model, self.layer, self.split = model, layer, split
        self.datasets = {**datasets, INPUTS: inputs}
        self.model_fingerprint = model_fingerprint
        self.preprocessing, self.device = preprocessing, device
        self.batch_size, self.workers = batch_size, workers
        self.cache, self.progress, self.stats = cache, progress, stats
        self._keys: dict[str, str] = {}
        self._sets: dict[str, object] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes_checked = False

    def key(self, name: str) -> str:
        """The activation cache key of set ``name`` (as compute_activations derives it)."""
        if name not in self._keys:
            parts = activation_parts([self.layer], self.datasets[name],
                                     model_fingerprint=self.model_fingerprint,
                                     preprocessing=self.preprocessing, pool=None, float16=False)
            self._keys[name] = self.cache.key(ACTIVATIONS, **parts)
        return self._keys[name]

    def acts(self, name: str):
        """The ActivationSet of set ``name`` at the layer (cached, else computed)."""
        if name not in self._sets:
            self._sets[name] = compute_activations(
                self.model, [self.layer], self.datasets[name],
                model_fingerprint=self.model_fingerprint, preprocessing=self.preprocessing,
                device=self.device, batch_size=self.batch_size, cache=self.cache,
                progress=self.progress, workers=self.workers)
            self.stats["activations_read"] += 1
        return self._sets[name]

    def array(self, name: str) -> np.ndarray:
        """Set ``name``'s activations at the layer, float32 [n, *layer_shape], kept in memory
        until :meth:`release_arrays` (each random set is read by every CAV's held-out
        table)."""
        if name not in self._arrays:
            self._arrays[name] = self.acts(name).array(self.layer)
        return self._arrays[name]

    def release_arrays(self) -> None:
        self._arrays.clear()

    def check_shapes(self) -> None:
        """Every image set must give activations of one shape at the layer (else the CAVs and
        the class inputs live in different spaces)."""
        if self._shapes_checked:
            return
        want = tuple(self.acts(INPUTS).shape(self.layer)[1:])
        for name in self.datasets:
            got = tuple(self.acts(name).shape(self.layer)[1:])
            if got != want:
                raise CnnexplainError(
                    f"the images of {name!r} give activations of shape {list(got)} at layer "
                    f"{self.layer!r}, the class inputs {list(want)}: the image sizes differ",
                    "pass `resize` N to bring every image to N x N")
        self._shapes_checked = True


INPUTS = "\x00class-inputs"  # the class inputs' name in a _LayerContext (no folder has it)


def _cav_parts(positive_key: str, negative_key: str, layer: str, config: TCAVConfig,
               extra_keys: Sequence[str]) -> dict:
    """Cache key parts of one CAV: the two activation keys (content of images, model and
    preprocessing), the layer, the hyper-parameters, the subsample share, the derived seed,
    the solver, and the activation keys of the further random sets its held-out table
    counts."""
    return {"positive": positive_key, "negative": negative_key, "layer": layer,
            "config": config.cav.to_dict(), "subsample": float(config.concept_subsample),
            "seed": cav_seed(config.seed, positive_key, negative_key),
            "truncate": "equal-first", "held_out": "all-unused", "solver": SOLVER_VERSION,
            "extra_negatives": list(extra_keys)}


def _cav(cache: Cache, parts: dict, ctx: _LayerContext, pair: tuple[str, str],
         extras: Sequence[str], layer: str, config: TCAVConfig, device,
         trained_keys: set) -> CAV:
    """The CAV of a (positive, negative) pair, its held-out table also counting the random
    sets ``extras``: from the cache (kind ``cav``) or trained and stored."""
    trained: list[CAV] = []

    def compute():
        pos_set = ctx.acts(pair[0])
        cav = train_cav(ctx.array(pair[0]), ctx.array(pair[1]), config.cav, parts["seed"],
                        device, subsample=config.concept_subsample,
                        extra_negatives=[ctx.array(r) for r in extras])
        trained.append(cav)
        attrs = {k: v for k, v in cav.info().items() if k not in ("key", "concept", "negative",
                                                                   "layer")}
        attrs.update(description="concept activation vector (cnnexplain.explain.tcav): unit "
                                 "normal of a linear concept-vs-random classifier on flattened "
                                 "activations, pointing toward the concept",
                     layer=layer, layer_shape=list(pos_set.shape(layer)[1:]))
        return ({"cav": cav.vector}, attrs,
                {"cav": {"description": "unit CAV toward the concept", "shape": "D (K*h*w)",
                         "units": "direction in activation space"}})

    entry, _ = cache.get_or_compute("cav", parts, compute)
    if trained:
        cav = trained[0]
        trained_keys.add(entry.key)
    else:
        a = entry.attrs
        cav = CAV(vector=np.asarray(entry["cav"], dtype=np.float32),
                  **{f: CAV_TYPES[f](a[f]) for f in CAV_FIELDS})
    cav.key = entry.key
    return cav


SCORE_FIELDS = ("sign_count", "n_positive", "magnitude", "i_plus", "i_minus",
                "sensitivity_mean")


def _scores(ctx: _LayerContext, class_index: int, class_name: str, filter_by_label: bool,
            cav_keys: list[str], get_cavs: Callable[[], dict], config: TCAVConfig
            ) -> tuple[list[dict], list[dict], int, int, int]:
    """Scores of every CAV for one (layer, class), and the CAVs' info: from the cache (kind
    ``tcav``), or computed from the (cached) class-logit gradients and tail evaluations.
    Returns (scores per CAV, CAV info per CAV, number of class inputs, number of them whose
    gradient is not zero, number of inputs I+ / I- average over)."""
    cache, layer, split, stats = ctx.cache, ctx.layer, ctx.split, ctx.stats
    select = {"class": int(class_index), "filter_by_label": bool(filter_by_label)}
    grad_parts = {"what": "tcav-class-gradients", "activations": ctx.key(INPUTS),
                  "layer": layer, "extras": split.n_extras, **select}
    parts = {"gradients": cache.key("features", **grad_parts), "cavs": list(cav_keys),
             "step": float(config.step), "step_units": config.step_units,
             "intervention_inputs": config.intervention_inputs,
             "fields": list(SCORE_FIELDS), "cav_fields": list(CAV_FIELDS),
             "attrs": ["gradient_spread"]}
    state: dict = {}

    def rows() -> np.ndarray:
        if "rows" not in state:
            acts = ctx.acts(INPUTS)
            state["rows"] = (np.flatnonzero(acts.labels == int(class_index)) if filter_by_label
                             else np.arange(len(acts)))
            if len(state["rows"]) == 0:
                spec = getattr(ctx.datasets[INPUTS], "spec", "") or "the class inputs"
                raise CnnexplainError(f"no images of class {class_name!r} (index {class_index}) "
                                      f"among the {len(acts)} inputs of {spec}",
                                      "raise `limit`, pick another `split`, or pass "
                                      "`class_images` DIR")
        return state["rows"]

    def inputs_on_device():
        if "acts" not in state:
            state["acts"] = _class_inputs(split, ctx.model, layer, ctx.datasets[INPUTS],
                                          ctx.acts(INPUTS), rows(), ctx.preprocessing,
                                          ctx.device, ctx.batch_size, ctx.workers)
        return state["acts"]

    def intervention_rows() -> np.ndarray:
        """The rows I+ / I- average over: every input ("all") or the class's ("class")."""
        return np.arange(len(ctx.acts(INPUTS))) if config.intervention_inputs == "all" \
            else rows()

    def intervention_inputs_on_device():
        if np.array_equal(intervention_rows(), rows()):
            return inputs_on_device()
        if "all_acts" not in state:
            state["all_acts"] = _class_inputs(split, ctx.model, layer, ctx.datasets[INPUTS],
                                              ctx.acts(INPUTS), intervention_rows(),
                                              ctx.preprocessing, ctx.device, ctx.batch_size,
                                              ctx.workers)
        return state["all_acts"]

    def grads_compute():
        a, extras = inputs_on_device()
        g = logit_gradients(split.tail, a, extras, class_index, ctx.batch_size)
        return ({"gradients": g.numpy()},
                {"description": "gradient of the class logit w.r.t. the flattened layer "
                                "activation, per class input (cnnexplain.explain.tcav)",
                 "layer": layer, "class": int(class_index)},
                {"gradients": {"description": "d logit_c / d a", "shape": "N_c x D",
                               "units": "logit per activation unit"}})

    def compute():
        ctx.check_shapes()
        entry, hit = cache.get_or_compute("features", grad_parts, grads_compute)
        stats["gradients_cached" if hit else "gradients_computed"] += 1
        grads = torch.from_numpy(np.asarray(entry["gradients"], dtype=np.float32))
        n_nonzero = int((grads.abs().amax(dim=1) > 0).sum()) if grads.numel() else 0
        spread = gradient_spread(grads)
        cavs = get_cavs()
        by_key = {c.key: c for c in cavs.values()}
        a, extras = intervention_inputs_on_device()
        base = class_log_probs(split.tail, a, extras, class_index, ctx.batch_size)
        out = np.zeros((len(cav_keys), len(SCORE_FIELDS)), np.float64)
        info = np.zeros((len(cav_keys), len(CAV_FIELDS)), np.float64)
        with ctx.progress(total=len(cav_keys),
                          description=f"scores at {layer}, class {class_name}") as bar:
            for i, key in enumerate(cav_keys):
                cav = by_key[key]
                s = directional_derivatives(grads, cav.vector)
                ip, im = interventional_scores(split.tail, a, extras, cav.vector, class_index,
                                               config.step, config.step_units, base,
                                               ctx.batch_size)
                out[i] = (sign_count(s), float((s > 0).sum()), magnitude(s), ip, im,
                          float(s.mean()))
                info[i] = [float(getattr(cav, f)) for f in CAV_FIELDS]
                bar.advance(1)
        return ({"scores": out, "cav_info": info},
                {"description": "TCAV scores of each CAV for one class and layer",
                 "fields": list(SCORE_FIELDS), "cav_fields": list(CAV_FIELDS), "layer": layer,
                 "class": int(class_index), "n_class_inputs": int(len(rows())),
                 "n_nonzero_gradients": n_nonzero, "gradient_spread": spread,
                 "intervention_inputs": config.intervention_inputs,
                 "n_intervention_inputs": int(len(intervention_rows()))},
                {"scores": {"description": "per CAV: " + ", ".join(SCORE_FIELDS),
                            "shape": f"CAVs x {len(SCORE_FIELDS)}",
                            "units": "fractions; counts; logit per unit"},
                 "cav_info": {"description": "per CAV: " + ", ".join(CAV_FIELDS),
                              "shape": f"CAVs x {len(CAV_FIELDS)}", "units": "mixed"}})

    entry, hit = cache.get_or_compute("tcav", parts, compute)
    stats["scores_cached" if hit else "scores_computed"] += 1
    values = np.asarray(entry["scores"], dtype=np.float64)
    info = np.asarray(entry["cav_info"], dtype=np.float64)
    scores = [dict(zip(SCORE_FIELDS, map(float, row))) for row in values]
    for sc in scores:
        sc["n_positive"] = int(round(sc["n_positive"]))
    infos = [{f: float(v) if CAV_TYPES[f] is float else CAV_TYPES[f](round(v))
              for f, v in zip(CAV_FIELDS, row)} for row in info]
    return (scores, infos, int(entry.attrs["n_class_inputs"]),
            int(entry.attrs["n_nonzero_gradients"]), int(entry.attrs["n_intervention_inputs"]),
            float(entry.attrs.get("gradient_spread", float("nan"))))


INPUT_INDEPENDENT = 1e-5
"""Below this :func:`gradient_spread`, the class logit's gradient is the same for every input."""


def gradient_spread(grads: torch.Tensor) -> float:
    """``max_i ||g_i - g_0|| / max(||g_0||, tiny)`` over the class inputs' logit gradients
    ``[N, D]``: 0 when the gradient does not depend on the input, as at a layer that feeds only
    global average pooling and a linear head (d logit_c / d a = w_c / (h w) everywhere); then
    every CAV's directional derivative has one sign for all inputs, and its TCAV score is 0 or
    1 whatever the concept (Kim et al. 2018's score needs input-dependent gradients)."""
    if grads.shape[0] < 2:
        return float("nan")
    g = grads.double()
    ref = g[0]
    return float((g - ref).norm(dim=1).max() / ref.norm().clamp_min(1e-30))
