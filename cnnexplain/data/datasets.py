"""Dataset specs: the string every command's ``dataset`` takes, and the real datasets on disk.

    synthetic[:KEY=VALUE,...]   the synthetic world (default; grammar in cnnexplain.data.synthetic)
    cifar10:ROOT                CIFAR-10, python or binary version
    cifar100:ROOT               CIFAR-100 (fine labels), python or binary version
    stl10:ROOT                  STL-10 binary version (labelled train and test images)
    imagefolder:ROOT            ROOT/<class>/* or ROOT/{train,val,test}/<class>/*
    broden:ROOT                 a Broden-format directory (cnnexplain.data.broden)

Nothing is downloaded: a missing dataset fails with one line naming the file expected where and
how to obtain it. Layouts are torchvision's (``cifar-10-batches-py/data_batch_1..5, test_batch,
batches.meta``; ``cifar-100-python/train, test, meta``; ``cifar-10-batches-bin/data_batch_1..5.bin,
test_batch.bin, batches.meta.txt``; ``cifar-100-binary/train.bin, test.bin,
fine_label_names.txt``; ``stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin,
class_names.txt``). The CIFAR python batches are pickles: they are read with a restricted
unpickler that only builds numpy arrays (torchvision's loader would run any code a tampered
file holds).

Splits are explicit: ``train``, ``val``, ``test``. Where a dataset has no validation split
(CIFAR, STL-10, an image folder without ``val/``), ``val`` is carved from the training images
with ``seed`` and ``val_fraction`` (:func:`carve_val`: deterministic, disjoint, and ``train``
then excludes those images). ``limit`` keeps the first N images of the split.

Image folders: images of any size and mode are read with PIL. Grayscale (1, L, I, I;16, F) is
replicated to three channels (16-bit scaled to 8 bits); images with transparency (RGBA, LA, P
with a transparent colour) are alpha-composited onto white; other modes (CMYK, YCbCr, ...) are
converted by PIL. Images of mixed sizes need ``preprocessing.resize`` (``resize``). A class
folder of the training split without images is an error (it would silently cost the model a
class). Every class folder and file must resolve inside the dataset's root and no image over
the pixel limit is decoded (:mod:`cnnexplain.data.files`, options ``follow_symlinks`` and
``max_image_pixels``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from cnnexplain.data.base import ImageDataset
from cnnexplain.data.broden import BrodenDataset
from cnnexplain.data.files import Confinement, FilePolicy, open_image
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig, image_tensor
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.fingerprint import digest_parts, files_digest

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")

# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def carve_val(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (train, val) index arrays, both sorted: val is the first
    max(1, round(n * val_fraction)) of ``np.random.default_rng(seed).permutation(n)``."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"`val_fraction` must be in (0, 1), got {val_fraction}",
                         "pass e.g. `val_fraction=0.1`")
    if n < 2:
        raise CnnexplainError(f"cannot carve a validation split from {n} training image(s)",
                              "add training images or provide a val/ split")
    return holdout(n, val_fraction, seed)


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions in [0, n), n >= 2, both sorted int64: the held-out ones are the
    first ``min(n - 1, max(1, round(fraction * n)))`` of ``np.random.default_rng(seed).
    permutation(n)`` (validation carving here, a CAV's test split in TCAV)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise UsageError(f"unknown split {split!r}{close_matches(str(split), allowed)}",
                         f"pass `split` {', '.join(allowed[:-1])} or {allowed[-1]}")
    return split


def _limit(indices: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None:
        return indices
    if int(limit) < 1:
        raise UsageError(f"`limit` must be >= 1, got {limit}", "pass e.g. `limit=100`")
    return indices[: int(limit)]


# ---------------------------------------------------------------------------------------------
# In-memory image arrays (CIFAR, STL-10)
# ---------------------------------------------------------------------------------------------


class ArrayDataset(ImageDataset):
    """Images held in a uint8 array [N, 3, H, W] (or a memmap), a selection of its rows.

    Items: ``image`` float32 [3, H, W] in [0, 1] (resized per preprocessing), ``label`` int64,
    ``index`` int64 (position in this dataset). ``fingerprint()``: content digest of the
    source files and the selection."""

    augmentation = "flip-crop"  # CIFAR and STL-10: photographs, the usual recipe

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                 class_names: list[str], preprocessing: Preprocessing, spec: str,
                 sources: list[Path], split: str, selection: dict):
        self.images, self.labels, self.rows = images, labels, rows
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.spec = spec
        self.sources = sources
        self.split = split
        self.selection = selection
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = int(self.rows[int(i)])
        chw = np.ascontiguousarray(self.images[r])
        image = torch.from_numpy(chw.astype(np.float32) * np.float32(1.0 / 255.0))
        return {"image": self.preprocessing.resize_image(image),
                "label": torch.tensor(int(self.labels[r]), dtype=torch.int64),
                "index": torch.tensor(int(i), dtype=torch.int64)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            root = os.path.commonpath([str(p.parent) for p in self.sources])
            self._fingerprint = digest_parts(self.spec.split(":")[0],
                                             files_digest(self.sources, root=root, mode="content"),
                                             self.selection, len(self.rows))
        return self._fingerprint

    def describe(self) -> dict:
        d = super().describe()
        d.update({"split": self.split, "selection": self.selection})
        return d


def _split_rows(split: str, n: int, seed: int, val_fraction: float) -> np.ndarray:
    """Rows of the loaded array a split uses: all of the test array, or the train / val part
    of the training array (:func:`carve_val`)."""
    if split == "test":
        return np.arange(n)
    train, val = carve_val(n, seed, val_fraction)
    return train if split == "train" else val


def _array_dataset(name: str, spec: str, split: str, args: "OpenArgs", load: Callable,
                   class_names: list[str], train_files, test_files) -> ArrayDataset:
    """Load the train or test files of an array dataset and select the split's rows."""
    files = test_files if split == "test" else train_files
    images, labels = load(files)
    rows = _split_rows(split, len(labels), args.seed, args.val_fraction)
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if bad.size:
        raise CnnexplainError(f"{name} label {int(labels[bad[0]])} in {files[0].parent} is out of "
                              f"range for {len(class_names)} classes", "re-extract the dataset")
    rows = _limit(rows, args.limit)
    selection = {"split": split, "seed": args.seed if split != "test" else None,
                 "val_fraction": args.val_fraction if split != "test" else None}
    return ArrayDataset(images, labels, rows, class_names, args.preprocessing, spec,
                        list(files), split, selection)


# -- CIFAR ------------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
REDOWNLOAD = f"download it again from {CIFAR_URL}"


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """What pickles written by Python 3 with protocol 2 call for bytes (``_codecs.encode(s,
    'latin1')``); refuses every other codec and argument."""
    codec = str(encoding).lower().replace("_", "-")
    if not isinstance(obj, str) or codec not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 strings")
    return obj.encode("latin-1")


def _frombuffer(buf, dtype, shape, order):
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
SAFE_PICKLE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the globals numpy arrays need (SAFE_PICKLE_GLOBALS); anything else is refused
    before it can be called."""

    def find_class(self, module: str, name: str):
        try:
            return SAFE_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("a persistent id")


class _Refused(pickle.UnpicklingError):
    pass


def safe_unpickle(path: Path):
    """Load a CIFAR python batch with the restricted unpickler (latin-1 strings, like
    torchvision). One-line CnnexplainError for a refused global or an unreadable file."""
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, encoding="latin1").load()
    except _Refused as exc:
        raise CnnexplainError(f"refusing to unpickle {path}: it calls {exc}, which a CIFAR batch "
                              "never does (only numpy arrays are allowed)",
                              f"the file may be tampered with: {REDOWNLOAD}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise CnnexplainError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}",
                              REDOWNLOAD) from None


def _key(d: dict, name: str, path: Path):
    """``d[name]`` for str or bytes keys (pickles from Python 2 or 3)."""
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    keys = ", ".join(map(str, list(d)[:6]))
    raise CnnexplainError(f"CIFAR batch {path} has no {name!r} entry (keys: {keys})", REDOWNLOAD)


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision expects a CIFAR variant's files."""

    name: str
    archive: str
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str
    py_labels: str
    py_names: str
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    bin_names: str
    bin_label_bytes: int  # label bytes before each image (1 for CIFAR-10; coarse, fine for 100)


CIFAR10 = CifarLayout("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                      "labels", "label_names", "cifar-10-batches-bin",
                      tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
                      "batches.meta.txt", 1)
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",),
                       "test", "meta", "fine_labels", "fine_label_names", "cifar-100-binary",
                       ("train.bin",), "test.bin", "fine_label_names.txt", 2)


def find_dir(root: Path, name: str) -> Path | None:
    """``root/name``, or ``root`` itself when it is that directory (None if neither)."""
    for d in (root / name, root):
        if d.is_dir() and d.name == name:
            return d
    return None


def _need(paths: list[Path], what: str, how: str) -> None:
    """One-line error naming the first missing file."""
    for p in paths:
        if not p.is_file():
            raise CnnexplainError(f"{what}: expected {p}", how)


def _cifar_python(d: Path, lay: CifarLayout):
    """(load(files) -> (uint8 [N, 3, 32, 32], int64 [N]), class names, train files, test
    files) for the python version: each batch a dict with ``data`` uint8 [N, 3072] (R, G, B
    planes of 32 x 32, row-major) and the label list."""
    def load(files):
        images, labels = [], []
        for p in files:
            batch = safe_unpickle(p)
            if not isinstance(batch, dict):
                raise CnnexplainError(f"CIFAR batch {p} is not a dict", REDOWNLOAD)
            data = np.asarray(_key(batch, "data", p))
            lab = np.asarray(_key(batch, lay.py_labels, p), dtype=np.int64)
            if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
                    or len(data) != len(lab)):
                raise CnnexplainError(f"CIFAR batch {p} holds data of shape {list(data.shape)} "
                                      f"({data.dtype}) for {len(lab)} labels, expected uint8 "
                                      "[N, 3072]", REDOWNLOAD)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab)
        return np.concatenate(images), np.concatenate(labels)

    meta = safe_unpickle(d / lay.py_meta)
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _key(meta, lay.py_names, d / lay.py_meta)]
    return load, names, [d / f for f in lay.py_train], [d / lay.py_test]


def _cifar_binary(d: Path, lay: CifarLayout):
    """Same as :func:`_cifar_python` for the binary version: fixed records of
    ``bin_label_bytes`` label bytes (the last one is the label used) + 3072 image bytes."""
    record = lay.bin_label_bytes + 3072

    def load(files):
        images, labels = [], []
        for p in files:
            raw = np.fromfile(p, dtype=np.uint8)
            if raw.size == 0 or raw.size % record:
                raise CnnexplainError(f"CIFAR binary batch {p} has {raw.size} bytes, not a "
                                      f"multiple of the {record}-byte record", REDOWNLOAD)
            recs = raw.reshape(-1, record)
            labels.append(recs[:, lay.bin_label_bytes - 1].astype(np.int64))
            images.append(recs[:, lay.bin_label_bytes:].reshape(-1, 3, 32, 32))
        return np.concatenate(images), np.concatenate(labels)

    text = (d / lay.bin_names).read_text(encoding="utf-8", errors="replace")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return load, names, [d / f for f in lay.bin_train], [d / lay.bin_test]


def _open_cifar(lay: CifarLayout) -> Callable:
    """The opener of one CIFAR variant: python version if present, else binary."""
    def opener(root: str, args: "OpenArgs") -> ArrayDataset:
        root_p = Path(root).expanduser()
        how = (f"download {lay.archive} (python version) or the binary version from {CIFAR_URL} "
               f"and extract it in {root_p}")
        if not root_p.is_dir():
            raise CnnexplainError(f"{lay.name} not found: {root_p} does not exist", how)
        split = _check_split(args.split)
        py, binary = find_dir(root_p, lay.py_dir), find_dir(root_p, lay.bin_dir)
        if py is not None:
            _need([py / f for f in lay.py_train + (lay.py_test, lay.py_meta)],
                  f"{lay.name} is incomplete", how)
            load, names, train, test = _cifar_python(py, lay)
        elif binary is not None:
            _need([binary / f for f in lay.bin_train + (lay.bin_test, lay.bin_names)],
                  f"{lay.name} is incomplete", how)
            load, names, train, test = _cifar_binary(binary, lay)
        else:
            raise CnnexplainError(f"{lay.name} not found in {root_p}: expected "
                                  f"{root_p / lay.py_dir / lay.py_train[0]} (python version) or "
                                  f"{root_p / lay.bin_dir / lay.bin_train[0]} (binary version)",
                                  how)
        spec = f"{args.prefix}:{root}"
        return _array_dataset(lay.name, spec, split, args, load, names, train, test)

    return opener


# -- STL-10 -----------------------------------------------------------------------------------

STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]
STL10_PIXELS = 3 * 96 * 96


def _open_stl10(root: str, args: "OpenArgs") -> ArrayDataset:
    """STL-10 binary: X files are uint8 images stored column-major, read as [N, 3, 96, 96] then
    transposed to [N, 3, H, W] (torchvision's np.transpose(images, (0, 1, 3, 2))); y files hold
    labels 1..10."""
    root_p = Path(root).expanduser()
    how = f"download stl10_binary.tar.gz from {STL10_URL} and extract it in {root_p}"
    if not root_p.is_dir():
        raise CnnexplainError(f"STL-10 not found: {root_p} does not exist", how)
    split = _check_split(args.split)
    d = find_dir(root_p, "stl10_binary")
    if d is None:
        raise CnnexplainError(f"STL-10 not found in {root_p}: expected "
                              f"{root_p / 'stl10_binary' / 'train_X.bin'}", how)
    part = "test" if split == "test" else "train"
    _need([d / f"{part}_X.bin", d / f"{part}_y.bin"], "STL-10 is incomplete", how)
    names_file = d / "class_names.txt"
    names = ([n.strip() for n in names_file.read_text().splitlines() if n.strip()]
             if names_file.is_file() else STL10_CLASSES)

    def load(files):
        x_path, y_path = files
        size = x_path.stat().st_size
        if size == 0 or size % STL10_PIXELS:
            raise CnnexplainError(f"STL-10 file {x_path} has {size} bytes, not a multiple of "
                                  f"{STL10_PIXELS} (3 x 96 x 96)", how)
        x = np.memmap(x_path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if len(y) != len(x):
            raise CnnexplainError(f"STL-10 {y_path} has {len(y)} labels for {len(x)} images "
                                  f"in {x_path}", how)
        return x, y

    files = [d / f"{part}_X.bin", d / f"{part}_y.bin"]
    return _array_dataset("STL-10", f"{args.prefix}:{root}", split, args, load, names, files, files)


# ---------------------------------------------------------------------------------------------
# Image files (image folders, TCAV concept folders)
# ---------------------------------------------------------------------------------------------


def to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] (policy in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode in ("RGBA", "RGBa", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def _unreadable(path: Path, exc: Exception) -> CnnexplainError:
    return CnnexplainError(f"cannot read image {path}: {type(exc).__name__}: {exc}",
                           "remove or replace the file")


def load_rgb(path: Path, files: FilePolicy | None = None,
             root: Path | Confinement | None = None) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3]; one-line error naming an unreadable file, an
    image over ``files.max_pixels`` or (``root``) a path that resolves outside ``root``
    (:mod:`cnnexplain.data.files`)."""
    try:
        with open_image(path, files, root) as im:
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


class ImageFileDataset(ImageDataset):
    """Image files with labels (-1 for TCAV concept images), decoded in ``__getitem__``.

    Items: ``image`` float32 [3, H, W] in [0, 1], ``label`` int64, ``index`` int64. Without
    ``preprocessing.resize`` every header is read on open: an unreadable file, or two files of
    different sizes, fail at once with one line naming them. ``fingerprint()`` digests the
    files (``fingerprint_mode`` "stat": size and mtime, cheap; "content": every byte), the
    labels and class names. ``policy``: the decoding limit and, with ``confine``, that every
    file resolves inside ``root`` when it is opened (:mod:`cnnexplain.data.files`; the
    readers that list a dataset check its files when listing them too)."""

    def __init__(self, files: list[Path], labels: list[int], class_names: list[str], root: Path,
                 preprocessing: Preprocessing, spec: str, split: str | None = None,
                 fingerprint_mode: str = "stat", policy: FilePolicy | None = None,
                 confine: bool = False):
        if not files:
            raise CnnexplainError(f"no images found in {root} (extensions: "
                                  f"{', '.join(IMAGE_EXTENSIONS)})", "add images or check the path")
        self.files, self.labels = list(files), [int(x) for x in labels]
        self.class_names = list(class_names)
        self.root = root
        self.preprocessing = preprocessing
        self.spec = spec
        self.split = split
        self.fingerprint_mode = fingerprint_mode
        self.policy = policy or FilePolicy()
        self.confine = Confinement(root, self.policy) if confine else None
        self.image_size = self._check_sizes() if preprocessing.resize is None else None
        self._fingerprint: str | None = None

    def _check_sizes(self) -> tuple[int, int]:
        first, first_size = None, None
        for p in self.files:
            try:
                with open_image(p, self.policy, self.confine) as im:
                    size = (im.height, im.width)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise _unreadable(p, exc) from None
            if first is None:
                first, first_size = p, size
            elif size != first_size:
                raise CnnexplainError(
                    f"images have mixed sizes: {first} is {first_size[0]}x{first_size[1]}, "
                    f"{p} is {size[0]}x{size[1]}", "pass `resize=N` to resize every image to N x N")
        return first_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[int(i)]
        arr = load_rgb(path, self.policy, self.confine)
        if self.image_size is not None and arr.shape[:2] != self.image_size:
            raise CnnexplainError(f"image {path} is {arr.shape[0]}x{arr.shape[1]}, the others "
                                  f"{self.image_size[0]}x{self.image_size[1]}",
                                  "pass `resize=N` to resize every image to N x N")
        return {"image": self.preprocessing.resize_image(image_tensor(arr)),
                "label": torch.tensor(self.labels[int(i)], dtype=torch.int64),
                "index": torch.tensor(int(i), dtype=torch.int64)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_parts(
                "files", files_digest(self.files, root=self.root, mode=self.fingerprint_mode),
                [str(p.relative_to(self.root)) for p in self.files], self.labels, self.class_names)
        return self._fingerprint

    def describe(self) -> dict:
        d = super().describe()
        d.update({"root": str(self.root), "split": self.split})
        return d


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (by extension, case-insensitive; hidden files skipped), sorted
    by path; ``recursive`` also walks subfolders (like torchvision's ImageFolder)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_tree(folder: Path, root: Path, policy: FilePolicy, training: bool = False
                ) -> dict[str, list[Path]]:
    """{class name: files} for the class subfolders of ``folder``; every folder and file must
    resolve inside ``root`` (``policy``). ``training``: a class folder without images is an
    error (dropping it would give the model one class fewer); elsewhere (val/, test/) it is
    left out."""
    out = {}
    confined = Confinement(root, policy)
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        confined.check(d, "class folder")
        files = [confined.check(f, "image") for f in image_files(d, recursive=True)]
        if files:
            out[d.name] = files
        elif training:
            raise CnnexplainError(f"class folder {d} holds no images (extensions: "
                                  f"{', '.join(IMAGE_EXTENSIONS)})",
                                  "add images to it or remove it")
    return out


def _open_imagefolder(root: str, args: "OpenArgs") -> ImageFileDataset:
    """ROOT/{train,val,test}/<class>/* when ROOT/train exists, else ROOT/<class>/* (train and a
    carved val; no test). Classes: sorted names of the training class folders."""
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise CnnexplainError(f"image folder not found: {root_p} does not exist",
                              "point imagefolder:ROOT at ROOT/<class>/*.png or "
                              "ROOT/train/<class>/*.png")
    split = _check_split(args.split)
    split_dirs = (root_p / "train").is_dir()
    train_dir = root_p / "train" if split_dirs else root_p
    tree = _class_tree(train_dir, root_p, args.files, training=True)
    if not tree:
        loose = " (it holds images directly)" if image_files(train_dir) else ""
        raise CnnexplainError(f"no class folders with images in {train_dir}{loose}",
                              f"put the images of each class in {train_dir}/<class>/ "
                              f"(e.g. {train_dir}/cat/1.png)")
    classes = list(tree)
    spec = f"{args.prefix}:{root}"

    def flatten(t: dict[str, list[Path]], where: Path):
        extra = [c for c in t if c not in classes]
        if extra:
            known = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise CnnexplainError(f"class folder {where / extra[0]} has no counterpart in "
                                  f"{train_dir}", f"use the training classes ({known})")
        files = [p for c in t for p in t[c]]
        labels = [classes.index(c) for c in t for _ in t[c]]
        return files, labels

    own = root_p / split if split_dirs and split != "train" else None
    if own is not None and own.is_dir():
        files, labels = flatten(_class_tree(own, root_p, args.files), own)
        if not files:
            raise CnnexplainError(f"no images in the class folders of {own}",
                                  f"add images under {own}/<class>/")
    elif split == "test":
        raise CnnexplainError(f"{root_p} has no test split",
                              f"add {root_p / 'test'}/<class>/ images or use `split=val`")
    else:
        files, labels = flatten(tree, train_dir)
        train_has_own_val = split_dirs and (root_p / "val").is_dir()
        if not train_has_own_val:
            train, val = carve_val(len(files), args.seed, args.val_fraction)
            keep = train if split == "train" else val
            files, labels = [files[k] for k in keep], [labels[k] for k in keep]
    keep = _limit(np.arange(len(files)), args.limit)
    return ImageFileDataset([files[k] for k in keep], [labels[k] for k in keep], classes, root_p,
                            args.preprocessing, spec, split, policy=args.files, confine=True)


# -- TCAV concept folders ---------------------------------------------------------------------


def list_concept_folders(root: str | os.PathLike, files: FilePolicy | None = None
                         ) -> dict[str, list[str]]:
    """{"concepts": [...], "randoms": [...]}: the image folders of a TCAV concept root (random
    sets are the folders whose name starts with ``random``, e.g. random_0, random500_3). Every
    folder must resolve inside the root (``files``, :mod:`cnnexplain.data.files`)."""
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise CnnexplainError(f"concept folder root {root_p} does not exist",
                              "create it with `cnnexplain data synth` in the concepts format")
    confined = Confinement(root_p, files)
    folders = [d for d in sorted(root_p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    names = [d.name for d in folders if confined.check(d, "concept folder") and image_files(d)]
    return {"concepts": [n for n in names if not n.startswith("random")],
            "randoms": [n for n in names if n.startswith("random")]}


def concept_images(root: str | os.PathLike, name: str,
                   preprocessing: Preprocessing = Preprocessing(),
                   limit: int | None = None, files: FilePolicy | None = None) -> ImageFileDataset:
    """The images of ``<root>/<name>/`` (label -1), fingerprinted by content; the folder and
    its files must resolve inside ``root`` (``files``, :mod:`cnnexplain.data.files`)."""
    root_p = Path(root).expanduser()
    folder = root_p / name
    if not folder.is_dir():
        found = list_concept_folders(root_p, files)
        names = found["concepts"] + found["randoms"]
        choices = ", ".join(names) or "(none: the root has no image folders)"
        raise CnnexplainError(f"no concept folder {folder}{close_matches(name, names)}",
                              f"choose from {choices}")
    confined = Confinement(root_p, files)
    confined.check(folder, "concept folder")
    paths = [confined.check(p, "image") for p in image_files(folder)]
    if not paths:
        raise CnnexplainError(f"concept folder {folder} holds no images",
                              "add images or remove the folder")
    paths = paths[: int(limit)] if limit is not None else paths
    return ImageFileDataset(paths, [-1] * len(paths), [], root_p, preprocessing,
                            f"concepts:{root_p}/{name}", None, fingerprint_mode="content",
                            policy=files, confine=True)


# ---------------------------------------------------------------------------------------------
# The spec registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenArgs:
    prefix: str
    split: str
    preprocessing: Preprocessing
    limit: int | None
    seed: int
    val_fraction: float
    categories: tuple[str, ...] | None
    files: FilePolicy = FilePolicy()


def _open_synthetic(rest: str, args: OpenArgs) -> SyntheticDataset:
    config = WorldConfig.from_spec("synthetic" + (f":{rest}" if rest else ""))
    if args.limit is not None and int(args.limit) < 1:
        raise UsageError(f"`limit` must be >= 1, got {args.limit}", "pass e.g. `limit=100`")
    return SyntheticDataset(config, _check_split(args.split), args.preprocessing, args.limit)


def _open_broden(root: str, args: OpenArgs) -> BrodenDataset:
    split = _check_split(args.split, ("train", "val", "all"))
    return BrodenDataset(root, categories=args.categories, limit=args.limit, split=split,
                         preprocessing=args.preprocessing, files=args.files)


@dataclass(frozen=True)
class DatasetKind:
    prefix: str
    usage: str
    help: str
    needs_root: bool
    open: Callable[[str, OpenArgs], ImageDataset]


DATASET_KINDS: dict[str, DatasetKind] = {
    k.prefix: k
    for k in [
        DatasetKind("synthetic", "synthetic[:n=600,res=32,...]",
                    "the procedurally generated world with per-pixel ground truth", False,
                    _open_synthetic),
        DatasetKind("cifar10", "cifar10:ROOT", "CIFAR-10 (python or binary version)", True,
                    _open_cifar(CIFAR10)),
        DatasetKind("cifar100", "cifar100:ROOT", "CIFAR-100, fine labels (python or binary)", True,
                    _open_cifar(CIFAR100)),
        DatasetKind("stl10", "stl10:ROOT", "STL-10 binary version, labelled images", True,
                    _open_stl10),
        DatasetKind("imagefolder", "imagefolder:ROOT",
                    "ROOT/<class>/* or ROOT/{train,val,test}/<class>/*", True, _open_imagefolder),
        DatasetKind("broden", "broden:ROOT", "a Broden-format directory (splits train, val, all)",
                    True, _open_broden),
    ]
}


def parse_spec(spec: str) -> tuple[DatasetKind, str]:
    """``PREFIX[:REST]`` -> (kind, REST); one-line UsageError for an unknown prefix or a
    missing ROOT."""
    prefix, _, rest = str(spec).strip().partition(":")
    kind = DATASET_KINDS.get(prefix)
    if kind is None:
        raise UsageError(f"unknown dataset {prefix!r}{close_matches(prefix, DATASET_KINDS)}",
                         f"use one of {', '.join(k.usage for k in DATASET_KINDS.values())}")
    if kind.needs_root and not rest:
        raise UsageError(f"dataset {prefix} needs a root directory", f"write {kind.usage}")
    return kind, rest


def open_dataset(spec: str = "synthetic", split: str = "train",
                 preprocessing: Preprocessing = Preprocessing(), limit: int | None = None,
                 seed: int = 0, val_fraction: float = 0.1,
                 categories: Sequence[str] | None = None,
                 files: FilePolicy | None = None) -> ImageDataset:
    """Open a dataset spec (module docstring) as an :class:`ImageDataset`.

    ``split``: train / val / test (Broden: train / val / all); ``seed`` and ``val_fraction``
    carve val from train where the dataset has none; ``limit``: first N images of the split;
    ``categories``: Broden categories to keep (Broden only); ``files``: symlinks and the
    decoding limit (:class:`~cnnexplain.data.files.FilePolicy`, default: confined to the
    dataset's root, PIL's pixel threshold)."""
    kind, rest = parse_spec(spec)
    if categories is not None and kind.prefix != "broden":
        raise UsageError(f"`categories` applies to Broden datasets, not {kind.prefix}",
                         "drop `categories` or use `dataset=broden:ROOT`")
    args = OpenArgs(kind.prefix, split, preprocessing, limit, int(seed), float(val_fraction),
                    tuple(categories) if categories is not None else None,
                    files if files is not None else FilePolicy())
    return kind.open(rest, args)
