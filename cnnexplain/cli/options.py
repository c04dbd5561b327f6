"""Option declarations shared by every subcommand (one place for each flag and its help)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

COMMON = "Common options"
MODEL = "Model"
DATA = "Data"

Out = Annotated[Optional[Path], typer.Option(
    "--out", help="Run directory for results (created). Default: runs/<command>.",
    rich_help_panel=COMMON, show_default=False)]
Device = Annotated[str, typer.Option(
    "--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=COMMON)]
Seed = Annotated[int, typer.Option(
    "--seed", help="Seed for everything random (same seed, same numbers on CPU).",
    rich_help_panel=COMMON)]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars (also automatic when stdout is not a terminal).",
    rich_help_panel=COMMON)]
Json = Annotated[bool, typer.Option(
    "--json", help="Print a machine-readable JSON summary to stdout, nothing else.",
    rich_help_panel=COMMON)]
Recipe = Annotated[Optional[Path], typer.Option(
    "--recipe", help="YAML file of options (flat, or sectioned by command); flags override it.",
    rich_help_panel=COMMON, show_default=False)]
CacheDir = Annotated[Optional[Path], typer.Option(
    "--cache-dir", envvar="CNNEXPLAIN_CACHE",
    help="HDF5 cache directory. Default: ~/.cache/cnnexplain.", rich_help_panel=COMMON,
    show_default=False)]
NoCache = Annotated[bool, typer.Option(
    "--no-cache", help="Neither read nor write the cache.", rich_help_panel=COMMON)]

Checkpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="A cnnexplain checkpoint (from train-gated).", rich_help_panel=MODEL,
    show_default=False)]
Backbone = Annotated[Optional[str], typer.Option(
    "--backbone", help="Backbone name (see `cnnexplain backbones`).", rich_help_panel=MODEL,
    show_default=False)]
NumClasses = Annotated[Optional[int], typer.Option(
    "--num-classes", min=1, help="Classes of the backbone's head (default: from the weights or "
    "the dataset).", rich_help_panel=MODEL, show_default=False)]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", help="PATH to a torchvision state_dict, or 'imagenet' (torchvision's weights "
    "from the local torch hub cache). Default: random init.", rich_help_panel=MODEL,
    show_default=False)]
Layer = Annotated[Optional[str], typer.Option(
    "--layer", help="Dotted module name, e.g. layer4, features.28, layer4.1.conv2 (see "
    "`cnnexplain layers`). Default: the backbone's last conv block.", rich_help_panel=MODEL,
    show_default=False)]
Resize = Annotated[Optional[int], typer.Option(
    "--resize", min=1, help="Resize images to this square side (default: the model's recorded "
    "preprocessing, else native size).", rich_help_panel=DATA, show_default=False)]
Mean = Annotated[Optional[str], typer.Option(
    "--mean", help="Normalization mean R,G,B (default: recorded, else ImageNet's).",
    rich_help_panel=DATA, show_default=False)]
Std = Annotated[Optional[str], typer.Option(
    "--std", help="Normalization std R,G,B (default: recorded, else ImageNet's).",
    rich_help_panel=DATA, show_default=False)]
Dataset = Annotated[str, typer.Option(
    "--dataset", help="synthetic[:opts], cifar10:ROOT, cifar100:ROOT, stl10:ROOT, "
    "imagefolder:ROOT or broden:ROOT.", rich_help_panel=DATA)]
Split = Annotated[str, typer.Option(
    "--split", help="train, val or test (val is carved from train with --seed when the dataset "
    "has none).", rich_help_panel=DATA)]
Limit = Annotated[Optional[int], typer.Option(
    "--limit", min=1, help="Use only the first N images.", rich_help_panel=DATA,
    show_default=False)]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.",
                                        rich_help_panel=DATA)]
Workers = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.",
                                      rich_help_panel=DATA)]
