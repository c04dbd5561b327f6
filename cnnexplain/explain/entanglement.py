"""``evaluate-entanglement``'s measurement: features from the activation cache, R0 / R1
solutions from the gate cache, then the metrics of :mod:`cnnexplain.metrics.entanglement`
(ACC1/ACC2/ACC3 of seed 004, R0/R1 of seed 000, MIS, gate statistics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from cnnexplain.metrics.entanglement import (EntanglementScore, PooledTail, ablation_matrix,
                                             entanglement_rows, gate_statistics,
                                             pathway_accuracies, r0_score, r1_score,
                                             random_p_accuracies, tail_starts_with_gap)
from cnnexplain.models.gates import class_clusters

RANDOM_P = 5
"""Random P drawn for seed 004's STD baseline (ACC2 / ACC3 of a model without a learned gate)."""


@dataclass
class EntanglementReport:
    """Everything evaluate-entanglement writes: ``rows`` (metric, value, std, n, note),
    ``per_class`` rows, the pooled ``features`` ``[N, K]`` and ``labels`` ``[N]`` that MIS used,
    the gate ``matrix`` ``[K, C]`` the clusters came from and where it came from."""

    rows: list[dict]
    per_class: list[dict]
    features: "np.ndarray"
    labels: "np.ndarray"
    matrix: torch.Tensor
    gate_source: str
    layer: str
    pool: str
    threshold: float
    mi: torch.Tensor
    scores: dict
    ablation: torch.Tensor | None = None
    """``[C, C]``: accuracy on class k's images with class c's cluster removed (row c, column k)."""
    class_names: list[str] | None = None

    def value(self, metric: str) -> float | None:
        for r in self.rows:
            if r["metric"].lower() == metric.lower():
                return r["value"]
        return None

    def summary(self) -> dict:
        return {r["metric"]: r["value"] for r in self.rows}


def _cached_score(cache, name: str, parts: dict, compute: Callable[[], EntanglementScore],
                  classes: int) -> EntanglementScore:
    """An R0 / R1 solution from the cache (kind ``gate``), computed and stored on a miss."""
    import numpy as np

    def make():
        s = compute()
        arrays = {"W": s.W.numpy().astype(np.float32),
                  "per_class_ce": np.array([r["ce"] for r in s.per_class], dtype=np.float64),
                  "per_class_acc": np.array([r["acc"] for r in s.per_class], dtype=np.float64),
                  "per_class_n": np.array([r["n"] for r in s.per_class], dtype=np.int64)}
        attrs = {"description": f"seed 000 {name} solution W (network frozen)", "score": s.score,
                 "ce": s.ce, "acc": s.acc, "density": s.density, "hparams": s.hparams,
                 "name": name, "convergence": s.convergence}
        return arrays, attrs

    entry, _hit = cache.get_or_compute("gate", parts, make)
    a = entry.attrs if hasattr(entry, "attrs") else {}
    W = torch.from_numpy(np.asarray(entry["W"], dtype=np.float32))
    ce = np.asarray(entry["per_class_ce"])
    acc = np.asarray(entry["per_class_acc"])
    n = np.asarray(entry["per_class_n"])
    per_class = [{"class": c, "n": int(n[c]), "ce": float(ce[c]), "acc": float(acc[c]),
                  "channels": int((W[:, c] > 0.5).sum())} for c in range(classes)]
    return EntanglementScore(name=name, score=float(a["score"]), ce=float(a["ce"]),
                             acc=float(a["acc"]), density=float(a["density"]), W=W,
                             convergence=float(a.get("convergence", float("nan"))),
                             per_class=per_class, hparams=dict(a.get("hparams") or {}))


def evaluate_entanglement(loaded, dataset, *, layer: str | None = None, options=None,
                          seed: int = 0, batch_size: int = 64, workers: int = 0,
                          device: torch.device | str = "cpu", cache=None, progress=None,
                          **overrides) -> EntanglementReport:
    """Measure channel-class entanglement of ``loaded`` (a LoadedModel) at ``layer`` on
    ``dataset``: features from the activation cache (the network runs once per model, data and
    preprocessing), R0 / R1 solutions from the gate cache, ACC1/2/3 through the tail, MIS on the
    pooled features. The clusters come from the model's learned gate when it is at ``layer``,
    else from R0's one-hot solution (post hoc). ``options``:
    :class:`~cnnexplain.config.evaluate.EntanglementOptions` (``overrides``: its fields by
    name, e.g. ``draws=3``). The network runs in eval mode and is handed back in the mode it
    came in."""
    import dataclasses

    from cnnexplain.config.evaluate import EntanglementOptions
    from cnnexplain.config.fields import check

    options = check(dataclasses.replace(options or EntanglementOptions(), **overrides))
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        return _evaluate(loaded, dataset, layer=layer, pool=options.pool, draws=options.draws,
                         threshold=options.threshold, scores=options.scores,
                         score_steps=options.score_steps, score_lr=options.score_lr,
                         mu=options.mu, seed=seed, batch_size=batch_size, workers=workers,
                         device=device, cache=cache, progress=progress)
    finally:
        model.train(was_training)


def _evaluate(loaded, dataset, *, layer, pool, draws, threshold, scores, score_steps, score_lr,
              mu, seed, batch_size, workers, device, cache, progress) -> EntanglementReport:
    import numpy as np

    from cnnexplain.activations import compute_activations
    from cnnexplain.cache.store import Cache
    from cnnexplain.errors import CnnexplainError, UsageError
    from cnnexplain.metrics.mis import mutual_information
    from cnnexplain.models.gates import gate_matrix, gate_threshold
    from cnnexplain.models.layers import split_at

    cache = cache if cache is not None else Cache(enabled=False)
    model = loaded.model
    layer = layer or loaded.layer
    classes = int(loaded.num_classes)
    names = list(getattr(dataset, "class_names", []) or [])
    if names and len(names) != classes:
        raise UsageError(f"the model has {classes} classes but the dataset has {len(names)}",
                         "evaluate on the data the model was trained for (or pass `num_classes` "
                         "for a random-init backbone)")
    split = split_at(model, layer)
    if split.n_extras:
        raise UsageError(f"layer {layer!r} feeds a skip connection, so the part after it needs "
                         "more than its output", "choose a block output such as the backbone's "
                         f"default layer {loaded.spec.default_layer!r}")
    gap = tail_starts_with_gap(split.tail)
    common = dict(model_fingerprint=loaded.fingerprint, preprocessing=loaded.preprocessing,
                  device=device, batch_size=batch_size, cache=cache, progress=progress,
                  workers=workers)
    if gap:
        acts = compute_activations(model, [layer], dataset, pool="mean", **common)
        tail_feats = torch.from_numpy(acts.array(layer))
        if pool == "mean":
            pooled = tail_feats.numpy()
        else:
            pooled = compute_activations(model, [layer], dataset, pool="sum", **common).array(layer)
        tail: nn.Module = PooledTail(split.tail)
        feature_kind = "mean"
    else:
        acts = compute_activations(model, [layer], dataset, pool=None, **common)
        tail_feats = torch.from_numpy(acts.array(layer))
        dims = tuple(range(2, tail_feats.dim()))
        pooled = (tail_feats.mean(dims) if pool == "mean" else tail_feats.sum(dims)).numpy() \
            if dims else tail_feats.numpy()
        tail = split.tail
        feature_kind = "maps"
    labels_np = np.asarray(acts.labels, dtype=np.int64)
    if labels_np.size == 0:
        raise CnnexplainError("the dataset has no images", "check `dataset`, `split` and `limit`")
    if labels_np.min() < 0 or labels_np.max() >= classes:
        raise CnnexplainError(f"the dataset's labels range over {labels_np.min()}..{labels_np.max()}, "
                              f"outside the model's {classes} classes",
                              "evaluate on a labelled dataset with the model's classes")
    dev = torch.device(device)
    feats = tail_feats.to(dev)
    labels = torch.from_numpy(labels_np).to(dev)
    # R0 / R1 (seed 000) on the frozen network, cached
    score_parts = {"model": loaded.fingerprint, "layer": layer, "dataset": dataset.fingerprint(),
                   "preprocessing": loaded.preprocessing.fingerprint(), "features": feature_kind}
    results: dict[str, EntanglementScore] = {}
    learned = gate_matrix(loaded)
    gate_layer = (loaded.meta.get("gate") or {}).get("layer", loaded.meta.get("layer")) \
        if loaded.meta else None
    if learned is not None and gate_layer not in (None, layer):
        learned = None
    need_r0 = scores or learned is None
    hp = dict(steps=score_steps, lr=score_lr, seed=seed)
    if need_r0:
        results["R0"] = _cached_score(
            cache, "R0", {**score_parts, "score": "R0", "hparams": hp},
            lambda: r0_score(tail, feats, labels, classes, steps=score_steps, lr=score_lr,
                             seed=seed, progress=progress), classes)
    if scores:
        results["R1"] = _cached_score(
            cache, "R1", {**score_parts, "score": "R1", "hparams": {**hp, "mu": mu}},
            lambda: r1_score(tail, feats, labels, classes, mu=mu, steps=score_steps, lr=score_lr,
                             seed=seed, progress=progress), classes)
    if learned is not None:
        matrix = learned
        source = f"learned ({loaded.method})"
        t = float(threshold) if threshold is not None else gate_threshold(loaded)
    else:
        matrix = results["R0"].W
        source = "post-hoc (R0 one-hot W)"
        t = float(threshold) if threshold is not None else 0.5
    if matrix.shape != (feats.shape[1], classes):
        raise CnnexplainError(f"the gate matrix has shape {list(matrix.shape)} but layer {layer!r} "
                              f"has {feats.shape[1]} channels and the model {classes} classes",
                              "evaluate at the layer the gate was trained on")
    bs = max(batch_size, 256)
    clusters = class_clusters(matrix, t)
    with torch.no_grad():
        acc = pathway_accuracies(tail, feats, labels, matrix, threshold=t, draws=draws,
                                 seed=seed, batch_size=bs)
        baseline = None if learned is not None else random_p_accuracies(
            tail, feats, labels, classes, n_p=RANDOM_P, draws=draws, seed=seed, batch_size=bs)
        r0_acc = pathway_accuracies(tail, feats, labels, results["R0"].W, threshold=0.5,
                                    draws=0, seed=seed, batch_size=bs) if "R0" in results else None
        ablation = ablation_matrix(tail, feats, labels, clusters, batch_size=bs)
    mi = mutual_information(pooled, labels_np, classes, device=dev)
    rows, per_class = entanglement_rows(acc, mi, gate_statistics(matrix, t), results, labels_np,
                                        threshold=t, pool=pool, mu=mu, source=source,
                                        clusters=clusters, names=names, report_r0=scores,
                                        learned=learned is not None, baseline=baseline,
                                        r0_acc=r0_acc, ablation=ablation)
    return EntanglementReport(rows=rows, per_class=per_class, features=np.asarray(pooled),
                              labels=labels_np, matrix=matrix.detach().cpu(), gate_source=source,
                              layer=layer, pool=pool, threshold=t, mi=mi,
                              scores={k: v for k, v in results.items() if scores},
                              ablation=ablation, class_names=[names[c] if c < len(names) else
                                                              str(c) for c in range(classes)])
