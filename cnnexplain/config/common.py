"""The option groups most commands share: output, compute, model, preprocessing and data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.fields import option, triplet_problem

STEM_CHOICES = ("auto", "imagenet", "small")
STEM_HELP = ("First layers of a ResNet or VGG: imagenet (torchvision's 7x7 stride-2 conv and "
             "max-pool) or small (3x3 stride-1 conv, no max-pool: the CIFAR convention of He et "
             "al. 2016 for 32-64 px inputs, so that the last block keeps a 4x4 map at 32 px). "
             "auto: small for inputs of at most 64 px. A checkpoint records its own.")

COMMON = "Common options"
MODEL = "Model"
DATA = "Data"


@dataclass
class RunOptions:
    """Where results go and how the command talks."""

    out: Path | None = option(None, help="Run directory for results (created). Default: "
                              "runs/<command>.", panel=COMMON, show_default=False)
    quiet: bool = option(False, short="q", help="No progress bars (also automatic when stdout "
                         "is not a terminal).", panel=COMMON)
    json_output: bool = option(False, name="json", help="Print a machine-readable JSON summary "
                               "to stdout, nothing else.", panel=COMMON)
    recipe: Path | None = option(None, help="YAML file of options (flat, or sectioned by "
                                 "command); flags override it.", panel=COMMON, show_default=False)


@dataclass
class ComputeOptions:
    """Device, seed and the cache."""

    device: str = option("auto", help="auto, cpu, cuda or cuda:N.", panel=COMMON)
    seed: int = option(0, help="Seed for everything random (same seed, same numbers on CPU).",
                       panel=COMMON)
    cache_dir: Path | None = option(None, envvar="CNNEXPLAIN_CACHE", help="HDF5 cache "
                                    "directory. Default: ~/.cache/cnnexplain.", panel=COMMON,
                                    show_default=False)
    no_cache: bool = option(False, help="Neither read nor write the cache.", panel=COMMON)


@dataclass
class ModelOptions:
    """A model: a cnnexplain checkpoint, or a backbone with optional weights."""

    checkpoint: Path | None = option(None, help="A cnnexplain checkpoint (from train-gated).",
                                     panel=MODEL, show_default=False)
    backbone: str | None = option(None, help="Backbone name (see `cnnexplain backbones`).",
                                  panel=MODEL, show_default=False)
    num_classes: int | None = option(None, low=1, help="Classes of the backbone's head "
                                     "(default: from the weights or the dataset).", panel=MODEL,
                                     show_default=False)
    weights: str | None = option(None, help="PATH to a torchvision state_dict, or 'imagenet' "
                                 "(torchvision's weights from the local torch hub cache). "
                                 "Default: random init.", panel=MODEL, show_default=False)
    stem: str | None = option(None, choices=STEM_CHOICES, help=STEM_HELP, panel=MODEL,
                              show_default=False)
    layer: str | None = option(None, help="Dotted module name, e.g. layer4, features.28, "
                               "layer4.1.conv2 (see `cnnexplain layers`). Default: the "
                               "checkpoint's gated layer, else the backbone's last conv block.",
                               panel=MODEL, show_default=False)


@dataclass
class PrepOptions:
    """Resize and normalization (recorded in checkpoints, part of every cache key)."""

    resize: int | None = option(None, low=1, help="Resize images to this square side (default: "
                                "the model's recorded preprocessing, else native size).",
                                panel=DATA, show_default=False, example=64)
    mean: str | None = option(None, check=triplet_problem(), help="Normalization mean R,G,B "
                              "(default: recorded, else ImageNet's).", panel=DATA,
                              show_default=False, example="0.5,0.5,0.5")
    std: str | None = option(None, check=triplet_problem(positive=True), help="Normalization "
                             "std R,G,B (default: recorded, else ImageNet's).", panel=DATA,
                             show_default=False, example="0.229,0.224,0.225")


@dataclass
class DataOptions:
    """A dataset split, read in batches."""

    dataset: str | None = option(None, help="synthetic[:opts], cifar10:ROOT, cifar100:ROOT, "
                                 "stl10:ROOT, imagefolder:ROOT or broden:ROOT. Default: the "
                                 "dataset a `checkpoint` was trained on, else synthetic.",
                                 panel=DATA, show_default=False)
    split: str = option("test", help="train, val or test (val is carved from train with `seed` "
                        "and `val_fraction` where the dataset has none).", panel=DATA)
    val_fraction: float | None = option(None, low=0, high=1, low_open=True, high_open=True,
                                        help="Share of train carved as val where the dataset "
                                        "has no val split. Default: the checkpoint's, else "
                                        "0.1.", panel=DATA, show_default=False, example=0.1)
    limit: int | None = option(None, low=1, help="Use only the first N images.", panel=DATA,
                               show_default=False)
    batch_size: int = option(64, low=1, help="Images per batch.", panel=DATA)
    workers: int = option(0, low=0, help="DataLoader worker processes.", panel=DATA)


@dataclass
class FileOptions:
    """How dataset files are read: confined to the dataset's root, decoded within a pixel
    limit (cnnexplain.data.files)."""

    follow_symlinks: bool = option(False, help="Accept dataset files and folders (images, masks, "
                                   "class and concept folders) that resolve through symlinks to "
                                   "places outside the dataset's root. By default such a file "
                                   "stops the command, so that a dataset cannot make it read "
                                   "files elsewhere; pass it for a dataset that is a farm of "
                                   "links.", panel=DATA)
    max_image_pixels: int = option(89_478_485, low=1, help="Largest image, in pixels (width x "
                                   "height, read from the header), that is decoded: a guard "
                                   "against decompression bombs. Default: PIL's warning "
                                   "threshold.", panel=DATA, example=89_478_485)
