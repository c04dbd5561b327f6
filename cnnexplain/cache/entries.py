"""Cache entries as read back: :class:`Entry` (a complete, validated entry), its datasets'
metadata (:class:`DatasetInfo`) and lazy reads of one dataset (:class:`LazyDataset`)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import h5py
import numpy as np

from cnnexplain.cache.attrs import _first_line
from cnnexplain.errors import CnnexplainError

if TYPE_CHECKING:
    from cnnexplain.cache.store import Cache


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """What an entry holds under one name (read from the file's metadata, no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict
    chunks: tuple[int, ...] | None


class Entry:
    """A complete, validated cache entry.

    ``entry[name]`` reads a whole dataset (in its stored dtype); ``entry.dataset(name)`` gives
    lazy access (shape, dtype, attrs, slicing, streaming); ``with entry.open() as f`` gives the
    raw read-only ``h5py.File``. A read that fails its checksum removes the entry and raises a
    one-line :class:`CnnexplainError` ("re-run to rebuild it").
    """

    def __init__(self, cache: "Cache", kind: str, key: str, path: Path, attrs: dict,
                 datasets: dict[str, DatasetInfo], inode: tuple[int, int]):
        self._cache = cache  # keeps a disabled cache's scratch directory alive
        self.kind = kind
        self.key = key
        self.path = path
        self.attrs = attrs
        self.infos = datasets
        self._inode = inode

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def parts(self) -> dict | None:
        """The key parts that produced this entry (None if the writer did not record them)."""
        return json.loads(self.attrs.get("parts_json", "null"))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> np.ndarray:
        return self.dataset(name)[()]

    def __repr__(self) -> str:
        return f"Entry({self.kind}/{self.key}, {self.names})"

    def dataset(self, name: str) -> "LazyDataset":
        if name not in self.infos:
            raise KeyError(f"cache entry {self.path} has no dataset {name!r} "
                           f"(it has {', '.join(self.names)})")
        return LazyDataset(self, self.infos[name])

    @contextlib.contextmanager
    def open(self) -> Iterator[h5py.File]:
        """The entry's file, open read-only for the duration of the block."""
        try:
            f = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise self._failed(exc) from None
        try:
            yield f
        finally:
            f.close()

    def _read(self, ds: h5py.Dataset, selection) -> np.ndarray:
        try:
            if h5py.check_string_dtype(ds.dtype) is not None:
                return np.asarray(ds.asstr()[selection], dtype=str)
            return ds[selection]
        except OSError as exc:  # a checksum, decompression or short read failure
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> CnnexplainError:
        if not self.path.exists():
            return CnnexplainError(f"cache entry {self.path} was removed while in use "
                                   "(by `cnnexplain cache clear`?)", "re-run the command")
        why = _first_line(exc)
        self._cache._discard(self.kind, self.key, self.path, self._inode, why)
        return CnnexplainError(f"cache entry {self.path} is corrupt ({why}); it was removed",
                               "re-run the command to rebuild it")


class LazyDataset:
    """One dataset of an :class:`Entry`, read on demand (each read opens the file briefly)."""

    def __init__(self, entry: Entry, info: DatasetInfo):
        self.entry = entry
        self.name = info.name
        self.shape = info.shape
        self.dtype = info.dtype
        self.attrs = info.attrs
        self.chunks = info.chunks

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection) -> np.ndarray:
        """h5py slicing: ``ds[()]``, ``ds[a:b]``, ``ds[a:b, k]``, ..."""
        with self.entry.open() as f:
            return self.entry._read(f[self.name], selection)

    def blocks(self, block_rows: int, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` for consecutive blocks of at most ``block_rows`` rows of
        ``[start, stop)``; memory holds one block."""
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        stop = len(self) if stop is None else stop
        with self.entry.open() as f:
            ds = f[self.name]
            for s in range(start, stop, block_rows):
                yield s, self.entry._read(ds, slice(s, min(stop, s + block_rows)))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at integer positions ``rows`` (any order, repeats allowed; negative counts from
        the end), read chunk by chunk."""
        n = len(self)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {self.name} with {n} rows")
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(uniq), *self.shape[1:]), dtype=self.dtype)
        step = self.chunks[0] if self.chunks else max(1, len(uniq))
        with self.entry.open() as f:
            ds = f[self.name]
            i = 0
            while i < len(uniq):
                lo = (uniq[i] // step) * step
                hi = min(n, lo + step)
                j = int(np.searchsorted(uniq, hi))
                out[i:j] = self.entry._read(ds, slice(lo, hi))[uniq[i:j] - lo]
                i = j
        return out[inverse]
