"""Class-specific gates at one conv layer: the W matrix of CDCNN and the P matrix of PICNN.

A gate relates the ``K`` channels (filters) of a target layer to the ``C`` classes. Every gate
exposes the same *effective membership* ``matrix() -> [K, C]`` in [0, 1]:

- ``cdcnn-r1p2`` (seed ``000_d60c53f3ec4d0e03.txt``, problem R1P2, update algorithm 1): ``W`` is
  the parameter itself, ``W in [0,1]^{K x C}``; after each optimizer step every channel's row is
  divided by its max and clipped to [0, 1] (:meth:`R1P2Gate.project_`), so ``||W_k||_inf = 1``.
- ``cdcnn-r1p1`` (seed 000, problem R1P1, update algorithm 2): ``W = sigmoid(Omega / delta)``;
  after each step every row of ``Omega`` is mapped linearly onto [-1, 1] (its min to -1, its max
  to 1) and ``delta`` is annealed *down* so that ``W`` tends to {0, 1}. (The seed's text says
  delta "becomes larger"; ``sigmoid(Omega/delta)`` only tends to {0, 1} as delta -> 0, which is
  what its stated goal needs, so delta decreases here.)
- ``cdcnn-r0p1`` (seed 000, problem R0P1, update algorithm 3): ``W_k = softmax(Omega_k / delta)``
  over classes, same row rescaling, delta annealed towards 0 so that each row tends to one-hot
  (each channel serves exactly one class).
- ``picnn`` (seed ``004_64660bc76be64243.txt``): the filter-class correspondence matrix
  ``P in [0,1]^{C x N}`` (the paper's K classes x N filters); ``matrix()`` is ``P^T``. Here
  ``P = softmax(Theta / T, dim=classes)``: each filter's column is a distribution over classes
  (as in the reference code), but ``Theta`` is initialized with small random logits and trained
  in its own optimizer group with a larger learning rate (``gate_lr``): the reference notes
  (../shared/reference/gated-training.md) show that with Adam at lr 1e-3 ``P`` barely leaves
  its uniform start, so its "clusters" are random.

The gated forward multiplies the layer's maps by a per-image channel mask ``[B, K]``:
``gated_logits = tail(a * mask[:, :, None, None])`` with ``a, *extras = body(x)`` from
:func:`cnnexplain.models.layers.split_at`, so the body runs once (:class:`GatedNetwork`).

- CDCNN (seed 000): ``mask = W[:, y]^T`` with the true label ``y`` (``Ã_k = W_{k,y} A_k``), in
  training only (or the pseudo-label, ``label_source="pseudo"``, PICNN's remedy against label
  leakage).
- PICNN (seed 004): a pseudo-label ``ỹ ~ Cat(softmax(y_1))`` drawn with the straight-through
  reparameterization of eq. 8-9, the row ``p = ỹ^T P``, and ``z ~ Ber(p)`` drawn with the
  reparameterization of eq. 5-6 (``z = p + eta``, ``eta`` constant: binary forward, identity
  backward). By default only samples with ``ỹ == y`` count in ``L_int`` (as the reference code
  does); ``samples="all"`` (``gate_samples`` all) counts every sample, as seed 004's
  ``L_int = H(y, y_2)`` reads (:meth:`Gate._weight`).

- Wrong-mask term (``lambda_neg`` of ``train-gated``, not in the seeds, against label leakage):
  :class:`GatedNetwork` also runs the tail on the maps masked by the row of a class drawn
  uniformly among the others (:meth:`Gate.other_class`); the training loss pulls that answer
  towards uniform (:func:`cnnexplain.training.loop.wrong_mask_loss`).

Checkpoints store the effective matrix as ``gate["W"]`` ``[K, C]`` (cdcnn-*) or ``gate["P"]``
``[C, K]`` (picnn) plus the raw parameters needed to resume (``Omega``, ``Theta``, ``delta``,
``temperature``), and ``meta["gate"] = {"kind", "layer", "threshold", ...}``. Every consumer
(gated-cam, dissect, evaluate-entanglement) uses :func:`gate_matrix` and :func:`class_clusters`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnexplain.config.train import METHODS
from cnnexplain.errors import CnnexplainError, UsageError

def check_choice(name: str, value: str) -> None:
    """One-line usage error unless ``value`` is one of the choices :class:`~cnnexplain.config.
    train.TrainConfig` declares for field ``name`` (``gate_label``, ``gate_samples``,
    ``gated_tail``); the gate constructors call it, ``TrainConfig.validate`` checks the same
    declaration before anything is written."""
    from cnnexplain.config.fields import check_field
    from cnnexplain.config.train import TrainConfig

    check_field(TrainConfig, name, value)


DEFAULT_THRESHOLD = 0.5
"""Membership above which a channel belongs to a class's cluster (``W > t`` / ``P > t``)."""


# ---------------------------------------------------------------------------------------------
# The two reparameterized draws of seed 004
# ---------------------------------------------------------------------------------------------

def bernoulli_st(p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``z ~ Ber(p)`` by seed 004 eq. 5-6: ``z = p + eta`` with ``eta = 1 - p`` where
    ``p >= eps`` and ``-p`` otherwise, ``eps ~ U(0, 1)`` given (same shape as ``p``).

    The forward value is exactly binary (eq. 7, Theorem 1: ``E[z] = p``); ``eta`` is a constant,
    so ``dz/dp = 1`` (straight-through).
    """
    hard = (p >= eps).to(p.dtype)
    return p + (hard - p).detach()


def gumbel_st(p: torch.Tensor, eps: torch.Tensor, tau: float) -> torch.Tensor:
    """``z ~ Ber(p)`` by the Gumbel-softmax (binary Concrete) relaxation with a straight-through
    hard sample (Jang et al. 2017; Maddison et al. 2017), the alternative seed 004 compares its
    reparameterization with: logistic noise ``L = log(eps) - log(1 - eps)``, soft sample
    ``s = sigmoid((logit(p) + L) / tau)``, forward value ``1[s > 1/2]`` (a Bernoulli(p) draw),
    gradient ``ds/dp``. ``eps ~ U(0, 1)`` given (same shape as ``p``)."""
    q = p.clamp(1e-6, 1 - 1e-6)
    e = eps.clamp(1e-6, 1 - 1e-6).to(q.dtype)
    soft = torch.sigmoid((torch.log(q) - torch.log1p(-q) + torch.log(e) - torch.log1p(-e)) / tau)
    hard = (soft > 0.5).to(p.dtype)
    return soft + (hard - soft).detach()


def categorical_st(probs: torch.Tensor, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ỹ ~ Cat(probs)`` by seed 004 eq. 8-9, with ``xi ~ U(0, 1)`` given (``[B]``).

    ``probs``: ``[B, C]`` (softmax of the discrimination pathway's logits ``y_1``). Returns
    ``(onehot_st [B, C], index [B])``: ``onehot_st = probs + tau`` with ``tau`` constant, so the
    forward value is the one-hot of the class ``k`` with ``cum[k-1] < xi <= cum[k]`` (eq. 10,
    Theorem 2) and the gradient flows to ``probs`` unchanged.
    """
    cum = probs.detach().cumsum(dim=1)
    index = torch.searchsorted(cum, xi.to(cum.dtype).unsqueeze(1).contiguous()).squeeze(1)
    index = index.clamp_(max=probs.shape[1] - 1)
    hard = F.one_hot(index, probs.shape[1]).to(probs.dtype)
    return probs + (hard - probs).detach(), index


@dataclass
class GateNoise:
    """The uniform numbers one training step's draws use: ``xi`` ``[B]`` for the pseudo-label
    (eq. 9) and ``eps`` ``[B, K]`` for the Bernoulli mask (eq. 6). Drawn per step from a generator
    seeded by (seed, epoch, step) for the *global* batch, so a resumed run and a
    DistributedDataParallel run see exactly the draws of an uninterrupted single-process run."""

    xi: torch.Tensor
    eps: torch.Tensor
    other: torch.Tensor | None = None

    @staticmethod
    def draw(generator: torch.Generator, batch: int, channels: int) -> "GateNoise":
        """``xi`` and ``eps`` as above, then ``other`` ``[B]`` (uniform, for the wrong-mask class
        of :meth:`Gate.other_class`), drawn last so that the first two do not depend on it."""
        xi = torch.rand(batch, generator=generator, dtype=torch.float64).float()
        eps = torch.rand(batch, channels, generator=generator)
        other = torch.rand(batch, generator=generator, dtype=torch.float64).float()
        return GateNoise(xi=xi, eps=eps, other=other)

    def slice(self, start: int, stop: int, device) -> "GateNoise":
        other = None if self.other is None else self.other[start:stop].to(device)
        return GateNoise(xi=self.xi[start:stop].to(device), eps=self.eps[start:stop].to(device),
                         other=other)


@dataclass
class GateDraw:
    """What a gate contributes to one training step.

    ``mask`` ``[B, K]``: channel multipliers for the gated pathway; ``weight`` ``[B]``: 1 for the
    samples that count in the gated loss, 0 otherwise (PICNN: pseudo-label == label);
    ``index`` ``[B]``: the class row each sample used (true label or pseudo-label);
    ``other`` ``[B]`` and ``other_logits`` ``[B, C]`` (only with the wrong-mask term,
    :class:`GatedNetwork` ``wrong_mask=True``): a class other than the true label per sample and
    the tail's logits on the maps masked by that class's membership row.
    """

    mask: torch.Tensor
    weight: torch.Tensor
    index: torch.Tensor
    other: torch.Tensor | None = None
    other_logits: torch.Tensor | None = None
    complement_logits: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Gate modules
# ---------------------------------------------------------------------------------------------

class Gate(nn.Module):
    """Base class: ``channels`` K x ``classes`` C membership; see the module docstring.

    Hyper-parameters live in ``self.hparams`` (JSON-able, recorded in ``meta["gate"]``).
    """

    kind: str = ""
    matrix_key: str = "W"
    description: str = ""

    def __init__(self, channels: int, classes: int, threshold: float = DEFAULT_THRESHOLD,
                 label_source: str = "true", samples: str = "matched", **hparams):
        super().__init__()
        if channels < 1 or classes < 2:
            raise UsageError(f"a class-specific gate needs at least 1 channel and 2 classes, got "
                             f"{channels} channels and {classes} classes",
                             "train on a dataset with at least two classes")
        check_choice("gate_label", label_source)
        check_choice("gate_samples", samples)
        self.channels = int(channels)
        self.classes = int(classes)
        self.samples = samples
        self.threshold = float(threshold)
        self.label_source = label_source
        self.hparams = dict(hparams)

    # -- the interface every consumer uses ------------------------------------------------------
    def matrix(self) -> torch.Tensor:
        """Effective channel-class membership ``[K, C]`` in [0, 1]."""
        raise TypeError(f"{type(self).__name__} must define matrix()")

    def mask(self, index: torch.Tensor) -> torch.Tensor:
        """Deterministic gated-forward mask ``[B, K]`` for class indices ``index`` ``[B]``:
        the membership of every channel in class ``index[b]`` (``W[:, y]^T`` / ``P[y]``).

        Computed as ``onehot(index) @ M^T`` rather than by indexing: the backward of an index is
        an accumulating scatter whose summation order varies between runs on a multi-threaded
        CPU, which made cdcnn-* training irreproducible at ResNet-18 scale; the matmul's is fixed."""
        m = self.matrix()
        return F.one_hot(index, self.classes).to(m.dtype) @ m.t()

    def project_(self) -> None:
        """The post-step constraint of the method's update algorithm (in place, no grad)."""

    def regularizer(self) -> torch.Tensor:
        """The gate's penalty term (0 for methods without one)."""
        return self.matrix().new_zeros(())

    def anneal(self, progress: float) -> None:
        """Set annealed hyper-parameters for ``progress`` in [0, 1] of the gated training."""

    def draw(self, logits: torch.Tensor, labels: torch.Tensor, noise: GateNoise) -> GateDraw:
        """The training-time mask for a batch (``logits``: the full pathway's ``[B, C]``)."""
        if self.label_source == "pseudo":
            onehot, index = categorical_st(torch.softmax(logits.float(), dim=1), noise.xi)
            mask = onehot @ self.matrix().t()
            return GateDraw(mask=mask, weight=self._weight(index, labels), index=index)
        mask = self.mask(labels)
        return GateDraw(mask=mask, weight=torch.ones_like(labels, dtype=mask.dtype), index=labels)

    def other_class(self, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A class other than ``labels`` ``[B]``, uniform over the other ``C - 1`` classes given
        ``u ~ U(0, 1)`` ``[B]``: ``(y + 1 + floor(u (C - 1))) mod C``."""
        steps = (u.to(torch.float64) * (self.classes - 1)).floor().long()
        shift = 1 + steps.clamp_(min=0, max=self.classes - 2)
        return (labels + shift.to(labels.device)) % self.classes

    def _weight(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which samples count in the gated loss when the mask row is a pseudo-label ``index``:
        all of them (``samples="all"``, seed 004's ``L_int = H(y, y_2)``: a mask row that is
        not the true class must still lead to ``y``, so the mask pattern alone cannot give the
        answer) or only those with ``index == labels`` (``"matched"``, the reference code)."""
        if self.samples == "all":
            return torch.ones_like(labels, dtype=torch.float32)
        return (index == labels).float()

    # -- statistics --------------------------------------------------------------------------
    @torch.no_grad()
    def density(self) -> float:
        """Fraction of channel-class pairs above the threshold (binary density)."""
        return float((self.matrix() > self.threshold).float().mean())

    @torch.no_grad()
    def l1_density(self) -> float:
        """``||W||_1 / (K C)`` (what the CSG paper calls the gate's L1 density)."""
        return float(self.matrix().mean())

    @torch.no_grad()
    def peakedness(self) -> float:
        """Mean over channels of the largest share of one class in the channel's row
        (``max_c M[k, c] / sum_c M[k, c]``): 1/C for a uniform gate, 1 for one-hot rows."""
        return peakedness(self.matrix())

    # -- checkpoints ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint's ``gate`` dict stores: the effective matrix under
        :attr:`matrix_key` plus the raw parameters (:meth:`load_state_tensors` restores them)."""
        with torch.no_grad():
            m = self.matrix().detach().float().cpu()
        out = {self.matrix_key: m if self.matrix_key == "W" else m.t().contiguous()}
        out.update({k: v.detach().cpu().clone() for k, v in self.raw_tensors().items()})
        return out

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raw = self.raw_tensors()
        missing = [k for k in raw if k not in tensors]
        if missing:
            raise CnnexplainError(f"the checkpoint's gate lacks {missing[0]!r}",
                                  "re-create it with cnnexplain train-gated")
        with torch.no_grad():
            for k, t in raw.items():
                src = tensors[k]
                if tuple(src.shape) != tuple(t.shape):
                    raise CnnexplainError(f"the checkpoint's gate tensor {k!r} has shape "
                                          f"{list(src.shape)}, expected {list(t.shape)}",
                                          "resume with the options the run was started with")
                t.copy_(src.to(t.device, t.dtype))

    def describe(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "classes": self.classes,
                "threshold": self.threshold, "label_source": self.label_source,
                "samples": self.samples, **self.hparams}


def _rescale_rows_(omega: torch.Tensor) -> None:
    """Seed 000 algorithms 2-3: ``Omega_k = 2 (Omega_k - min Omega_k) / (max - min) - 1``.
    Rows whose range is (numerically) zero are left unchanged."""
    lo = omega.amin(dim=1, keepdim=True)
    hi = omega.amax(dim=1, keepdim=True)
    span = hi - lo
    ok = span > 1e-12
    scaled = 2 * (omega - lo) / torch.where(ok, span, torch.ones_like(span)) - 1
    omega.copy_(torch.where(ok, scaled, omega))


def _l12(w: torch.Tensor) -> torch.Tensor:
    """``||W||_{1,2} = sqrt(sum_k ||W_k||_1^2)`` (seed 000, problem P2)."""
    return w.abs().sum(dim=1).pow(2).sum().clamp_min(1e-12).sqrt()


class R1P2Gate(Gate):
    """CDCNN R1P2 / algorithm 1 (seed 000): ``W in [0,1]^{K x C}``, ``||W_k||_inf = 1``, loss
    ``CE(y, ŷ) + λ1 CE(y, ŷ_W) + λ2 ||W||_{1,2}``; :meth:`project_` divides each row by its max
    and clips to [0, 1]. ``W`` starts uniform in [0, 1] and row-normalized: a constant start
    (the reference code's 0.5) stays all-ones under max-normalization (the gate collapse of the
    reference notes), while from a random start the uniform push of the sparsity term followed by
    the max-normalization shrinks every entry but each row's largest, unless the gated
    cross-entropy holds it up."""

    kind = "cdcnn-r1p2"
    description = "W in [0,1], rows max-normalized and clipped after each step (algorithm 1)"

    def __init__(self, channels: int, classes: int, **kw):
        super().__init__(channels, classes, **kw)
        self.W = nn.Parameter(torch.rand(channels, classes))
        self.project_()

    def matrix(self) -> torch.Tensor:
        return self.W

    @torch.no_grad()
    def project_(self) -> None:
        w = self.W
        w.clamp_(min=0.0)
        top = w.amax(dim=1, keepdim=True)
        w.div_(torch.where(top > 0, top, torch.ones_like(top)))
        # a row that fell to all zeros gets back a uniform row (max 1) rather than dying
        w.copy_(torch.where(top > 0, w, torch.ones_like(w)))
        w.clamp_(0.0, 1.0)

    def regularizer(self) -> torch.Tensor:
        return _l12(self.W)

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "W" not in tensors or tuple(tensors["W"].shape) != tuple(self.W.shape):
            raise CnnexplainError("the checkpoint's gate W is missing or has the wrong shape",
                                  "resume with the options the run was started with")
        with torch.no_grad():
            self.W.copy_(tensors["W"].to(self.W.device, self.W.dtype))


class _AnnealedGate(Gate):
    """``Omega in [-1,1]^{K x C}`` with a temperature ``delta`` annealed geometrically from
    ``delta_start`` to ``delta_end`` over the gated training (seed 000 algorithms 2-3)."""

    def __init__(self, channels: int, classes: int, delta_start: float = 1.0,
                 delta_end: float = 0.05, **kw):
        if not (delta_start > 0 and delta_end > 0):
            raise UsageError(f"`delta_start` and `delta_end` must be positive, got {delta_start} "
                             f"and {delta_end}", "pass e.g. `delta_start=1` `delta_end=0.05`")
        super().__init__(channels, classes, delta_start=float(delta_start),
                         delta_end=float(delta_end), **kw)
        self.Omega = nn.Parameter(torch.rand(channels, classes) * 2 - 1)
        self.register_buffer("delta", torch.tensor(float(delta_start)))
        self.project_()

    def anneal(self, progress: float) -> None:
        p = min(max(float(progress), 0.0), 1.0)
        d0, d1 = self.hparams["delta_start"], self.hparams["delta_end"]
        self.delta.fill_(d0 * (d1 / d0) ** p)

    @torch.no_grad()
    def project_(self) -> None:
        _rescale_rows_(self.Omega)

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        return {"Omega": self.Omega, "delta": self.delta}


class R1P1Gate(_AnnealedGate):
    """CDCNN R1P1 / algorithm 2 (seed 000): ``W = sigmoid(Omega / delta)``, loss as R1P2's
    (``λ2 ||W||_{1,2}`` relaxes ``||W||_0``); as delta -> 0 every entry tends to 0 or 1 and each
    row keeps a 1 (its max, Omega = 1) and a 0 (its min, Omega = -1)."""

    kind = "cdcnn-r1p1"
    description = "W = sigmoid(Omega/delta), Omega rows rescaled to [-1,1], delta annealed (algorithm 2)"

    def matrix(self) -> torch.Tensor:
        return torch.sigmoid(self.Omega / self.delta)

    def regularizer(self) -> torch.Tensor:
        return _l12(self.matrix())


class R0P1Gate(_AnnealedGate):
    """CDCNN R0P1 / algorithm 3 (seed 000): ``W_k = softmax(Omega_k / delta)`` over classes,
    loss ``CE(y, ŷ) + λ1 CE(y, ŷ_W)`` (no sparsity term: the softmax rows are the constraint);
    as delta -> 0 each row tends to one-hot (each channel serves exactly one class)."""

    kind = "cdcnn-r0p1"
    description = "W_k = softmax(Omega_k/delta), annealed to one-hot rows (algorithm 3)"

    def matrix(self) -> torch.Tensor:
        return torch.softmax(self.Omega / self.delta, dim=1)


class PICNNGate(Gate):
    """PICNN (seed 004): ``P = softmax(Theta / T, dim=classes)`` ``[C, N]``; ``matrix() = P^T``.

    ``Theta`` starts at ``init_scale * N(0, 1)`` (symmetry broken, P near uniform) and should be
    trained with its own, larger learning rate (``gate_lr``). Training draws use pseudo-labels
    (eq. 8-9) and Bernoulli masks (eq. 5-6); see :meth:`Gate.draw`.
    """

    kind = "picnn"
    matrix_key = "P"
    description = "P = softmax over classes per filter, Bernoulli masks from pseudo-labels"

    def __init__(self, channels: int, classes: int, temperature: float = 1.0,
                 init_scale: float = 0.01, sampling: str = "bernoulli",
                 gumbel_temperature: float = 0.5, **kw):
        if temperature <= 0:
            raise UsageError(f"`gate_temperature` must be positive, got {temperature}",
                             "pass e.g. `gate_temperature=1`")
        check_choice("gate_sampling", sampling)
        kw["label_source"] = "pseudo"
        super().__init__(channels, classes, temperature=float(temperature),
                         init_scale=float(init_scale), sampling=sampling,
                         gumbel_temperature=float(gumbel_temperature), **kw)
        self.sampling = sampling
        self.gumbel_temperature = float(gumbel_temperature)
        self.Theta = nn.Parameter(torch.randn(classes, channels) * float(init_scale))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def probabilities(self) -> torch.Tensor:
        """``P`` ``[C, N]``: each filter's column is a distribution over classes."""
        return torch.softmax(self.Theta / self.temperature, dim=0)

    def matrix(self) -> torch.Tensor:
        return self.probabilities().t()

    def draw(self, logits: torch.Tensor, labels: torch.Tensor, noise: GateNoise) -> GateDraw:
        onehot, index = categorical_st(torch.softmax(logits.float(), dim=1), noise.xi)  # eq. 8-9
        p = onehot @ self.probabilities()                                              # [B, N]
        z = bernoulli_st(p, noise.eps) if self.sampling == "bernoulli" \
            else gumbel_st(p, noise.eps, self.gumbel_temperature)                      # eq. 5-6
        return GateDraw(mask=z, weight=self._weight(index, labels), index=index)

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        return {"Theta": self.Theta, "temperature": self.temperature}


GATES: dict[str, type[Gate]] = {g.kind: g for g in (R1P2Gate, R1P1Gate, R0P1Gate, PICNNGate)}
"""``method`` choices (declared in :mod:`cnnexplain.config.train`): ``std`` plus these;
tests/test_architecture.py checks the two agree."""


def make_gate(method: str, channels: int, classes: int, **hparams) -> Gate | None:
    """A freshly initialized gate for ``method`` (None for ``std``); uses the global torch RNG."""
    if method == "std":
        return None
    if method not in GATES:
        from cnnexplain.errors import close_matches

        raise UsageError(f"unknown method {method!r}{close_matches(method, METHODS)}",
                         f"choose one of: {', '.join(METHODS)}")
    cls = GATES[method]
    import inspect

    accepted = set()
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        accepted |= set(inspect.signature(klass.__init__).parameters)
    kw = {k: v for k, v in hparams.items() if k in accepted and v is not None}
    return cls(channels, classes, **kw)


# ---------------------------------------------------------------------------------------------
# The gated network (one module, so that DistributedDataParallel sees one forward)
# ---------------------------------------------------------------------------------------------

def apply_mask(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a`` ``[B, K, *space]`` times ``mask`` ``[B, K]`` broadcast over space."""
    return a * mask.to(a.dtype).reshape(*mask.shape, *([1] * (a.dim() - 2)))


class GatedNetwork(nn.Module):
    """``body`` and ``tail`` of :func:`~cnnexplain.models.layers.split_at` plus an optional gate.

    ``forward(x, labels, noise) -> (logits [B, C], gated_logits [B, C] | None, GateDraw | None)``:
    the body runs once; the gated pathway re-runs only the tail on ``a * mask``. With
    ``wrong_mask=True`` the tail also runs on ``a`` masked by the membership row of another class
    (``draw.other``, :meth:`Gate.other_class`), giving ``draw.other_logits``: the wrong-mask
    term of ``train-gated``'s ``lambda_neg``. With ``complement=True`` it runs on ``a`` masked
    by one minus the true class's row (every channel but the class's own), giving
    ``draw.complement_logits``: the complement term of ``lambda_comp``.
    Parameters are shared with the network the split was made from.
    """

    def __init__(self, body: nn.Module, tail: nn.Module, gate: Gate | None,
                 gated_tail: str = "shared", wrong_mask: bool = False,
                 complement: bool = False):
        super().__init__()
        check_choice("gated_tail", gated_tail)
        self.body = body
        self.tail = tail
        self.gate = gate
        self.gated_tail = gated_tail
        self.wrong_mask = bool(wrong_mask)
        self.complement = bool(complement)

    def _gated(self, a: torch.Tensor, extras) -> torch.Tensor:
        """The tail on the masked maps; with ``gated_tail="frozen"`` the gated loss reaches the
        body and the gate but not the tail's parameters (they get gradients from the full
        pathway only), so the tail cannot learn to read the mask pattern."""
        if self.gated_tail == "shared":
            return self.tail(a, *extras)
        from torch.func import functional_call

        params = {k: v.detach() for k, v in self.tail.named_parameters()}
        return functional_call(self.tail, params, (a, *extras))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                noise: GateNoise | None = None):
        a, *extras = self.body(x)
        logits = self.tail(a, *extras)
        if self.gate is None or labels is None or noise is None:
            return logits, None, None
        draw = self.gate.draw(logits, labels, noise)
        gated = self._gated(apply_mask(a, draw.mask), extras)
        if self.wrong_mask:
            draw.other = self.gate.other_class(labels, noise.other)
            draw.other_logits = self._gated(apply_mask(a, self.gate.mask(draw.other)), extras)
        if self.complement:
            draw.complement_logits = self._gated(apply_mask(a, 1 - self.gate.mask(labels)),
                                                 extras)
        return logits, gated, draw


# ---------------------------------------------------------------------------------------------
# Public helpers for every consumer of a gated checkpoint
# ---------------------------------------------------------------------------------------------

def gate_matrix(loaded) -> torch.Tensor | None:
    """The effective membership ``[K, C]`` of a :class:`~cnnexplain.models.loading.LoadedModel`
    (``gate["W"]`` for cdcnn-*, ``gate["P"]^T`` for picnn), or None for a model without a
    learned gate (std, plain torchvision weights)."""
    gate = getattr(loaded, "gate", None) or {}
    if "W" in gate:
        return gate["W"].detach().float().cpu()
    if "P" in gate:
        return gate["P"].detach().float().cpu().t().contiguous()
    return None


def gate_threshold(loaded, default: float = DEFAULT_THRESHOLD) -> float:
    """The cluster threshold recorded in ``meta["gate"]["threshold"]`` (else ``default``)."""
    meta = getattr(loaded, "meta", None) or {}
    g = meta.get("gate") or {}
    t = g.get("threshold")
    return float(t) if isinstance(t, (int, float)) else float(default)


def class_clusters(matrix: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Boolean ``[C, K]``: channel ``k`` is in class ``c``'s cluster iff ``matrix[k, c] >
    threshold`` (seed 004's class-specific filter clusters; P thresholded at 0.5, or W > t)."""
    if matrix.dim() != 2:
        raise ValueError(f"a gate matrix is [K, C], got shape {list(matrix.shape)}")
    return (matrix > threshold).t().contiguous()


def peakedness(matrix: torch.Tensor) -> float:
    """Mean over channels of ``max_c M[k, c] / sum_c M[k, c]`` for ``M`` ``[K, C]``."""
    m = matrix.detach().float().clamp_min(0)
    s = m.sum(dim=1).clamp_min(1e-12)
    return float((m.amax(dim=1) / s).mean())


def onehot_matrix(assignment: torch.Tensor, classes: int) -> torch.Tensor:
    """``[K, C]`` one-hot membership from a per-channel class index ``[K]``."""
    return F.one_hot(assignment.long(), classes).float()


def sort_channels(matrix: torch.Tensor) -> torch.Tensor:
    """Channel order for display: by argmax class, then by decreasing membership (``[K]``)."""
    m = matrix.detach().float()
    top, cls = m.max(dim=1)
    key = cls.double() * 4.0 - top.double()
    return torch.argsort(key, stable=True)


HELP: dict[str, str] = {
    "std": "plain cross-entropy on the same architecture (the baseline).",
    "cdcnn-r1p2": "seed 000 algorithm 1: W in [0,1] at the layer, loss CE + λ1·CE(gated by W[:, y]) "
                  "+ λ2·||W||_{1,2}, rows max-normalized and clipped after each step.",
    "cdcnn-r1p1": "seed 000 algorithm 2: W = σ(Ω/δ), Ω rows rescaled to [-1,1], δ annealed to "
                  "`delta_end` so W tends to {0,1}; loss as r1p2.",
    "cdcnn-r0p1": "seed 000 algorithm 3: W_k = softmax(Ω_k/δ), annealed to one-hot rows (one "
                  "class per channel); loss CE + λ1·CE(gated).",
    "picnn": "seed 004: P = softmax over classes per filter, Bernoulli masks (eq. 5-6) from "
             "pseudo-labels drawn from the model's own prediction (eq. 8-9); loss L_dis + λ·L_int.",
}


def describe_methods() -> str:
    return "; ".join(f"{k}: {v}" for k, v in HELP.items())

