"""The contract every saliency method follows, and the registry that holds them.

A method is a small object in :data:`METHODS` (name -> instance) with one call::

    attribution = METHODS[name].attribute(model, inputs, targets, layer=..., context=...)

- ``model``: an ``nn.Module`` in eval mode returning logits ``[B, C]``; never modified (LRP
  canonizers and rule hooks are undone before the call returns, also on error).
- ``inputs``: float ``[B, 3, H, W]``, already preprocessed (normalized) as the model expects.
- ``targets``: int64 ``[B]``, the class explained per image.
- ``layer``: dotted module name for layer methods (Grad-CAM family); ignored by pixel methods.
- ``context``: :class:`Context` (method options, the preprocessing, the classifier's name, a
  gated checkpoint's class clusters, the seed).

It returns an :class:`Attribution`:

- ``raw``: pixel methods ``[B, 3, H, W]`` signed and unnormalized (the method's own units, e.g.
  d logit / d input, or relevance that sums to the logit); layer methods ``[B, h, w]`` at the
  layer's resolution; ``None`` where a method has no meaningful raw form.
- ``map``: ``[B, H, W]`` at input resolution, the method's own reduction of ``raw`` (sum over
  colour channels, max of absolute values, bilinear upsampling, ...). Each method states its
  reduction and sign convention in :attr:`SaliencyMethod.reduction_doc` / ``sign``; both are
  written as attributes of ``maps.h5``.

Methods declare what they need (``needs_layer``, ``needs_gap``, ``needs_gate``, LRP's
canonizer) through :meth:`SaliencyMethod.problem`, so the CLI can refuse a combination in one
line before computing anything. Everything random (SmoothGrad noise, LIME samples) is drawn from
per-image generators seeded by ``(seed, image id, method)``, so a map does not depend on the
batch size or on which other images share its batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cnnexplain.config.saliency import IG_METHODS, MethodOptions  # noqa: F401 (re-exported)
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError, close_matches


@dataclass
class Attribution:
    """``raw``: ``[B, 3, H, W]`` (pixel methods) / ``[B, h, w]`` (layer methods) / None;
    ``map``: ``[B, H, W]`` at input resolution (see the module docstring)."""

    raw: torch.Tensor | None
    map: torch.Tensor


@dataclass(frozen=True, eq=False)
class Context:
    """Everything a method may need besides the model, inputs and targets.

    ``classifier``: dotted name of the final linear layer (CAM's weights, CLRP2's dual head;
    None: the last ``nn.Linear`` of the model); ``clusters``: bool ``[C, K]`` class-specific
    channel clusters of a gated checkpoint (``cnnexplain.models.gates.class_clusters``);
    ``sample_ids``: int64 ``[B]`` global ids of the batch's images, which seed their random
    streams (None: ``0..B-1``); ``backbone``: registry name, for messages.
    """

    options: MethodOptions = field(default_factory=MethodOptions)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    classifier: str | None = None
    clusters: torch.Tensor | None = None
    seed: int = 0
    sample_ids: torch.Tensor | None = None
    backbone: str | None = None

    def with_ids(self, ids: torch.Tensor) -> "Context":
        return replace(self, sample_ids=ids)

    def generators(self, batch: int, salt: str) -> list[torch.Generator]:
        """One CPU generator per image, seeded by (seed, image id, ``salt``)."""
        ids = (self.sample_ids.tolist() if self.sample_ids is not None else list(range(batch)))
        if len(ids) != batch:
            raise ValueError(f"context.sample_ids has {len(ids)} ids for a batch of {batch}")
        code = zlib.crc32(salt.encode())
        out = []
        for i in ids:
            g = torch.Generator()
            g.manual_seed((int(self.seed) * 1_000_003 + int(i) * 7919 + code) % (2**63 - 1))
            out.append(g)
        return out


@dataclass(frozen=True)
class ModelInfo:
    """What the requirement checks look at (no forward pass): ``backbone`` registry name or
    None, ``gap`` (global average pooling + one linear head), ``gated`` (class clusters
    available), ``model_type`` (LRP picks its canonizer by type), ``num_classes``."""

    backbone: str | None
    gap: bool
    gated: bool
    model_type: type
    num_classes: int

    @property
    def label(self) -> str:
        return self.backbone or self.model_type.__name__


# --------------------------------------------------------------------------------------------
# Reductions raw -> map
# --------------------------------------------------------------------------------------------

def _max_abs(raw: torch.Tensor) -> torch.Tensor:
    return raw.abs().amax(dim=1)


def _channel_sum(raw: torch.Tensor) -> torch.Tensor:
    return raw.sum(dim=1)


def _channel_mean(raw: torch.Tensor) -> torch.Tensor:
    return raw.mean(dim=1)


REDUCTIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "max-abs": (_max_abs, "max over colour channels of |raw| (Simonyan et al. 2013); >= 0"),
    "sum": (_channel_sum, "sum over colour channels of raw (signed; keeps completeness / "
                          "relevance conservation: the map sums to what raw sums to)"),
    "mean": (_channel_mean, "mean over colour channels of raw (identical channels)"),
}


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, H, W]``: bilinear, ``align_corners=False`` (the convention of
    captum's ``LayerAttribution.interpolate(..., "bilinear")``; pytorch-grad-cam resizes with
    OpenCV's bilinear, which uses the same pixel centres)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


# --------------------------------------------------------------------------------------------
# The method base class and the registry
# --------------------------------------------------------------------------------------------

class SaliencyMethod:
    """Base class. Subclasses set the class attributes and implement :meth:`compute`.

    ``kind``: ``"pixel"`` (raw ``[B, 3, H, W]``) or ``"layer"`` (raw ``[B, h, w]``);
    ``reduction``: a key of :data:`REDUCTIONS` (pixel methods) or ``"upsample"`` (layer
    methods: bilinear to input size); ``sign``: the sign convention of raw and map;
    ``units``: a short unit label for colour bars; ``option_names``: the
    :class:`MethodOptions` fields that change the result;
    ``stochastic``: draws random numbers (seeded per image); ``peer``: the peer library
    implementation the benchmark compares against (None: none offers it).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    kind: ClassVar[str] = "pixel"
    reduction: ClassVar[str] = "sum"
    sign: ClassVar[str] = ""
    units: ClassVar[str] = "saliency"
    needs_layer: ClassVar[bool] = False
    needs_gap: ClassVar[bool] = False
    needs_gate: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()
    stochastic: ClassVar[bool] = False
    peer: ClassVar[str | None] = None

    # -- requirements ------------------------------------------------------------------------
    def problem(self, info: ModelInfo) -> tuple[str, str] | None:
        """``(problem, fix)`` when this method cannot run on the model ``info`` describes."""
        if self.needs_gap and not info.gap:
            return (f"{self.name} needs a GAP network (global average pooling + one linear "
                    f"layer); {info.label} does not have one",
                    "use gradcam, which works on any CNN, or a GAP backbone such as resnet18, "
                    "resnet50, densenet121 or smallcnn")
        if self.needs_gate and not info.gated:
            return (f"{self.name} needs a gated checkpoint (class-specific channel clusters); "
                    f"this {info.label} model has no gate",
                    "pass `checkpoint` of a model trained with `cnnexplain train-gated`, or use "
                    "gradcam")
        return None

    def options_used(self, options: MethodOptions) -> dict:
        return options.subset(self.option_names)

    # -- computation -------------------------------------------------------------------------
    def attribute(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                  layer: str | None = None, context: Context | None = None) -> Attribution:
        """Explain ``targets`` ``[B]`` for ``inputs`` ``[B, 3, H, W]`` (module docstring)."""
        context = context or Context()
        if inputs.dim() != 4 or inputs.shape[1] != 3:
            raise CnnexplainError(f"saliency inputs must be [B, 3, H, W], got {list(inputs.shape)}",
                                  "pass RGB images as a batch")
        targets = torch.as_tensor(targets, dtype=torch.long, device=inputs.device).reshape(-1)
        if targets.numel() != inputs.shape[0]:
            raise CnnexplainError(f"{targets.numel()} targets for {inputs.shape[0]} images",
                                  "pass one target class per image")
        if self.needs_layer and not layer:
            raise UsageError(f"{self.name} needs a layer", "pass `layer`, e.g. layer4")
        out = self.compute(model, inputs.detach(), targets, layer=layer, context=context)
        return Attribution(raw=None if out.raw is None else out.raw.detach(),
                           map=out.map.detach())

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        raise TypeError(f"{type(self).__name__} must implement compute()")

    def reduce(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The method's map from its raw output."""
        if self.kind == "layer":
            return upsample(raw, size)
        return REDUCTIONS[self.reduction][0](raw)

    # -- documentation -----------------------------------------------------------------------
    @property
    def reduction_doc(self) -> str:
        if self.kind == "layer":
            return "bilinear upsampling (align_corners=False) of the layer-resolution raw map"
        return REDUCTIONS[self.reduction][1]

    def describe(self) -> dict:
        """JSON-able description (maps.h5 attributes, `list_methods` `json_output`)."""
        return {"name": self.name, "description": self.description, "kind": self.kind,
                "raw_shape": "N x 3 x H x W" if self.kind == "pixel" else "N x h x w",
                "reduction": self.reduction_doc, "sign": self.sign, "units": self.units,
                "citation": self.citation,
                "needs_layer": self.needs_layer, "needs_gap": self.needs_gap,
                "needs_gate": self.needs_gate, "options": list(self.option_names),
                "stochastic": self.stochastic, "peer": self.peer}


METHODS: dict[str, SaliencyMethod] = {}
"""The registry, in listing order (filled by the family modules on import)."""


def register(cls: type[SaliencyMethod]) -> type[SaliencyMethod]:
    """Class decorator: add one instance of ``cls`` to :data:`METHODS` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"saliency method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> SaliencyMethod:
    if name not in METHODS:
        raise UsageError(f"unknown saliency method {name!r}{close_matches(name, METHODS)}",
                         "see the method list (`methods=all` runs every one that applies)")
    return METHODS[name]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` checked to be ``[B, C]`` logits."""
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CnnexplainError(f"the model returned {shape}, not logits [B, C]",
                              "explain a classifier whose forward returns one logit per class")
    return out


def target_scores(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``out[b, targets[b]]`` -> ``[B]``."""
    return out.gather(1, targets.view(-1, 1)).squeeze(1)


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d logit_target / d x [B, 3, H, W], logits [B, C])`` with one forward and one
    backward pass for the whole batch (images are independent in eval mode, so the gradient of
    the summed target logits is each image's own gradient)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = logits_of(model, x)
        (grad,) = torch.autograd.grad(target_scores(out, targets).sum(), x)
    return grad, out.detach()


def chunks(total: int, size: int):
    """``(start, stop)`` pairs covering ``range(total)`` in steps of ``size``."""
    for start in range(0, total, max(1, int(size))):
        yield start, min(total, start + max(1, int(size)))


#: Most pixels one model pass over perturbed images takes on a CPU: 8 images of 224 x 224.
#: Measured on 2 cores (ResNet-18, forward + backward per image): 46-48 ms at 8-16 images of
#: 224 px against 57 ms at 32, while at 32-112 px batches of 32-64 images are the fastest, so a
#: pixel budget, not an image count, is what keeps a CPU pass in its fast range.
CPU_PIXELS_PER_PASS = 8 * 224 * 224


def pass_size(limit: int, inputs: torch.Tensor) -> int:
    """Perturbed images per model pass for ``inputs`` ``[B, 3, H, W]``: ``limit`` (the
    ``internal_batch_size`` option, a memory bound), and on a CPU also at most
    :data:`CPU_PIXELS_PER_PASS` pixels. The result does not depend on it beyond float rounding
    (eval-mode images are independent)."""
    limit = max(1, int(limit))
    if inputs.device.type != "cpu":
        return limit
    return max(1, min(limit, CPU_PIXELS_PER_PASS // int(inputs.shape[-2] * inputs.shape[-1])))


def passes(total: int, limit: int, inputs: torch.Tensor):
    """:func:`chunks` of ``range(total)`` perturbed copies of ``inputs``, :func:`pass_size`
    at a time."""
    return chunks(total, pass_size(limit, inputs))


def last_linear_name(model: nn.Module) -> str:
    """Dotted name of the last registered ``nn.Linear`` (the classifier of every zoo model)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CnnexplainError("the model has no nn.Linear classifier layer",
                              "explain a classifier ending in a linear layer")
    return names[-1]
