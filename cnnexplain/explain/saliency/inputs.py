"""What ``saliency`` explains: images in model-input space, their labels and ground truth, and
the (image, class) pairs chosen by ``target``.

Three sources (exactly one):

- a dataset spec (``dataset``, e.g. ``synthetic:n=200,res=32,second=1.0``): images in [0, 1]
  normalized per the model's preprocessing; labels; and for the synthetic world the ground truth
  of the main object (``mask``, ``box``) and of the second object (``second_label``,
  ``second_mask``, ``second_box``; label -1 when absent);
- image files or a directory (``images``): read with PIL, resized per the preprocessing
  (``resize``; images of mixed sizes need it), normalized; no labels;
- a ``.npy`` file (``inputs``): float ``N x 3 x H x W`` already preprocessed, used as is
  (loaded with ``allow_pickle=False``; NaN / Inf refused).

Targets (``target``): ``pred`` (the model's top class), ``label`` (needs labels), an integer
class, or ``topk:K`` (each image becomes K pairs, its K top classes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnexplain.data.files import Confinement, FilePolicy
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.fingerprint import array_digest, digest_parts
from cnnexplain.progress import silent

TRUTH_KEYS = ("mask", "box", "second_label", "second_mask", "second_box")


@dataclass
class ImageSet:
    """``images`` float32 ``[N, 3, H, W]`` in model-input space (CPU); ``labels`` int64 ``[N]``
    (-1 unknown) or None; ``truth``: ``{"mask": uint8 [N, H, W], "box": float [N, 4],
    "second_label": int64 [N], "second_mask", "second_box"}`` or None; ``names``: one short
    name per image; ``fingerprint``: digest of the input tensor (content, so every source
    hashes alike); ``describe``: for run.json."""

    images: torch.Tensor
    source: str
    labels: torch.Tensor | None = None
    truth: dict | None = None
    names: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    describe: dict = field(default_factory=dict)
    fingerprint: str = ""

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = array_digest(self.images.numpy())
        if not self.names:
            self.names = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels >= 0).all())


def _collect(dataset, batch_size: int, progress=None) -> dict[str, torch.Tensor]:
    from cnnexplain.data.base import make_loader

    parts: dict[str, list[torch.Tensor]] = {}
    loader = make_loader(dataset, batch_size=batch_size)
    with (progress or silent())(total=len(dataset), description="loading images") as task:
        for batch in loader:
            for key in ("image", "label", *TRUTH_KEYS):
                if key in batch:
                    parts.setdefault(key, []).append(batch[key])
            task.advance(len(batch["image"]))
    return {k: torch.cat(v) for k, v in parts.items()}


def from_dataset(spec: str, split: str, preprocessing: Preprocessing, limit: int | None = None,
                 seed: int = 0, batch_size: int = 32, progress=None,
                 files: FilePolicy | None = None) -> ImageSet:
    """Open ``spec`` and load its (first ``limit``) images normalized, with labels and any
    ground truth the dataset has."""
    from cnnexplain.data.datasets import open_dataset

    ds = open_dataset(spec, split=split, preprocessing=preprocessing, limit=limit, seed=seed,
                      files=files)
    return from_opened(ds, split, preprocessing, batch_size, progress)


def from_opened(ds, split: str, preprocessing: Preprocessing, batch_size: int = 32,
                progress=None) -> ImageSet:
    """The images of an opened dataset split ``ds`` normalized, with labels and any ground
    truth it has."""
    spec = getattr(ds, "spec", "dataset")
    if len(ds) == 0:
        raise UsageError(f"dataset {spec} split {split} has no images", "check `split` and `limit`")
    got = _collect(ds, batch_size, progress)
    truth = {k: got[k] for k in TRUTH_KEYS if k in got} or None
    if truth is not None and not all(k in truth for k in ("mask", "box")):
        truth = None
    images = preprocessing.normalize(got["image"].float())
    labels = got["label"].long() if "label" in got else None
    desc = ds.describe() if hasattr(ds, "describe") else {"spec": spec}
    return ImageSet(images=images, source=f"dataset:{spec}:{split}", labels=labels, truth=truth,
                    names=[f"{split}{i}" for i in range(len(images))],
                    class_names=list(getattr(ds, "class_names", []) or []) or None,
                    describe=desc)


def image_paths(items, files: FilePolicy | None = None) -> list[Path]:
    """Files named directly or found (by image extension, sorted) in named directories; a file
    found in a directory must resolve inside it (``files``, :mod:`cnnexplain.data.files`), a
    file named directly is taken as named."""
    from cnnexplain.data.datasets import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            confined = Confinement(p, files)
            found = sorted(confined.check(q, "image") for q in p.iterdir() if q.is_file()
                           and q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith("."))
            if not found:
                raise UsageError(f"no image files in directory {p}",
                                 f"put images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) there")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"`images`: {p} does not exist", "pass image files or a directory")
    if not out:
        raise UsageError("`images` names no files", "pass image files or a directory")
    return out


def from_images(items, preprocessing: Preprocessing, progress=None,
                files: FilePolicy | None = None) -> ImageSet:
    """Read image files (or directories of them) as the model expects: [0, 1], resized per
    ``preprocessing`` (mixed sizes need ``resize``), normalized; ``files``: symlinks and the
    decoding limit (:class:`~cnnexplain.data.files.FilePolicy`)."""
    from cnnexplain.data.datasets import ImageFileDataset

    paths = image_paths(items, files)
    root = Path(_common_root(paths))
    ds = ImageFileDataset(paths, [-1] * len(paths), [], root, preprocessing,
                          spec=f"images:{root}", fingerprint_mode="content", policy=files)
    got = _collect(ds, 16, progress)
    images = preprocessing.normalize(got["image"].float())
    return ImageSet(images=images, source=f"images:{root}", labels=None, truth=None,
                    names=[p.stem for p in paths],
                    describe={"spec": f"images:{root}", "size": len(paths),
                              "files": [str(p) for p in paths[:20]]})


def _common_root(paths: list[Path]) -> str:
    import os

    parents = [str(p.resolve().parent) for p in paths]
    return os.path.commonpath(parents) if parents else "."


def from_npy(path, min_size: int = 1) -> ImageSet:
    """A float array ``N x 3 x H x W`` (already preprocessed) from ``path``; one-line errors
    for a missing / unreadable / pickled file, a wrong shape or dtype, and NaN / Inf."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"`inputs` {p} does not exist", "pass a .npy file saved with numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise CnnexplainError(f"`inputs` {p} cannot be read without unpickling ({exc})",
                              "save a plain float array with numpy.save") from None
    except (OSError, EOFError) as exc:
        raise CnnexplainError(f"`inputs` {p} is not a readable .npy file ({exc})",
                              "save a float array with numpy.save(path, array)") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        kind = getattr(arr, "dtype", type(arr))
        raise UsageError(f"`inputs` {p} holds {kind}, not floats",
                         "save a float32 array N x 3 x H x W, already normalized")
    if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise UsageError(f"`inputs` {p} has shape {list(arr.shape)}, expected N x 3 x H x W",
                         "save a batch of RGB images, channels first")
    if arr.shape[2] < min_size or arr.shape[3] < min_size:
        raise UsageError(f"`inputs` {p} images are {arr.shape[2]}x{arr.shape[3]}, smaller than "
                         f"the model's minimum {min_size}", f"save images of at least {min_size} px")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise UsageError(f"`inputs` {p} contains NaN or Inf ({int(bad.sum())} values, first in "
                         f"image {int(first[0])})", "remove or fix those images")
    images = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return ImageSet(images=images, source=f"inputs:{p}", labels=None, truth=None,
                    describe={"spec": f"inputs:{p}", "size": int(arr.shape[0]),
                              "shape": list(arr.shape)})


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

_TOPK = re.compile(r"topk:(\d+)$")


@dataclass(frozen=True)
class TargetSpec:
    """``target``: ``kind`` in pred / label / class / topk, ``value`` the class or K."""

    kind: str
    value: int = 0
    text: str = "pred"

    @classmethod
    def parse(cls, text: str) -> "TargetSpec":
        t = str(text).strip().lower()
        if t in ("pred", "label"):
            return cls(t, 0, t)
        m = _TOPK.match(t)
        if m:
            k = int(m.group(1))
            if k < 1:
                raise UsageError(f"`target` {text}: K must be at least 1", "pass e.g. `target` topk:2")
            return cls("topk", k, t)
        if re.fullmatch(r"-?\d+", t):
            return cls("class", int(t), t)
        raise UsageError(f"`target` {text!r} is not pred, label, a class index or topk:K",
                         "pass e.g. `target` pred, `target` label, `target` 3 or `target` topk:2")

    def check(self, num_classes: int, has_labels: bool) -> None:
        """One-line UsageError when the spec cannot apply to this model / these inputs."""
        if self.kind == "class" and not 0 <= self.value < num_classes:
            raise UsageError(f"`target` {self.value} is out of range: the model has "
                             f"{num_classes} classes (0..{num_classes - 1})",
                             f"pass a class index below {num_classes}")
        if self.kind == "topk" and self.value > num_classes:
            raise UsageError(f"`target` topk:{self.value} asks for more classes than the model's "
                             f"{num_classes}", f"pass K <= {num_classes}")
        if self.kind == "label" and not has_labels:
            raise UsageError("`target` label needs labelled images, these inputs have no labels",
                             "use `target` pred, a class index, or a labelled `dataset`")

    @property
    def needs_predictions(self) -> bool:
        return self.kind in ("pred", "topk")

    def resolve(self, logits: torch.Tensor | None, labels: torch.Tensor | None, n: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_index [M], target [M], rank [M])``: the (image, class) pairs to explain
        (rank: position of the class in the image's top-k, 0 otherwise)."""
        idx = torch.arange(n)
        zero = torch.zeros(n, dtype=torch.long)
        if self.kind == "class":
            return idx, torch.full((n,), self.value, dtype=torch.long), zero
        if self.kind == "label":
            return idx, labels.long().clone(), zero
        if self.kind == "pred":
            return idx, logits.argmax(dim=1).long(), zero
        top = logits.topk(self.value, dim=1).indices.long()  # [N, K]
        k = self.value
        return idx.repeat_interleave(k), top.reshape(-1), torch.arange(k).repeat(n)


def predictions(model, images: torch.Tensor, device, batch_size: int, progress=None
                ) -> torch.Tensor:
    """Logits ``[N, C]`` of ``images`` (CPU float32), batched, no gradients."""
    outs = []
    with (progress or silent())(total=len(images), description="predicting") as task, \
            torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            outs.append(model(x).float().cpu())
            task.advance(len(x))
    return torch.cat(outs)


def pairs_digest(image_index: torch.Tensor, targets: torch.Tensor) -> str:
    return digest_parts(array_digest(image_index.numpy()), array_digest(targets.numpy()))
