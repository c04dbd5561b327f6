"""Exports of the synthetic world to directories: an ImageFolder train/val tree and TCAV concept
folders (the Broden export lives in :mod:`cnnexplain.data.broden`).

Every export is staged: files are written (each atomically, :mod:`cnnexplain.io`) into a
temporary sibling directory ``.cnnexplain-tmp-<name>-*`` which is renamed to ``out_dir`` only
when everything, including the ``synthetic.json`` manifest, is written. A killed export leaves
no ``out_dir`` behind (only a temporary directory that a re-run ignores), so a directory that
exists is complete.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from cnnexplain import __version__
from cnnexplain.data.synthetic import (
    CORRELATABLE, IMAGE_CATEGORIES, ONTOLOGY, SPLIT_OFFSETS, WORLD_VERSION, WorldConfig, render)
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.io import umask, TMP_PREFIX, write_bytes, write_json

Progress = Callable[[int, int], None]
MANIFEST = "synthetic.json"
CONCEPT_OFFSET = 3_000_000_000  # world indices of concept images (disjoint from the splits)
RANDOM_OFFSET = 4_000_000_000  # world indices of random_<i> images
MAX_RENDERS_PER_IMAGE = 200  # give up on a concept after this many renders per wanted image


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out_dir``; on success rename it to
    ``out_dir`` (replacing an existing one only with ``overwrite``); on failure delete it."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CnnexplainError(f"{out} already exists and is not empty",
                              "choose another `out` or pass `overwrite=true`")
    remove_stale_staging(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-{os.getpid()}-",
                                    dir=out.parent))
    except OSError as exc:
        raise CnnexplainError(f"cannot create {out}: {exc.strerror or exc}",
                              "choose a writable `out`") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{out.name}-", dir=out.parent))
            os.replace(out, old / "old")
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0o700 -> what mkdir would have given
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` that killed exports left beside it (named
    ``.cnnexplain-tmp-<name>-<pid>-*`` by a process that no longer runs); returns them."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for p in parent.glob(f"{TMP_PREFIX}{out.name}-*"):
        pid = p.name[len(f"{TMP_PREFIX}{out.name}-"):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(root: Path, fmt: str, config: WorldConfig, **extra) -> None:
    """``synthetic.json``: what produced an export (format, world config, code versions)."""
    write_json(root / MANIFEST, {"format": fmt, "world": config.to_dict(),
                                 "spec": config.to_spec(), "world_version": WORLD_VERSION,
                                 "cnnexplain": __version__, **extra})


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 [H, W, 3] array as PNG."""
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _digits(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


def export_imagefolder(config: WorldConfig, out_dir: str | os.PathLike,
                       splits: Sequence[str] = ("train", "val"), progress: Progress | None = None,
                       overwrite: bool = False) -> dict:
    """Write ``<out_dir>/<split>/<class>/<world index>.png`` for each split (train: world
    indices [0, num_images); val/test: their :data:`SPLIT_OFFSETS` ranges, sizes from
    ``config.split_size``). Readable back with ``imagefolder:<out_dir>``. Returns the counts
    per split."""
    sizes = {s: config.split_size(s) for s in splits}
    total, done = sum(sizes.values()), 0
    with staged_directory(out_dir, overwrite) as tmp:
        for split, n in sizes.items():
            for k in config.classes:
                (tmp / split / k).mkdir(parents=True, exist_ok=True)
            width = _digits(n)
            for i in range(n):
                s = render(config, SPLIT_OFFSETS[split] + i)
                write_bytes(tmp / split / s.class_name / f"{i:0{width}d}.png", png_bytes(s.image))
                done += 1
                if progress:
                    progress(done, total)
        write_manifest(tmp, "imagefolder", config, splits=sizes)
    return sizes


OBJECT_ATTRIBUTES = {"color": lambda o: f"{o.color}-c", "material": lambda o: o.material}
"""The concept categories an object has as one attribute, and its concept name there."""
SCOPES = ("image", "object")


def concept_present(sample, number: int, min_coverage: float, scope: str = "image") -> bool:
    """Whether a concept is present in a rendered sample: a whole-image label (scene, texture)
    equals it, or it covers at least ``min_coverage`` of the image's pixels (any layer).
    ``scope="object"``: a colour or material concept only when it is the main object's colour
    or material (what a planted correlation sets), however much of the image it covers."""
    cat = ONTOLOGY.category_of(number)
    if scope == "object" and cat in OBJECT_ATTRIBUTES:
        return OBJECT_ATTRIBUTES[cat](sample.objects[0]) == ONTOLOGY.name(number)
    if cat in IMAGE_CATEGORIES:
        return number in sample.image_labels[cat]
    maps = sample.pixel[cat]
    return float((maps == number).any(axis=0).mean()) >= min_coverage


def class_quotas(n: int, n_classes: int) -> list[int]:
    """Images per class of a class-balanced folder of ``n`` images: ``n // n_classes`` each,
    the first ``n % n_classes`` classes (in class order) one more. The random folders (``n``
    consecutive world indices, class of index k = ``classes[k % n_classes]``) hold the same
    numbers up to which classes get the extra images."""
    return [n // n_classes + (1 if k < n % n_classes else 0) for k in range(n_classes)]


def export_concepts(config: WorldConfig, out_dir: str | os.PathLike, concepts: Sequence[str],
                    n_per_concept: int = 50, n_random_sets: int = 5,
                    n_random: int | None = None, min_coverage: float = 0.005,
                    balance_classes: bool = True, progress: Progress | None = None,
                    overwrite: bool = False, scope: str = "image") -> dict:
    """TCAV concept folders (../shared/reference/tcav.md).

    ``<concept>/`` holds ``n_per_concept`` world images in which the concept is present
    (:func:`concept_present`; pixel concepts must cover ``min_coverage`` of the image, default
    0.5%: a star's tips cover 0.6-1.9%), searched in world order from index 3e9 on.
    ``scope="object"``: a colour or material concept must be the main object's (see
    :func:`concept_present`) -- the concept a ``correlate=red-c@circle`` plants; with
    "image", red backgrounds count as red-c too, and a folder of them differs from random
    images far less (CAV held-out accuracy 0.61 against 0.73 on the quickstart's ResNet-18).
    ``random_<i>/`` (i = 0 .. n_random_sets - 1) holds ``n_random`` (default
    ``n_per_concept``) consecutive world images from 4e9 + i * n_random on, disjoint between
    sets and, since the class of world index k is ``classes[k % len(classes)]``, balanced over
    the classes. Images are PNGs named by world index, so a folder's files sort in world order.

    ``balance_classes`` (default): a concept folder gets the random folders' class mix,
    :func:`class_quotas` images per class. Without it a concept folder takes the first images
    carrying the concept whatever their class, and a concept that co-occurs with a class
    (``red-c`` with ``correlate=red-c@star=0.95``: about 90% stars with two classes) or is
    rarer in some classes makes the folder differ from the random folders by class as well as
    by concept -- its CAV then also points at the class, which biases TCAV (see
    :mod:`cnnexplain.explain.tcav`). An image is taken for a concept only while its class has
    no more images in the folder than any class still short of its quota, so every prefix of
    the folder in file order (``cnnexplain tcav`` with ``images_per_set`` N reads the first N files)
    is balanced too, to within one image per class.

    At most ``MAX_RENDERS_PER_IMAGE * n_per_concept`` images are rendered; a concept (with
    balancing: a class of a concept) still short of its images then raises a one-line
    :class:`CnnexplainError` naming it, and nothing is written. Returns the number of images
    per folder; ``synthetic.json`` also records the class counts of every folder.
    """
    if scope not in SCOPES:
        raise UsageError(f"unknown concept scope {scope!r}", "pass `scope` image or object")
    if not concepts:
        raise UsageError("no concepts to export", "pass e.g. `concepts=striped,red-c,star-tip`")
    if n_per_concept < 1 or n_random_sets < 0:
        raise UsageError("`n_per_concept` must be >= 1 and `random_sets` >= 0",
                         "pass e.g. `n_per_concept=50` `random_sets=5`")
    numbers = {c: ONTOLOGY.number(c) for c in concepts}
    n_random = n_per_concept if n_random is None else int(n_random)
    n_classes = len(config.classes)
    quota = (class_quotas(n_per_concept, n_classes) if balance_classes
             else [n_per_concept] * n_classes)
    total = n_per_concept * len(numbers) + n_random * n_random_sets
    found: dict[str, list[int]] = {c: [] for c in numbers}
    per_class: dict[str, list[int]] = {c: [0] * n_classes for c in numbers}
    checked: dict[str, list[int]] = {c: [0] * n_classes for c in numbers}  # per class
    class_counts: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {}

    def takes(c: str, label: int) -> bool:
        """Whether concept ``c``'s folder takes one more image of class ``label`` now."""
        if len(found[c]) >= n_per_concept:
            return False
        got = per_class[c]
        if not balance_classes:
            return True
        open_levels = [got[k] for k in range(n_classes) if got[k] < quota[k]]
        return got[label] < quota[label] and got[label] <= min(open_levels)

    with staged_directory(out_dir, overwrite) as tmp:
        for c in numbers:
            (tmp / c).mkdir()
        budget = MAX_RENDERS_PER_IMAGE * n_per_concept
        for k in range(budget):
            wanted = [c for c, idx in found.items() if len(idx) < n_per_concept]
            if not wanted:
                break
            label = (CONCEPT_OFFSET + k) % n_classes  # render's class rule, without rendering
            wanted = [c for c in wanted if takes(c, label)]
            if not wanted:
                continue
            s = render(config, CONCEPT_OFFSET + k)
            for c in wanted:
                checked[c][s.label] += 1
                if concept_present(s, numbers[c], min_coverage, scope):
                    found[c].append(k)
                    per_class[c][s.label] += 1
                    write_bytes(tmp / c / f"{CONCEPT_OFFSET + k}.png", png_bytes(s.image))
                    if progress:
                        progress(sum(map(len, found.values())), total)
        short = {c: len(v) for c, v in found.items() if len(v) < n_per_concept}
        if short:
            c, got = next(iter(short.items()))
            plant = (f", or plant it with a correlation (correlate={c}@CLASS=0.9)"
                     if ONTOLOGY.category_of(numbers[c]) in CORRELATABLE else "")
            if balance_classes:
                k = min((k for k in range(n_classes) if per_class[c][k] < quota[k]),
                        key=lambda k: per_class[c][k])
                raise CnnexplainError(
                    f"concept {c!r} is present (coverage >= {min_coverage:g}) in only "
                    f"{per_class[c][k]} of {checked[c][k]} checked images of class "
                    f"{config.classes[k]!r}, but a class-balanced folder of {n_per_concept} "
                    f"images needs {quota[k]} per class",
                    "lower `per_concept` or `min_coverage`, or export without class "
                    f"balancing (`no_balance_classes=true`){plant}")
            raise CnnexplainError(
                f"concept {c!r} is present (coverage >= {min_coverage:g}) in only {got} of "
                f"{budget} rendered images", f"lower `per_concept` or `min_coverage`{plant}")
        for c in numbers:
            counts[c] = len(found[c])
            class_counts[c] = dict(zip(config.classes, per_class[c]))
        done = sum(counts.values())
        for r in range(n_random_sets):
            folder = tmp / f"random_{r}"
            folder.mkdir()
            mix = [0] * n_classes
            for j in range(n_random):
                idx = RANDOM_OFFSET + r * n_random + j
                write_bytes(folder / f"{idx}.png", png_bytes(render(config, idx).image))
                mix[idx % n_classes] += 1
                done += 1
                if progress:
                    progress(done, total)
            counts[f"random_{r}"] = n_random
            class_counts[f"random_{r}"] = dict(zip(config.classes, mix))
        write_manifest(tmp, "concepts", config, folders=counts, min_coverage=min_coverage,
                       scope=scope,
                       balance_classes=bool(balance_classes), class_counts=class_counts)
    return counts


def _export_broden(config: WorldConfig, out_dir, progress: Progress | None = None,
                   overwrite: bool = False, **_):
    # imported here: cnnexplain.data.broden imports this module for staged_directory
    from cnnexplain.data.broden import export_broden

    return export_broden(config, out_dir, progress=progress, overwrite=overwrite)


# `cnnexplain data synth --format NAME`: every exporter takes (config, out_dir, progress=,
# overwrite=, **format options).
EXPORT_FORMATS: dict[str, Callable] = {
    "broden": _export_broden,
    "imagefolder": export_imagefolder,
    "concepts": export_concepts,
}
