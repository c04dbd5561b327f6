"""``cnnexplain backbones`` and ``cnnexplain layers``: what can be named on the command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cnnexplain.cli.main import app
from cnnexplain.cli import options as O


@app.command("backbones")
def backbones(json_output: O.Json = False):
    """List the backbones, their default target layer and the ImageNet weights file each expects."""
    from cnnexplain.models import zoo

    rows = []
    for spec in zoo.BACKBONES.values():
        rows.append({"backbone": spec.name, "default_layer": spec.default_layer,
                     "classifier": spec.classifier, "min_input": spec.min_size,
                     "gap_head": spec.gap,
                     "imagenet_file": str(zoo.imagenet_weights_file(spec)) if spec.weights_enum else ""})
    if json_output:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="Backbones")
    for col in ("backbone", "default layer", "classifier", "min input", "CAM (GAP head)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backbone"], r["default_layer"], r["classifier"], str(r["min_input"]),
                      "yes" if r["gap_head"] else "no")
    Console().print(table)


@app.command("layers")
def layers(backbone: Annotated[str, typer.Option("--backbone", help="Backbone name.")],
           size: Annotated[int, typer.Option("--size", min=8, help="Input side for the shape probe.")] = 64,
           num_classes: O.NumClasses = None,
           insert_conv: Annotated[Optional[int], typer.Option(
               "--insert-conv", min=1, help="Show the model with an inserted N-filter conv.")] = None,
           json_output: O.Json = False):
    """List a backbone's layers (dotted names for --layer) with their output shapes."""
    import torch

    from cnnexplain.models import zoo
    from cnnexplain.models.network import build_network

    spec = zoo.get_spec(backbone)
    size = max(size, spec.min_size)
    model, target = build_network(backbone, num_classes or 10, insert=insert_conv)
    model.eval()
    shapes: dict[str, list[int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, _n=name):
            if isinstance(out, torch.Tensor):
                shapes[_n] = list(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    rows = [{"layer": n, "type": type(m).__name__, "output": shapes.get(n),
             "default": n == target}
            for n, m in model.named_modules() if n]
    if json_output:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title=f"{backbone} layers (input {size}x{size})")
    for col in ("layer", "type", "output [C, H, W]", ""):
        table.add_column(col)
    for r in rows:
        table.add_row(r["layer"], r["type"], "x".join(map(str, r["output"] or [])) or "-",
                      "default" if r["default"] else "")
    Console().print(table)
