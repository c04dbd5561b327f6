"""The backbone registry: a backbone is a string on the command line.

Each entry names the torchvision builder, its ImageNet weight enum, the default target layer
(the last conv block; see the table in README.md), the classifier layer that ``num_classes``
replaces, and the smallest input side the architecture accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.models.smallcnn import smallcnn


STEMS = ("imagenet", "small")
"""First layers of a ResNet / VGG: ``imagenet`` (torchvision's: a 7x7 stride-2 conv and a 3x3
stride-2 max-pool for ResNets, five max-pools for VGGs) or ``small`` (the CIFAR convention for
32-64 px inputs, He et al. 2016 sec. 4.2: a 3x3 stride-1 conv and no max-pool for ResNets; the
first max-pool removed for VGGs), so that the last conv block keeps a spatial map (4x4 at 32 px)
instead of collapsing to 1x1."""

SMALL_INPUT = 64
"""Largest input side for which the default stem is ``small``."""


def _resnet_small_stem(model: nn.Module) -> None:
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _vgg_small_stem(model: nn.Module) -> None:
    """The first max-pool becomes an identity (module names, hence layer names, unchanged)."""
    for i, m in enumerate(model.features):
        if isinstance(m, nn.MaxPool2d):
            model.features[i] = nn.Identity()
            return


@dataclass(frozen=True)
class BackboneSpec:
    """``default_layer``: dotted name of the last conv block; ``classifier``: dotted name of the
    final nn.Linear; ``min_size``: smallest square input side that runs; ``gap``: the head is
    global-average-pool + one linear layer (CAM applies); ``small_stem``: turns a freshly built
    model into its small-input variant (:data:`STEMS`), None where the backbone has none."""

    name: str
    builder: Callable[..., nn.Module]
    default_layer: str
    classifier: str
    weights_enum: str | None
    min_size: int = 32
    gap: bool = False
    small_stem: Callable[[nn.Module], None] | None = None

    @property
    def stems(self) -> tuple[str, ...]:
        return STEMS if self.small_stem is not None else ("imagenet",)


def _tv(name: str) -> Callable[..., nn.Module]:
    return getattr(torchvision.models, name)


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("smallcnn", smallcnn, "features", "fc", None, 8, gap=True),
        BackboneSpec("resnet18", _tv("resnet18"), "layer4", "fc", "ResNet18_Weights", gap=True,
                     small_stem=_resnet_small_stem),
        BackboneSpec("resnet34", _tv("resnet34"), "layer4", "fc", "ResNet34_Weights", gap=True,
                     small_stem=_resnet_small_stem),
        BackboneSpec("resnet50", _tv("resnet50"), "layer4", "fc", "ResNet50_Weights", gap=True,
                     small_stem=_resnet_small_stem),
        BackboneSpec("resnet152", _tv("resnet152"), "layer4", "fc", "ResNet152_Weights", gap=True,
                     small_stem=_resnet_small_stem),
        BackboneSpec("wide_resnet50_2", _tv("wide_resnet50_2"), "layer4", "fc",
                     "Wide_ResNet50_2_Weights", gap=True, small_stem=_resnet_small_stem),
        BackboneSpec("vgg11", _tv("vgg11"), "features.19", "classifier.6", "VGG11_Weights",
                     small_stem=_vgg_small_stem),
        BackboneSpec("vgg11_bn", _tv("vgg11_bn"), "features.27", "classifier.6", "VGG11_BN_Weights",
                     small_stem=_vgg_small_stem),
        BackboneSpec("vgg16", _tv("vgg16"), "features.29", "classifier.6", "VGG16_Weights",
                     small_stem=_vgg_small_stem),
        BackboneSpec("vgg16_bn", _tv("vgg16_bn"), "features.42", "classifier.6", "VGG16_BN_Weights",
                     small_stem=_vgg_small_stem),
        BackboneSpec("alexnet", _tv("alexnet"), "features.11", "classifier.6", "AlexNet_Weights",
                     min_size=63),
        BackboneSpec("densenet121", _tv("densenet121"), "features", "classifier",
                     "DenseNet121_Weights", min_size=32, gap=True),
        BackboneSpec("mobilenet_v2", _tv("mobilenet_v2"), "features", "classifier.1",
                     "MobileNet_V2_Weights"),
        BackboneSpec("efficientnet_b0", _tv("efficientnet_b0"), "features", "classifier.1",
                     "EfficientNet_B0_Weights"),
    ]
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}{close_matches(name, BACKBONES)}",
                         f"choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_classifier(model: nn.Module, spec: BackboneSpec, num_classes: int) -> None:
    """Give the model a fresh final linear layer with ``num_classes`` outputs."""
    old = model.get_submodule(spec.classifier)
    if old.out_features != num_classes:
        _set_module(model, spec.classifier, nn.Linear(old.in_features, num_classes))


def num_outputs(model: nn.Module, spec: BackboneSpec) -> int:
    return model.get_submodule(spec.classifier).out_features


def imagenet_weights_file(spec: BackboneSpec) -> Path:
    """Where torchvision expects the ImageNet weights of ``spec`` in its cache."""
    enum = getattr(torchvision.models, spec.weights_enum)
    url = enum.DEFAULT.url
    hub = Path(torch.hub.get_dir())
    return hub / "checkpoints" / os.path.basename(url)


def choose_stem(spec: BackboneSpec, stem: str | None, input_side: int | None) -> str:
    """The stem to build: ``stem`` if given (checked against the backbone), else ``small`` for
    inputs of at most :data:`SMALL_INPUT` px where the backbone has one, else ``imagenet``."""
    if stem is None or stem == "auto":
        small = spec.small_stem is not None and input_side is not None and \
            input_side <= SMALL_INPUT
        return "small" if small else "imagenet"
    if stem not in spec.stems:
        raise UsageError(f"backbone {spec.name!r} has no `stem` {stem!r}",
                         f"choose one of: {', '.join(spec.stems)}")
    return stem


def build(name: str, num_classes: int = 10, imagenet: bool = False,
          stem: str = "imagenet") -> nn.Module:
    """A backbone by name with ``num_classes`` outputs and the given stem (:data:`STEMS`);
    ``imagenet=True`` loads torchvision's ImageNet weights from torch's hub cache (never
    downloads; imagenet stem only) and then replaces the classifier if ``num_classes`` != 1000."""
    spec = get_spec(name)
    stem = choose_stem(spec, stem, None)
    if imagenet and stem != "imagenet":
        raise UsageError("ImageNet weights were trained with the imagenet stem",
                         "pass `stem=imagenet` with `weights=imagenet`")
    if num_classes < 1:
        raise UsageError(f"`num_classes` must be at least 1, got {num_classes}",
                         "pass the number of classes of your dataset")
    if not imagenet:
        model = spec.builder(num_classes=num_classes)
        if stem == "small":
            spec.small_stem(model)
        return model
    if spec.weights_enum is None:
        raise UsageError(f"backbone {name!r} has no ImageNet weights",
                         "leave out `weights=imagenet` or pass `weights=PATH`")
    path = imagenet_weights_file(spec)
    if not path.is_file():
        raise CnnexplainError(f"ImageNet weights for {name} not found: torchvision expects {path}",
                              f"copy the file there (it is {getattr(torchvision.models, spec.weights_enum).DEFAULT.url}) "
                              "or pass `weights=PATH` to a state_dict")
    model = spec.builder(num_classes=1000)
    state = safe_load_state_dict(path)
    model.load_state_dict(state)
    replace_classifier(model, spec, num_classes)
    return model


def safe_load_state_dict(path: str | os.PathLike) -> dict:
    """Load a plain state_dict file with ``weights_only=True`` (never runs pickled code)."""
    from cnnexplain.models.checkpoint import read_tensor_file

    obj = read_tensor_file(path, what="weights file")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CnnexplainError(f"{path} is not a state_dict (a mapping of names to tensors)",
                              "save it with torch.save(model.state_dict(), PATH)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_into(model: nn.Module, state: dict, name: str, source: str) -> None:
    """Load ``state`` strictly, turning key/shape mismatches into one-line errors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CnnexplainError(
            f"{source} does not match backbone {name!r}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (e.g. {example!r})",
            "pass the `backbone` these weights were saved from")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CnnexplainError(
                f"{source} does not fit backbone {name!r}: tensor {k!r} has shape "
                f"{list(state[k].shape)}, the model expects {list(v.shape)}",
                "check `backbone` and `num_classes` against the weights")
    model.load_state_dict(state)


def infer_num_classes(state: dict, spec: BackboneSpec) -> int | None:
    w = state.get(spec.classifier + ".weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def stem_of(state: dict, spec: BackboneSpec, stem: str | None = None) -> str:
    """A ResNet state_dict says its stem (conv1's kernel is 3x3 for ``small``); for other
    backbones the stem has no weights of its own, so ``stem`` (default imagenet) decides."""
    w = state.get("conv1.weight")
    if spec.small_stem is not None and isinstance(w, torch.Tensor) and w.dim() == 4:
        found = "small" if w.shape[-1] == 3 else "imagenet"
        if stem not in (None, "auto", found):
            raise UsageError(f"the weights have the {found} stem, not `stem` {stem!r}",
                             f"pass `stem={found}` or leave `stem` out")
        return found
    return choose_stem(spec, stem, None) if stem not in (None, "auto") else "imagenet"


def build_from_weights_file(name: str, path: str | os.PathLike, stem: str | None = None
                            ) -> tuple[nn.Module, int]:
    """Backbone ``name`` with the weights of a state_dict file (read without unpickling code),
    with as many outputs as the file's classifier: ``(model, num_classes)``."""
    spec = get_spec(name)
    state = safe_load_state_dict(path)
    found = infer_num_classes(state, spec)
    if found is None:
        raise CnnexplainError(f"weights file {path} has no {spec.classifier}.weight, so it is not "
                              f"a {name} state_dict", "pass the `backbone` the weights were saved from")
    model = build(name, num_classes=found, stem=stem_of(state, spec, stem))
    load_state_dict_into(model, state, name, f"weights file {path}")
    return model, found
