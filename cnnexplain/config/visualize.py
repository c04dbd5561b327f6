"""``visualize``'s options: which units (channels, one neuron, the whole layer, a direction in
channel space or class logits), how their images are optimized (Olah et al. 2017, "Feature
Visualization", Distill) and how many dataset examples are shown beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.common import (DATA, ComputeOptions, DataOptions, FileOptions,
                                      ModelOptions, PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

VIS = "Visualization"
OPT = "Optimization"

OBJECTIVES = ("channel", "neuron", "layer", "direction")
"""The unit objectives (``target`` optimizes class logits instead); see
:data:`cnnexplain.explain.visualize.objectives.OBJECTIVES`."""
DIRECTIONS = ("max", "min", "both")
PARAMETERIZATIONS = ("fourier", "pixel")
TRANSFORMS = ("standard", "none")
DEFAULT_TOP = 8
"""``units`` default: the ``top:8`` channels."""


@dataclass(frozen=True)
class UnitSpec:
    """Parsed ``units``: ``kind`` ``list`` (``indices``), ``all`` or ``top`` (the ``count``
    channels with the highest mean activation over the dataset)."""

    kind: str
    indices: tuple[int, ...] = ()
    count: int = 0

    @property
    def text(self) -> str:
        if self.kind == "list":
            return ",".join(map(str, self.indices))
        return "all" if self.kind == "all" else f"top:{self.count}"


def parse_units(value: str | None) -> UnitSpec:
    """``"0,5,7"``, ``"all"`` or ``"top:K"`` (None: ``top:8``) -> :class:`UnitSpec`;
    ValueError with the reason otherwise."""
    if value is None:
        return UnitSpec("top", count=DEFAULT_TOP)
    text = str(value).replace(" ", "")
    if text == "all":
        return UnitSpec("all")
    if text.startswith("top:"):
        k = text[4:]
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"top:K needs a whole number K of at least 1, got {value!r}")
        return UnitSpec("top", count=int(k))
    parts = [p for p in text.split(",") if p]
    if not parts or not all(p.isdigit() for p in parts):
        bad = next((p for p in parts if not p.isdigit()), text)
        raise ValueError(f"unknown unit {bad!r}: expected channel indices such as 0,5,7, all, "
                         "or top:K")
    return UnitSpec("list", indices=tuple(dict.fromkeys(int(p) for p in parts)))


def parse_position(value: str | None) -> tuple[int, int] | None:
    """``"x,y"`` (column, row; whole numbers from 0) -> ``(x, y)``; None passes through;
    ValueError with the reason otherwise."""
    if value is None:
        return None
    parts = [p for p in str(value).replace(" ", "").split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"must be x,y (column, row of the layer's map, from 0), got {value!r}")
    return int(parts[0]), int(parts[1])


def _problem(parse):
    def problem(value):
        try:
            parse(value)
        except ValueError as exc:
            return str(exc)
        return None
    return problem


@dataclass
class VisualizeData(DataOptions):
    """The dataset whose images rank the units and give their top and bottom examples."""

    batch_size: int = option(32, low=1, help="Images per batch: dataset images per forward "
                             "pass, and images optimized together.", panel=DATA)


@dataclass
class VisualizeOptions:
    """``cnnexplain visualize``."""

    model: ModelOptions = group(ModelOptions)
    data: VisualizeData = group(VisualizeData)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    units: str | None = option(None, check=_problem(parse_units), help="Channels of `layer` to "
                               "visualize: indices (0,5,7), all, or top:K (the K channels with "
                               "the highest mean activation over the dataset). Default: top:8.",
                               panel=VIS, show_default=False, example="0,5,7")
    neuron: str | None = option(None, check=_problem(parse_position), help="x,y: one position "
                                "(column, row) of the layer's map; each channel is optimized "
                                "there instead of over the whole map (`objective=neuron`, "
                                "whose default is the centre).", panel=VIS, show_default=False,
                                example="2,2")
    target: list[str] | None = option(None, help="Class names or indices (repeat or "
                                      "comma-separate): optimize each class's pre-softmax logit "
                                      "instead of units of `layer`.", panel=VIS,
                                      show_default=False)
    objective: str = option("channel", choices=OBJECTIVES, help="channel (mean of a channel "
                            "over the map), neuron (a channel at one position), layer (mean "
                            "squared activation of the whole layer: DeepDream) or direction (a "
                            "direction in channel space).", panel=VIS)
    direction: str = option("max", choices=DIRECTIONS, help="max (what excites the unit), min "
                            "(what inhibits it) or both.", panel=VIS)
    direction_vector: Path | None = option(None, help="A .npy of K floats, or D x K for D "
                                           "directions, in the layer's channel space (for "
                                           "`objective=direction`). Default: one random unit "
                                           "direction drawn with `seed`.", panel=VIS,
                                           show_default=False)
    examples: int = option(8, low=0, help="Top and bottom dataset examples shown per unit, "
                           "with the unit's map over them (0: none).", panel=VIS)
    steps: int = option(256, low=1, help="Optimization steps (Adam).", panel=OPT)
    lr: float = option(0.05, low=0, low_open=True, help="Adam learning rate (lucid's 0.05).",
                       panel=OPT)
    size: int | None = option(None, low=8, help="Side of the optimized images in pixels. "
                              "Default: the model's input size (`resize`, else the dataset's "
                              "images).", panel=OPT, show_default=False, example=32)
    diversity: int = option(1, low=1, help="Images per unit and direction, pushed apart by a "
                            "diversity term (different facets of the unit).", panel=OPT)
    diversity_weight: float = option(1e2, low=0, help="Weight of the diversity term (lucid's "
                                     "1e2); used when `diversity` is at least 2.", panel=OPT)
    tv: float = option(0.0, low=0, help="Weight of the total-variation penalty (mean absolute "
                       "difference of neighbouring pixels).", panel=OPT)
    l2: float = option(0.0, low=0, help="Weight of the L2 penalty (mean squared distance of the "
                       "pixels from grey).", panel=OPT)
    param: str = option("fourier", choices=PARAMETERIZATIONS, help="fourier (decorrelated "
                        "Fourier basis, lucid's default) or pixel.", panel=OPT)
    decorrelate: bool = option(True, negatable=True, help="Decorrelate the colour channels "
                               "(lucid's ImageNet colour matrix).", panel=OPT)
    transforms: str = option("standard", choices=TRANSFORMS, help="standard (random jitter, "
                             "scale 0.9-1.1 and rotation of -10..10 degrees at every step, "
                             "jitter scaled to the image side) or none.", panel=OPT)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def targets(self) -> list[str]:
        out: list[str] = []
        for v in self.target or []:
            out.extend(p.strip() for p in str(v).split(",") if p.strip())
        return list(dict.fromkeys(out))

    def unit_spec(self) -> UnitSpec:
        return parse_units(self.units)

    def position(self) -> tuple[int, int] | None:
        return parse_position(self.neuron)

    def effective_objective(self) -> str:
        """``logit`` with `target`, ``neuron`` when `neuron` is given with the default
        objective, else `objective`."""
        if self.targets():
            return "logit"
        if self.neuron is not None and self.objective == "channel":
            return "neuron"
        return self.objective

    def validate(self) -> "VisualizeOptions":
        """Bounds and choices, then the combinations (before anything is loaded)."""
        check(self)
        if self.targets():
            if self.units is not None:
                raise UsageError("`target` and `units` exclude each other (class logits or "
                                 "channels of `layer`)", "pass only one of `target` and `units`")
            if self.objective != "channel" or self.neuron is not None:
                raise UsageError("`target` optimizes class logits, which have no `objective` "
                                 "or `neuron`", "drop `objective` and `neuron`, or `target`")
        objective = self.effective_objective()
        if self.neuron is not None and objective != "neuron":
            raise UsageError(f"`neuron` is a position for `objective=neuron`, not "
                             f"`objective={objective}`",
                             "drop `neuron`, or pass `objective=neuron`")
        if objective in ("layer", "direction") and self.units is not None:
            what = ("the whole layer" if objective == "layer"
                    else "directions (`direction_vector`)")
            raise UsageError(f"`objective={objective}` optimizes {what}, not `units`",
                             "drop `units`")
        if self.direction_vector is not None and objective != "direction":
            raise UsageError("`direction_vector` is for `objective=direction`",
                             "pass `objective=direction`, or drop `direction_vector`")
        return self
