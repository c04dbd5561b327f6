"""Streaming writes of cache entries: rows appended in whole chunks to ``<key>.partial.h5``,
resumable after a kill (:class:`StreamWriter`)."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Callable, Mapping

import h5py
import numpy as np

from cnnexplain.cache.attrs import _first_line, _fsync_dir, _now, _read_attrs, _remove, _set_attrs
from cnnexplain.cache.entries import Entry
from cnnexplain.cache.layout import (FORMAT_VERSIONS, PARTIAL_SUFFIX, _block_rows, _storage,
                                     _stored_dtype, _to_stored)
from cnnexplain.errors import CnnexplainError

if TYPE_CHECKING:
    from cnnexplain.cache.store import Cache


# --------------------------------------------------------------------------------------------
# Streaming writes
# --------------------------------------------------------------------------------------------

class StreamWriter:
    """Rows appended to ``<key>.partial.h5`` in whole chunks; resumable after a kill.

    Create it with :meth:`Cache.writer`, which takes the key's lock until :meth:`commit`,
    :meth:`abort` or :meth:`close`. ``rows_done`` is where to resume: rows ``[0, rows_done)``
    are on disk. :meth:`append` buffers rows until a whole chunk is ready, writes it, flushes,
    then records ``rows_done`` in the file, so a kill at any moment leaves a partial file whose
    ``rows_done`` rows are intact (or an unreadable one, which the next writer discards).
    Leaving the ``with`` block without :meth:`commit` keeps the partial file for a later resume.
    """

    def __init__(self, cache: "Cache", kind: str, key: str,
                 columns: dict[str, tuple[tuple[int, ...], str]], total_rows: int, attrs: dict,
                 dataset_attrs: dict[str, dict], float16: bool, parts, release: Callable[[], None]):
        self.cache = cache
        self.kind = kind
        self.key = key
        self.path = cache.path(kind, key)
        self.partial = self.path.with_name(key + PARTIAL_SUFFIX)
        self.total_rows = int(total_rows)
        self.columns = {name: (tuple(int(d) for d in shape), _stored_dtype(dtype, float16))
                        for name, (shape, dtype) in columns.items()}
        self.rows_done = 0
        self.block_rows = 1
        self._attrs = attrs
        self._dataset_attrs = dataset_attrs
        self._parts = parts
        self._release = release
        self._file: h5py.File | None = None
        self._buffer: dict[str, list[np.ndarray]] = {name: [] for name in self.columns}
        self._buffered = 0

    # -- opening ------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.partial.exists():
            why = self._resume() if self.cache.enabled else "left in a scratch directory"
            if why is not None:
                if self.cache.enabled:
                    self.cache.notice(f"discarding partial cache entry {self.partial} ({why}); "
                                      "starting it over")
                _remove(self.partial)
        if self._file is None:
            self._create()

    def _resume(self) -> str | None:
        """Reopen a partial file left by an earlier run; None on success, else why not."""
        try:
            f = h5py.File(self.partial, "r+", locking=False)
        except Exception as exc:  # any failure to open means the file is unusable
            return f"unreadable: {_first_line(exc)}"
        try:
            why, rows_done, block = self._check_partial(f)
        except Exception as exc:  # broken metadata of any sort: unusable
            why, rows_done, block = f"bad metadata: {_first_line(exc)}", 0, 1
        if why is not None:
            with contextlib.suppress(Exception):
                f.close()
            return why
        self._file, self.rows_done, self.block_rows = f, rows_done, block
        return None

    def _check_partial(self, f: h5py.File) -> tuple[str | None, int, int]:
        a = _read_attrs(f)
        if (a.get("cnnexplain_kind"), a.get("key")) != (self.kind, self.key):
            return "written for another entry", 0, 1
        if a.get("format_version") != FORMAT_VERSIONS[self.kind]:
            return f"format version {a.get('format_version')}", 0, 1
        if a.get("complete") != 0 or a.get("total_rows") != self.total_rows:
            return "written for another number of rows", 0, 1
        if sorted(a.get("datasets", [])) != sorted(self.columns):
            return "other datasets", 0, 1
        blocks = set()
        for name, (shape, dtype) in self.columns.items():
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset) or ds.shape != (self.total_rows, *shape) \
                    or ds.dtype != dtype:
                return f"dataset {name} differs", 0, 1
            blocks.add(ds.chunks[0] if ds.chunks else 1)
        if len(blocks) != 1:
            return "inconsistent chunking", 0, 1
        block = blocks.pop()
        rows_done = a.get("rows_done")
        if not isinstance(rows_done, int) or not 0 <= rows_done <= self.total_rows or (
                rows_done % block and rows_done != self.total_rows):
            return f"bad rows_done {rows_done!r}", 0, 1
        if rows_done:  # the chunk written last must read back with a valid checksum
            lo = ((rows_done - 1) // block) * block
            for name in self.columns:
                f[name][lo:rows_done]
        return None, rows_done, block

    def _create(self) -> None:
        self.block_rows = _block_rows(list(self.columns.values()))
        try:
            f = h5py.File(self.partial, "w", locking=False)
        except OSError as exc:
            raise self.cache._oserror(exc, self.partial) from None
        try:
            header = self.cache._header(self.kind, self.key, self._parts, self._attrs,
                                        list(self.columns))
            header.update(complete=0, rows_done=0, total_rows=self.total_rows)
            _set_attrs(f, header)
            for name, (shape, dtype) in self.columns.items():
                full = (self.total_rows, *shape)
                ds = f.create_dataset(name, shape=full, dtype=dtype,
                                      **_storage(full, dtype, self.block_rows))
                _set_attrs(ds, {**self._dataset_attrs.get(name, {}), "rows": self.total_rows})
            f.flush()
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(Exception):
                f.close()
            raise self.cache._oserror(exc, self.partial) from None
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise
        self._file = f
        self.rows_done = 0

    # -- writing ------------------------------------------------------------------------------
    @property
    def rows_appended(self) -> int:
        """Rows handed to :meth:`append` so far, including any still buffered."""
        return self.rows_done + self._buffered

    def append(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append ``rows[name]`` of shape ``[b, *column_shape]`` for every column (same b)."""
        if self._file is None:
            raise RuntimeError(f"writer for {self.partial} is closed")
        if set(rows) != set(self.columns):
            raise ValueError(f"append() needs exactly the columns {sorted(self.columns)}, "
                             f"got {sorted(rows)}")
        converted, b = {}, None
        for name, (shape, dtype) in self.columns.items():
            arr = np.array(rows[name])  # a copy: the caller may reuse its buffers
            if arr.shape[1:] != shape or (b is not None and arr.shape[0] != b):
                raise ValueError(f"column {name}: got rows of shape {arr.shape}, expected "
                                 f"[{b if b is not None else 'b'}, {', '.join(map(str, shape))}]")
            b = arr.shape[0]
            converted[name] = arr
        if self.rows_appended + b > self.total_rows:
            raise ValueError(f"append() of {b} rows exceeds total_rows={self.total_rows}")
        try:
            for name, arr in converted.items():
                converted[name] = _to_stored(name, arr, self.columns[name][1])
        except CnnexplainError:
            self.abort()  # this entry can never be completed
            raise
        for name, arr in converted.items():
            self._buffer[name].append(arr)
        self._buffered += b
        n = (self._buffered // self.block_rows) * self.block_rows
        if self.rows_appended == self.total_rows:
            n = self._buffered
        if n:
            self._write(n)

    def _write(self, n: int) -> None:
        data = {name: np.concatenate(parts) if len(parts) > 1 else parts[0]
                for name, parts in self._buffer.items()}
        r0, r1 = self.rows_done, self.rows_done + n
        f = self._file
        try:
            for name, arr in data.items():
                f[name][r0:r1] = arr[:n]
            f.flush()  # data first ...
            f.attrs.modify("rows_done", r1)
            f.flush()  # ... then the marker that says it is there
        except (OSError, RuntimeError) as exc:
            raise self.cache._oserror(exc, self.partial) from None
        self.rows_done = r1
        self._buffered -= n
        self._buffer = {name: ([arr[n:]] if self._buffered else []) for name, arr in data.items()}

    # -- finishing ----------------------------------------------------------------------------
    def commit(self) -> Entry:
        """Mark the entry complete and move it atomically to its final path; the Entry."""
        if self._file is None:
            raise RuntimeError(f"writer for {self.partial} is closed")
        if self.rows_done != self.total_rows:
            raise ValueError(f"commit() after {self.rows_appended} of {self.total_rows} rows")
        try:
            try:
                self._file.attrs.modify("complete", 1)
                self._file.attrs["created"] = _now()
            finally:
                f, self._file = self._file, None
                f.close()
            with open(self.partial, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.partial, self.path)
            _fsync_dir(self.path.parent)
        except (OSError, RuntimeError) as exc:
            self.close()
            raise self.cache._oserror(exc, self.path) from None
        try:
            return self.cache._read_back(self.kind, self.key, self.path)
        finally:
            self.close()

    def abort(self) -> None:
        """Drop the partial file and release the lock."""
        self._close_file()
        with contextlib.suppress(OSError):
            self.partial.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Release the lock, keeping any partial file (rows ``[0, rows_done)``) for a resume.
        Buffered rows not yet written are dropped. Safe to call twice."""
        self._close_file()
        self._buffer = {name: [] for name in self.columns}
        self._buffered = 0
        release, self._release = self._release, None
        if release is not None:
            release()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
