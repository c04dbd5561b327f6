"""Layer-wise relevance propagation (zennit) and contrastive LRP (seed ``003_0c687514e405e536.txt``).

LRP redistributes the target logit ``z_c`` backwards layer by layer with local rules (Bach et
al. 2015; Montavon et al. 2017). The rules run on zennit (the field's LRP library) through a
*composite* (which rule for which layer) and *canonizers* (model rewrites that make the rules
apply: BatchNorm merged into the preceding linear layer, residual additions and concatenations
as modules). Both are registered for the duration of one call and always removed afterwards.

Composites (:data:`COMPOSITES`):

- ``epsilon`` (method ``lrp-epsilon``): zennit's ``EpsilonPlusFlat``: epsilon rule on dense
  layers, z+ on convolutions, flat rule on the first layer (biases take part, as in zennit).
- ``alpha2beta1`` (``lrp-alpha2beta1``): zennit's ``EpsilonAlpha2Beta1Flat``: alpha=2, beta=1 on
  convolutions, epsilon on dense layers, flat first layer.
- ``zplus`` (``lrp-zplus``, ``clrp1``, ``clrp2``): seed 003's setting (sec. 3.1): the z+ rule on
  every convolution *and* dense layer, the z^B (ZBox) rule on the first convolution with the
  bounds of normalized pixels ``((0 - mean) / std, (1 - mean) / std)``, biases bypassed
  (``zero_params=["bias"]``), BatchNorm bypassed (merged or passed through), max pooling
  winner-take-all (its gradient), average pooling and residual sums proportional to the inputs
  (zennit's Norm, which is the z+ rule of a layer with positive weights; the seed's text says
  "evenly" for average pooling, which would hand relevance to inactive units). Relevance is
  conserved: the input relevance sums to the seed (up to relevance that merged BatchNorm
  shifts would have explained: a neuron active only through its bias has no positive input
  contribution to pass it to, which happens in depthwise convolutions).

Every method seeds the output explicitly with ``onehot(c)`` (zennit's default would seed with
the whole output): one unit of relevance at the target logit, so for conserving rules ``raw``
sums to 1 (seed 003's Definition 1 with the score normalized to 1; multiply by ``z_c`` for the
logit units of captum's LRP). A unit seed keeps the *pattern* independent of the logit's sign and
size: under z+ the map of a class with a negative logit still shows the positive evidence for
it. raw ``[B, 3, H, W]`` is signed relevance; map = sum over colour channels.

CLRP (seed 003, sec. 4, eq. 2): ``CLRP = max(0, R(target) - R(dual))``, negatives clipped per
input variable, with the z+ composite:

- ``clrp1``: the dual concept is *all other classes*: the target's (unit) score is
  redistributed uniformly to the other ``C - 1`` output neurons (seed 003: "the score of target class is
  uniformly redistributed to other classes"; "we call the first modeling method CLRP1"): seed
  ``1`` at ``c`` and ``1 / (C - 1)`` at every other class.
- ``clrp2``: the dual concept is the target neuron with *negated last-layer weights*
  ``-W_c`` (seed 003: "the other way ... is to negate the weights"; "the second one CLRP2"),
  seeded with the same unit score.

LRP is linear in its output seed once the forward pass is fixed, so ``R(target) - R(dual)`` is
computed in *one* backward pass: CLRP1 seeds ``1`` at ``c`` and ``-1 / (C - 1)`` at every other
class; CLRP2 evaluates a temporary head with ``2C`` outputs ``[W; -W]`` (on a shallow copy of
the model, so the caller's model is untouched) and seeds ``1`` at ``c`` and ``-1`` at ``C + c``.
The tests check both against two separate zennit passes.

Canonizers by model type (:data:`CANONIZERS`): ResNet -> zennit's ``ResNetCanonizer`` blocks;
VGG, SmallCNN, plain ``nn.Sequential`` -> zennit's ``SequentialMergeBatchNorm``; AlexNet -> none
(no BatchNorm); DenseNet -> :class:`DenseNetCanonizer` and MobileNetV2 ->
:class:`MobileNetV2Canonizer` (written here: zennit has none). Every BatchNorm merge is made
output-exact (:class:`_ExactMerge`; zennit's leaves a factor ``1 / sqrt(1 + eps)`` per merged
layer). Other models (EfficientNet's squeeze-excitation products have no rule here) are refused
before computing.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torchvision
from torch import nn
from zennit.canonizers import (
    AttributeCanonizer,
    CompositeCanonizer,
    MergeBatchNorm,
    SequentialMergeBatchNorm,
)
from zennit.composites import (
    EpsilonAlpha2Beta1Flat,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite
from zennit.layer import Sum
from zennit.rules import ZBox, ZPlus
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Convolution

from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain.saliency.base import (
    Attribution,
    Context,
    ModelInfo,
    SaliencyMethod,
    last_linear_name,
    logits_of,
    register,
)
from cnnexplain.models.layers import get_module
from cnnexplain.models.smallcnn import SmallCNN

# --------------------------------------------------------------------------------------------
# Canonizers zennit does not ship
# --------------------------------------------------------------------------------------------

class _ExactMerge:
    """Mixin for zennit's BatchNorm merges: zennit leaves the merged BatchNorm computing
    ``x / sqrt(1 + eps)`` (running_var 1, eps kept), a factor 1 - 5e-6 per layer that adds up to
    1e-5 .. 1e-3 relative output changes in deep networks; setting ``eps`` to 0 for the duration
    of the merge makes the canonized model output-equivalent. ``remove`` restores ``eps``."""

    def register(self, linears, batch_norm):
        self._eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self._eps


class ExactSequentialMergeBatchNorm(_ExactMerge, SequentialMergeBatchNorm):
    """zennit's ``SequentialMergeBatchNorm`` (a BatchNorm right after a linear layer in
    registration order), output-exact (see :class:`_ExactMerge`)."""


class ResNetCanonizer(CompositeCanonizer):
    """zennit's ``ResNetCanonizer`` (blocks' residual sums as ``Sum`` modules) with the exact
    BatchNorm merge."""

    def __init__(self):
        super().__init__((ExactSequentialMergeBatchNorm(), ResNetBottleneckCanonizer(),
                          ResNetBasicBlockCanonizer()))


class DenseNetMergeBatchNorm(_ExactMerge, MergeBatchNorm):
    """Merge only the BatchNorms that directly follow a convolution in torchvision's DenseNet:
    ``features.conv0 -> features.norm0`` and, in every dense layer, ``conv1 -> norm2``.

    zennit's ``SequentialMergeBatchNorm`` pairs modules by registration order and would merge
    a dense layer's ``conv2`` into the *next* layer's ``norm1``, which normalizes the
    concatenation of all earlier features (wrong, or a shape error). The remaining
    pre-activation BatchNorms (``norm1``, transitions, ``norm5``) are passed through by the
    composites' BatchNorm rule (seed 003: "normalization layers are bypassed")."""

    def apply(self, root_module):
        from torchvision.models.densenet import _DenseLayer

        pairs = []
        for module in root_module.modules():
            if isinstance(module, torchvision.models.DenseNet):
                feats = module.features
                if hasattr(feats, "conv0") and hasattr(feats, "norm0"):
                    pairs.append((feats.conv0, feats.norm0))
            elif isinstance(module, _DenseLayer):
                pairs.append((module.conv1, module.norm2))
        instances = []
        for linear, norm in pairs:
            instance = self.copy()
            instance.register((linear,), norm)
            instances.append(instance)
        return instances


def _densenet_forward(self, x):
    features = self.features(x)
    out = self.canonizer_relu(features)
    out = self.canonizer_pool(out)
    return self.classifier(torch.flatten(out, 1))


def _densenet_attributes(name, module):
    if isinstance(module, torchvision.models.DenseNet):
        return {"forward": _densenet_forward.__get__(module), "canonizer_relu": nn.ReLU(),
                "canonizer_pool": nn.AdaptiveAvgPool2d((1, 1))}
    return None


class DenseNetCanonizer(CompositeCanonizer):
    """torchvision DenseNet: :class:`DenseNetMergeBatchNorm`, and the head's functional
    ``F.relu`` + ``F.adaptive_avg_pool2d`` replaced by modules (so the ReLU gets the pass rule
    and the pooling the Norm rule). Concatenations need nothing: their backward routes each
    part's relevance unchanged. Output-equivalent (tested)."""

    def __init__(self):
        super().__init__((DenseNetMergeBatchNorm(), AttributeCanonizer(_densenet_attributes)))


def _inverted_residual_forward(self, x):
    return self.canonizer_sum(torch.stack([x, self.conv(x)], dim=-1))


def _mobilenet_forward(self, x):
    x = self.features(x)
    x = self.canonizer_pool(x)
    return self.classifier(torch.flatten(x, 1))


def _mobilenet_attributes(name, module):
    from torchvision.models.mobilenetv2 import InvertedResidual

    if isinstance(module, InvertedResidual) and module.use_res_connect:
        return {"forward": _inverted_residual_forward.__get__(module), "canonizer_sum": Sum()}
    if isinstance(module, torchvision.models.MobileNetV2):
        return {"forward": _mobilenet_forward.__get__(module),
                "canonizer_pool": nn.AdaptiveAvgPool2d((1, 1))}
    return None


class MobileNetV2Canonizer(CompositeCanonizer):
    """torchvision MobileNetV2: BatchNorms merged into their convolutions (registration order
    is dataflow order in every ``Conv2dNormActivation`` and ``InvertedResidual``), residual
    additions ``x + conv(x)`` as a ``Sum`` module (Norm rule, as zennit's ResNet canonizer
    does), the head's functional pooling as a module. Output-equivalent (tested)."""

    def __init__(self):
        super().__init__((ExactSequentialMergeBatchNorm(),
                          AttributeCanonizer(_mobilenet_attributes)))


CANONIZERS: list[tuple[type, Callable[[], list]]] = [
    (torchvision.models.ResNet, lambda: [ResNetCanonizer()]),
    (torchvision.models.DenseNet, lambda: [DenseNetCanonizer()]),
    (torchvision.models.MobileNetV2, lambda: [MobileNetV2Canonizer()]),
    (torchvision.models.VGG, lambda: [ExactSequentialMergeBatchNorm()]),
    (torchvision.models.AlexNet, lambda: []),
    (SmallCNN, lambda: [ExactSequentialMergeBatchNorm()]),
    (nn.Sequential, lambda: [ExactSequentialMergeBatchNorm()]),
]
"""Model type -> canonizers (first match wins)."""

SUPPORTED = "resnet*, vgg*, alexnet, densenet*, mobilenet_v2, smallcnn"


def canonizers_for(model_type: type) -> list | None:
    for kind, make in CANONIZERS:
        if issubclass(model_type, kind):
            return make()
    return None


# --------------------------------------------------------------------------------------------
# Composites
# --------------------------------------------------------------------------------------------

def _pixel_bounds(context: Context, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(context.preprocessing.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(context.preprocessing.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def _epsilon(context: Context, canonizers, device, dtype) -> Composite:
    return EpsilonPlusFlat(epsilon=context.options.lrp_epsilon, canonizers=canonizers)


def _alpha2beta1(context: Context, canonizers, device, dtype) -> Composite:
    return EpsilonAlpha2Beta1Flat(epsilon=context.options.lrp_epsilon, canonizers=canonizers)


def _zplus(context: Context, canonizers, device, dtype) -> Composite:
    low, high = _pixel_bounds(context, device, dtype)
    no_bias = ["bias"]
    return SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZPlus(zero_params=no_bias)),
                                      (nn.Linear, ZPlus(zero_params=no_bias))],
        first_map=[(Convolution, ZBox(low=low, high=high, zero_params=no_bias))],
        canonizers=canonizers)


COMPOSITES: dict[str, Callable[..., Composite]] = {
    "epsilon": _epsilon,
    "alpha2beta1": _alpha2beta1,
    "zplus": _zplus,
}


def make_composite(rule: str, model: nn.Module, context: Context, device, dtype) -> Composite:
    canonizers = canonizers_for(type(model))
    if canonizers is None:
        raise UsageError(f"LRP has no canonizer for {context.backbone or type(model).__name__}",
                         f"use a backbone LRP supports ({SUPPORTED}) or a gradient method")
    return COMPOSITES[rule](context, canonizers, device, dtype)


def relevance(model: nn.Module, x: torch.Tensor, composite: Composite,
              seed_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R [B, 3, H, W], logits)``: one forward and one modified backward pass of ``model``
    under ``composite``, seeded with ``seed_fn(logits)``. The composite (hooks and canonizers)
    is removed before returning, also on error."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), composite.context(model) as modified:
        out = logits_of(modified, x)
        seed = seed_fn(out.detach())
        (rel,) = torch.autograd.grad(out, x, grad_outputs=seed)
    return rel, out.detach()


def with_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` in which the submodule ``name`` is ``new``; the modules along
    the path are shallow copies too, every other module (and parameter) is shared, and
    ``model`` itself is not modified."""
    parts = name.split(".")
    root = copy.copy(model)
    root.__dict__["_modules"] = dict(model._modules)
    parent = root
    for part in parts[:-1]:
        child = copy.copy(parent._modules[part])
        child.__dict__["_modules"] = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = new
    return root


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------

def onehot_seed(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Seed ``onehot(c)``: one unit of relevance at the target logit (conserving rules then
    distribute a total of 1; multiply by ``z_c`` for captum's logit units)."""
    def seed(out):
        s = torch.zeros_like(out)
        s.scatter_(1, targets.view(-1, 1), 1.0)
        return s
    return seed


class LRPMethod(SaliencyMethod):
    kind = "pixel"
    reduction = "sum"
    units = "relevance (unit seed)"
    rule = "zplus"
    option_names: tuple[str, ...] = ()

    def problem(self, info: ModelInfo):
        if canonizers_for(info.model_type) is None:
            return (f"{self.name} has no LRP canonizer for {info.label} (e.g. EfficientNet's "
                    "squeeze-excitation products have no LRP rule here)",
                    f"use a backbone LRP supports ({SUPPORTED}) or a gradient method")
        return super().problem(info)

    def composite(self, model, x, context) -> Composite:
        return make_composite(self.rule, model, context, x.device, x.dtype)

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        rel, _ = relevance(model, inputs, self.composite(model, inputs, context),
                           onehot_seed(targets))
        return Attribution(raw=rel, map=rel.sum(dim=1))


@register
class LRPEpsilon(LRPMethod):
    name = "lrp-epsilon"
    description = ("LRP, zennit EpsilonPlusFlat: epsilon on dense layers, z+ on convolutions, "
                   "flat first layer")
    citation = "Bach et al. 2015; seed 003; zennit EpsilonPlusFlat"
    rule = "epsilon"
    option_names = ("lrp_epsilon",)
    sign = "raw: signed relevance of a unit seed (biases absorb some); map: signed channel sum"
    peer = "zennit EpsilonPlusFlat"


@register
class LRPAlpha2Beta1(LRPMethod):
    name = "lrp-alpha2beta1"
    description = ("LRP, zennit EpsilonAlpha2Beta1Flat: alpha=2 beta=1 on convolutions, epsilon "
                   "on dense layers, flat first layer")
    citation = "Bach et al. 2015; seed 003; zennit EpsilonAlpha2Beta1Flat"
    rule = "alpha2beta1"
    option_names = ("lrp_epsilon",)
    sign = "raw: signed relevance; map: signed sum over channels"
    peer = "zennit EpsilonAlpha2Beta1Flat"


@register
class LRPZPlus(LRPMethod):
    name = "lrp-zplus"
    description = "LRP as in seed 003: z+ everywhere, zB first layer, biases bypassed; conserving"
    citation = "Montavon et al. 2017; seed 003 sec. 3.1"
    rule = "zplus"
    sign = "raw: relevance >= 0 mostly, sums to 1 (unit seed, conserved); map: sum over channels"
    peer = "zennit (same composite)"


class CLRPMethod(LRPMethod):
    rule = "zplus"
    sign = "raw: max(0, R_target - R_dual) >= 0; map: sum over channels, >= 0"

    def problem(self, info: ModelInfo):
        if info.num_classes < 2:
            return (f"{self.name} needs at least 2 classes (its dual concept is made of the "
                    f"other classes or the negated class weights)", "use lrp-zplus")
        return super().problem(info)


@register
class CLRP1(CLRPMethod):
    name = "clrp1"
    description = "contrastive LRP, dual = all other classes sharing the score (seed 003, CLRP1)"
    citation = "Gu, Yang & Tresp 2018; seed 003 sec. 4 (first modelling method)"
    peer = "zennit, two passes (target and dual) subtracted"

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        def seed(out):
            c = out.shape[1]
            if c < 2:
                raise UsageError("clrp1 needs at least 2 classes", "use lrp-zplus")
            s = torch.full_like(out, -1.0 / (c - 1))
            s.scatter_(1, targets.view(-1, 1), 1.0)
            return s

        rel, _ = relevance(model, inputs, self.composite(model, inputs, context), seed)
        raw = rel.clamp(min=0)
        return Attribution(raw=raw, map=raw.sum(dim=1))


@register
class CLRP2(CLRPMethod):
    name = "clrp2"
    description = "contrastive LRP, dual = target neuron with negated weights (seed 003, CLRP2)"
    citation = "Gu, Yang & Tresp 2018; seed 003 sec. 4 (second modelling method)"
    peer = "zennit, two passes (target and dual head) subtracted"

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        name = context.classifier or last_linear_name(model)
        head = get_module(model, name)
        if not isinstance(head, nn.Linear):
            raise CnnexplainError(f"clrp2 needs the classifier {name!r} to be nn.Linear, it is "
                                  f"{type(head).__name__}", "use clrp1")
        c = head.out_features
        dual = nn.Linear(head.in_features, 2 * c, bias=head.bias is not None).to(
            device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            dual.weight.copy_(torch.cat([head.weight, -head.weight]))
            if head.bias is not None:
                dual.bias.copy_(torch.cat([head.bias, -head.bias]))
        contrast = with_module(model, name, dual)

        def seed(out):
            if out.shape[1] != 2 * c:
                raise CnnexplainError(f"clrp2: the classifier {name!r} is not the model's last "
                                      "operation", "use clrp1")
            s = torch.zeros_like(out)
            s.scatter_(1, targets.view(-1, 1), 1.0)
            s.scatter_(1, targets.view(-1, 1) + c, -1.0)
            return s

        composite = make_composite(self.rule, model, context, inputs.device, inputs.dtype)
        rel, _ = relevance(contrast, inputs, composite, seed)
        raw = rel.clamp(min=0)
        return Attribution(raw=raw, map=raw.sum(dim=1))

