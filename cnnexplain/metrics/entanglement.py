"""Channel-class entanglement at one layer: ACC1/ACC2/ACC3 (seed 004), R0/R1 (seed 000) and
gate statistics. Pure functions of cached features, labels, a gate matrix and the network's
``tail`` (the part after the layer, from :func:`cnnexplain.models.layers.split_at`); MIS lives
in :mod:`cnnexplain.metrics.mis`.

Shapes: ``features`` ``[N, K, *space]`` (the layer's maps) or ``[N, K]`` (pooled, for tails
that start with global average pooling, see :func:`tail_starts_with_gap`); ``labels`` ``[N]``;
``matrix`` ``[K, C]`` membership in [0, 1] (``W`` or ``P^T``); ``tail(features) -> logits [B, C]``.

Accuracies (seed ``004_64660bc76be64243.txt``, "Evaluation Metric"):

- ACC1: the full pathway.
- ACC2: only the class-specific cluster of the *predicted* class: the paper / reference code draw
  a pseudo-label ``ỹ ~ Cat(softmax(ŷ))`` and a mask ``z ~ Ber(M[:, ỹ])`` once per image
  (stochastic, averaged over ``draws`` with their standard deviation); the deterministic variant
  uses ``argmax ŷ`` and the thresholded cluster ``M[:, ŷ] > t``.
- ACC3: all channels except the *true* class's cluster: ``1 - z'`` with ``z' ~ Ber(M[:, y])``
  (stochastic) or ``M[:, y] <= t`` (deterministic). Lower is better.

Entanglement scores (seed ``000_d60c53f3ec4d0e03.txt``, "通道-类别稀疏度评分"), with the network
frozen and the gated forward ``ŷ_W = f_{>l}(W_{:,y} ⊙ A)`` (true label):

- R0 = min_W CE(y, ŷ_W) s.t. every row W_k one-hot: optimized as algorithm 3 (``W_k =
  softmax(Ω_k / δ)``, Ω rows rescaled to [-1, 1], δ annealed), scored with the hard one-hot W.
- R1 = min_W CE(y, ŷ_W) + μ ||W||_0 / (K C) s.t. W binary, ||W_k||_inf = 1: optimized as
  algorithm 2 (``W = σ(Ω / δ)``), scored with the binarized W (Ω > 0; each row keeps its max).
  (The seed's ||W||_0 is divided by K C here so that μ does not depend on the layer's width.)
Lower is more disentangled. A model without a learned gate (std, torchvision weights) gets its
class clusters from the R0 solution, so its ACC2/ACC3 are comparable with a gated model's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cnnexplain.models.gates import R0P1Gate, R1P1Gate, apply_mask, class_clusters, peakedness

if TYPE_CHECKING:
    import numpy as np

Tail = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The tail
# ---------------------------------------------------------------------------------------------

def tail_starts_with_gap(tail: nn.Module) -> bool:
    """True when ``tail`` (an fx GraphModule with one input) depends on its input only through
    a global average pool over space (``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``
    or ``x.mean((2, 3))``). Then ``tail(maps) == tail(mean_pool(maps)[:, :, None, None])``
    exactly and a channel mask commutes with the pooling, so pooled features suffice."""
    graph = getattr(tail, "graph", None)
    if graph is None:
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    u = placeholders[0]
    while True:  # split_at's tail starts by cloning its input: look through clones
        users = list(u.users)
        if len(users) != 1:
            return False
        u = users[0]
        if not (u.op == "call_method" and u.target == "clone"):
            break
    if u.op == "call_module":
        m = tail.get_submodule(u.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
    if u.op == "call_function":
        if u.target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
            size = u.args[1] if len(u.args) > 1 else u.kwargs.get("output_size")
            return size in (1, (1, 1), [1, 1])
        if u.target is torch.mean:
            dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
            return _spatial_dims(dims)
        return False
    if u.op == "call_method" and u.target == "mean":
        dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        return _spatial_dims(dims)
    return False


def _spatial_dims(dims) -> bool:
    if isinstance(dims, (list, tuple)):
        return sorted(int(d) % 4 for d in dims) == [2, 3]
    return False


class PooledTail(nn.Module):
    """``f [B, K] -> tail(f[:, :, None, None])``: exact for tails that start with global average
    pooling (:func:`tail_starts_with_gap`), since the pool of a 1 x 1 map is the map."""

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.tail(f[:, :, None, None] if f.dim() == 2 else f)


def logits_of(tail: Tail, features: torch.Tensor, batch_size: int = 1024,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``tail(features * mask)`` in batches, ``[N, C]`` float32 (no grad)."""
    out = []
    with torch.no_grad():
        for s in range(0, features.shape[0], batch_size):
            f = features[s:s + batch_size]
            if mask is not None:
                f = apply_mask(f, mask[s:s + batch_size])
            out.append(tail(f).float())
    return torch.cat(out) if out else features.new_zeros((0, 0))


# ---------------------------------------------------------------------------------------------
# ACC1 / ACC2 / ACC3
# ---------------------------------------------------------------------------------------------

@dataclass
class PathwayAccuracies:
    """Accuracies of seed 004 (fractions in [0, 1]). ``acc2`` / ``acc3``: mean of the stochastic
    draws (``acc2_std`` / ``acc3_std`` their standard deviation over draws); ``*_det``: the
    deterministic variants; ``per_class``: class -> dict of the same keys plus ``n``."""

    acc1: float
    acc2: float
    acc2_std: float
    acc3: float
    acc3_std: float
    acc2_det: float
    acc3_det: float
    draws: int
    n: int
    per_class: list[dict] = field(default_factory=list)


def pathway_accuracies(tail: Tail, features: torch.Tensor, labels: torch.Tensor,
                       matrix: torch.Tensor, threshold: float = 0.5, draws: int = 10,
                       seed: int = 0, batch_size: int = 1024) -> PathwayAccuracies:
    """ACC1, ACC2 and ACC3 of seed 004 (module docstring) for ``matrix`` ``[K, C]``."""
    dev = features.device
    labels = labels.to(dev).long()
    m = matrix.to(dev).float().clamp(0, 1)
    k, c = m.shape
    n = int(labels.shape[0])
    logits = logits_of(tail, features, batch_size)
    pred = logits.argmax(1)
    probs = torch.softmax(logits, 1)
    clusters = class_clusters(m, threshold)                      # [C, K]
    ok1 = pred == labels
    ok2_det = logits_of(tail, features, batch_size, clusters[pred].float()).argmax(1) == labels
    ok3_det = logits_of(tail, features, batch_size, (~clusters[labels]).float()).argmax(1) == labels
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    ok2_draws, ok3_draws = [], []
    for _ in range(max(int(draws), 0)):
        xi = torch.rand(n, generator=g, dtype=torch.float64).to(dev)
        cum = probs.double().cumsum(1)
        pseudo = torch.searchsorted(cum, xi[:, None]).squeeze(1).clamp(max=c - 1)
        eps2 = torch.rand(n, k, generator=g).to(dev)
        eps3 = torch.rand(n, k, generator=g).to(dev)
        z2 = (m.t()[pseudo] >= eps2).float()                     # z ~ Ber(M[:, ỹ]) (eq. 5-7)
        z3 = (m.t()[labels] >= eps3).float()                     # z' ~ Ber(M[:, y])
        ok2_draws.append(logits_of(tail, features, batch_size, z2).argmax(1) == labels)
        ok3_draws.append(logits_of(tail, features, batch_size, 1 - z3).argmax(1) == labels)
    if ok2_draws:
        a2 = torch.stack(ok2_draws).float()                      # [draws, N]
        a3 = torch.stack(ok3_draws).float()
    else:
        a2 = ok2_det.float()[None]
        a3 = ok3_det.float()[None]

    def std(v: torch.Tensor) -> float:
        return float(v.std(unbiased=True)) if v.numel() > 1 else 0.0

    per_class = []
    for cls in range(c):
        sel = labels == cls
        nc = int(sel.sum())
        if nc == 0:
            per_class.append({"class": cls, "n": 0})
            continue
        per_class.append({
            "class": cls, "n": nc, "acc1": float(ok1[sel].float().mean()),
            "acc2": float(a2[:, sel].mean()), "acc2_std": std(a2[:, sel].mean(1)),
            "acc3": float(a3[:, sel].mean()), "acc3_std": std(a3[:, sel].mean(1)),
            "acc2_det": float(ok2_det[sel].float().mean()),
            "acc3_det": float(ok3_det[sel].float().mean())})
    return PathwayAccuracies(
        acc1=float(ok1.float().mean()), acc2=float(a2.mean()), acc2_std=std(a2.mean(1)),
        acc3=float(a3.mean()), acc3_std=std(a3.mean(1)), acc2_det=float(ok2_det.float().mean()),
        acc3_det=float(ok3_det.float().mean()), draws=len(ok2_draws), n=n, per_class=per_class)


def random_p(channels: int, classes: int, generator: torch.Generator,
             init_scale: float = 0.01, temperature: float = 1.0) -> torch.Tensor:
    """A randomly initialized PICNN membership ``[K, C]``: ``P = softmax(Theta / T)`` over
    classes with ``Theta ~ init_scale * N(0, 1)`` (seed 004's initialization, so every filter is
    near 1/C for every class). Seed 004 evaluates its STD baseline with such a P and its
    Bernoulli sampling."""
    theta = torch.randn(classes, channels, generator=generator) * float(init_scale)
    return torch.softmax(theta / float(temperature), dim=0).t().contiguous()


@dataclass
class BaselineAccuracies:
    """Seed 004's ACC2 / ACC3 of a model without a learned gate: the mean over ``n_p`` random
    P (:func:`random_p`) of each P's stochastic accuracies, and the standard deviation over
    the P draws."""

    acc2: float
    acc2_std: float
    acc3: float
    acc3_std: float
    n_p: int
    draws: int


def random_p_accuracies(tail: Tail, features: torch.Tensor, labels: torch.Tensor, classes: int,
                        n_p: int = 5, draws: int = 10, seed: int = 0, batch_size: int = 1024
                        ) -> BaselineAccuracies:
    """ACC2 / ACC3 (seed 004) with ``n_p`` random P and ``draws`` Bernoulli draws each."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    a2, a3 = [], []
    for j in range(max(int(n_p), 1)):
        m = random_p(features.shape[1], classes, g)
        acc = pathway_accuracies(tail, features, labels, m, draws=max(int(draws), 1),
                                 seed=int(seed) + 1000 * (j + 1), batch_size=batch_size)
        a2.append(acc.acc2)
        a3.append(acc.acc3)
    t2, t3 = torch.tensor(a2), torch.tensor(a3)

    def sd(v: torch.Tensor) -> float:
        return float(v.std(unbiased=True)) if v.numel() > 1 else 0.0

    return BaselineAccuracies(acc2=float(t2.mean()), acc2_std=sd(t2), acc3=float(t3.mean()),
                              acc3_std=sd(t3), n_p=len(a2), draws=max(int(draws), 1))


def ablation_matrix(tail: Tail, features: torch.Tensor, labels: torch.Tensor,
                    clusters: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The causal test of class specificity: ``A[c, k]`` = accuracy on the images of class
    ``k`` with class ``c``'s cluster removed (``clusters`` bool ``[C, K]``), ``[C, C]``; NaN
    for a class without images. The diagonal is each class's own drop, the rest collateral."""
    labels = labels.to(features.device).long()
    c = int(clusters.shape[0])
    out = torch.full((c, c), float("nan"))
    for cls in range(c):
        keep = (~clusters[cls].to(features.device)).float()[None].expand(features.shape[0], -1)
        ok = logits_of(tail, features, batch_size, keep).argmax(1) == labels
        for k in range(c):
            sel = labels == k
            if sel.any():
                out[cls, k] = float(ok[sel].float().mean())
    return out


def specificity(ablation: torch.Tensor, acc1: torch.Tensor) -> dict:
    """One number from the ablation matrix: the mean drop of a class's accuracy when its own
    cluster is removed minus the mean drop of the other classes' accuracies, divided by the
    mean full-pathway accuracy (``acc1``: per class ``[C]``). 1: removing a cluster removes
    exactly its class; 0: a cluster is no more about its class than about the others."""
    drop = acc1[None, :] - ablation                       # [C (removed), C (evaluated)]
    c = drop.shape[0]
    eye = torch.eye(c, dtype=torch.bool)
    own = float(torch.nanmean(drop[eye]))
    other = float(torch.nanmean(drop[~eye])) if c > 1 else 0.0
    scale = max(float(torch.nanmean(acc1)), 1e-12)
    return {"specificity": (own - other) / scale, "own_drop": own, "collateral_drop": other}


# ---------------------------------------------------------------------------------------------
# R0 / R1
# ---------------------------------------------------------------------------------------------

@dataclass
class EntanglementScore:
    """One of seed 000's scores: ``score`` (R0: CE; R1: CE + μ·density), ``ce`` and ``acc`` of
    the gated pathway with the hard W, ``density`` = ||W||_0 / (K C), ``W`` ``[K, C]`` (hard,
    0/1), ``per_class`` (class -> CE, accuracy, channels)."""

    name: str
    score: float
    ce: float
    acc: float
    density: float
    W: torch.Tensor
    per_class: list[dict]
    hparams: dict
    convergence: float = float("nan")
    """:func:`convergence` of the fit (the scores are upper bounds of the seed's minimum: a
    relaxation fitted by ``steps`` Adam steps, then made hard)."""


def gated_cross_entropy(tail: Tail, features: torch.Tensor, labels: torch.Tensor,
                        W: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image CE and correctness ``[N]`` of ``ŷ_W = tail(W[:, y]^T ⊙ features)`` (seed 000's
    gated forward with the true label), no grad."""
    labels = labels.to(features.device).long()
    mask = W.to(features.device).float().t()[labels]
    logits = logits_of(tail, features, batch_size, mask)
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(1) == labels


def _fit(gate: nn.Module, tail: Tail, features: torch.Tensor, labels: torch.Tensor,
         steps: int, lr: float, batch_size: int, seed: int, penalty: Callable[[], torch.Tensor],
         progress=None) -> list[float]:
    """Minimize CE(y, ŷ_W) + penalty over the gate's Ω by Adam on random minibatches; the
    network stays frozen; δ annealed over the steps; Ω rows rescaled after each step. Returns
    the minibatch objective of every step."""
    dev = features.device
    labels = labels.to(dev).long()
    n = features.shape[0]
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    b = min(batch_size, n)
    bar = progress(total=steps, description=f"fit {type(gate).__name__}") if progress \
        else contextlib.nullcontext(None)
    losses = []
    with bar as task, _frozen(tail):
        for step in range(steps):
            gate.anneal(step / max(steps - 1, 1))
            idx = torch.randperm(n, generator=g)[:b].to(dev)
            y = labels[idx]
            mask = gate.mask(y)  # one-hot matmul: a reproducible backward (Gate.mask)
            loss = F.cross_entropy(tail(apply_mask(features[idx], mask)).float(), y) + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            gate.project_()
            losses.append(float(loss.detach()))
            if task is not None:
                task.advance(1)
    return losses


def convergence(losses: list[float]) -> float:
    """Relative change of the fit's objective between the last two tenths of its steps
    (``|mean(last) - mean(previous)| / mean(previous)``): small when the fit has settled."""
    if len(losses) < 20:
        return float("nan")
    w = len(losses) // 10
    last, prev = sum(losses[-w:]) / w, sum(losses[-2 * w:-w]) / w
    return abs(last - prev) / max(abs(prev), 1e-12)


def _score(name: str, tail: Tail, features: torch.Tensor, labels: torch.Tensor, W: torch.Tensor,
           extra: float, hparams: dict, batch_size: int) -> EntanglementScore:
    ce, ok = gated_cross_entropy(tail, features, labels, W, batch_size)
    labels = labels.to(features.device).long()
    per_class = []
    for c in range(W.shape[1]):
        sel = labels == c
        per_class.append({"class": c, "n": int(sel.sum()),
                          "ce": float(ce[sel].mean()) if sel.any() else float("nan"),
                          "acc": float(ok[sel].float().mean()) if sel.any() else float("nan"),
                          "channels": int((W[:, c] > 0.5).sum())})
    density = float((W > 0.5).float().mean())
    return EntanglementScore(name=name, score=float(ce.mean()) + extra, ce=float(ce.mean()),
                             acc=float(ok.float().mean()), density=density, W=W.detach().cpu(),
                             per_class=per_class, hparams=hparams)


@contextlib.contextmanager
def _frozen(tail: Tail) -> Iterator[None]:
    """The network stays frozen while W is fitted: no gradients for the tail's parameters
    (their ``requires_grad`` flags are restored afterwards)."""
    params = list(tail.parameters()) if isinstance(tail, nn.Module) else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def r0_score(tail: Tail, features: torch.Tensor, labels: torch.Tensor, classes: int, *,
             steps: int = 300, lr: float = 0.1, delta_start: float = 1.0, delta_end: float = 0.02,
             batch_size: int = 512, seed: int = 0, progress=None) -> EntanglementScore:
    """Seed 000's R0 (module docstring): one-hot W by algorithm 3, scored hard."""
    torch.manual_seed(seed)
    gate = R0P1Gate(features.shape[1], classes, delta_start=delta_start,
                    delta_end=delta_end).to(features.device)
    losses = _fit(gate, tail, features, labels, steps, lr, batch_size, seed,
                  lambda: features.new_zeros(()), progress)
    with torch.no_grad():
        hard = F.one_hot(gate.Omega.argmax(1), classes).float()
    hp = {"steps": steps, "lr": lr, "delta_start": delta_start, "delta_end": delta_end,
          "batch_size": batch_size, "seed": seed}
    score = _score("R0", tail, features, labels, hard, 0.0, hp, batch_size)
    score.convergence = convergence(losses)
    return score


def r1_score(tail: Tail, features: torch.Tensor, labels: torch.Tensor, classes: int, *,
             mu: float = 0.5, steps: int = 300, lr: float = 0.1, delta_start: float = 1.0,
             delta_end: float = 0.02, batch_size: int = 512, seed: int = 0,
             progress=None) -> EntanglementScore:
    """Seed 000's R1 (module docstring): binary W with row max 1 by algorithm 2, penalty
    ``μ ||W||_1 / (K C)`` during the fit, scored hard as ``CE + μ ||W||_0 / (K C)``."""
    torch.manual_seed(seed)
    gate = R1P1Gate(features.shape[1], classes, delta_start=delta_start,
                    delta_end=delta_end).to(features.device)
    losses = _fit(gate, tail, features, labels, steps, lr, batch_size, seed,
                  lambda: mu * gate.matrix().mean(), progress)
    with torch.no_grad():
        hard = (gate.Omega > 0).float()
        top = gate.Omega.argmax(1)
        hard[torch.arange(hard.shape[0]), top] = 1.0
    hp = {"mu": mu, "steps": steps, "lr": lr, "delta_start": delta_start, "delta_end": delta_end,
          "batch_size": batch_size, "seed": seed}
    density = float(hard.mean())
    score = _score("R1", tail, features, labels, hard, mu * density, hp, batch_size)
    score.convergence = convergence(losses)
    return score


# ---------------------------------------------------------------------------------------------
# Gate statistics
# ---------------------------------------------------------------------------------------------

def gate_statistics(matrix: torch.Tensor, threshold: float = 0.5) -> dict:
    """Density (share of channel-class pairs in a cluster), L1 density (mean membership),
    peakedness, channels per class and classes per channel (mean / min / max), empty clusters
    and channels in no cluster, for ``matrix`` ``[K, C]``."""
    m = matrix.detach().float().cpu()
    clusters = class_clusters(m, threshold)                        # [C, K]
    per_class = clusters.sum(1).float()
    per_channel = clusters.sum(0).float()
    return {"density": float(clusters.float().mean()), "l1_density": float(m.mean()),
            "peakedness": peakedness(m),
            "channels_per_class": float(per_class.mean()),
            "channels_per_class_min": float(per_class.min()),
            "channels_per_class_max": float(per_class.max()),
            "classes_per_channel": float(per_channel.mean()),
            "classes_per_channel_min": float(per_channel.min()),
            "classes_per_channel_max": float(per_channel.max()),
            "empty_clusters": int((per_class == 0).sum()),
            "unassigned_channels": int((per_channel == 0).sum()),
            "channels": int(m.shape[0]), "classes": int(m.shape[1])}



# ---------------------------------------------------------------------------------------------
# The evaluate-entanglement pipeline: cached features -> metrics -> rows
# ---------------------------------------------------------------------------------------------

METRIC_NOTES = {
    "ACC1": "accuracy of the full pathway",
    "ACC2": "Guo et al. 2024's ACC2: only the predicted class's cluster, pseudo-label and Bernoulli mask "
            "drawn once per image, mean (std) over `draws` draws; a model without a learned gate "
            "is measured with random P as Guo et al. 2024's STD baseline (mean (std) over the P draws)",
    "ACC3": "Guo et al. 2024's ACC3: all channels but a Bernoulli draw of the true class's cluster, as "
            "ACC2 (lower = more class-specific); random P for a model without a learned gate",
    "ACC2_det": "ACC2 with argmax prediction and the whole thresholded learned cluster",
    "ACC3_det": "ACC3 with the whole thresholded learned cluster removed: the accuracy that "
                "answers 'does removing the class's cluster remove the class'",
    "ACC2_R0": "ACC2 with the clusters of R0's one-hot W (fitted post hoc on the frozen model; "
               "the same for every model)",
    "ACC3_R0": "ACC3 with R0's clusters removed (post hoc, for every model)",
    "specificity": "causal test: mean drop of a class's accuracy when its own cluster is removed "
                   "minus the mean drop of the other classes', over mean ACC1 (1: a cluster "
                   "carries exactly its class; 0: no more its class than others'); the C x C "
                   "matrix is entanglement_ablation.csv",
    "own_drop": "mean accuracy drop of a class when its own cluster is removed",
    "collateral_drop": "mean accuracy drop of the other classes when a cluster is removed",
    "MIS": "mean over channels of the max over classes of the k-NN (k=3) mutual information "
           "between the pooled activation and the one-vs-rest class (nats)",
    "MIS_margin": "mean over channels of the gap between the largest and the second-largest class "
                  "MI (nats): how much a channel's information is about one class rather than "
                  "shared by two (a diagnostic beside MIS, not in the seeds)",
    "MIS_ceiling": "largest possible MIS: max over classes of the entropy of the one-vs-rest "
                   "indicator (H(Bernoulli(1/C)) for balanced classes)",
    "R0": "Liang's (CDCNN) R0, an upper bound of its minimum: CE of the gated pathway with the one-hot "
          "W that `score_steps` Adam steps of a relaxation found (network frozen; lower = more "
          "disentangled)",
    "R0_acc": "gated accuracy with R0's one-hot W",
    "R0_convergence": "relative change of R0's fit objective over its last tenth of steps",
    "R1": "Liang's (CDCNN) R1, an upper bound of its minimum: CE + mu * ||W||_0 / (K C) with the "
          "binary W (row max 1) the relaxation found",
    "R1_ce": "CE part of R1",
    "R1_acc": "gated accuracy with R1's W",
    "R1_density": "||W||_0 / (K C) of R1's W",
    "R1_convergence": "relative change of R1's fit objective over its last tenth of steps",
    "gate_density": "share of channel-class pairs in a cluster (membership > threshold)",
    "gate_l1_density": "mean membership ||W||_1 / (K C)",
    "gate_peakedness": "mean over channels of the largest class share of the row (1/C uniform, 1 one-hot)",
    "channels_per_class": "mean cluster size (channels per class; per class in the per-class file)",
    "classes_per_channel": "mean number of clusters a channel belongs to",
    "empty_clusters": "classes whose cluster has no channel",
    "unassigned_channels": "channels in no cluster",
}
"""Every metric evaluate-entanglement reports (names for the `fail_under` / `fail_over` bounds)."""

METRICS: tuple[str, ...] = tuple(METRIC_NOTES)
SCORE_METRICS = ("R0", "R0_acc", "R0_convergence", "R1", "R1_ce", "R1_acc", "R1_density",
                 "R1_convergence", "ACC2_R0", "ACC3_R0")


def _row(metric: str, value: float, std: float | None, n: int | None, note: str = "") -> dict:
    """One row of entanglement.csv; ``detail`` is the run-specific part of the note."""
    base = METRIC_NOTES.get(metric, "")
    return {"metric": metric, "value": float(value), "std": std, "n": n,
            "note": f"{base}; {note}" if note and base else (note or base), "detail": note}


def _margin(mi: torch.Tensor) -> float:
    """Mean over channels of (largest - second-largest) MI over classes, for ``mi`` [C, K]."""
    if mi.shape[0] < 2 or mi.numel() == 0:
        return float(mi.max(dim=0).values.mean()) if mi.numel() else 0.0
    top = torch.topk(mi, 2, dim=0).values
    return float((top[0] - top[1]).mean())


def _binary_entropy(p: float) -> float:
    import math

    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def entanglement_rows(acc: PathwayAccuracies, mi: torch.Tensor, stats: dict, scores: dict,
                      labels: "np.ndarray", *, threshold: float, pool: str, mu: float,
                      source: str, clusters: torch.Tensor, names: list[str],
                      report_r0: bool, learned: bool = True,
                      baseline: BaselineAccuracies | None = None,
                      r0_acc: PathwayAccuracies | None = None,
                      ablation: torch.Tensor | None = None) -> tuple[list[dict], list[dict]]:
    """The rows of entanglement.csv and entanglement_per_class.csv from computed metrics:
    ``acc`` (:func:`pathway_accuracies` on the model's clusters: its learned gate, else R0's),
    ``mi`` ``[C, K]``, ``stats`` (:func:`gate_statistics`), ``scores`` (name ->
    :class:`EntanglementScore`), ``labels`` ``[N]``, the ``clusters`` ``[C, K]`` ``acc`` used;
    ``learned``: the clusters are a learned gate's; ``baseline``: seed 004's random-P ACC2 /
    ACC3 for a model without one; ``r0_acc``: the accuracies with R0's clusters; ``ablation``:
    :func:`ablation_matrix` on ``clusters``. ``report_r0``: R0 / R1 were asked for."""
    import numpy as np

    from cnnexplain.metrics.mis import mis_from_mi

    classes = int(clusters.shape[0])
    t = threshold
    counts = np.bincount(labels, minlength=classes) / labels.size
    ceiling = max((_binary_entropy(float(p)) for p in counts), default=0.0)
    n = int(labels.size)
    rows = [_row("ACC1", acc.acc1, None, n)]
    if learned or baseline is None:
        rows += [_row("ACC2", acc.acc2, acc.acc2_std, n, f"{source}, {acc.draws} draws"),
                 _row("ACC3", acc.acc3, acc.acc3_std, n, f"{source}, {acc.draws} draws")]
    else:
        what = f"random P (Guo et al. 2024's STD baseline), {baseline.n_p} P x {baseline.draws} draws"
        rows += [_row("ACC2", baseline.acc2, baseline.acc2_std, n, what),
                 _row("ACC3", baseline.acc3, baseline.acc3_std, n, what)]
    if learned:
        rows += [_row("ACC2_det", acc.acc2_det, None, n, f"threshold {t}"),
                 _row("ACC3_det", acc.acc3_det, None, n, f"threshold {t}")]
    if r0_acc is not None and report_r0:
        rows += [_row("ACC2_R0", r0_acc.acc2_det, None, n, "R0's one-hot clusters"),
                 _row("ACC3_R0", r0_acc.acc3_det, None, n, "R0's one-hot clusters")]
    if ablation is not None:
        per_acc1 = torch.tensor([acc.per_class[c].get("acc1", float("nan"))
                                 for c in range(classes)])
        sp = specificity(ablation, per_acc1)
        rows += [_row("specificity", sp["specificity"], None, n, source),
                 _row("own_drop", sp["own_drop"], None, n, source),
                 _row("collateral_drop", sp["collateral_drop"], None, n, source)]
    rows += [
        _row("MIS", mis_from_mi(mi), None, n, f"pool {pool}, k=3, nats"),
        _row("MIS_margin", _margin(mi), None, n, f"pool {pool}"),
        _row("MIS_ceiling", ceiling, None, n, "max over classes of H(class share)"),
    ]
    if "R0" in scores and report_r0:
        r0 = scores["R0"]
        rows += [_row("R0", r0.score, None, n), _row("R0_acc", r0.acc, None, n),
                 _row("R0_convergence", r0.convergence, None, None,
                      f"{r0.hparams.get('steps')} steps")]
    if "R1" in scores:
        r1 = scores["R1"]
        rows += [_row("R1", r1.score, None, n, f"mu {mu}"), _row("R1_ce", r1.ce, None, n),
                 _row("R1_acc", r1.acc, None, n), _row("R1_density", r1.density, None, n),
                 _row("R1_convergence", r1.convergence, None, None,
                      f"{r1.hparams.get('steps')} steps")]
    rows += [
        _row("gate_density", stats["density"], None, None, source),
        _row("gate_l1_density", stats["l1_density"], None, None, source),
        _row("gate_peakedness", stats["peakedness"], None, None, source),
        _row("channels_per_class", stats["channels_per_class"], None, None,
             f"min {stats['channels_per_class_min']:.0f}, max {stats['channels_per_class_max']:.0f}"),
        _row("classes_per_channel", stats["classes_per_channel"], None, None,
             f"min {stats['classes_per_channel_min']:.0f}, max {stats['classes_per_channel_max']:.0f}"),
        _row("empty_clusters", float(stats["empty_clusters"]), None, None),
        _row("unassigned_channels", float(stats["unassigned_channels"]), None, None),
    ]
    per_class = []
    for c in range(classes):
        pc = acc.per_class[c]
        cluster = clusters[c].cpu()
        row = {"class": c, "name": names[c] if c < len(names) else str(c), "n": pc.get("n", 0),
               "acc1": pc.get("acc1"), "acc2": pc.get("acc2"), "acc2_std": pc.get("acc2_std"),
               "acc3": pc.get("acc3"), "acc3_std": pc.get("acc3_std"),
               "acc2_det": pc.get("acc2_det"), "acc3_det": pc.get("acc3_det"),
               "own_cluster_removed": float(ablation[c, c]) if ablation is not None else None,
               "cluster_channels": int(cluster.sum()),
               "mi_max": float(mi[c].max()),
               "mi_cluster_mean": float(mi[c][cluster].mean()) if cluster.any() else float("nan"),
               "mi_mean": float(mi[c].mean())}
        for name, s_ in scores.items():
            if name == "R0" and not report_r0:
                continue
            row[f"{name.lower()}_ce"] = s_.per_class[c]["ce"]
            row[f"{name.lower()}_acc"] = s_.per_class[c]["acc"]
        per_class.append(row)
    return rows, per_class
