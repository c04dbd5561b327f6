"""Class activation maps: CAM, Grad-CAM and its counterfactual, guided and gated variants.

Layer methods: ``raw`` is ``[B, h, w]`` at the resolution of the explained layer, ``map`` its
bilinear upsampling to the input size. ``A`` ``[B, K, h, w]`` is the layer's output and
``z_c`` the target logit.

- ``cam`` (Zhou et al. 2016; seed 000, 类激活图): ``sum_k w_{c,k} F_k`` where ``F`` is the map
  that is globally average-pooled into the final linear layer with weights ``w``; only GAP
  networks have one. Signed, no ReLU, bias left out: ``mean(raw) + b_c = z_c``.
- ``gradcam`` (Selvaraju et al. 2017; seeds 000, 002): ``relu(sum_k alpha_k A_k)`` with
  ``alpha_k = mean_{ij} d z_c / d A_k[i, j]``.
- ``gradcam-counterfactual`` (seed 002, "Counterfactual Explanation"): the same with
  ``-alpha_k``: regions whose removal would make the prediction more confident.
- ``guided-gradcam`` (seed 002): guided backprop ``[B, 3, H, W]`` times the upsampled Grad-CAM
  (a pixel method; map: max-abs over channels).
- ``gated-cam`` / ``gated-cam-complement`` (seed ``004_64660bc76be64243.txt``, fig. 1 and 7):
  Grad-CAM where only the channels of the target class's cluster contribute
  (``relu(sum_{k in cluster(c)} alpha_k A_k)``), or only the other channels. The clusters are a
  gated checkpoint's ``class_clusters(gate_matrix(loaded), threshold)`` at the gated layer; the
  gradients ``alpha_k`` are those of the full (ungated) network.

The layer output is captured by a forward hook that hands a copy downstream, so an in-place
operation after the layer (DenseNet's ``F.relu(features, inplace=True)``) cannot change the
captured activations. A layer that runs more than once per forward pass is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnexplain.errors import UsageError
from cnnexplain.explain.saliency.base import (
    REDUCTIONS,
    Attribution,
    SaliencyMethod,
    last_linear_name,
    logits_of,
    register,
    target_scores,
    upsample,
)
from cnnexplain.explain.saliency.gradients import GuidedBackprop
from cnnexplain.models.layers import get_module


def layer_forward(model: nn.Module, x: torch.Tensor, layer: str, method: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, C], A [B, K, h, w])`` with ``A`` part of the autograd graph."""
    module = get_module(model, layer)
    store: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise UsageError(f"{method} needs a layer that outputs one tensor; {layer!r} returns "
                             f"{type(out).__name__}", "pass `layer` naming a conv block")
        store.append(out)
        return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = logits_of(model, x.detach().requires_grad_(True))
    finally:
        handle.remove()
    if len(store) != 1:
        raise UsageError(f"layer {layer!r} runs {len(store)} times per forward pass, so its "
                         f"output is ambiguous for {method}",
                         "choose a layer that runs exactly once, e.g. its parent block")
    a = store[0]
    if a.dim() != 4:
        raise UsageError(f"{method} needs a convolutional layer with output [B, C, h, w]; "
                         f"{layer!r} outputs {list(a.shape)}",
                         "pass `layer` naming a conv block, e.g. the backbone's default layer")
    return out, a


def gradcam_terms(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str,
                  method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha [B, K], A [B, K, h, w])``: Grad-CAM's channel weights (spatial mean of the
    target logit's gradient) and the layer's activations, one forward + backward pass."""
    with torch.enable_grad():
        out, a = layer_forward(model, x, layer, method)
        (grad,) = torch.autograd.grad(target_scores(out, targets).sum(), a)
    return grad.mean(dim=(2, 3)), a.detach()


def weighted_sum(alpha: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha[b, k] A[b, k]`` -> ``[B, h, w]``."""
    return torch.einsum("bk,bkhw->bhw", alpha, a)


class LayerCAM(SaliencyMethod):
    """Base of the Grad-CAM family: raw = relu(sum_k s * mask_k * alpha_k A_k)."""

    kind = "layer"
    needs_layer = True
    sign = "raw and map >= 0 (ReLU of the weighted channel sum)"
    units = "logit grad x activation"
    flip = 1.0

    def channel_mask(self, targets: torch.Tensor, channels: int, context, layer: str):
        return None

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        alpha, a = gradcam_terms(model, inputs, targets, layer, self.name)
        mask = self.channel_mask(targets, a.shape[1], context, layer)
        if mask is not None:
            alpha = alpha * mask.to(alpha)
        raw = torch.relu(self.flip * weighted_sum(alpha, a))
        return Attribution(raw=raw, map=upsample(raw, tuple(inputs.shape[-2:])))


@register
class GradCAM(LayerCAM):
    name = "gradcam"
    description = "Grad-CAM: ReLU of gradient-weighted layer channels (seeds 000, 002)"
    citation = "Selvaraju et al. 2017; seeds 000, 002"
    peer = "pytorch-grad-cam GradCAM / captum LayerGradCam"


@register
class GradCAMCounterfactual(LayerCAM):
    name = "gradcam-counterfactual"
    description = "counterfactual Grad-CAM: negated gradients, regions that lower the score"
    citation = "Selvaraju et al. 2017; seed 002"
    flip = -1.0
    peer = "captum LayerGradCam on the negated logit"


@register
class GatedCAM(LayerCAM):
    name = "gated-cam"
    description = "Grad-CAM from the target class's channel cluster of a gated checkpoint (seed 004)"
    citation = "seed 004, fig. 1 and 7 (PICNN)"
    needs_gate = True
    option_names = ("gate_threshold",)
    complement = False

    def channel_mask(self, targets, channels, context, layer):
        clusters = context.clusters
        if clusters is None:
            raise UsageError(f"{self.name} needs the class clusters of a gated checkpoint",
                             "pass `checkpoint` of a model trained with `cnnexplain train-gated`")
        if clusters.dim() != 2 or clusters.shape[1] != channels:
            raise UsageError(f"the gate's clusters are {list(clusters.shape)} (classes x channels) "
                             f"but layer {layer!r} has {channels} channels",
                             "leave out `layer` so that gated-cam explains the gated layer")
        if int(targets.max()) >= clusters.shape[0]:
            raise UsageError(f"target class {int(targets.max())} has no cluster (the gate has "
                             f"{clusters.shape[0]} classes)", "pass targets of the gated classes")
        mask = clusters.to(targets.device)[targets].bool()
        return ~mask if self.complement else mask


@register
class GatedCAMComplement(GatedCAM):
    name = "gated-cam-complement"
    description = "Grad-CAM from all channels outside the target class's cluster (seed 004)"
    complement = True


@register
class GuidedGradCAM(SaliencyMethod):
    name = "guided-gradcam"
    description = "guided Grad-CAM: guided backprop times upsampled Grad-CAM (seed 002)"
    citation = "Selvaraju et al. 2017; seed 002"
    kind = "pixel"
    reduction = "max-abs"
    needs_layer = True
    sign = "raw: signed (guided gradient times Grad-CAM >= 0); map: >= 0 (max-abs over channels)"
    units = "|guided grad| x Grad-CAM"
    peer = "captum GuidedGradCam"

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        alpha, a = gradcam_terms(model, inputs, targets, layer, self.name)
        cam = upsample(torch.relu(weighted_sum(alpha, a)), tuple(inputs.shape[-2:]))
        guided = GuidedBackprop().raw(model, inputs, targets, context)
        raw = guided * cam[:, None]
        return Attribution(raw=raw, map=REDUCTIONS[self.reduction][0](raw))


class _PoolCapture(TorchFunctionMode):
    """Records the inputs of global average pools (``F.adaptive_avg_pool2d`` to 1x1, which
    ``nn.AdaptiveAvgPool2d`` calls, and ``mean`` over the two spatial dimensions)."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            if func is F.adaptive_avg_pool2d and isinstance(out, torch.Tensor) \
                    and tuple(out.shape[-2:]) == (1, 1):
                self.inputs.append(x)
            elif func in (torch.mean, torch.Tensor.mean):
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                dims = {d % 4 for d in (dim if isinstance(dim, (tuple, list)) else [dim])} \
                    if dim is not None else set()
                if dims == {2, 3}:
                    self.inputs.append(x)
        return out


@register
class CAM(SaliencyMethod):
    name = "cam"
    description = "CAM: classifier weights times the globally pooled maps (GAP networks; seed 000)"
    citation = "Zhou et al. 2016; seed 000"
    kind = "layer"
    needs_gap = True
    sign = "raw and map signed (no ReLU); mean(raw) + bias = target logit"
    units = "logit units"
    peer = "captum LayerGradCam(relu=False) x h*w at the GAP input (same quantity)"

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        name = context.classifier or last_linear_name(model)
        head = get_module(model, name)
        capture = _PoolCapture()
        with torch.no_grad(), capture:
            logits_of(model, inputs)
        if not capture.inputs or not isinstance(head, nn.Linear) \
                or capture.inputs[-1].shape[1] != head.in_features:
            raise UsageError(f"cam needs a GAP network (global average pooling + one linear "
                             f"layer); {context.backbone or type(model).__name__} does not have "
                             "one", "use gradcam, which works on any CNN")
        pooled = capture.inputs[-1]
        weight = head.weight.detach()[targets]  # [B, K]
        raw = weighted_sum(weight.to(pooled), pooled)
        return Attribution(raw=raw, map=upsample(raw, tuple(inputs.shape[-2:])))
