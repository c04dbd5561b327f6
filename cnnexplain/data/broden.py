"""Broden on disk: the reader (:class:`BrodenDataset`) and the writer (:func:`export_broden`).

The format is the one CSAILVision/NetDissect's ``joinseg.py`` writes and NetDissect-Lite reads
(../shared/reference/broden-and-dissection.md):

    ROOT/index.csv     image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
    ROOT/label.csv     number,name,category,frequency,coverage,syns
    ROOT/category.csv  name,first,last,count,frequency
    ROOT/c_<cat>.csv   code,number,name,frequency,coverage
    ROOT/images/<source>/<name>.jpg, <name>_<cat>.png, <name>_<cat>_<k>.png

Columns are read by name (an older README orders them differently). An index cell holds
``;``-separated entries, dominant first: mask paths relative to ``images/`` (8-bit RGB PNGs at
sh x sw whose pixel label is R + 256 * G, a global label number) or integers (whole-image labels,
as for scene and texture). CSVs are written with CRLF line ends like the reference writer (the
``csv`` module's excel dialect); the reader accepts any line ends.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from cnnexplain.data.base import ImageDataset
from cnnexplain.data.export import Progress, png_bytes, staged_directory, write_manifest
from cnnexplain.data.files import Confinement, FilePolicy, open_image, too_large
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import (
    CATEGORIES, IMAGE_CATEGORIES, ONTOLOGY, PIXEL_CATEGORIES, Sample, WorldConfig,
    downsample_labels, image_tensor, render)
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.fingerprint import digest_parts, file_digest, files_digest
from cnnexplain.io import write_bytes

INDEX_META = ("image", "split", "ih", "iw", "sh", "sw")
ITEM_FIELDS = ("image", "label", "index", "masks", "image_labels", "has_category")
INDEX_HEADER = INDEX_META + CATEGORIES
LABEL_HEADER = ("number", "name", "category", "frequency", "coverage", "syns")
CATEGORY_HEADER = ("name", "first", "last", "count", "frequency")
CODE_HEADER = ("code", "number", "name", "frequency", "coverage")
LABEL_REQUIRED = ("number", "name", "category")
CODE_REQUIRED = ("code", "number", "coverage")
SOURCE = "synthetic"  # images/<source>/ of the synthetic export
TRAIN_FRACTION = 0.7  # split by hash of the image path, 70/30 like Broden
MAX_REPORTED = 3  # problems quoted in the one-line error
MAX_COLLECTED = 50  # stop validating after this many problems
SAMPLE_DECODE_ROWS = 8  # rows whose masks are decoded on open to check label numbers
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GET_BRODEN = ("point broden:ROOT at a copy of Broden (NetDissect-Lite's script/dlbroden.sh "
              "downloads broden1_224) or generate one with `cnnexplain data synth` "
              "in the Broden format")
FIX_BRODEN = ("repair the listed files, or regenerate the dataset (`cnnexplain data synth` "
              "writes a valid one in the Broden format)")

# ---------------------------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------------------------


def encode_rg(labels: np.ndarray) -> np.ndarray:
    """int [H, W] label numbers (< 65536) -> uint8 [H, W, 3] with R = n % 256, G = n // 256,
    B = 0 (joinseg.py's encodeRG)."""
    labels = np.asarray(labels, np.int64)
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return out


def decode_rg(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C>=2] -> int32 [H, W] label numbers R + 256 * G."""
    return rgb[..., 0].astype(np.int32) | (rgb[..., 1].astype(np.int32) << 8)


def hashed_float(path: str) -> float:
    """md5 of a path as a float in [0, 1) (joinseg.py's hashed_float), used for the split."""
    (number,) = struct.unpack(">Q", hashlib.md5(path.encode()).digest()[:8])
    return number / 2.0 ** 64


def png_size(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk (reads 26 bytes, no
    decode). Raises ValueError if the file does not start like a PNG."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24], head[25]


def _format_coverage(x: float) -> str:
    """A float the way the reference's Python 2 str() wrote c_*.csv coverages ('0.910724454131',
    '3.0'): positional, at most 12 significant digits."""
    return np.format_float_positional(float(x), precision=12, unique=True, fractional=False,
                                      trim="0")


def _csv_bytes(header: Sequence[str], rows: list[dict]) -> bytes:
    buf = _io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(header), restval="")  # excel dialect: CRLF
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


# ---------------------------------------------------------------------------------------------
# label.csv / c_*.csv
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    number: int
    name: str
    categories: dict  # category -> number of images with the label in that category
    frequency: int
    coverage: float
    syns: tuple


class LabelTable:
    """label.csv plus the c_<cat>.csv dense codes of the categories in use.

    ``label_names[n]`` is the name of global number n ('-' for 0 and unused numbers);
    :meth:`category_of` gives the primary category: the one whose c_*.csv gives the label the
    largest coverage (NetDissect-Lite's primary_categories_per_index, ties to the later
    category).
    """

    def __init__(self, labels: list[Label], codes: dict[str, list[dict]]):
        self.labels = {lab.number: lab for lab in labels}
        size = max(self.labels, default=0) + 1
        self.label_names = ["-"] * size
        for lab in labels:
            self.label_names[lab.number] = lab.name
        self._by_name = {lab.name: lab.number for lab in labels}
        self.categories = list(codes)
        self._codes = {c: {int(r["number"]): r for r in rows} for c, rows in codes.items()}
        self._primary: dict[int, str] = {}
        for n in self.labels:
            cov = [(self.coverage(c, n), i) for i, c in enumerate(self.categories)
                   if n in self._codes[c]]
            if cov:
                self._primary[n] = self.categories[max(cov)[1]]
            elif self.labels[n].categories:
                self._primary[n] = max(self.labels[n].categories.items(), key=lambda kv: kv[1])[0]

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, number: int) -> bool:
        return int(number) in self.labels

    def name(self, number: int) -> str:
        return self.label_names[int(number)]

    def number(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(f"unknown concept {name!r}{close_matches(name, self._by_name)}",
                             "see label.csv (or `cnnexplain data inspect ROOT`) for the names"
                             ) from None

    def category_of(self, number: int) -> str:
        """Primary category of a label number (KeyError for an unknown number)."""
        return self._primary[int(number)]

    def categories_of(self, number: int) -> dict:
        return dict(self.labels[int(number)].categories)

    def coverage(self, category: str, number: int) -> float:
        row = self._codes.get(category, {}).get(int(number))
        return float(row["coverage"]) if row else 0.0

    def numbers_in(self, category: str) -> list[int]:
        """Global numbers of a category's labels, in c_<cat>.csv code order."""
        rows = self._codes.get(category, {})
        return [n for n, _ in sorted(rows.items(), key=lambda kv: int(kv[1]["code"]))]

    def known_mask(self) -> np.ndarray:
        """bool [65536]: which R + 256 G values are 0 or a label of label.csv."""
        known = np.zeros(1 << 16, bool)
        known[0] = True
        known[[n for n in self.labels if 0 < n < (1 << 16)]] = True
        return known


_CAT_ENTRY = re.compile(r"^([^(]*)\(([0-9]+)\)$")


def _parse_label_row(row: dict) -> Label:
    cats = {}
    for entry in filter(None, (row.get("category") or "").split(";")):
        m = _CAT_ENTRY.match(entry.strip())
        if not m:
            raise ValueError(f"category entry {entry!r} is not 'name(count)'")
        cats[m.group(1)] = int(m.group(2))
    freq = row.get("frequency") or ""
    cov = row.get("coverage") or ""
    return Label(number=int(row["number"]), name=row["name"], categories=cats,
                 frequency=int(freq) if freq.strip() else sum(cats.values()),
                 coverage=float(cov) if cov.strip() else 0.0,
                 syns=tuple(s for s in (row.get("syns") or "").split(";") if s))


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts keyed by the stripped column names) of a CSV file."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [{k.strip(): v for k, v in r.items() if k is not None} for r in reader]
        return [f.strip() for f in (reader.fieldnames or [])], rows


def _path_problem(rel: str) -> str | None:
    """Why an index path may not be used (None if fine): empty, absolute, or escaping the
    dataset root through '..'. Lexical checks only (no filesystem access)."""
    if not rel:
        return "an empty path"
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or PureWindowsPath(rel).drive:
        return f"absolute path {rel!r}"
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        return f"path {rel!r} escapes the dataset root"
    return None


class _Listing:
    """Existence checks by listing each directory once (cheaper than a stat per file)."""

    def __init__(self, base: Path):
        self.base = base
        self._dirs: dict[str, set] = {}

    def exists(self, rel: str) -> bool:
        head, _, name = rel.replace("\\", "/").rpartition("/")
        if head not in self._dirs:
            try:
                self._dirs[head] = set(os.listdir(self.base / head))
            except OSError:
                self._dirs[head] = set()
        return name in self._dirs[head]


@dataclass(frozen=True)
class _Row:
    line: int  # line number in index.csv (header = 1)
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    cells: dict  # category -> tuple of entries (str path or int)


def _columns(names: list[str]) -> str:
    return f"column{'s' if len(names) > 1 else ''} {', '.join(names)}"


class _Problems:
    def __init__(self):
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    @property
    def full(self) -> bool:
        return len(self.items) >= MAX_COLLECTED

    def raise_if_any(self, root: Path) -> None:
        """Raise one CnnexplainError quoting the first MAX_REPORTED problems."""
        if not self.items:
            return
        n = len(self.items)
        count = f"{n}+" if self.full else str(n)
        more = f"; and {n - MAX_REPORTED} more" if n > MAX_REPORTED else ""
        shown = "; ".join(self.items[:MAX_REPORTED])
        raise CnnexplainError(f"{root} is not a valid Broden dataset ({count} problem"
                              f"{'s' if n > 1 else ''}): {shown}{more}", FIX_BRODEN)


class BrodenDataset(ImageDataset):
    """A Broden-format directory, validated on open.

    Items (fixed shapes, so the default collate batches them):

        image        float32 [3, ih, iw] in [0, 1] (resized only if preprocessing.resize)
        label        int64 -1 (Broden has no classes)
        index        int64 position in this dataset
        masks        int32 [L, sh, sw] global label numbers; slot l holds a layer of category
                     ``layer_categories[l]`` (each category gets as many slots as the most
                     layers it has in any image; missing layers are 0)
        image_labels int32 [M] whole-image labels (scene, texture), slots per
                     ``image_label_categories``, 0 = none
        has_category bool [len(categories)] the image's index cell for that category is not empty

    Validation on open collects every problem (up to 50) and raises ONE CnnexplainError quoting
    the first three: missing files or columns, bad numbers, empty index, paths escaping the root
    (absolute or '..'), missing image/mask files (directory listings), masks whose PNG header
    is not sh x sw 8-bit RGB(A), whole-image label numbers absent from label.csv, and — by
    decoding the masks of 8 rows spread over the index — mask label numbers absent from
    label.csv. Every decode in ``__getitem__`` checks its mask numbers and sizes again, so a
    bad mask elsewhere fails with a one-line error naming the file. ``categories`` keeps those
    categories (and drops images that have none of them, like NetDissect-Lite); ``split``
    keeps one split ('train' / 'val'; None or 'all' keeps every row); ``limit`` then keeps the
    first N rows. ``files`` (:class:`~cnnexplain.data.files.FilePolicy`): every image and mask
    must resolve inside ``root`` (checked on open and again on every decode, a one-line error
    naming the file), and no image or mask larger than its pixel limit is decoded (the index's
    ih x iw and the mask headers are checked on open).
    """

    def __init__(self, root: str | os.PathLike, categories: Sequence[str] | None = None,
                 limit: int | None = None, split: str | None = None,
                 preprocessing: Preprocessing = Preprocessing(),
                 files: FilePolicy | None = None):
        self.root = Path(root).expanduser()
        self.images_dir = self.root / "images"
        self.preprocessing = preprocessing
        self.files_policy = files or FilePolicy()
        self._confined = Confinement(self.root, self.files_policy)
        self.class_names = []
        self.spec = f"broden:{root}"
        self.split = None if split in (None, "all") else split
        self.limit = limit
        if limit is not None and int(limit) < 1:
            raise UsageError(f"`limit` must be >= 1, got {limit}", "pass e.g. `limit=100`")
        if not self.root.is_dir():
            raise CnnexplainError(f"Broden dataset not found: {self.root} is not a directory "
                                  "(expected index.csv, label.csv, category.csv, images/ in it)",
                                  GET_BRODEN)
        problems = _Problems()
        rows, columns = self._read_index(problems)
        self.labels = self._read_labels(problems, columns, categories)
        if self.labels is not None:
            self._validate_rows(rows, problems)
        problems.raise_if_any(self.root)
        self._known = self.labels.known_mask()
        self._layout(rows)
        rows = [r for r in rows if any(r.cells.get(c) for c in self.categories)]
        self._check_sizes(rows, problems)
        self._sample_decode(rows, problems)
        problems.raise_if_any(self.root)
        rows = self._select(rows)
        self.rows = rows
        self._fingerprint: str | None = None

    # -- reading the tables ------------------------------------------------------------------

    def _read_index(self, problems: _Problems) -> tuple[list[_Row], list[str]]:
        """Parse index.csv by column name: (rows, columns); problems for missing columns, an
        empty index and non-integer sizes."""
        path = self.root / "index.csv"
        if not path.is_file():
            problems.add("index.csv is missing")
            return [], []
        columns, raw = _read_csv(path)
        missing = [c for c in INDEX_META if c not in columns]
        if missing:
            problems.add(f"index.csv lacks {_columns(missing)} (header: {','.join(columns)})")
            return [], columns
        if not raw:
            problems.add("index.csv lists no images")
        cats = [c for c in columns if c not in INDEX_META]
        if not cats and raw:
            problems.add("index.csv has no category columns (e.g. color, object, part)")
        rows = []
        for k, r in enumerate(raw):
            line = k + 2
            try:
                sizes = [int(r[c]) for c in ("ih", "iw", "sh", "sw")]
                if min(sizes) < 1:
                    raise ValueError
            except (TypeError, ValueError):
                problems.add(f"index.csv line {line}: ih/iw/sh/sw must be positive integers")
                continue
            cells = {}
            for c in cats:
                entries = []
                for e in (x.strip() for x in (r.get(c) or "").split(";")):
                    if e:
                        entries.append(int(e) if e.isdigit() else e)
                cells[c] = tuple(entries)
            rows.append(_Row(line, (r.get("image") or "").strip(), (r.get("split") or "").strip(),
                             *sizes, cells))
        return rows, columns

    def _read_labels(self, problems: _Problems, columns: list[str],
                     categories: Sequence[str] | None) -> LabelTable | None:
        """Read label.csv, category.csv and the c_<cat>.csv of the categories in use; sets
        ``self.categories`` (Broden's order first, then any others)."""
        index_cats = [c for c in columns if c not in INDEX_META]
        tables = {}
        for name, required in (("label.csv", LABEL_REQUIRED), ("category.csv", ("name",))):
            path = self.root / name
            if not path.is_file():
                problems.add(f"{name} is missing")
                continue
            header, rows = _read_csv(path)
            lacking = [c for c in required if c not in header]
            if lacking:
                problems.add(f"{name} lacks {_columns(lacking)}")
                continue
            tables[name] = rows
        if len(tables) < 2 or not index_cats:
            return None
        listed = [r["name"] for r in tables["category.csv"]]
        for c in index_cats:
            if c not in listed:
                problems.add(f"index.csv column {c!r} is not a category of category.csv "
                             f"({', '.join(listed)})")
        available = [c for c in CATEGORIES if c in index_cats and c in listed]
        available += [c for c in listed if c in index_cats and c not in available]
        if categories is not None:
            unknown = [c for c in categories if c not in available]
            if unknown:
                raise UsageError(f"unknown Broden category {unknown[0]!r}"
                                 f"{close_matches(unknown[0], available)} in {self.root}",
                                 f"choose from {', '.join(available)}")
            available = [c for c in available if c in categories]
        self.categories = available
        labels = []
        for k, r in enumerate(tables["label.csv"]):
            try:
                labels.append(_parse_label_row(r))
            except (TypeError, ValueError) as exc:
                why = exc if "entry" in str(exc) else "bad number"
                problems.add(f"label.csv line {k + 2}: {why}")
        codes = {}
        for c in available:
            path = self.root / f"c_{c}.csv"
            if not path.is_file():
                problems.add(f"c_{c}.csv is missing")
                continue
            header, rows = _read_csv(path)
            lacking = [h for h in CODE_REQUIRED if h not in header]
            if lacking:
                problems.add(f"c_{c}.csv lacks {_columns(lacking)}")
                continue
            try:
                for r in rows:
                    int(r["code"]), int(r["number"]), float(r["coverage"] or 0)
            except (TypeError, ValueError):
                problems.add(f"c_{c}.csv holds a non-numeric code, number or coverage")
                continue
            codes[c] = rows
        return LabelTable(labels, codes)

    def _validate_rows(self, rows: list[_Row], problems: _Problems) -> None:
        """Per row: paths stay inside images/ (lexically, and once symlinks are resolved: a
        one-line error of its own), files exist, images and masks are within the pixel limit,
        mask PNG headers say sh x sw 8-bit RGB(A), integer labels are in label.csv."""
        listing = _Listing(self.images_dir)
        confined = self._confined
        limit = self.files_policy.max_pixels
        for r in rows:
            if problems.full:
                return
            masks = [(c, e) for c in self.categories for e in r.cells.get(c, ())
                     if isinstance(e, str)]
            for what, rel in [("image", r.image)] + masks:
                bad = _path_problem(rel)
                if bad:
                    problems.add(f"index.csv line {r.line}: {what} is {bad}")
                    continue
                if not listing.exists(rel):
                    problems.add(f"index.csv line {r.line}: {what} file images/{rel} is missing")
                    continue
                kind = "image" if what == "image" else f"{what} mask"
                path = confined.check(self.images_dir / rel,
                                      f"Broden {kind} (index.csv line {r.line})")
                if what == "image":
                    if r.ih * r.iw > limit:
                        raise too_large(f"{path} (ih x iw in index.csv line {r.line})", r.iw,
                                        r.ih, self.files_policy, "Broden image")
                    continue
                try:
                    w, h, depth, ctype = png_size(path)
                except (OSError, ValueError):
                    problems.add(f"index.csv line {r.line}: mask images/{rel} is not a PNG file")
                    continue
                if w * h > limit:
                    raise too_large(path, w, h, self.files_policy, "Broden mask")
                if (h, w) != (r.sh, r.sw):
                    problems.add(f"index.csv line {r.line}: mask images/{rel} is {h}x{w}, "
                                 f"expected sh x sw = {r.sh}x{r.sw}")
                elif depth != 8 or ctype not in (2, 6):
                    problems.add(f"index.csv line {r.line}: mask images/{rel} is not an 8-bit "
                                 "RGB PNG")
            for c in self.categories:
                for e in r.cells.get(c, ()):
                    if isinstance(e, int) and e not in self.labels:
                        problems.add(f"index.csv line {r.line}: {c} label {e} is absent from "
                                     "label.csv")

    # -- layout ------------------------------------------------------------------------------

    def _layout(self, rows: list[_Row]) -> None:
        """Slots per category = the most entries it has in any row; a category with any mask
        path is a pixel category (integer entries there fill a whole layer), else an
        image-label category."""
        self.layer_categories: list[str] = []
        self.image_label_categories: list[str] = []
        self._slot0: dict[str, int] = {}
        for c in self.categories:
            depth = max((len(r.cells.get(c, ())) for r in rows), default=0)
            pixel = any(isinstance(e, str) for r in rows for e in r.cells.get(c, ()))
            target = self.layer_categories if pixel or depth == 0 else self.image_label_categories
            self._slot0[c] = len(target)
            target.extend([c] * depth)
        self.pixel_categories = [c for c in self.categories if c in self.layer_categories]

    def _check_sizes(self, rows: list[_Row], problems: _Problems) -> None:
        """One mask size (and one image size unless resizing) so items batch."""
        if not rows:
            problems.add("no image has labels in the chosen categories "
                         f"({', '.join(self.categories)})")
            return
        first = rows[0]
        for r in rows:
            if (r.sh, r.sw) != (first.sh, first.sw):
                problems.add(f"masks have mixed sizes ({first.sh}x{first.sw} at index.csv line "
                             f"{first.line}, {r.sh}x{r.sw} at line {r.line})")
                break
        if self.preprocessing.resize is None:
            for r in rows:
                if (r.ih, r.iw) != (first.ih, first.iw):
                    problems.add(f"images have mixed sizes ({first.ih}x{first.iw} at index.csv "
                                 f"line {first.line}, {r.ih}x{r.iw} at line {r.line}); "
                                 "pass `resize`")
                    break
        self.image_size = (first.ih, first.iw)
        self.mask_size = (first.sh, first.sw)

    def _sample_decode(self, rows: list[_Row], problems: _Problems) -> None:
        """Decode the masks of SAMPLE_DECODE_ROWS rows spread over the index and report label
        numbers absent from label.csv."""
        if not rows or problems.items:
            return
        picks = sorted(set(np.linspace(0, len(rows) - 1, min(SAMPLE_DECODE_ROWS, len(rows)))
                           .round().astype(int).tolist()))
        for k in picks:
            r = rows[k]
            for c in self.pixel_categories:
                for e in r.cells.get(c, ()):
                    if isinstance(e, str):
                        values = self._decode_mask(e, r, check=False)
                        bad = np.unique(values[~self._known[values]])
                        if bad.size:
                            problems.add(f"index.csv line {r.line}: mask images/{e} holds label "
                                         f"number{'s' if bad.size > 1 else ''} "
                                         f"{', '.join(map(str, bad[:5]))} absent from label.csv")

    def _select(self, rows: list[_Row]) -> list[_Row]:
        if self.split is not None:
            present = sorted({r.split for r in rows})
            rows = [r for r in rows if r.split == self.split]
            if not rows:
                raise CnnexplainError(f"no images with split {self.split!r} in "
                                      f"{self.root / 'index.csv'} (it has: {', '.join(present)})",
                                      f"pass `split` {' or '.join(present)} or all")
        if self.limit is not None:
            rows = rows[: int(self.limit)]
        return rows

    # -- decoding ----------------------------------------------------------------------------

    def _decode_mask(self, rel: str, row: _Row, check: bool = True) -> np.ndarray:
        """images/<rel> -> int32 [sh, sw] label numbers R + 256 G; one-line errors for an
        undecodable file, a wrong shape, or (``check``) numbers absent from label.csv."""
        path = self.images_dir / rel
        try:
            with open_image(path, self.files_policy, self._confined, "Broden mask") as im:
                rgb = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise CnnexplainError(f"cannot decode Broden mask {path}: {exc}", FIX_BRODEN) from None
        if rgb.ndim != 3 or rgb.shape[:2] != (row.sh, row.sw) or rgb.dtype != np.uint8:
            raise CnnexplainError(f"Broden mask {path} has shape {list(rgb.shape)}, expected "
                                  f"[{row.sh}, {row.sw}, 3] uint8 (index.csv line {row.line})",
                                  FIX_BRODEN)
        values = decode_rg(rgb)
        if check and not self._known[values].all():
            bad = np.unique(values[~self._known[values]])
            raise CnnexplainError(f"Broden mask {path} holds label numbers "
                                  f"{', '.join(map(str, bad[:5]))} absent from label.csv",
                                  FIX_BRODEN)
        return values

    def _decode_image(self, row: _Row) -> torch.Tensor:
        """images/<image> -> float32 [3, ih, iw] in [0, 1] (resized per preprocessing)."""
        path = self.images_dir / row.image
        try:
            with open_image(path, self.files_policy, self._confined, "Broden image") as im:
                arr = np.array(im.convert("RGB") if im.mode != "RGB" else im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise CnnexplainError(f"cannot decode Broden image {path}: {exc}", FIX_BRODEN) from None
        if self.preprocessing.resize is None and arr.shape[:2] != (row.ih, row.iw):
            raise CnnexplainError(f"Broden image {path} is {arr.shape[0]}x{arr.shape[1]}, "
                                  f"index.csv line {row.line} says {row.ih}x{row.iw}", FIX_BRODEN)
        return self.preprocessing.resize_image(image_tensor(arr))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.item(i, ITEM_FIELDS)

    def item(self, i: int, fields: Sequence[str]) -> dict:
        """Item ``i`` with only ``fields`` (of :data:`ITEM_FIELDS`): the image is decoded only
        when asked for, the masks only when ``masks`` is (a dissection's forward pass needs no
        mask, its tally pass no image)."""
        row = self.rows[int(i)]
        out = {}
        for name in (fields,) if isinstance(fields, str) else fields:
            if name not in ITEM_FIELDS:
                raise KeyError(f"a Broden item has no field {name!r} (it has "
                               f"{', '.join(ITEM_FIELDS)})")
            out[name] = self._field(name, i, row)
        return out

    def _field(self, name: str, i: int, row: _Row) -> torch.Tensor:
        if name == "image":
            return self._decode_image(row)
        if name == "label":
            return torch.tensor(-1, dtype=torch.int64)
        if name == "index":
            return torch.tensor(int(i), dtype=torch.int64)
        if name == "has_category":
            return torch.tensor([bool(row.cells.get(c)) for c in self.categories],
                                dtype=torch.bool)
        if name == "masks":
            sh, sw = self.mask_size
            masks = np.zeros((len(self.layer_categories), sh, sw), np.int32)
            for c in self.pixel_categories:
                start = self._slot0[c]
                for k, e in enumerate(row.cells.get(c, ())):
                    masks[start + k] = self._decode_mask(e, row) if isinstance(e, str) else e
            return torch.from_numpy(masks)
        image_labels = np.zeros(len(self.image_label_categories), np.int32)
        for c in self.categories:
            if c not in self.pixel_categories:
                start = self._slot0[c]
                for k, e in enumerate(row.cells.get(c, ())):
                    image_labels[start + k] = e
        return torch.from_numpy(image_labels)

    # -- metadata ----------------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        return self.labels.label_names

    def category_of(self, number: int) -> str:
        return self.labels.category_of(number)

    def files(self) -> list[Path]:
        """Every image and mask file the selected rows reference."""
        out = []
        for r in self.rows:
            out.append(self.images_dir / r.image)
            out += [self.images_dir / e for c in self.categories for e in r.cells.get(c, ())
                    if isinstance(e, str)]
        return out

    def fingerprint(self) -> str:
        """Content digest of the CSV files + size/mtime digest of every image and mask
        (``files_digest(mode="stat")``), and the selection (categories, split, limit)."""
        if self._fingerprint is None:
            csvs = sorted(p for p in self.root.glob("*.csv"))
            self._fingerprint = digest_parts(
                "broden", [(p.name, file_digest(p)) for p in csvs],
                files_digest(self.files(), root=self.images_dir, mode="stat"),
                self.categories, self.split, len(self.rows))
        return self._fingerprint

    def describe(self) -> dict:
        d = super().describe()
        d.update({"root": str(self.root), "categories": self.categories, "split": self.split,
                  "image_size": list(self.image_size), "mask_size": list(self.mask_size)})
        return d


# ---------------------------------------------------------------------------------------------
# Writer: the synthetic world as a Broden directory
# ---------------------------------------------------------------------------------------------


def broden_truth(sample: Sample, sh: int, sw: int) -> tuple[dict, dict]:
    """The Broden ground truth of a rendered sample, in canonical :data:`ONTOLOGY` numbers:
    ({pixel category: [int32 [sh, sw], ...] non-empty layers at half resolution, resampled by
    :func:`downsample_labels`}, {image category: [numbers]}). Empty layers (a circle has no
    layer-2 part; a part too small to survive resampling) are left out, as Broden leaves them
    out of index.csv."""
    pixel = {}
    for c in PIXEL_CATEGORIES:
        layers = downsample_labels(sample.pixel[c], sh, sw)
        pixel[c] = [layer for layer in layers if layer.any()]
    return pixel, {c: list(sample.image_labels[c]) for c in IMAGE_CATEGORIES}


@dataclass(frozen=True)
class BrodenExport:
    """What :func:`export_broden` wrote. ``number_map``: int32 [len(ONTOLOGY) + 1], canonical
    ontology number -> Broden number in label.csv (0 for concepts that never occur);
    ``label_names``: Broden number -> name."""

    root: Path
    num_images: int
    number_map: np.ndarray
    label_names: list

    def to_broden(self, canonical: np.ndarray) -> np.ndarray:
        """Map canonical label numbers (any shape) to the export's numbers."""
        return self.number_map[np.asarray(canonical)]


def _label_statistics(config: WorldConfig, sh: int, sw: int, progress: Callable | None):
    """Per (canonical number, category): images containing it (frequency) and summed pixel
    fraction over all layers (coverage; 1.0 per image for whole-image labels), counted on the
    half-resolution masks that are written (joinseg.py's count_label_statistics)."""
    freq: dict[tuple[int, str], int] = {}
    cov: dict[tuple[int, str], float] = {}
    n = config.num_images
    for i in range(n):
        pixel, image = broden_truth(render(config, i), sh, sw)
        for c, layers in pixel.items():
            if not layers:
                continue
            counts = np.bincount(np.concatenate([x.ravel() for x in layers]))
            for num in np.flatnonzero(counts[1:]) + 1:
                key = (int(num), c)
                freq[key] = freq.get(key, 0) + 1
                cov[key] = cov.get(key, 0.0) + counts[num] / float(sh * sw)
        for c, nums in image.items():
            for num in set(nums):
                freq[(num, c)] = freq.get((num, c), 0) + 1
                cov[(num, c)] = cov.get((num, c), 0.0) + 1.0
        if progress:
            progress(i + 1, 2 * n)
    return freq, cov


def _label_tables(freq: dict, cov: dict) -> tuple[np.ndarray, dict[str, bytes]]:
    """Number labels by descending (frequency, coverage) like joinseg.py's assign_labels (ties:
    canonical order) and build label.csv, category.csv and c_<cat>.csv."""
    name_freq: dict[int, int] = {}
    name_cov: dict[int, float] = {}
    for (num, _), f in freq.items():
        name_freq[num] = name_freq.get(num, 0) + f
        name_cov[num] = name_cov.get(num, 0.0) + cov[(num, _)]
    order = sorted(name_freq, key=lambda n: (-name_freq[n], -name_cov[n], n))
    number_map = np.zeros(len(ONTOLOGY) + 1, np.int32)
    for new, old in enumerate(order, start=1):
        number_map[old] = new
    cat_rank = {c: i for i, c in enumerate(CATEGORIES)}
    label_rows = []
    for old in order:
        cats = sorted(((c, f) for (n, c), f in freq.items() if n == old),
                      key=lambda cf: (-cf[1], cat_rank[cf[0]]))
        label_rows.append({"number": int(number_map[old]), "name": ONTOLOGY.name(old),
                           "category": ";".join(f"{c}({f})" for c, f in cats),
                           "frequency": sum(f for _, f in cats), "coverage": "%f" % name_cov[old],
                           "syns": ""})
    cats_used = {c for (_, c) in freq}
    first = {c: min(int(number_map[n]) for (n, k) in freq if k == c) for c in cats_used}
    cat_rows = []
    files: dict[str, bytes] = {}
    for c in sorted(cats_used, key=lambda c: first[c]):
        nums = [int(number_map[n]) for (n, k) in freq if k == c]
        cat_rows.append({"name": c, "first": min(nums), "last": max(nums), "count": len(nums),
                         "frequency": sum(f for (n, k), f in freq.items() if k == c)})
        dense = sorted((n for (n, k) in freq if k == c),
                       key=lambda n: (-freq[(n, c)], -cov[(n, c)], int(number_map[n])))
        files[f"c_{c}.csv"] = _csv_bytes(CODE_HEADER, [
            {"code": code, "number": int(number_map[n]), "name": ONTOLOGY.name(n),
             "frequency": freq[(n, c)], "coverage": _format_coverage(cov[(n, c)])}
            for code, n in enumerate(dense, start=1)])
    files["label.csv"] = _csv_bytes(LABEL_HEADER, label_rows)
    files["category.csv"] = _csv_bytes(CATEGORY_HEADER, cat_rows)
    return number_map, files


def export_broden(config: WorldConfig, out_dir: str | os.PathLike,
                  progress: Progress | None = None, overwrite: bool = False,
                  jpeg_quality: int = 95) -> BrodenExport:
    """Write world images 0 .. num_images - 1 as a Broden directory (module docstring):
    ``images/synthetic/<i>.jpg`` at ih = iw = resolution, masks at sh = sw = resolution // 2
    holding :func:`broden_truth` renumbered by descending frequency, ``_part_1.png`` /
    ``_part_2.png`` for the two part layers, scene and texture numbers in index.csv, split by
    md5 of the image path (70% train). Rows follow world index order. Two passes: label
    statistics, then files (``progress(done, 2 * num_images)``). Staged: a killed export
    leaves no ``out_dir``."""
    res, n = config.resolution, config.num_images
    sh = sw = res // 2
    freq, cov = _label_statistics(config, sh, sw, progress)
    number_map, tables = _label_tables(freq, cov)
    width = max(6, len(str(n - 1)))
    index_rows = []
    with staged_directory(out_dir, overwrite) as tmp:
        (tmp / "images" / SOURCE).mkdir(parents=True)
        for i in range(n):
            sample = render(config, i)
            stem = f"{SOURCE}/{i:0{width}d}"
            buf = _io.BytesIO()
            Image.fromarray(sample.image).save(buf, format="JPEG", quality=jpeg_quality,
                                               subsampling=0)
            write_bytes(tmp / "images" / f"{stem}.jpg", buf.getvalue())
            image_rel = f"{stem}.jpg"
            row = {"image": image_rel, "ih": res, "iw": res, "sh": sh, "sw": sw,
                   "split": "train" if hashed_float(image_rel) <= TRAIN_FRACTION else "val"}
            pixel, image = broden_truth(sample, sh, sw)
            for c, layers in pixel.items():
                names = []
                for k, layer in enumerate(layers):
                    rel = f"{stem}_{c}_{k + 1}.png" if c == "part" else f"{stem}_{c}.png"
                    write_bytes(tmp / "images" / rel, png_bytes(encode_rg(number_map[layer])))
                    names.append(rel)
                row[c] = ";".join(names)
            for c, nums in image.items():
                row[c] = ";".join(str(int(number_map[x])) for x in nums)
            index_rows.append(row)
            if progress:
                progress(n + i + 1, 2 * n)
        for name, data in tables.items():
            write_bytes(tmp / name, data)
        write_bytes(tmp / "index.csv", _csv_bytes(INDEX_HEADER, index_rows))
        names = ["-"] * (int(number_map.max()) + 1)
        for old in np.flatnonzero(number_map):
            names[number_map[old]] = ONTOLOGY.name(int(old))
        write_manifest(tmp, "broden", config,
                       number_map={ONTOLOGY.name(int(o)): int(number_map[o])
                                   for o in np.flatnonzero(number_map)})
    return BrodenExport(root=Path(out_dir), num_images=n, number_map=number_map, label_names=names)


def image_side(root: str | os.PathLike) -> int | None:
    """The smaller side of the first image listed in ``root/index.csv`` (its ``ih`` / ``iw``
    columns; None when the index is absent or unreadable: opening the dataset reports why)."""
    path = Path(root).expanduser() / "index.csv"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        return min(int(row["ih"]), int(row["iw"]))
    except (OSError, StopIteration, KeyError, ValueError, TypeError, csv.Error):
        return None
