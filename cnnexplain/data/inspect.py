"""``cnnexplain data inspect``: a summary of any supported dataset as table rows.

:func:`inspect_dataset` takes a dataset spec (``synthetic:...``, ``cifar10:ROOT``, ...) or a
directory whose format it detects (Broden, CIFAR, STL-10, TCAV concept folders, image folder)
and returns rows ``{"group", "name", "count", "detail"}`` (``count`` may be None): the format,
sizes, images per split, per class, per category and per concept. The CLI renders them as a
Rich table; this module never prints.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cnnexplain.data.broden import BrodenDataset
from cnnexplain.data.datasets import (
    CIFAR10, CIFAR100, DATASET_KINDS, ArrayDataset, ImageFileDataset, find_dir, image_files,
    list_concept_folders, open_dataset, parse_spec)
from cnnexplain.data.export import MANIFEST
from cnnexplain.data.files import Confinement, FilePolicy, open_image
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import ONTOLOGY, SPLIT_OFFSETS, WorldConfig, render
from cnnexplain.errors import CnnexplainError

COLUMNS = ("group", "name", "count", "detail")
MAX_RENDER = 2000  # synthetic images rendered to count concepts
MAX_HEADERS = 5000  # image headers read to summarise sizes
TOP_CONCEPTS = 10  # concepts listed per Broden category


def _row(group: str, name: str, count=None, detail: str = "") -> dict:
    return {"group": group, "name": name, "count": None if count is None else int(count),
            "detail": detail}


def _size_rows(files: list[Path], policy: FilePolicy) -> list[dict]:
    """Image sizes from headers (at most MAX_HEADERS files), most common first; an image over
    the policy's pixel limit is a one-line error naming it (:mod:`cnnexplain.data.files`)."""
    sizes: Counter = Counter()
    for p in files[:MAX_HEADERS]:
        try:
            with open_image(p, policy) as im:
                sizes[f"{im.width}x{im.height} {im.mode}"] += 1
        except (OSError, ValueError, SyntaxError):
            sizes["unreadable"] += 1
    note = f" (first {MAX_HEADERS} files)" if len(files) > MAX_HEADERS else ""
    return [_row("size", s, n, f"width x height, mode{note}") for s, n in sizes.most_common()]


# -- synthetic --------------------------------------------------------------------------------


def _inspect_synthetic(spec: str, policy: FilePolicy) -> list[dict]:
    cfg = WorldConfig.from_spec(spec)
    rows = [_row("dataset", "format", None, "synthetic world"),
            _row("dataset", "spec", None, cfg.to_spec()),
            _row("size", f"{cfg.resolution}x{cfg.resolution}", None, "render resolution (RGB)")]
    rows += [_row("split", s, cfg.split_size(s), f"world indices from {offset}")
             for s, offset in SPLIT_OFFSETS.items()]
    n, k = cfg.num_images, len(cfg.classes)
    rows += [_row("class", name, len(range(i, n, k)), "train")
             for i, name in enumerate(cfg.classes)]
    rows += [_row("planted", f"{c}@{k}", None, f"strength {s:g}") for c, k, s in cfg.correlations]
    if cfg.clever_hans:
        klass, strength = cfg.clever_hans
        rows.append(_row("planted", f"marker@{klass}", None, f"strength {strength:g}"))
    if cfg.second_object:
        rows.append(_row("planted", "second object", None, f"probability {cfg.second_object:g}"))
    m = min(n, MAX_RENDER)
    counts: Counter = Counter()
    for i in range(m):
        counts.update(render(cfg, i).concept_numbers())
    for c in ONTOLOGY.concepts:
        if counts[c.number]:
            rows.append(_row("concept", c.name, counts[c.number],
                             f"{c.category}; images among the first {m} train images"))
    return rows


# -- Broden -----------------------------------------------------------------------------------


def _inspect_broden(root: str, policy: FilePolicy) -> list[dict]:
    ds = BrodenDataset(root, files=policy)
    rows = [_row("dataset", "format", None, f"Broden at {ds.root}"),
            _row("dataset", "images", len(ds)),
            _row("size", f"{ds.image_size[1]}x{ds.image_size[0]}", None,
                 "image (ih x iw of the first row)"),
            _row("size", f"{ds.mask_size[1]}x{ds.mask_size[0]}", None, "masks (sh x sw)")]
    rows += [_row("split", s, n) for s, n in sorted(Counter(r.split for r in ds.rows).items())]
    for c in ds.categories:
        with_cat = sum(1 for r in ds.rows if r.cells.get(c))
        layers = ds.layer_categories.count(c) or ds.image_label_categories.count(c)
        kind = "pixel masks" if c in ds.pixel_categories else "whole-image labels"
        rows.append(_row("category", c, with_cat, f"{len(ds.labels.numbers_in(c))} labels, {kind}, "
                                                  f"up to {layers} per image"))
    for c in ds.categories:
        nums = [n for n in ds.labels.numbers_in(c)]
        nums.sort(key=lambda n: -ds.labels.labels[n].categories.get(c, 0))
        for n in nums[:TOP_CONCEPTS]:
            lab = ds.labels.labels[n]
            rows.append(_row("concept", lab.name, lab.categories.get(c, 0),
                             f"{c} (number {n}, primary {ds.labels.category_of(n)}), coverage "
                             f"{ds.labels.coverage(c, n):.3g} images"))
        if len(nums) > TOP_CONCEPTS:
            rows.append(_row("concept", f"... {len(nums) - TOP_CONCEPTS} more {c} labels", None,
                             "see label.csv"))
    return rows


# -- labelled datasets (CIFAR, STL-10, image folders) -----------------------------------------


def _inspect_labelled(spec: str, policy: FilePolicy) -> list[dict]:
    """Images per split and per class, and image sizes, of a spec opened with open_dataset."""
    kind, _ = parse_spec(spec)
    rows = [_row("dataset", "format", None, kind.help), _row("dataset", "spec", None, spec)]
    per_split: dict[str, Counter] = {}
    opened = []
    for split in ("train", "val", "test"):
        try:
            # resize: skip the header scan that rejects mixed sizes (summarised below instead)
            ds = open_dataset(spec, split=split, preprocessing=Preprocessing(resize=32),
                              files=policy)
        except CnnexplainError as exc:
            if split == "train":
                raise
            rows.append(_row("split", split, 0, exc.problem))
            continue
        labels = ds.labels[ds.rows] if isinstance(ds, ArrayDataset) else np.asarray(ds.labels)
        per_split[split] = Counter(int(x) for x in labels)
        opened.append(ds)
        rows.append(_row("split", split, len(ds)))
    first = opened[0]
    if isinstance(first, ImageFileDataset):
        rows += _size_rows([f for ds in opened for f in ds.files], policy)
    else:
        rows.append(_row("size", f"{first.images.shape[-1]}x{first.images.shape[-2]} RGB", None,
                         "width x height"))
    for k, name in enumerate(first.class_names):
        detail = ", ".join(f"{s} {c[k]}" for s, c in per_split.items())
        rows.append(_row("class", name, sum(c[k] for c in per_split.values()), detail))
    return rows


# -- TCAV concept folders ---------------------------------------------------------------------


def _inspect_concepts(root: str, policy: FilePolicy) -> list[dict]:
    found = list_concept_folders(root, policy)
    rows = [_row("dataset", "format", None, f"TCAV concept folders at {root}")]
    all_files = []
    confined = Confinement(root, policy)
    for group, names in (("concept", found["concepts"]), ("random", found["randoms"])):
        for n in names:
            files = [confined.check(p, "image") for p in image_files(Path(root) / n)]
            all_files += files
            rows.append(_row(group, n, len(files), f"{Path(root) / n}"))
    return rows + _size_rows(all_files, policy)


# -- detection --------------------------------------------------------------------------------


def _manifest_format(p: Path) -> str | None:
    try:
        return json.loads((p / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class Detector:
    """A directory format: ``matches(path)`` and the spec-free ``inspect(path, policy)``."""

    name: str
    matches: Callable[[Path], bool]
    inspect: Callable[[str, FilePolicy], list[dict]]


def _has_dir(p: Path, *names: str) -> bool:
    return any(find_dir(p, n) is not None for n in names)


def _has_random_folders(p: Path) -> bool:
    return any(d.is_dir() and d.name.startswith("random") for d in p.iterdir())


DETECTORS: list[Detector] = [
    Detector("broden", lambda p: (p / "index.csv").is_file() and (p / "label.csv").is_file(),
             _inspect_broden),
    Detector("cifar10", lambda p: _has_dir(p, CIFAR10.py_dir, CIFAR10.bin_dir),
             lambda r, f: _inspect_labelled(f"cifar10:{r}", f)),
    Detector("cifar100", lambda p: _has_dir(p, CIFAR100.py_dir, CIFAR100.bin_dir),
             lambda r, f: _inspect_labelled(f"cifar100:{r}", f)),
    Detector("stl10", lambda p: _has_dir(p, "stl10_binary"),
             lambda r, f: _inspect_labelled(f"stl10:{r}", f)),
    Detector("concepts", lambda p: _manifest_format(p) == "concepts" or _has_random_folders(p),
             _inspect_concepts),
    Detector("imagefolder", lambda p: True,
             lambda r, f: _inspect_labelled(f"imagefolder:{r}", f)),
]

SPEC_INSPECTORS: dict[str, Callable[[str, FilePolicy], list[dict]]] = {
    "synthetic": _inspect_synthetic,
    "broden": lambda spec, f: _inspect_broden(spec.partition(":")[2], f),
}


def inspect_dataset(path_or_spec: str, files: FilePolicy | None = None) -> list[dict]:
    """Summary rows ``{"group", "name", "count", "detail"}`` of a dataset spec or a directory
    (an existing directory wins over a spec of the same name). ``files``: symlinks and the
    decoding limit (:class:`~cnnexplain.data.files.FilePolicy`), as the commands read them."""
    text = str(path_or_spec).strip()
    path = Path(text).expanduser()
    policy = files or FilePolicy()
    if path.is_dir():
        return next(d for d in DETECTORS if d.matches(path)).inspect(str(path), policy)
    if ":" not in text and text not in DATASET_KINDS:
        raise CnnexplainError(f"{text} is neither a directory nor a dataset spec",
                              "pass an existing directory or one of "
                              + ", ".join(k.usage for k in DATASET_KINDS.values()))
    kind, _ = parse_spec(text)
    return SPEC_INSPECTORS.get(kind.prefix, _inspect_labelled)(text, policy)
