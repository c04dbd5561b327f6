"""``cnnexplain backbones`` and ``cnnexplain layers``: what can be named on the command line."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from cnnexplain.cli.declare import command
from cnnexplain.cli.main import app
from cnnexplain.config.info import BackbonesOptions, LayersOptions


def backbones(options: BackbonesOptions):
    from cnnexplain.models import zoo

    rows = []
    for spec in zoo.BACKBONES.values():
        rows.append({"backbone": spec.name, "default_layer": spec.default_layer,
                     "classifier": spec.classifier, "min_input": spec.min_size,
                     "gap_head": spec.gap,
                     "imagenet_file": str(zoo.imagenet_weights_file(spec)) if spec.weights_enum else ""})
    if options.json_output:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="Backbones")
    for col in ("backbone", "default layer", "classifier", "min input", "CAM (GAP head)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backbone"], r["default_layer"], r["classifier"], str(r["min_input"]),
                      "yes" if r["gap_head"] else "no")
    Console().print(table)


def layers(options: LayersOptions):
    from cnnexplain.models.layers import layer_shapes

    rows, size, stem = layer_shapes(options.backbone, options.size, options.num_classes,
                                    options.insert_conv, options.stem)
    backbone, json_output = options.backbone, options.json_output
    if json_output:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title=f"{backbone} layers (input {size}x{size}, {stem} stem)")
    for col in ("layer", "type", "output [C, H, W]", ""):
        table.add_column(col)
    for r in rows:
        table.add_row(r["layer"], r["type"], "x".join(map(str, r["output"] or [])) or "-",
                      "default" if r["default"] else "")
    Console().print(table)


command(app, "backbones", BackbonesOptions, backbones,
        help="List the backbones, their default target layer and the ImageNet weights file "
             "each expects.")
command(app, "layers", LayersOptions, layers,
        help="List a backbone's layers (dotted names for --layer) with their output shapes.\n\n"
             "Example: cnnexplain layers --backbone resnet18 --size 32 (the small stem that "
             "train-gated builds for 32 px; --stem imagenet shows torchvision's)")
