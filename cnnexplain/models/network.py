"""Build the network a command runs: a backbone, its classifier sized to the dataset, and,
for PICNN-style training, an extra N-filter conv layer inserted after the target layer."""

from __future__ import annotations

import torch
from torch import nn

from cnnexplain.errors import UsageError
from cnnexplain.models import zoo
from cnnexplain.models.layers import get_module, record, split_at


def probe_channels(model: nn.Module, layer: str, size: int) -> int:
    """Number of channels the output of ``layer`` has (one dummy forward pass in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record(model, [layer]) as acts:
            p = next(model.parameters())
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return int(acts[layer].shape[1])


def insert_conv(model: nn.Module, spec: zoo.BackboneSpec, layer: str, n_filters: int) -> str:
    """Insert ``Conv2d(C, n_filters, 3, padding=1)`` after ``layer`` (seed 004 / the PICNN code:
    bias, no BatchNorm, no ReLU) and resize the first linear layer after it.

    Returns the dotted name of the inserted conv. Only allowed where nothing but pooling,
    activations and linear layers run after ``layer``.
    """
    if n_filters < 1:
        raise UsageError(f"`insert_conv` must be at least 1, got {n_filters}",
                         "pass the number of filters, e.g. `insert_conv=64`")
    target = get_module(model, layer)
    channels = probe_channels(model, layer, max(spec.min_size, 32))
    split = split_at(model, layer)
    tail_modules = [split.tail.get_submodule(n.target) for n in split.tail.graph.nodes
                    if n.op == "call_module"]
    if any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in tail_modules):
        raise UsageError(f"`insert_conv` needs a target layer after which only pooling and linear "
                         f"layers run, but convolutions follow {layer!r}",
                         f"use the backbone's default layer {spec.default_layer!r}")
    linears = [(n.target, split.tail.get_submodule(n.target)) for n in split.tail.graph.nodes
               if n.op == "call_module" and isinstance(split.tail.get_submodule(n.target), nn.Linear)]
    if not linears:
        raise UsageError(f"no linear layer follows {layer!r}", "use the backbone's default layer")
    lin_name, lin = linears[0]
    if lin.in_features % channels:
        raise UsageError(f"cannot resize {lin_name!r} for an inserted conv at {layer!r}",
                         "use the backbone's default layer")
    new_in = lin.in_features // channels * n_filters
    zoo._set_module(model, lin_name, nn.Linear(new_in, lin.out_features))
    conv = nn.Conv2d(channels, n_filters, 3, padding=1)
    if isinstance(target, nn.Sequential):
        target.append(conv)
        return f"{layer}.{len(target) - 1}"
    zoo._set_module(model, layer, nn.Sequential(target, conv))
    return f"{layer}.1"


def build_network(backbone: str, num_classes: int, layer: str | None = None,
                  insert: int | None = None, imagenet: bool = False,
                  stem: str = "imagenet") -> tuple[nn.Module, str]:
    """A backbone with ``num_classes`` outputs and the given stem (:data:`~cnnexplain.models.
    zoo.STEMS`) and, optionally, an inserted conv at ``layer``.

    Returns ``(model, target_layer)``: ``target_layer`` is ``layer`` (default: the backbone's
    last conv block); with ``insert`` its output is that of the inserted conv.
    """
    spec = zoo.get_spec(backbone)
    model = zoo.build(backbone, num_classes=num_classes, imagenet=imagenet, stem=stem)
    layer = layer or spec.default_layer
    get_module(model, layer)
    if insert:
        insert_conv(model, spec, layer, insert)
    return model, layer
