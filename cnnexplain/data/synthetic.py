"""The synthetic world: procedurally generated images in which every pixel's concepts are known.

An image shows one main object on a background. The class of the image is the shape of its main
object (``circle, square, triangle, star, cross, ring`` by default; ``hexagon`` and ``diamond``
are available too). Objects vary in position, size, rotation, colour and material (the pattern of
their surface); backgrounds vary in colour and texture, and the kind of background is the
image's *scene*. Every pixel is labelled in the six categories of Broden
(../shared/reference/broden-and-dissection.md): ``color`` (every pixel), ``object`` (the shape,
or ``marker`` for the Clever-Hans patch), ``part`` (two layers: layer 1 splits each shape into
two parts such as ``star-arm``/``star-centre`` or ``square-outline``/``square-fill``; layer 2 is
a smaller overlapping part such as ``star-tip`` or ``square-corner``; circles and rings have no
layer-2 part), ``material`` (object surface), and per image ``scene`` (names end in ``-s``) and
``texture`` (background pattern). Colours are Broden's eleven colour names ending in ``-c``.

Determinism: :func:`render` is a pure function of ``(config, index)``; it draws every random
number from ``np.random.default_rng([config.seed, index])``, so any subset of images renders
independently (DataLoader workers, shards, exports). Splits are disjoint *index ranges*: item
``i`` of split ``train`` / ``val`` / ``test`` is world index ``i`` / ``10**9 + i`` /
``2 * 10**9 + i`` (:data:`SPLIT_OFFSETS`). Classes are balanced: the class of world index ``k``
is ``classes[k % len(classes)]``.

Known answers can be planted: a *correlation* ``(concept, class, strength)`` makes a fraction
``strength`` of that class's images carry the concept (object colour, object material, scene or
texture; the remaining images of the class never carry it) while other classes carry it at the
world's base rate; a *Clever-Hans* marker (a small square of the reserved colour ``pink-c`` in a
corner region) appears with probability ``strength`` in one class and with probability
:data:`HANS_ELSEWHERE` in the others; a *second object* of another class appears with a given
probability, placed so that it does not overlap the main one when possible.

Dataset spec grammar (``dataset``; keys in any order, each at most once except ``correlate``)::

    synthetic[:KEY=VALUE[,KEY=VALUE...]]
      n=INT              images in the train split (default 2000)
      nval=INT           images in the val split (default max(1, n // 5))
      ntest=INT          images in the test split (default max(1, n // 5))
      res=INT            image side in pixels, >= 16 (default 32)
      seed=INT           world seed (default 0)
      classes=A+B+...    shape classes, >= 2, '+'-separated (default the six shapes above)
      correlate=CONCEPT@CLASS=STRENGTH   e.g. correlate=red-c@star=0.9 (repeatable)
      hans=CLASS@STRENGTH                e.g. hans=star@0.8
      second=PROB        probability of a second object of another class (default 0)
      fresh=0|1          1 (default): training draws n new images every epoch; 0: the same n

e.g. ``synthetic:n=600,res=32,seed=1,correlate=red-c@star=0.9,hans=star@0.8,second=0.3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np
import torch

from cnnexplain import __version__
from cnnexplain.data.base import ImageDataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.fingerprint import digest_parts

# Bump when rendering changes: it is part of every synthetic dataset's fingerprint.
WORLD_VERSION = "2"

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}

# ---------------------------------------------------------------------------------------------
# Palette, shapes, materials, textures, scenes
# ---------------------------------------------------------------------------------------------

# Broden's eleven colour names; a pixel's RGB is round(COLORS[c] * shade), shade in
# [SHADE_MIN, 1] (materials and the noisy texture modulate brightness, never the colour label).
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "blue": (30, 70, 220),
    "brown": (140, 80, 30),
    "green": (40, 170, 50),
    "grey": (128, 128, 128),
    "orange": (245, 140, 20),
    "pink": (255, 105, 200),
    "purple": (130, 40, 180),
    "red": (220, 30, 30),
    "white": (240, 240, 240),
    "yellow": (245, 225, 40),
}
SHADE_MIN = 0.75
MARKER_COLOR = "pink"  # reserved for the Clever-Hans marker: never an object or background colour
OBJECT_COLORS = tuple(c for c in COLORS if c != MARKER_COLOR)
HANS_ELSEWHERE = 0.02  # marker probability in the classes other than the Clever-Hans class

OUTLINE = 0.3  # outline parts: the outer 30% of the shape's gauge (shape minus a 0.7 scaled copy)
MAIN_RADIUS = (0.28, 0.42)  # circumradius of the main object, fraction of the image side
MAIN_RADIUS_BESIDE_SECOND = (0.18, 0.30)  # ... in images with a second object (room for both)
SECOND_RADIUS = (0.12, 0.20)
TEXTURE_SCALE = 0.5
"""Background patterns (stripes, dots, checks) at half the scale of world version 1: patterns
at the scale of the objects (dots as large as a small circle, checks as large as a small square)
made the main object's shape hard to tell apart from its background, so that ResNet-18 needed
about twice the training images (README, "The default world and training recipe")."""
MARKER_SIDE = 0.12  # marker square side, fraction of the image side (at least 2 px)

MATERIALS = ("plastic", "metal", "wood", "fabric", "stone")
TEXTURES = ("plain", "striped", "dotted", "checkered", "noisy")


@dataclass(frozen=True)
class Scene:
    """A background kind: colours it draws from (>= 3) and weights of its textures."""

    name: str
    palette: tuple[str, ...]
    textures: Mapping[str, float]


SCENES: dict[str, Scene] = {
    s.name: s
    for s in [
        Scene("desert-s", ("yellow", "orange", "brown"), {"plain": 2, "dotted": 1, "noisy": 2}),
        Scene("ocean-s", ("blue", "white", "grey"), {"striped": 3, "plain": 1, "noisy": 1}),
        Scene("forest-s", ("green", "brown", "yellow"), {"noisy": 2, "dotted": 1, "striped": 1}),
        Scene("snow-s", ("white", "grey", "blue"), {"plain": 2, "dotted": 2}),
        Scene("night-s", ("black", "purple", "blue"), {"dotted": 3, "plain": 1}),
        Scene("city-s", ("grey", "red", "black"), {"checkered": 3, "striped": 1}),
    ]
}


@dataclass(frozen=True)
class Shape:
    """A class of the world. ``parts``: the two layer-1 parts (they partition the shape);
    ``detail``: the layer-2 part (a smaller region overlapping layer 1) or None.
    ``geometry(u, v)`` takes local coordinates in units of the circumradius (arrays of one shape)
    and returns boolean masks ``(body, part_a, part_b, detail_or_None)``."""

    name: str
    parts: tuple[str, str]
    detail: str | None
    geometry: Callable[[np.ndarray, np.ndarray], tuple]


def _folded_angle(u: np.ndarray, v: np.ndarray, n: int, phase: float) -> np.ndarray:
    """Angle of (u, v) to the nearest of the ``n`` directions ``phase + 2 pi k / n``, in
    [0, pi / n]."""
    sector = 2.0 * np.pi / n
    a = np.mod(np.arctan2(v, u) - phase, sector)
    return np.minimum(a, sector - a)


def _polygon_gauge(u, v, n: int, phase: float, apothem: float) -> np.ndarray:
    """Gauge of a regular n-gon whose edge normals point at ``phase + 2 pi k / n``: max_k of
    (n_k . p) / apothem = rho cos(angle to the nearest normal) / apothem (<= 1 inside)."""
    return np.hypot(u, v) * np.cos(_folded_angle(u, v, n, phase)) / apothem


def _outline_fill(body: np.ndarray, gauge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fill = gauge <= 1.0 - OUTLINE
    return body & ~fill, body & fill


def _circle(u, v):
    rho = np.hypot(u, v)
    body = rho <= 1.0
    return (body, *_outline_fill(body, rho), None)


def _ring(u, v):
    rho = np.hypot(u, v)
    body = (rho <= 1.0) & (rho >= 0.5)
    outline = body & ((rho >= 0.85) | (rho <= 0.65))
    return body, outline, body & ~outline, None


def _square(u, v):
    a = 1.0 / math.sqrt(2.0)
    g = _polygon_gauge(u, v, 4, 0.0, a)
    body = g <= 1.0
    corner = body & (np.abs(u) >= 0.6 * a) & (np.abs(v) >= 0.6 * a)
    return (body, *_outline_fill(body, g), corner)


def _triangle(u, v):
    # vertices at -90, 30, 150 degrees (one points up, y grows downwards); inradius 0.5
    g = _polygon_gauge(u, v, 3, math.pi / 2.0, 0.5)
    body = g <= 1.0
    return (body, *_outline_fill(body, g), body & (np.hypot(u, v) >= 0.6))


def _hexagon(u, v):
    g = _polygon_gauge(u, v, 6, math.pi / 6.0, math.cos(math.pi / 6.0))
    body = g <= 1.0
    return (body, *_outline_fill(body, g), body & (np.hypot(u, v) >= 0.9))


def _diamond(u, v):
    g = np.abs(u) + np.abs(v) / 0.6
    body = g <= 1.0
    corner = body & ((np.abs(u) >= 0.7) | (np.abs(v) >= 0.42))
    return (body, *_outline_fill(body, g), corner)


STAR_INNER = 0.45  # inner-vertex radius of the five-pointed star


def _star(u, v):
    # outer vertices at -90 + 72k degrees; inner vertices at radius STAR_INNER in between.
    half = math.pi / 5.0
    a = _folded_angle(u, v, 5, -math.pi / 2.0)
    rho = np.hypot(u, v)
    nx, ny = STAR_INNER * math.sin(half), 1.0 - STAR_INNER * math.cos(half)
    g = rho * (nx * np.cos(a) + ny * np.sin(a)) / nx  # rho / R(a), R = boundary radius
    body = g <= 1.0
    centre = rho * np.cos(a) <= STAR_INNER * math.cos(half)  # inner pentagon
    return body, body & ~centre, body & centre, body & (rho >= 0.7)


CROSS_HALF = 1.0 / math.sqrt(1.09)  # bar half-length; half-thickness 0.3x; circumradius 1
CROSS_THICK = 0.3 * CROSS_HALF


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    body = ((au <= CROSS_HALF) & (av <= CROSS_THICK)) | ((av <= CROSS_HALF) & (au <= CROSS_THICK))
    centre = (au <= CROSS_THICK) & (av <= CROSS_THICK)
    ends = body & (np.maximum(au, av) >= 0.7 * CROSS_HALF)
    return body, body & ~centre, centre, ends


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape("circle", ("circle-outline", "circle-fill"), None, _circle),
        Shape("square", ("square-outline", "square-fill"), "square-corner", _square),
        Shape("triangle", ("triangle-outline", "triangle-fill"), "triangle-corner", _triangle),
        Shape("star", ("star-arm", "star-centre"), "star-tip", _star),
        Shape("cross", ("cross-arm", "cross-centre"), "cross-end", _cross),
        Shape("ring", ("ring-outline", "ring-fill"), None, _ring),
        Shape("hexagon", ("hexagon-outline", "hexagon-fill"), "hexagon-corner", _hexagon),
        Shape("diamond", ("diamond-outline", "diamond-fill"), "diamond-corner", _diamond),
    ]
}
DEFAULT_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
MARKER = "marker"

# ---------------------------------------------------------------------------------------------
# Ontology: one numbering shared by the renderer, the Broden export, dissect and TCAV
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")
IMAGE_CATEGORIES = ("scene", "texture")
LAYERS = {"color": 1, "object": 1, "part": 2, "material": 1}  # label-map layers per category


@dataclass(frozen=True)
class Concept:
    number: int  # global label number, 1-based (0 = unlabeled)
    name: str
    category: str


class Ontology:
    """Every concept of the world with its global number, Broden name and category.

    Canonical numbering (fixed, independent of a world's config): colours, objects (the eight
    shapes, then ``marker``), parts, materials, scenes, textures, in that order from 1. The
    Broden export renumbers by descending frequency as real Broden does and records the mapping
    (:class:`cnnexplain.data.broden.BrodenExport`); names never change. The read API
    (``label_names``, ``number``, ``name``, ``category_of``, ``numbers_in``) matches
    :class:`cnnexplain.data.broden.LabelTable`.
    """

    categories = CATEGORIES

    def __init__(self, concepts: list[Concept]):
        self.concepts = tuple(concepts)
        self._by_name = {c.name: c for c in self.concepts}
        self._by_number = {c.number: c for c in self.concepts}
        self.label_names = ["-"] + [c.name for c in self.concepts]

    @classmethod
    def build(cls) -> "Ontology":
        names: list[tuple[str, str]] = [(f"{c}-c", "color") for c in COLORS]
        names += [(s, "object") for s in SHAPES] + [(MARKER, "object")]
        for s in SHAPES.values():
            names += [(p, "part") for p in s.parts] + ([(s.detail, "part")] if s.detail else [])
        names += [(m, "material") for m in MATERIALS]
        names += [(s, "scene") for s in SCENES] + [(t, "texture") for t in TEXTURES]
        return cls([Concept(i + 1, n, c) for i, (n, c) in enumerate(names)])

    def __len__(self) -> int:
        return len(self.concepts)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def number(self, name: str) -> int:
        """Global number of a concept name; a one-line UsageError names close matches."""
        try:
            return self._by_name[name].number
        except KeyError:
            raise UsageError(f"unknown concept {name!r}{close_matches(name, self._by_name)}",
                             "see `cnnexplain data inspect synthetic` for the concept names"
                             ) from None

    def name(self, number: int) -> str:
        return self.label_names[number]

    def category_of(self, number: int) -> str:
        """The (only) category of a concept of the world."""
        return self._by_number[int(number)].category

    def numbers_in(self, category: str) -> list[int]:
        return [c.number for c in self.concepts if c.category == category]

    def names_in(self, category: str) -> list[str]:
        return [c.name for c in self.concepts if c.category == category]

    def concept(self, name: str) -> Concept:
        self.number(name)
        return self._by_name[name]


ONTOLOGY = Ontology.build()


def _palette() -> np.ndarray:
    """float32 [len(ONTOLOGY) + 1, 3]: RGB of each global colour number (read-only)."""
    table = np.zeros((len(ONTOLOGY) + 1, 3), np.float32)
    for name, rgb in COLORS.items():
        table[ONTOLOGY.number(f"{name}-c")] = rgb
    table.setflags(write=False)
    return table


_PALETTE = _palette()

# Which attribute of an image a correlated concept sets (see WorldConfig.correlations).
CORRELATABLE = {"color": "color", "material": "material", "scene": "scene", "texture": "texture"}

# ---------------------------------------------------------------------------------------------
# Configuration and spec strings
# ---------------------------------------------------------------------------------------------


def _int(key: str, text: str, lo: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"synthetic option {key}={text!r} is not an integer",
                         f"pass e.g. {key}={max(lo, 64)}") from None
    if v < lo:
        raise UsageError(f"synthetic option {key}={v} must be >= {lo}", f"pass {key}={lo} or more")
    return v


def _prob(key: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise UsageError(f"synthetic option {key} needs a probability in [0, 1], got {text!r}",
                         f"pass e.g. {key}=0.9")
    return v


def _split_at(key: str, text: str, sep: str, example: str) -> tuple[str, str]:
    if sep not in text:
        raise UsageError(f"synthetic option {key}={text!r} is malformed",
                         f"write it as {key}={example}")
    a, b = text.rsplit(sep, 1)
    return a, b


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the synthetic world (see the module docstring).

    ``num_images``: size of the train split (also the number of images a ``data synth``
    export writes); ``num_val`` / ``num_test``: sizes of the val / test splits (default
    ``max(1, num_images // 5)``); ``correlations``: ``(concept, class, strength)`` triples;
    ``clever_hans``: ``(class, strength)`` or None; ``second_object``: probability of a second
    object of another class; ``fresh``: training draws ``num_images`` new images every epoch
    (the world is procedural: epoch ``e`` trains on world indices ``e n .. (e + 1) n - 1``), so
    a model cannot memorize its training images; False: the same ``num_images`` every epoch.
    """

    num_images: int = 2000
    resolution: int = 32
    seed: int = 0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    correlations: tuple[tuple[str, str, float], ...] = ()
    clever_hans: tuple[str, float] | None = None
    second_object: float = 0.0
    num_val: int | None = None
    num_test: int | None = None
    fresh: bool = True

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "correlations",
                           tuple((str(c), str(k), float(s)) for c, k, s in self.correlations))
        if self.clever_hans is not None:
            k, s = self.clever_hans
            object.__setattr__(self, "clever_hans", (str(k), float(s)))
        if self.resolution < 16:
            raise UsageError(f"synthetic resolution {self.resolution} is too small",
                             "use a resolution of 16 pixels or more (32 is the default)")
        if self.num_images < 1:
            raise UsageError(f"synthetic num_images must be >= 1, got {self.num_images}",
                             "pass e.g. `num_images=600`")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise UsageError("synthetic classes must be >= 2 distinct shapes, got "
                             f"{list(self.classes)}",
                             f"choose from {', '.join(SHAPES)}")
        for k in self.classes:
            self._check_class(k)
        seen = set()
        for concept, k, s in self.correlations:
            self._check_member(k, "correlation")
            cat = ONTOLOGY.category_of(ONTOLOGY.number(concept))
            if cat not in CORRELATABLE or concept == f"{MARKER_COLOR}-c":
                allowed = [n for c in CORRELATABLE for n in ONTOLOGY.names_in(c)
                           if n != f"{MARKER_COLOR}-c"]
                raise UsageError(f"concept {concept!r} ({cat}) cannot be correlated with a class",
                                 "choose a colour, material, scene or texture: "
                                 + ", ".join(allowed))
            if (k, cat) in seen:
                raise UsageError(f"two correlations set the {cat} of class {k!r}",
                                 "keep one correlation per class and category")
            seen.add((k, cat))
            if not 0.0 <= s <= 1.0:
                raise UsageError(f"correlation strength {s} for {concept}@{k} is not in [0, 1]",
                                 "pass e.g. correlate=red-c@star=0.9")
        if self.clever_hans is not None:
            self._check_member(self.clever_hans[0], "Clever-Hans")
            if not 0.0 <= self.clever_hans[1] <= 1.0:
                raise UsageError(f"Clever-Hans strength {self.clever_hans[1]} is not in [0, 1]",
                                 "pass e.g. hans=star@0.8")
        if not 0.0 <= self.second_object <= 1.0:
            raise UsageError(f"second-object probability {self.second_object} is not in [0, 1]",
                             "pass e.g. second=0.3")

    @staticmethod
    def _check_class(name: str) -> None:
        if name not in SHAPES:
            raise UsageError(f"unknown shape class {name!r}{close_matches(name, SHAPES)}",
                             f"choose from {', '.join(SHAPES)}")

    def _check_member(self, name: str, what: str) -> None:
        self._check_class(name)
        if name not in self.classes:
            raise UsageError(f"{what} class {name!r} is not one of the world's classes "
                             f"({', '.join(self.classes)})", f"add it with classes=...+{name}")

    def split_size(self, split: str) -> int:
        """Number of images in a split (train: ``num_images``; val/test default n // 5)."""
        check_split(split)
        explicit = {"train": self.num_images, "val": self.num_val, "test": self.num_test}[split]
        return explicit if explicit is not None else max(1, self.num_images // 5)

    def with_resolution(self, resolution: int | None) -> "WorldConfig":
        if resolution in (None, self.resolution):
            return self
        return replace(self, resolution=int(resolution))

    def to_dict(self) -> dict:
        return {"num_images": self.num_images, "resolution": self.resolution, "seed": self.seed,
                "classes": list(self.classes),
                "correlations": [list(c) for c in self.correlations],
                "clever_hans": list(self.clever_hans) if self.clever_hans else None,
                "second_object": self.second_object, "num_val": self.num_val,
                "num_test": self.num_test, "fresh": self.fresh}

    @classmethod
    def from_dict(cls, d: Mapping) -> "WorldConfig":
        d = dict(d)
        d["classes"] = tuple(d.get("classes", DEFAULT_CLASSES))
        d["correlations"] = tuple(tuple(c) for c in d.get("correlations", ()))
        d["clever_hans"] = tuple(d["clever_hans"]) if d.get("clever_hans") else None
        return cls(**d)

    def to_spec(self) -> str:
        """The spec string that reopens this world (defaults left out)."""
        default = WorldConfig()
        parts = []
        for key, attr in (("n", "num_images"), ("nval", "num_val"), ("ntest", "num_test"),
                          ("res", "resolution"), ("seed", "seed")):
            if getattr(self, attr) != getattr(default, attr):
                parts.append(f"{key}={getattr(self, attr)}")
        if self.classes != default.classes:
            parts.append("classes=" + "+".join(self.classes))
        parts += [f"correlate={c}@{k}={s:g}" for c, k, s in self.correlations]
        if self.clever_hans:
            parts.append(f"hans={self.clever_hans[0]}@{self.clever_hans[1]:g}")
        if self.second_object:
            parts.append(f"second={self.second_object:g}")
        if not self.fresh:
            parts.append("fresh=0")
        return "synthetic" + (":" + ",".join(parts) if parts else "")

    @classmethod
    def from_spec(cls, spec: str) -> "WorldConfig":
        """Parse ``synthetic[:key=value,...]`` (grammar in the module docstring)."""
        head, _, rest = spec.partition(":")
        if head != "synthetic":
            raise UsageError(f"not a synthetic dataset spec: {spec!r}",
                             "write synthetic[:key=value,...]")
        kw: dict = {}
        correlations = []
        for item in (p.strip() for p in rest.split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in _SPEC_KEYS:
                valid = ", ".join(_SPEC_KEYS)
                what = f"unknown synthetic option {key!r}{close_matches(key, _SPEC_KEYS)}" if eq \
                    else f"synthetic option {item!r} has no value"
                raise UsageError(what, f"valid options: {valid} (e.g. synthetic:n=600,res=32)")
            attr, parse = _SPEC_KEYS[key]
            if attr in kw and attr != "correlations":
                raise UsageError(f"synthetic option {key} is given twice", f"keep one {key}=...")
            if attr == "correlations":
                correlations.append(parse(value.strip()))
                kw[attr] = True
            else:
                kw[attr] = parse(value.strip())
        if correlations:
            kw["correlations"] = tuple(correlations)
        return cls(**kw)


def _parse_correlation(text: str) -> tuple[str, str, float]:
    left, strength = _split_at("correlate", text, "=", "red-c@star=0.9")
    concept, klass = _split_at("correlate", left, "@", "red-c@star=0.9")
    return concept, klass, _prob("correlate", strength)


def _parse_hans(text: str) -> tuple[str, float]:
    klass, strength = _split_at("hans", text, "@", "star@0.8")
    return klass, _prob("hans", strength)


_SPEC_KEYS: dict[str, tuple[str, Callable]] = {
    "n": ("num_images", lambda t: _int("n", t, 1)),
    "nval": ("num_val", lambda t: _int("nval", t, 1)),
    "ntest": ("num_test", lambda t: _int("ntest", t, 1)),
    "res": ("resolution", lambda t: _int("res", t, 16)),
    "seed": ("seed", lambda t: _int("seed", t, 0)),
    "classes": ("classes", lambda t: tuple(c.strip() for c in t.split("+") if c.strip())),
    "correlate": ("correlations", _parse_correlation),
    "hans": ("clever_hans", _parse_hans),
    "second": ("second_object", lambda t: _prob("second", t)),
    "fresh": ("fresh", lambda t: bool(_int("fresh", t, 0))),
}


def check_split(split: str) -> str:
    if split not in SPLIT_OFFSETS:
        raise UsageError(f"unknown split {split!r}{close_matches(str(split), SPLIT_OFFSETS)}",
                         "pass `split` train, val or test")
    return split


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldObject:
    """One object of an image. ``mask``: bool [H, W], its *visible* pixels (the main object is
    drawn over the second, the marker over both); ``box``: (x0, y0, x1, y1) tight bounds of
    ``mask`` in pixels, end exclusive ((0, 0, 0, 0) if nothing is visible); ``center`` (x, y) and
    ``radius`` (circumradius) in pixels, pixel centres at (j + 0.5, i + 0.5); ``rotation`` in
    radians."""

    class_index: int
    shape: str
    color: str
    material: str
    center: tuple[float, float]
    radius: float
    rotation: float
    mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Sample:
    """One rendered image and its ground truth (all label numbers are global ontology numbers).

    image   uint8 [H, W, 3]
    pixel   {category: int32 [L, H, W]} for color (L=1), object (1), part (2), material (1)
    image_labels {scene: (n,), texture: (n,)}
    objects main object first, then the second object if any
    planted concepts set by a correlation in this image; hans: marker drawn (hans_box: its box)
    overlap the second object could not be placed apart from the main one
    """

    index: int
    label: int
    class_name: str
    image: np.ndarray
    pixel: dict
    image_labels: dict
    objects: tuple
    scene: str
    texture: str
    planted: tuple
    hans: bool
    hans_box: tuple | None
    overlap: bool

    @property
    def color(self) -> np.ndarray:
        return self.pixel["color"][0]

    @property
    def object(self) -> np.ndarray:
        return self.pixel["object"][0]

    @property
    def part(self) -> np.ndarray:
        return self.pixel["part"]

    @property
    def material(self) -> np.ndarray:
        return self.pixel["material"][0]

    def concept_numbers(self) -> set[int]:
        """Global numbers of every concept present in the image."""
        present = set()
        for maps in self.pixel.values():
            present.update(int(x) for x in np.unique(maps) if x)
        for nums in self.image_labels.values():
            present.update(nums)
        return present


def _choice(rng: np.random.Generator, options, exclude=()) -> str:
    opts = [o for o in options if o not in exclude]
    return opts[int(rng.integers(len(opts)))]


def _weighted(rng: np.random.Generator, weights: Mapping[str, float], exclude=()) -> str:
    names = [k for k in weights if k not in exclude] or [t for t in TEXTURES if t not in exclude]
    w = np.array([weights.get(k, 1.0) for k in names], np.float64)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _texture(rng: np.random.Generator, kind: str, res: int, yy: np.ndarray, xx: np.ndarray):
    """Background pattern [H, W]: (pattern-colour mask bool, shade float32). Scales are
    fractions of the image side, so the world looks the same at every resolution."""
    pattern = np.zeros((res, res), bool)
    shade = np.ones((res, res), np.float32)
    if kind == "striped":
        period = rng.uniform(0.16, 0.25) * TEXTURE_SCALE * res
        ang = rng.uniform(0.0, np.pi)
        phase = rng.uniform(0.0, period)
        t = xx * np.cos(ang) + yy * np.sin(ang) + phase
        pattern = np.mod(t, period) < period / 2.0
    elif kind == "dotted":
        step = rng.uniform(0.16, 0.25) * TEXTURE_SCALE * res
        ox, oy = rng.uniform(0.0, step, 2)
        dx = np.mod(xx + ox, step) - step / 2.0
        dy = np.mod(yy + oy, step) - step / 2.0
        pattern = dx * dx + dy * dy <= (0.28 * step) ** 2
    elif kind == "checkered":
        cell = rng.uniform(0.12, 0.2) * TEXTURE_SCALE * res
        ox, oy = rng.uniform(0.0, cell, 2)
        pattern = (np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2 == 1
    elif kind == "noisy":
        shade = rng.uniform(SHADE_MIN, 1.0, (res, res)).astype(np.float32)
    return pattern, shade


def _material_shade(rng: np.random.Generator, material: str, u: np.ndarray, v: np.ndarray):
    """Surface pattern of an object, as a shade in [SHADE_MIN, 1] over its local coordinates
    (u, v in circumradius units, so the pattern moves and turns with the object)."""
    span = 1.0 - SHADE_MIN
    if material == "metal":  # linear sheen across the object
        return (SHADE_MIN + span * np.clip((u + 1.0) / 2.0, 0.0, 1.0)).astype(np.float32)
    if material == "wood":  # wavy grain
        t = np.sin(2.0 * np.pi * (3.0 * v + 0.5 * np.sin(2.0 * np.pi * 0.75 * u)))
        return (SHADE_MIN + span * (0.5 + 0.5 * t)).astype(np.float32)
    if material == "fabric":  # fine weave
        check = (np.floor(u / 0.15) + np.floor(v / 0.15)) % 2
        return np.where(check == 1, SHADE_MIN, 1.0).astype(np.float32)
    if material == "stone":  # speckle
        return rng.uniform(SHADE_MIN, 1.0, u.shape).astype(np.float32)
    return np.ones(u.shape, np.float32)  # plastic


@dataclass
class _Canvas:
    """Label maps being painted (global numbers) and the brightness of every pixel."""

    color: np.ndarray
    shade: np.ndarray
    object: np.ndarray
    part: np.ndarray
    material: np.ndarray
    owner: np.ndarray  # int8: which object (1 = main, 2 = second) owns a pixel, 0 = none


def _place(rng: np.random.Generator, res: int, radius_range, avoid=None, tries: int = 20):
    """Draw (cx, cy, r, theta) inside the image; with ``avoid`` = (cx, cy, r), retry until the
    circumcircles are disjoint. Returns the placement and whether it still overlaps."""
    for _ in range(tries):
        r = rng.uniform(*radius_range) * res
        cx, cy = rng.uniform(r, res - r, 2)
        theta = rng.uniform(0.0, 2.0 * np.pi)
        if avoid is None or math.hypot(cx - avoid[0], cy - avoid[1]) > r + avoid[2] + 1.0:
            return (float(cx), float(cy), float(r), float(theta)), False
    return (float(cx), float(cy), float(r), float(theta)), True


def _draw(canvas: _Canvas, rng: np.random.Generator, shape: Shape, color: str, material: str,
          place, owner: int) -> None:
    """Paint one object over the canvas (vectorized over its bounding window)."""
    cx, cy, r, theta = place
    res = canvas.color.shape[0]
    y0, y1 = max(0, int(cy - r) - 1), min(res, int(math.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(cx - r) - 1), min(res, int(math.ceil(cx + r)) + 1)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = math.cos(theta), math.sin(theta)
    u = (xs * c + ys * s) / r
    v = (-xs * s + ys * c) / r
    body, part_a, part_b, detail = shape.geometry(u, v)
    win = (slice(y0, y1), slice(x0, x1))
    num = ONTOLOGY.number
    shade = _material_shade(rng, material, u, v)
    canvas.color[win][body] = num(f"{color}-c")
    canvas.shade[win][body] = shade[body]
    canvas.object[win][body] = num(shape.name)
    canvas.material[win][body] = num(material)
    layer1 = canvas.part[0][win]
    layer1[body] = 0
    layer1[part_a] = num(shape.parts[0])
    layer1[part_b] = num(shape.parts[1])
    layer2 = canvas.part[1][win]
    layer2[body] = 0
    if detail is not None:
        layer2[detail] = num(shape.detail)
    canvas.owner[win][body] = owner


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) of a bool mask [H, W], end exclusive; zeros if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _marker_box(rng: np.random.Generator, res: int, owner: np.ndarray):
    """A marker square in one of the four corner regions, preferring corners where it hides no
    object pixel. Returns (x0, y0, x1, y1)."""
    side = max(2, int(round(MARKER_SIDE * res)))
    margin = max(1, int(round(0.04 * res)))
    jx, jy = (int(v) for v in rng.integers(0, margin + 1, 2))
    boxes = []
    for corner in range(4):
        x0 = jx if corner % 2 == 0 else res - side - jx
        y0 = jy if corner < 2 else res - side - jy
        boxes.append((x0, y0, x0 + side, y0 + side))
    order = [int(i) for i in rng.permutation(4)]
    free = [i for i in order if not owner[boxes[i][1]:boxes[i][3], boxes[i][0]:boxes[i][2]].any()]
    return boxes[(free or order)[0]]


def render(config: WorldConfig, index: int, main_color: str | None = None) -> Sample:
    """Render world image ``index`` (any int >= 0): a pure function of ``(config, index)``.

    ``main_color``: paint the main object in this colour (an ``OBJECT_COLORS`` name) instead
    of the drawn one; every random draw and every other pixel stay the same, so the image is
    the counterfactual of the same scene (``recipes/recolour_control.py`` uses it to measure
    whether a model relies on a planted colour).

    Random numbers come from ``np.random.default_rng([config.seed, index])`` in a fixed order:
    one draw per planted correlation, scene, texture, colours, material, whether a second object
    is drawn, main placement, second object, marker flag, background pattern, object surfaces,
    marker corner. Shapes: [H, W, 3]
    image, [L, H, W] label maps (see :class:`Sample`), H = W = ``config.resolution``.
    """
    res = config.resolution
    rng = np.random.default_rng([config.seed, int(index)])
    label = int(index) % len(config.classes)
    klass = config.classes[label]

    forced: dict[str, str] = {}
    avoid: dict[str, set] = {a: set() for a in CORRELATABLE.values()}
    for concept, k, strength in config.correlations:
        draw = rng.random()
        if k != klass:
            continue
        attr = CORRELATABLE[ONTOLOGY.concept(concept).category]
        value = concept[:-2] if attr == "color" else concept
        if draw < strength:
            forced[attr] = value
        else:
            avoid[attr].add(value)

    scene = forced.get("scene") or _choice(rng, SCENES, avoid["scene"])
    texture = forced.get("texture") or _weighted(rng, SCENES[scene].textures, avoid["texture"])
    fixed_color = forced.get("color")
    palette = [c for c in SCENES[scene].palette if c != fixed_color]
    base, pattern_color = (palette[int(i)] for i in rng.permutation(len(palette))[:2])
    color = fixed_color or _choice(rng, OBJECT_COLORS, {base, pattern_color} | avoid["color"])
    if main_color is not None and main_color not in OBJECT_COLORS:
        raise UsageError(f"unknown object colour {main_color!r}",
                         f"choose one of: {', '.join(OBJECT_COLORS)}")
    material = forced.get("material") or _choice(rng, MATERIALS, avoid["material"])
    has_second = config.second_object > 0 and rng.random() < config.second_object
    main_place, _ = _place(rng, res, MAIN_RADIUS_BESIDE_SECOND if has_second else MAIN_RADIUS)

    second = None
    if has_second:
        k2 = int(rng.integers(len(config.classes) - 1))
        k2 += k2 >= label
        c2 = _choice(rng, OBJECT_COLORS, {base, pattern_color, color})
        m2 = _choice(rng, MATERIALS)
        place2, overlap = _place(rng, res, SECOND_RADIUS, avoid=main_place[:3])
        second = (k2, c2, m2, place2, overlap)

    hans_p = 0.0
    if config.clever_hans is not None:
        hans_p = config.clever_hans[1] if config.clever_hans[0] == klass else HANS_ELSEWHERE
    hans = bool(config.clever_hans is not None and rng.random() < hans_p)

    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    pat, shade = _texture(rng, texture, res, yy, xx)
    num = ONTOLOGY.number
    canvas = _Canvas(
        color=np.where(pat, num(f"{pattern_color}-c"), num(f"{base}-c")).astype(np.int32),
        shade=shade,
        object=np.zeros((res, res), np.int32),
        part=np.zeros((2, res, res), np.int32),
        material=np.zeros((res, res), np.int32),
        owner=np.zeros((res, res), np.int8),
    )
    if second is not None:
        k2, c2, m2, place2, _ = second
        _draw(canvas, rng, SHAPES[config.classes[k2]], c2, m2, place2, owner=2)
    # the drawn colour stays in every draw that depends on it (the second object's); only the
    # paint changes
    color = main_color or color
    _draw(canvas, rng, SHAPES[klass], color, material, main_place, owner=1)

    hans_box = None
    if hans:
        x0, y0, x1, y1 = hans_box = _marker_box(rng, res, canvas.owner)
        win = (slice(y0, y1), slice(x0, x1))
        canvas.color[win] = num(f"{MARKER_COLOR}-c")
        canvas.shade[win] = 1.0
        canvas.object[win] = num(MARKER)
        canvas.part[:, y0:y1, x0:x1] = 0
        canvas.material[win] = 0
        canvas.owner[win] = 0

    image = np.rint(_PALETTE[canvas.color] * canvas.shade[..., None]).astype(np.uint8)
    objects = [_object(label, klass, color, material, main_place, canvas.owner == 1)]
    if second is not None:
        k2, c2, m2, place2, overlap = second
        objects.append(_object(k2, config.classes[k2], c2, m2, place2, canvas.owner == 2))
    planted = tuple(f"{v}-c" if a == "color" else v for a, v in sorted(forced.items()))
    return Sample(
        index=int(index), label=label, class_name=klass, image=image,
        pixel={"color": canvas.color[None], "object": canvas.object[None], "part": canvas.part,
               "material": canvas.material[None]},
        image_labels={"scene": (num(scene),), "texture": (num(texture),)},
        objects=tuple(objects), scene=scene, texture=texture, planted=planted, hans=hans,
        hans_box=hans_box, overlap=bool(second is not None and second[4]),
    )


def _object(k: int, shape: str, color: str, material: str, place, mask: np.ndarray) -> WorldObject:
    cx, cy, r, theta = place
    return WorldObject(class_index=int(k), shape=shape, color=color, material=material,
                       center=(cx, cy), radius=r, rotation=theta, mask=mask, box=_box(mask))


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]. Converted in numpy: torch's intra-op
    threads make the same conversion 10-30x slower on a loaded machine."""
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return torch.from_numpy(chw.astype(np.float32) * np.float32(1.0 / 255.0))


def downsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resampling of label maps [..., H, W] -> [..., height, width]: output
    pixel (i, j) takes input pixel (floor((i + 0.5) H / height), floor((j + 0.5) W / width)),
    i.e. the odd pixels (2i + 1, 2j + 1) at half resolution. This is the ground truth the
    Broden export writes (masks at sh x sw = size // 2, broden-and-dissection.md)."""
    h, w = labels.shape[-2:]
    rows = ((np.arange(height) + 0.5) * h / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * w / width).astype(np.int64)
    return labels[..., rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class SyntheticDataset(ImageDataset):
    """The synthetic world as an :class:`ImageDataset`.

    Items (fixed shapes; H = W = the render resolution, which is ``preprocessing.resize`` when
    set so that masks and boxes stay exact):

        image        float32 [3, H, W] in [0, 1]
        label        int64   class index into ``class_names``
        index        int64   position in this dataset (world index = SPLIT_OFFSETS[split] + index)
        mask         uint8   [H, W] visible pixels of the main object (0/1)
        box          float32 [4] main object's (x0, y0, x1, y1), end exclusive
        second_label int64   class of the second object, -1 when absent
        second_mask  uint8   [H, W] (zeros when absent)
        second_box   float32 [4] (zeros when absent)
        hans         bool    the Clever-Hans marker is drawn

    With ``concepts=True`` the items also carry the Broden-style ground truth of
    :class:`cnnexplain.data.broden.BrodenDataset`, at full resolution and in canonical
    :data:`ONTOLOGY` numbers: ``masks`` int32 [L, H, W] laid out per ``layer_categories``,
    ``image_labels`` int32 [2] per ``image_label_categories``, ``has_category`` bool [6].
    """


    layer_categories = [c for c in PIXEL_CATEGORIES for _ in range(LAYERS[c])]
    image_label_categories = list(IMAGE_CATEGORIES)
    categories = list(CATEGORIES)
    labels = ONTOLOGY

    def __init__(self, config: WorldConfig = WorldConfig(), split: str = "train",
                 preprocessing: Preprocessing = Preprocessing(), limit: int | None = None,
                 concepts: bool = False):
        self.world = config.with_resolution(preprocessing.resize)
        self.config = config
        self.split = check_split(split)
        self.preprocessing = preprocessing
        self.concepts = concepts
        n = self.world.split_size(split)
        self.size = n if limit is None else max(0, min(n, int(limit)))
        self.limit = limit
        self.offset = SPLIT_OFFSETS[split]
        self.class_names = list(config.classes)
        self.spec = config.to_spec()

    @property
    def augmentation(self) -> str:
        """The classes are shapes drawn at any rotation, so flips and quarter turns keep them
        (dihedral); with fresh images every epoch there is nothing to gain (none)."""
        return "none" if self.world.fresh and self.split == "train" else "dihedral"

    def epoch_view(self, epoch: int) -> "SyntheticDataset":
        """The training images of ``epoch``: new world images when the world is ``fresh``
        (world indices shifted by ``epoch * len(self)``), else this dataset."""
        if not (self.world.fresh and self.split == "train") or epoch == 0:
            return self
        view = SyntheticDataset(self.config, self.split, self.preprocessing, self.limit,
                                self.concepts)
        view.offset = self.offset + int(epoch) * self.size
        if view.offset + view.size > SPLIT_OFFSETS["val"]:
            raise CnnexplainError(f"the synthetic world has no fresh training images left for "
                                  f"epoch {epoch + 1}", "use fewer epochs or `dataset` with "
                                  "fresh=0")
        return view

    @property
    def label_names(self) -> list[str]:
        return ONTOLOGY.label_names

    def category_of(self, number: int) -> str:
        return ONTOLOGY.category_of(number)

    def __len__(self) -> int:
        return self.size

    def world_index(self, i: int) -> int:
        return self.offset + int(i)

    def sample(self, i: int) -> Sample:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return render(self.world, self.world_index(i))

    def __getitem__(self, i: int) -> dict:
        s = self.sample(int(i))
        res = self.world.resolution
        image = image_tensor(s.image)
        main = s.objects[0]
        second = s.objects[1] if len(s.objects) > 1 else None
        item = {
            "image": image,
            "label": torch.tensor(s.label, dtype=torch.int64),
            "index": torch.tensor(int(i), dtype=torch.int64),
            "mask": torch.from_numpy(main.mask.astype(np.uint8)),
            "box": torch.tensor(main.box, dtype=torch.float32),
            "second_label": torch.tensor(second.class_index if second else -1, dtype=torch.int64),
            "second_mask": torch.from_numpy(second.mask.astype(np.uint8)) if second
            else torch.zeros((res, res), dtype=torch.uint8),
            "second_box": torch.tensor(second.box if second else (0, 0, 0, 0), dtype=torch.float32),
            "hans": torch.tensor(s.hans, dtype=torch.bool),
        }
        if self.concepts:
            item["masks"] = torch.from_numpy(np.concatenate([s.pixel[c] for c in PIXEL_CATEGORIES]))
            item["image_labels"] = torch.tensor([s.image_labels[c][0] for c in IMAGE_CATEGORIES],
                                                dtype=torch.int32)
            item["has_category"] = torch.ones(len(CATEGORIES), dtype=torch.bool)
        return item

    def fingerprint(self) -> str:
        """Digest of the world config, split, limit and code version (no rendering)."""
        return digest_parts("synthetic", WORLD_VERSION, __version__, self.world.to_dict(),
                            self.split, self.size)

    def describe(self) -> dict:
        d = super().describe()
        d.update({"split": self.split, "world": self.world.to_dict()})
        return d
