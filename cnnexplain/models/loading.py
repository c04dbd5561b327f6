"""Model selection, the same in every command: ``checkpoint`` (a PATH) or
``backbone`` (a NAME) with optional ``num_classes`` and ``weights`` (PATH or imagenet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import UsageError
from cnnexplain.fingerprint import digest_parts, state_dict_digest
from cnnexplain.models import zoo
from cnnexplain.models.checkpoint import load_checkpoint
from cnnexplain.models.network import build_network


@dataclass
class LoadedModel:
    """A ready-to-run model and everything known about it.

    ``layer``: the default target layer (a gated checkpoint's gated layer, else the backbone's
    default); ``gate``: gate tensors of a gated checkpoint ({"W": [K, C]} or {"P": [C, K]});
    ``fingerprint``: digest of weights, gate and architecture (cache keys use it).
    """

    model: nn.Module
    backbone: str
    num_classes: int
    layer: str
    preprocessing: Preprocessing
    source: str
    class_names: list[str] | None = None
    method: str = "std"
    insert_conv: int | None = None
    gate: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    fingerprint: str = ""
    stem: str = "imagenet"

    def architecture(self) -> dict:
        """What besides the tensors defines the network (part of its fingerprint)."""
        return architecture(self.backbone, self.insert_conv, self.stem)

    @property
    def spec(self) -> zoo.BackboneSpec:
        return zoo.get_spec(self.backbone)

    def describe(self) -> dict:
        return {"backbone": self.backbone, "num_classes": self.num_classes, "layer": self.layer,
                "method": self.method, "insert_conv": self.insert_conv, "stem": self.stem,
                "source": self.source,
                "fingerprint": self.fingerprint, "preprocessing": self.preprocessing.to_dict()}

    def class_name(self, i: int) -> str:
        if self.class_names and 0 <= i < len(self.class_names):
            return self.class_names[i]
        return str(i)


def architecture(backbone: str, insert_conv: int | None, stem: str) -> dict:
    """The architecture choices a fingerprint records besides the weights (a VGG's stem has no
    weights of its own, so it must be named)."""
    return {"backbone": backbone, "insert_conv": insert_conv, "stem": stem}


def model_fingerprint(model: nn.Module, gate: dict | None = None, arch: dict | None = None) -> str:
    gate = gate or {}
    return digest_parts(state_dict_digest(model.state_dict()), state_dict_digest(gate), arch or {})


def load_model(checkpoint: str | Path | None = None, backbone: str | None = None,
               num_classes: int | None = None, weights: str | None = None,
               device: torch.device | str = "cpu", layer: str | None = None,
               default_num_classes: int = 10, class_names: list[str] | None = None,
               preprocessing: Preprocessing | None = None, stem: str | None = None,
               input_side: int | None = None) -> LoadedModel:
    """Build and load a model as the CLI's model options describe it (eval mode, on ``device``).

    - ``checkpoint``: a cnnexplain checkpoint (architecture, weights, gate, preprocessing and
      class names come from it; ``backbone``/``num_classes`` must agree if also given).
    - ``backbone`` + ``weights=None``: random init (seeded by the caller) with ``num_classes``
      (default ``default_num_classes``, e.g. the dataset's class count).
    - ``weights="imagenet"``: torchvision's ImageNet weights from the hub cache (no download).
    - ``weights=PATH``: a plain torchvision state_dict; ``num_classes`` is read from it.
    ``preprocessing`` (if given) overrides the recorded one. ``stem``: a backbone's stem
    (None / auto: ``small`` for inputs of at most 64 px, ``input_side``, where it has one; a
    checkpoint and a ResNet weights file record their own).
    """
    if checkpoint is not None:
        if weights is not None:
            raise UsageError("`checkpoint` and `weights` cannot be used together",
                             "pass either a cnnexplain checkpoint or `backbone` with `weights`")
        from cnnexplain.models.checkpoint import Checkpoint

        ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        checkpoint = getattr(ck, "path", None) or checkpoint
        meta = ck.meta
        if backbone is not None and backbone != meta["backbone"]:
            raise UsageError(f"`backbone={backbone}` does not match the checkpoint's backbone "
                             f"{meta['backbone']}", "leave out `backbone` when using `checkpoint`")
        if num_classes is not None and int(num_classes) != int(meta["num_classes"]):
            raise UsageError(f"`num_classes={num_classes}` does not match the checkpoint's "
                             f"{meta['num_classes']} classes", "leave out `num_classes`")
        recorded_stem = meta.get("stem", "imagenet")
        if stem not in (None, "auto", recorded_stem):
            raise UsageError(f"`stem={stem}` does not match the checkpoint's {recorded_stem} stem",
                             "leave out `stem` when using `checkpoint`")
        zoo.get_spec(meta["backbone"])
        model, ck_layer = build_network(meta["backbone"], int(meta["num_classes"]),
                                        layer=meta.get("layer"), insert=meta.get("insert_conv"),
                                        stem=recorded_stem)
        zoo.load_state_dict_into(model, ck.state_dict, meta["backbone"], f"checkpoint {checkpoint}")
        prep = preprocessing or Preprocessing.from_dict(meta.get("preprocessing"))
        loaded = LoadedModel(model=model, backbone=meta["backbone"],
                             num_classes=int(meta["num_classes"]), layer=layer or ck_layer,
                             preprocessing=prep, source=f"checkpoint:{checkpoint}",
                             class_names=meta.get("class_names"), method=meta.get("method", "std"),
                             insert_conv=meta.get("insert_conv"), gate=dict(ck.gate), meta=meta,
                             stem=recorded_stem)
    else:
        if backbone is None:
            raise UsageError("no model given", "pass `checkpoint=PATH` or `backbone=NAME`")
        spec = zoo.get_spec(backbone)
        if weights is None:
            n = int(num_classes or default_num_classes)
            stem = zoo.choose_stem(spec, stem, input_side)
            model = zoo.build(backbone, num_classes=n, stem=stem)
            source = "random-init"
        elif weights == "imagenet":
            n = int(num_classes or 1000)
            stem = zoo.choose_stem(spec, "imagenet" if stem in (None, "auto") else stem, None)
            model = zoo.build(backbone, num_classes=n, imagenet=True, stem=stem)
            source = "imagenet"
        else:
            model, n = zoo.build_from_weights_file(backbone, weights, stem=stem)
            stem = zoo.stem_of(zoo.safe_load_state_dict(weights), spec, stem)
            if num_classes is not None and int(num_classes) != n:
                raise UsageError(f"`num_classes={num_classes}` does not match the weights, which "
                                 f"have {n} classes", f"pass `num_classes={n}` or leave it out")
            source = f"weights:{weights}"
        layer = layer or spec.default_layer
        prep = preprocessing or Preprocessing()
        loaded = LoadedModel(model=model, backbone=backbone, num_classes=n, layer=layer,
                             preprocessing=prep, source=source, class_names=class_names,
                             stem=stem)
    from cnnexplain.models.layers import get_module

    get_module(loaded.model, loaded.layer)
    if class_names and not loaded.class_names:
        loaded.class_names = list(class_names)
    loaded.model.to(device).eval()
    loaded.fingerprint = model_fingerprint(loaded.model, loaded.gate, loaded.architecture())
    return loaded
