"""Per-input scores of a CAV: sensitivities, sign count, magnitude and seed 000's interventional
I+ / I- (TCAV, Kim et al. 2018; seed ``000_d60c53f3ec4d0e03.txt``).

Definitions (a = the layer's output for one input, flattened to D = K*h*w values, C order):

Sensitivity and scores (per CAV, over the class-c inputs X_c)
    S(x) = grad_a logit_c(tail(a(x))) . v -- the directional derivative of the class logit
    along the CAV (``layers.split_at``: the model cut at the layer; skip inputs of a ResNet
    block held fixed). tcav differentiates the loss and counts S < 0: the same thing.
    sign count  TCAV_Q = mean_x 1{S(x) > 0}
    magnitude   = sum_x |S(x)| 1{S(x) > 0} / sum_x |S(x)|  (captum's ``magnitude``: the share of
                the total sensitivity mass that is positive, in [0, 1]; 0 when every S is 0).
                The mean of S is also reported, as ``sensitivity_mean``.
    I+          = mean_{x in D} 1{p_c(tail(a + eps v)) > p_c(tail(a))}   (seed 000)
    I-          = mean_{x in D} 1{p_c(tail(a - eps v)) < p_c(tail(a))}
                D: seed 000 averages over the whole test set, every class's images
                (``intervention_inputs="all"``, the default); ``"class"`` restricts D to X_c
                like the sign count (the behaviour before the option).
                p_c = softmax of the logits, compared as float64 log-probabilities (strict: an
                unchanged probability counts for neither). ``step_units="absolute"``: eps =
                ``step`` (default 1.0: seed 000 adds the unit CAV itself); ``"norm"``: eps =
                ``step * ||a(x)||`` per input (a step relative to the activation's size).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from cnnexplain.config.tcav import STEP_UNITS
from cnnexplain.errors import UsageError


def logit_gradients(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                    class_index: int, batch_size: int = 64) -> torch.Tensor:
    """d logit_c / d a for each input: acts [n, *layer_shape] (and the tail's extra inputs, each
    [n, ...]) -> float32 [n, D] on the CPU, D = prod(layer_shape). Computed in batches on the
    device of ``acts``."""
    out = []
    for s in range(0, acts.shape[0], batch_size):
        a = acts[s:s + batch_size].detach().clone().requires_grad_(True)
        ex = [e[s:s + batch_size].clone() for e in extras]
        with torch.enable_grad():
            logits = tail(a.clone(), *ex)  # clone: the tail may start with an in-place op
            _check_class(class_index, logits)
            (grad,) = torch.autograd.grad(logits[:, class_index].sum(), a)
        out.append(grad.reshape(grad.shape[0], -1).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, int(np.prod(acts.shape[1:]))))


def _check_class(class_index: int, logits: torch.Tensor) -> None:
    if not 0 <= class_index < logits.shape[1]:
        raise UsageError(f"target class {class_index} is out of range: the model has "
                         f"{logits.shape[1]} classes", f"pass `target` 0..{logits.shape[1] - 1}")


def directional_derivatives(grads, vector) -> np.ndarray:
    """S = grads [n, D] . vector [D] -> float64 [n] (the sensitivity of each input)."""
    g = torch.as_tensor(grads).to(torch.float64)
    v = torch.as_tensor(np.asarray(vector)).to(torch.float64).reshape(-1)
    return (g.reshape(g.shape[0], -1) @ v).numpy()


def sign_count(sensitivities) -> float:
    """TCAV_Q: the fraction of inputs with S > 0 (strict)."""
    s = np.asarray(sensitivities, dtype=np.float64)
    return float((s > 0).mean()) if s.size else float("nan")


def magnitude(sensitivities) -> float:
    """captum's magnitude score: sum |S| 1{S > 0} / sum |S| (0 when every S is 0)."""
    s = np.asarray(sensitivities, dtype=np.float64)
    total = float(np.abs(s).sum())
    return float(s[s > 0].sum() / total) if total > 0 else 0.0


def class_log_probs(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                    class_index: int, batch_size: int = 64) -> torch.Tensor:
    """log p_c(tail(a)) as float64 [n] on the CPU (log-softmax of the float32 logits in float64,
    so that probabilities near 1 still compare)."""
    out = []
    with torch.no_grad():
        for s in range(0, acts.shape[0], batch_size):
            logits = tail(acts[s:s + batch_size].clone(), *[e[s:s + batch_size].clone()
                                                             for e in extras])
            _check_class(class_index, logits)
            out.append(torch.log_softmax(logits.double(), dim=1)[:, class_index].cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def interventional_scores(tail: nn.Module, acts: torch.Tensor, extras: Sequence[torch.Tensor],
                          vector, class_index: int, step: float = 1.0,
                          step_units: str = "absolute", base: torch.Tensor | None = None,
                          batch_size: int = 64) -> tuple[float, float]:
    """Seed 000's (I+, I-) for one CAV: the fractions of inputs whose class probability rises
    when eps v is added to the layer activation, and falls when it is subtracted (module
    docstring; eps = ``step``, or ``step * ||a||`` per input with ``step_units="norm"``).
    acts [n, *layer_shape]; vector [D]; ``base``: precomputed :func:`class_log_probs`."""
    if step_units not in STEP_UNITS:
        raise UsageError(f"unknown `step_units` {step_units!r}", "pass absolute or norm")
    v = torch.as_tensor(np.asarray(vector), dtype=acts.dtype, device=acts.device)
    v = v.reshape(acts.shape[1:])
    if base is None:
        base = class_log_probs(tail, acts, extras, class_index, batch_size)
    if acts.shape[0] == 0:
        return float("nan"), float("nan")
    plus, minus = [], []
    with torch.no_grad():
        for s in range(0, acts.shape[0], batch_size):
            a = acts[s:s + batch_size]
            ex = [e[s:s + batch_size] for e in extras]
            eps = torch.full((a.shape[0],), float(step), dtype=a.dtype, device=a.device)
            if step_units == "norm":
                eps = eps * torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1)
            delta = eps.view(-1, *([1] * (a.dim() - 1))) * v
            plus.append(torch.log_softmax(tail(a + delta, *[e.clone() for e in ex]).double(),
                                          1)[:, class_index].cpu())
            minus.append(torch.log_softmax(tail(a - delta, *[e.clone() for e in ex]).double(),
                                           1)[:, class_index].cpu())
    up = torch.cat(plus) > base
    down = torch.cat(minus) < base
    return float(up.double().mean()), float(down.double().mean())
