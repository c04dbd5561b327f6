"""Modified ReLU backward rules (guided backprop, DeconvNet) that every ReLU obeys.

The peer libraries override only ``nn.ReLU`` *modules* (captum, zennit): a functional
``F.relu`` (torchvision's DenseNet applies one before its pooling) is silently left as a plain
gradient, and state kept per module breaks where a module is called twice (ResNet's BasicBlock
reuses ``self.relu``); see ../shared/reference/attribution-libraries.md, "Pitfalls".

Here the rule is installed at the level of *functions*: while :func:`relu_rule` is active, a
:class:`~torch.overrides.TorchFunctionMode` replaces every call of ``F.relu``, ``torch.relu``,
``Tensor.relu`` (and their in-place forms), ``F.relu6`` and ``F.hardtanh(min_val=0)`` (which
``nn.ReLU6`` calls) with one stateless autograd function. ``nn.ReLU`` modules call ``F.relu``,
so modules, reused modules, functional calls and torch.fx-traced graphs are all covered, and
nothing is registered on the model. In-place calls become out-of-place (the result is returned
and used by every torchvision model; code that relies only on the side effect of an in-place
ReLU would not see the rule).

Backward rules for ``y = clamp(x, 0, upper)`` (``upper`` = inf for ReLU, 6 for ReLU6), with
``g`` the gradient arriving at ``y``:

- gradient (reference): ``g * 1[0 < x < upper]``
- guided backprop (Springenberg et al. 2014; seed 002): ``relu(g) * 1[0 < x < upper]``
- DeconvNet (Zeiler & Fergus 2014; seed 003, sec. 2): ``relu(g)`` (the forward mask is not used)
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float) -> torch.Tensor:
        out = x.clamp(min=0) if math.isinf(upper) else x.clamp(0, upper)
        mask = x > 0
        if not math.isinf(upper):
            mask &= x < upper
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad.clamp(min=0) * mask, None


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float) -> torch.Tensor:
        return x.clamp(min=0) if math.isinf(upper) else x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(min=0), None


RULES: dict[str, type[torch.autograd.Function]] = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}


def _relu(rule, input, inplace=False):
    return rule.apply(input, math.inf)


def _relu6(rule, input, inplace=False):
    return rule.apply(input, 6.0)


def _hardtanh(rule, input, min_val=-1.0, max_val=1.0, inplace=False):
    if float(min_val) != 0.0:
        return NotImplemented
    return rule.apply(input, float(max_val))


_HANDLERS = {
    F.relu: _relu,
    F.relu_: _relu,
    torch.relu: _relu,
    torch.relu_: _relu,
    torch.Tensor.relu: _relu,
    torch.Tensor.relu_: _relu,
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh,
}


class _ReLURuleMode(TorchFunctionMode):
    def __init__(self, rule: type[torch.autograd.Function]):
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self.rule, *args, **kwargs)
            if out is not NotImplemented:
                self.calls += 1
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rule(name: str) -> Iterator[_ReLURuleMode]:
    """Apply the backward rule ``name`` (``"guided"`` or ``"deconvnet"``) to every ReLU / ReLU6
    evaluated inside the block (forward values are unchanged). The yielded mode counts the
    rectifier calls it replaced (``mode.calls``)."""
    mode = _ReLURuleMode(RULES[name])
    with mode:
        yield mode
