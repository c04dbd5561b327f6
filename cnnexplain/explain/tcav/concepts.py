"""Concept and random image sets for TCAV (Kim et al. 2018): the folders of a concept root
(:func:`folder_concept_sets`) or the images of a Broden-format dataset where a concept is present
(:func:`broden_concept_sets`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from cnnexplain.cache.store import Cache
from cnnexplain.data.base import ImageDataset, make_loader
from cnnexplain.data.files import FilePolicy
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.fingerprint import array_digest, digest_parts
from cnnexplain.progress import silent

ProgressLike = Callable[..., ContextManager]


class SubsetDataset(ImageDataset):
    """Rows ``indices`` of another dataset, yielding only ``image``, ``label`` and ``index``
    (position in this subset; read with ``base.item``, so a Broden base decodes no masks).
    Fingerprint: the base's fingerprint and the rows."""

    def __init__(self, base: ImageDataset, indices: Sequence[int], name: str = ""):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.name = name
        self.class_names = list(getattr(base, "class_names", []))
        self.preprocessing = getattr(base, "preprocessing", Preprocessing())
        self.spec = f"{getattr(base, 'spec', '')}[{name or 'subset'}]"
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.base.item(int(self.indices[int(i)]), ("image", "label"))
        return {"image": item["image"], "label": item["label"],
                "index": torch.tensor(int(i), dtype=torch.int64)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_parts("subset", self.base.fingerprint(),
                                             array_digest(self.indices))
        return self._fingerprint

    def describe(self) -> dict:
        d = super().describe()
        d.update({"base": self.base.describe() if hasattr(self.base, "describe") else None,
                  "rows": len(self.indices)})
        return d


def concept_coverage(dataset, numbers: Sequence[int], *, batch_size: int = 32,
                     workers: int = 0, progress: ProgressLike | None = None) -> np.ndarray:
    """float32 [N, len(numbers)]: per image, 1.0 where a concept is a whole-image label (scene,
    texture: ``image_labels``), else the fraction of mask pixels where any layer holds it
    (``masks``). For a Broden dataset (or the synthetic world with ``concepts=True``)."""
    numbers = [int(n) for n in numbers]
    out = np.zeros((len(dataset), len(numbers)), np.float32)
    progress = progress or silent()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    pos = 0
    with progress(total=len(dataset), description="concept coverage") as bar:
        for batch in loader:
            masks, labels = batch["masks"], batch["image_labels"]
            b = masks.shape[0]
            for j, n in enumerate(numbers):
                whole = (labels == n).any(dim=1) if labels.numel() else torch.zeros(b, dtype=bool)
                if masks.shape[1]:
                    pix = (masks == n).any(dim=1).flatten(1).float().mean(dim=1)
                else:
                    pix = torch.zeros(b)
                out[pos:pos + b, j] = torch.where(whole, torch.ones(b), pix).numpy()
            pos += b
            bar.advance(b)
    return out


@dataclass
class ConceptSets:
    """Concept and random image sets for :func:`run_tcav`: ``concepts`` name -> dataset;
    ``randoms`` [(name, dataset)], random_0 first (:func:`run_tcav` pairs random_{k-1} with
    random_k for the baseline and the concepts with random_1 ..); ``info`` what was chosen."""

    concepts: dict[str, ImageDataset]
    randoms: list[tuple[str, ImageDataset]]
    info: dict = field(default_factory=dict)


def broden_concept_sets(dataset, concepts: Sequence[str], *, random_sets: int,
                        per_set: int = 50, min_coverage: float = 0.005, seed: int = 0,
                        cache: Cache | None = None, batch_size: int = 32, workers: int = 0,
                        progress: ProgressLike | None = None) -> ConceptSets:
    """Concept sets from a Broden-format dataset (or the synthetic world with concepts).

    Positives of a concept: images where it is present -- a whole-image label (scene, texture)
    equals it, or it covers at least ``min_coverage`` of the mask pixels (and more than none);
    at most ``per_set`` of them, a seeded sample when there are more. Random sets
    ``random_0 .. random_{random_sets - 1}``: ``per_set`` images each (fewer only if the pool
    is smaller), drawn without replacement by ``np.random.default_rng([seed, 7919, i])`` from
    the images where none of the requested concepts is present. Coverages are cached (kind
    ``features``) per dataset content and concepts. Unknown concept -> UsageError with close
    matches."""
    if not concepts:
        raise UsageError("no concept given", "pass `concept` NAME[,NAME...]")
    if not 0.0 <= float(min_coverage) <= 1.0:
        raise UsageError(f"`min_coverage` must be in [0, 1], got {min_coverage}",
                         "pass e.g. `min_coverage` 0.005")
    if int(per_set) < 2:
        raise UsageError(f"`images_per_set` must be at least 2, got {per_set}",
                         "pass e.g. `images_per_set` 50")
    numbers = [int(dataset.labels.number(c)) for c in concepts]
    cache = cache if cache is not None else Cache(enabled=False)
    parts = {"what": "tcav-concept-coverage", "dataset": dataset.fingerprint(),
             "numbers": numbers}

    def compute():
        cov = concept_coverage(dataset, numbers, batch_size=batch_size, workers=workers,
                               progress=progress)
        return ({"coverage": cov},
                {"description": "per-image coverage of concepts (1 for whole-image labels)",
                 "concepts": list(concepts), "numbers": numbers},
                {"coverage": {"description": "fraction of mask pixels holding the concept",
                              "shape": "N x concepts", "units": "fraction"}})

    entry, _ = cache.get_or_compute("features", parts, compute)
    coverage = np.asarray(entry["coverage"], dtype=np.float32)
    present = (coverage >= float(min_coverage)) & (coverage > 0)
    sets: dict[str, ImageDataset] = {}
    counts = {}
    for j, name in enumerate(concepts):
        rows = np.flatnonzero(present[:, j])
        if len(rows) < 2:
            raise CnnexplainError(f"concept {name!r} is present (coverage >= {min_coverage:g}) in "
                                  f"only {len(rows)} of {len(dataset)} images",
                                  "lower `min_coverage`, use more images (`limit`), or choose "
                                  "another concept")
        counts[name] = int(len(rows))
        if len(rows) > per_set:
            rng = np.random.default_rng([int(seed), 104729, numbers[j]])
            rows = np.sort(rng.choice(rows, size=int(per_set), replace=False))
        sets[name] = SubsetDataset(dataset, rows, name)
    pool = np.flatnonzero(~present.any(axis=1))
    if len(pool) < 2:
        raise CnnexplainError(f"only {len(pool)} of {len(dataset)} images lack every requested "
                              "concept, too few for random sets",
                              "use more images (`limit`) or fewer concepts")
    randoms = []
    for i in range(int(random_sets)):
        rng = np.random.default_rng([int(seed), 7919, i])
        rows = np.sort(rng.choice(pool, size=min(int(per_set), len(pool)), replace=False))
        randoms.append((f"random_{i}", SubsetDataset(dataset, rows, f"random_{i}")))
    return ConceptSets(sets, randoms, {"source": "broden", "present": counts,
                                       "pool": int(len(pool)), "min_coverage": min_coverage})


def folder_concept_sets(root, concepts: Sequence[str], *, random_sets: int,
                        preprocessing: Preprocessing = Preprocessing(),
                        per_set: int | None = None,
                        files: FilePolicy | None = None) -> ConceptSets:
    """Concept sets from a TCAV concept root (``<root>/<concept>/``, ``<root>/random_<i>/``):
    the named concept folders and the first ``random_sets`` random folders in natural order
    (random_0, random_1, ..., random_10). ``per_set`` keeps the first N images of each folder
    (in file order: world order for ``cnnexplain data synth `fmt` concepts`` exports, whose
    prefixes keep the class balance). ``files``: symlinks and the decoding limit
    (:class:`~cnnexplain.data.files.FilePolicy`; every folder and image must resolve inside
    ``root`` by default). Unknown concept -> UsageError with close matches; too few random
    folders -> UsageError."""
    from cnnexplain.data.datasets import concept_images, list_concept_folders

    if not concepts:
        raise UsageError("no concept given", "pass `concept` NAME[,NAME...]")
    found = list_concept_folders(root, files)
    for c in concepts:
        if c not in found["concepts"]:
            choices = ", ".join(found["concepts"]) or "(none)"
            raise UsageError(f"no concept folder {c!r} in {root}"
                             f"{close_matches(c, found['concepts'])}",
                             f"choose from {choices}")
    randoms = sorted(found["randoms"], key=_natural_key)
    if len(randoms) < int(random_sets):
        raise UsageError(f"{root} has {len(randoms)} random folders, but {random_sets} are needed "
                         f"(`random_runs` {int(random_sets) - 1} + 1: the baseline pairs "
                         "random_0 with random_1, random_1 with random_2, ...)",
                         f"pass `random_runs` {max(len(randoms) - 1, 2)} or add random folders "
                         "(`cnnexplain data synth` in the concepts format, with N random sets)")
    sets = {c: concept_images(root, c, preprocessing, per_set, files) for c in concepts}
    rand = [(r, concept_images(root, r, preprocessing, per_set, files))
            for r in randoms[: int(random_sets)]]
    return ConceptSets(sets, rand, {"source": "folders", "root": str(root)})


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
