"""The HDF5 cache: every computed array (activations, gate matrices, saliency maps, dissection
tallies, CAVs) is stored once, keyed by what produced it, and reused.

Key scheme
----------
An entry's key is a content digest of everything that produced its arrays::

    key = sha256(canonical JSON of {"kind": kind,
                                    "format_version": FORMAT_VERSIONS[kind],
                                    "parts": parts}).hexdigest()[:20]

where the canonical JSON has sorted keys and no whitespace (:func:`cnnexplain.fingerprint.
digest_json`) and ``parts`` are the inputs named by the caller, each a content fingerprint,
never a path alone. For layer activations (:mod:`cnnexplain.activations`) the parts are::

    model          digest of the weights (state_dict names, dtypes, shapes, values)
    layers         the captured layers, sorted
    dataset        the dataset's content fingerprint (``dataset.fingerprint()``)
    preprocessing  digest of resize, mean and std
    pool           "mean" / "sum" / "max" over space, or null for full maps
    dtype          the stored dtype, "float32" or "float16"

Change any part -- retrain one weight, edit one image, change the normalization, bump a code
format version -- and the key changes, so the old entry is never reused. The batch size and the
device are not parts: they do not change the result beyond float rounding.

Layout
------
::

    <root>/<kind>/<key[:2]>/<key>.h5           a complete entry
    <root>/<kind>/<key[:2]>/<key>.partial.h5   a streaming write in progress, or a resumable one
                                               left by a killed run
    <root>/<kind>/<key[:2]>/<key>.h5.lock      an empty file that writers flock
    <root>/<kind>/<key[:2]>/.cnnexplain-tmp-*  the temporary file of an atomic save

``root`` is ``--cache-dir``, else ``$CNNEXPLAIN_CACHE``, else ``$XDG_CACHE_HOME/cnnexplain``,
else ``~/.cache/cnnexplain``.

The files
---------
Plain HDF5, readable with ``h5py.File(path)``. Root attributes: ``cnnexplain_kind``,
``format_version``, ``key``, ``parts_json`` (the JSON of the key parts, so a reader can see what
produced the entry), ``created`` (UTC, ISO 8601), ``complete`` (1 only once fully written),
``datasets`` (the dataset names), plus the writer's own attributes (values that are not a
string or number are stored as JSON strings; the attribute ``json_attrs`` lists them). Every
dataset carries ``rows`` (its first dimension) and the writer's ``description``, ``shape``
(meaning, e.g. ``"N x K x h x w"``) and ``units``. Datasets are chunked along their first
dimension (about ``CHUNK_BYTES`` per chunk), gzip-compressed with the shuffle filter, and
fletcher32-checksummed, so a flipped byte is detected when it is read. ``float16=True`` stores
floating arrays as float16 (half the disk); the stored dtype is part of the key, and
:class:`Entry` returns what was stored.

Safety
------
- Complete entries appear only by ``os.replace`` of a fully written, fsynced file: a reader never
  sees a half-written entry, and a kill -9 during a write leaves at most a temporary or
  ``.partial.h5`` file, which no lookup reads as an entry.
- Writers of one key hold ``fcntl.flock`` on ``<key>.h5.lock`` (re-entrant within a process), so
  two processes asking for the same entry compute it once: the second waits, then reads it.
  Reads take no lock, so a hit also works from a read-only cache directory.
- :meth:`Cache.load` validates an entry before returning it (HDF5 signature, opens, kind, key,
  format version, ``complete == 1``, every dataset present with its row count). A corrupt,
  truncated or non-HDF5 file is reported as one notice, removed (under the lock), and treated
  as a miss, so it is rebuilt. A checksum failure while reading data becomes a one-line
  :class:`~cnnexplain.errors.CnnexplainError` and the entry is removed.
- A streaming write (:meth:`Cache.writer`) appends whole chunks and records ``rows_done`` after
  each flush; a valid partial file from a killed run is resumed from there, an unreadable one is
  discarded with a notice.
- An unwritable cache directory is detected at the first write (not at construction, so a
  read-only cache still serves hits) and reported as one line naming the directory and the fix
  (``--cache-dir`` or ``CNNEXPLAIN_CACHE``). A file at the cache root is reported at construction.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping

import h5py
import numpy as np

from cnnexplain.errors import CnnexplainError, close_matches
from cnnexplain.fingerprint import digest_json
from cnnexplain.io import atomic_path, cleanup_stale_tmp, to_jsonable

FORMAT_VERSIONS: dict[str, int] = {
    "activations": 1,  # layer activations over a dataset (cnnexplain.activations)
    "gate": 1,         # gate matrices W [K, C] / P [C, K]
    "saliency": 1,     # saliency maps of one method over a dataset
    "dissection": 1,   # Network Dissection thresholds and tallies
    "cav": 1,          # concept activation vectors
    "tcav": 1,         # TCAV scores
    "features": 1,     # other per-image feature arrays
}
"""Code-format version per kind of entry; part of every key. Bump a kind's version whenever the
code that computes or lays out its arrays changes meaning, and every old entry of that kind
stops being reused."""

ENV_VAR = "CNNEXPLAIN_CACHE"
CHUNK_BYTES = 1 << 20
"""Target size of one HDF5 chunk (uncompressed) of the widest dataset of an entry."""
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PARTIAL_SUFFIX = ".partial.h5"
LOCK_SUFFIX = ".lock"
WAIT_NOTICE_S = 2.0
"""After waiting this long for another process's lock, say so (once)."""

_KIND_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_KEY_RE = re.compile(r"[0-9a-f]{8,64}")
_SYSTEM_ATTRS = ("cnnexplain_kind", "format_version", "key", "created", "complete", "parts_json",
                 "datasets", "rows_done", "total_rows", "json_attrs")
_FIX = "pass --cache-dir with a writable directory, set CNNEXPLAIN_CACHE, or use --no-cache"


# --------------------------------------------------------------------------------------------
# Inter-process locks, re-entrant within a process
# --------------------------------------------------------------------------------------------

@dataclass
class _Held:
    """One lock file as seen by this process: a thread lock, the flock'ed fd and the depth."""

    rlock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _held(lock_path: Path) -> _Held:
    with _HELD_GUARD:
        return _HELD.setdefault(os.path.realpath(lock_path), _Held())


def _forget_locks_after_fork() -> None:
    """A forked child (a DataLoader worker) holds none of its parent's locks: drop the table and
    close the inherited lock fds (never unlock them: that would unlock the parent), so a child
    that outlives a killed parent does not keep the lock."""
    global _HELD_GUARD
    for held in _HELD.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _HELD.clear()
    _HELD_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


def _acquire(lock_path: Path, timeout: float | None, on_wait: Callable[[], None] | None = None
             ) -> bool:
    """Take the lock (``timeout`` None: wait forever; 0: try once). False when it timed out.

    flock locks belong to an open file description, so a second ``open`` + ``flock`` of the same
    file in this process would deadlock; the table of held locks makes it re-entrant instead
    (and serializes the threads of this process). OSError (unwritable directory) propagates.
    """
    held = _held(lock_path)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    if timeout is not None and timeout <= 0:
        got = held.rlock.acquire(blocking=False)
    else:
        got = held.rlock.acquire(timeout=-1 if timeout is None else timeout)
    if not got:
        return False
    try:
        if held.depth == 0:
            fd = _flock(lock_path, deadline, on_wait)
            if fd is None:
                held.rlock.release()
                return False
            held.fd = fd
        held.depth += 1
        return True
    except BaseException:
        held.rlock.release()
        raise


def _release(lock_path: Path) -> None:
    held = _held(lock_path)
    held.depth -= 1
    try:
        if held.depth == 0:
            fd, held.fd = held.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
    finally:
        held.rlock.release()


def _flock(lock_path: Path, deadline: float | None, on_wait) -> int | None:
    """flock ``lock_path`` exclusively; the fd, or None at the deadline.

    After getting the lock, check that the path still names the locked file: ``clear()`` may
    have removed it while we waited, and a lock on a removed file protects nothing.
    """
    start = time.monotonic()
    delay = 0.01
    announced = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        os.close(fd)
                        return None
                    if on_wait is not None and not announced and now - start >= WAIT_NOTICE_S:
                        announced = True
                        on_wait()
                    pause = delay if deadline is None else min(delay, max(deadline - now, 0.001))
                    time.sleep(pause)
                    delay = min(delay * 1.5, 0.5)
            mine = os.fstat(fd)
            try:
                now_there = os.stat(lock_path)
                same = (now_there.st_dev, now_there.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Attributes: plain HDF5 where possible, JSON strings otherwise
# --------------------------------------------------------------------------------------------

def _set_attrs(obj, attrs: Mapping) -> None:
    """Write ``attrs`` on an HDF5 object: strings, numbers and booleans natively, anything else
    (lists, dicts, None) as a JSON string whose name is listed in the ``json_attrs`` attribute."""
    json_names = []
    for name, value in attrs.items():
        value = to_jsonable(value)
        native = isinstance(value, (str, float, bool)) or (
            isinstance(value, int) and -(2 ** 63) <= value < 2 ** 63)
        if native:
            obj.attrs[name] = value
        else:
            obj.attrs[name] = json.dumps(value)
            json_names.append(name)
    if json_names:
        obj.attrs["json_attrs"] = json.dumps(sorted(json_names))


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_attrs(obj) -> dict:
    """The attributes written by :func:`_set_attrs`, JSON ones decoded."""
    json_names = set(json.loads(_plain(obj.attrs.get("json_attrs", "[]"))))
    out = {}
    for name in obj.attrs:
        if name == "json_attrs":
            continue
        value = _plain(obj.attrs[name])
        out[name] = json.loads(value) if name in json_names else value
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stored_dtype(dtype, float16: bool) -> np.dtype:
    dtype = np.dtype(dtype)
    if float16 and dtype.kind == "f":
        return np.dtype(np.float16)
    return dtype


def _to_stored(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast ``array`` to the stored dtype; a value beyond the float16 range is an error, not inf."""
    if array.dtype == dtype:
        return array
    with np.errstate(over="ignore"):
        out = array.astype(dtype)
    if dtype == np.float16:
        overflow = np.isinf(out) & np.isfinite(array)
        if overflow.any():
            largest = float(np.abs(array[np.isfinite(array)]).max())
            raise CnnexplainError(f"values of {name} exceed the float16 range (largest |value| "
                                  f"{largest:.4g} > 65504); the cache entry was not written",
                                  "store float32: leave out the float16 option (--float16)")
    return out


def _block_rows(row_shapes: list[tuple[tuple[int, ...], np.dtype]]) -> int:
    """Rows per chunk: a power of two so the widest dataset's chunk is about CHUNK_BYTES."""
    row_bytes = max((int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in row_shapes),
                    default=1)
    rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return 1 << (int(rows).bit_length() - 1)


def _storage(shape: tuple[int, ...], dtype: np.dtype, block_rows: int) -> dict:
    """create_dataset options: chunked along rows, gzip + shuffle + fletcher32 checksums."""
    if len(shape) == 0 or 0 in shape or h5py.check_string_dtype(dtype) is not None:
        return {}
    return dict(chunks=(min(block_rows, shape[0]), *shape[1:]), compression="gzip",
                compression_opts=1, shuffle=True, fletcher32=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

class Cache:
    """The shared HDF5 store (see the module docstring for keys, layout and guarantees).

    ``root``: the directory (None: :meth:`default_root`). ``enabled=False`` (``--no-cache``):
    every lookup misses and nothing is written under ``root``; entries that must exist to be
    read back (:meth:`get_or_compute`, :meth:`writer`) go to a private temporary directory that
    is deleted when the Cache and every Entry from it are garbage-collected (or at exit).
    ``warn``: called with each one-line notice (corrupt entry removed, partial discarded,
    waiting for another process); notices are also kept in ``self.notices``.
    ``lock_timeout``: how long :meth:`get_or_compute` and :meth:`writer` wait for another
    process computing the same entry (None: forever).
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True,
                 warn: Callable[[str], None] | None = None,
                 lock_timeout: float | None = 6 * 3600.0):
        self.enabled = bool(enabled)
        root = Path(root).expanduser() if root is not None else self.default_root()
        self.root = root.absolute()
        self.notices: list[str] = []
        self.lock_timeout = lock_timeout
        self._warn = warn
        self._parts: dict[str, dict] = {}
        self._scratch: Path | None = None
        if self.enabled and self.root.exists() and not self.root.is_dir():
            raise CnnexplainError(f"the cache directory {self.root} is a file, not a directory",
                                  "pass --cache-dir with a directory, set CNNEXPLAIN_CACHE, or "
                                  "move the file away")

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, enabled={self.enabled})"

    @staticmethod
    def default_root() -> Path:
        """``$CNNEXPLAIN_CACHE``, else ``$XDG_CACHE_HOME/cnnexplain``, else
        ``~/.cache/cnnexplain``."""
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            return Path(env).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cnnexplain"

    def notice(self, message: str) -> None:
        self.notices.append(message)
        if self._warn is not None:
            self._warn(message)

    # -- keys and paths -----------------------------------------------------------------------
    def key(self, kind: str, /, **parts) -> str:
        """The digest of ``kind``, ``FORMAT_VERSIONS[kind]`` and ``parts`` (JSON-able values;
        order of the parts does not matter)."""
        self._check_kind(kind)
        try:
            plain = to_jsonable(parts)
        except TypeError as exc:
            raise TypeError(f"cache key parts must be JSON-able: {exc}") from None
        key = digest_json({"kind": kind, "format_version": FORMAT_VERSIONS[kind], "parts": plain})
        self._parts[key] = plain
        return key

    def path(self, kind: str, key: str) -> Path:
        """``<root>/<kind>/<key[:2]>/<key>.h5`` (for a disabled cache: under its scratch dir)."""
        self._check_kind(kind)
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self._store() / kind / key[:2] / f"{key}.h5"

    def _lock_path(self, kind: str, key: str) -> Path:
        path = self.path(kind, key)
        return path.with_name(path.name + LOCK_SUFFIX)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in FORMAT_VERSIONS or not _KIND_RE.fullmatch(kind):
            hint = close_matches(str(kind), FORMAT_VERSIONS)
            raise ValueError(f"unknown cache kind {kind!r}{hint}"
                             f"; known: {', '.join(FORMAT_VERSIONS)}")

    def _store(self) -> Path:
        if self.enabled:
            return self.root
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="cnnexplain-scratch-"))
            weakref.finalize(self, shutil.rmtree, str(self._scratch), True)
        return self._scratch

    # -- errors -------------------------------------------------------------------------------
    def _oserror(self, exc: OSError, path: Path) -> CnnexplainError:
        """An OSError while writing ``path`` as one line naming the cache directory (HDF5
        reports failed writes as RuntimeError with ``errno = N`` in its text)."""
        store = self._store()
        if not isinstance(exc, OSError):
            m = re.search(r"errno = (\d+)", str(exc))
            if m is None:
                raise exc
            exc = OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return CnnexplainError(f"no space left (or file size limit) for the cache at {store} "
                                   f"(writing {path})", "free some disk space, pass --cache-dir "
                                   "on another disk, or use --no-cache")
        if isinstance(exc, (NotADirectoryError, FileExistsError)) or exc.errno in (
                errno.ENOTDIR, errno.EEXIST):
            return CnnexplainError(f"the cache directory {store} cannot be created: a file is in "
                                   f"the way ({path})", _FIX)
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM,
                                                             errno.EROFS):
            return CnnexplainError(f"the cache directory {store} is not writable ({path}: "
                                   f"{exc.strerror or _first_line(exc)})", _FIX)
        return CnnexplainError(f"cannot write the cache entry {path} ({_first_line(exc)})", _FIX)

    def _ensure_dir(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._oserror(exc, directory) from None

    # -- locking ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, key: str, timeout: float | None = 600) -> Iterator[None]:
        """Hold the inter-process lock of one entry (``fcntl.flock`` on ``<path>.lock``).

        Re-entrant within a process. ``timeout`` seconds (None: forever), then a one-line
        :class:`CnnexplainError`. Needs a writable cache directory (one-line error otherwise).
        """
        lock_path = self._lock_path(kind, key)
        self._acquire_or_fail(lock_path, timeout)
        try:
            yield
        finally:
            _release(lock_path)

    def _acquire_or_fail(self, lock_path: Path, timeout: float | None) -> None:
        self._ensure_dir(lock_path.parent)
        entry = lock_path.with_name(lock_path.name[: -len(LOCK_SUFFIX)])

        def on_wait():
            self.notice(f"waiting for another cnnexplain process to finish the cache entry "
                        f"{entry}")

        try:
            got = _acquire(lock_path, timeout, on_wait)
        except OSError as exc:
            raise self._oserror(exc, lock_path) from None
        if not got:
            raise CnnexplainError(f"timed out after {timeout:g} s waiting for the lock on cache "
                                  f"entry {entry} (another cnnexplain process is computing it)",
                                  "wait for that process to finish or stop it, or pass another "
                                  "--cache-dir / --no-cache")

    def _try_lock(self, kind: str, key: str) -> Path | None:
        """Take the lock without waiting; its path (release with ``_release``) or None."""
        lock_path = self._lock_path(kind, key)
        try:
            return lock_path if _acquire(lock_path, 0) else None
        except OSError:
            return None

    # -- reading ------------------------------------------------------------------------------
    def load(self, kind: str, key: str) -> Entry | None:
        """The complete, valid entry, or None (a miss; always None for a disabled cache).

        A corrupt, truncated or non-HDF5 file at the entry's path is reported with one notice
        ("cache entry <path> was corrupt (<why>); removed it and rebuilding"), removed under the
        lock, and treated as a miss. Takes no lock on a hit, so read-only caches work.
        """
        if not self.enabled:
            return None
        return self._open_entry(kind, key, self.path(kind, key))

    def _open_entry(self, kind: str, key: str, path: Path) -> Entry | None:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise CnnexplainError(f"cannot read the cache entry {path} ({_first_line(exc)})",
                                  _FIX) from None
        inode = (st.st_dev, st.st_ino)
        why, meta = self._inspect(path, kind, key)
        if why is not None:
            self._discard(kind, key, path, inode, why)
            return None
        attrs, datasets = meta
        return Entry(self, kind, key, path, attrs, datasets, inode)

    def _read_back(self, kind: str, key: str, path: Path) -> Entry:
        """The entry just written at ``path`` (validated like any other)."""
        entry = self._open_entry(kind, key, path)
        if entry is None:
            raise CnnexplainError(f"cache entry {path} could not be read back after writing",
                                  "check the disk, or use --no-cache")
        return entry

    def _inspect(self, path: Path, kind: str, key: str):
        """``(None, (attrs, datasets))`` for a valid entry file, else ``(why, None)``."""
        if path.is_dir():
            return "a directory is in its place", None
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(HDF5_SIGNATURE))
        except OSError as exc:
            raise CnnexplainError(f"cannot read the cache entry {path} ({_first_line(exc)})",
                                  _FIX) from None
        if head != HDF5_SIGNATURE:
            return ("not an HDF5 file" + (" (empty)" if not head else "")), None
        try:
            with h5py.File(path, "r", locking=False) as f:
                return self._validate(f, kind, key)
        except Exception as exc:  # any failure to read a file's metadata means it is unusable
            return f"unreadable HDF5, probably truncated: {_first_line(exc)}", None

    @staticmethod
    def _validate(f: h5py.File, kind: str, key: str):
        a = _read_attrs(f)
        if a.get("cnnexplain_kind") != kind:
            return f"written as kind {a.get('cnnexplain_kind')!r}", None
        if a.get("format_version") != FORMAT_VERSIONS[kind]:
            return (f"format version {a.get('format_version')!r}, this code writes "
                    f"{FORMAT_VERSIONS[kind]}"), None
        if a.get("key") != key:
            return f"its key attribute is {a.get('key')!r}", None
        if a.get("complete") != 1:
            return "incomplete write", None
        if "total_rows" in a and a.get("rows_done") != a["total_rows"]:
            return f"{a.get('rows_done')} of {a['total_rows']} rows written", None
        datasets = {}
        for name in a.get("datasets", None) or []:
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset):
                return f"dataset {name!r} is missing", None
            d_attrs = _read_attrs(ds)
            if ds.ndim and d_attrs.get("rows") != ds.shape[0]:
                return f"dataset {name!r} has {ds.shape[0]} rows, its attrs say " \
                       f"{d_attrs.get('rows')}", None
            datasets[name] = DatasetInfo(name, tuple(ds.shape), ds.dtype, d_attrs, ds.chunks)
        if not datasets:
            return "it lists no datasets", None
        return None, (a, datasets)

    def _discard(self, kind: str, key: str, path: Path, inode: tuple[int, int], why: str) -> None:
        """Report a corrupt entry and remove it, if it is still the file we found, under the
        lock (a process holding the lock is rewriting it anyway)."""
        try:
            lock_path = self._try_lock(kind, key)
        except CnnexplainError:
            lock_path = None
        if lock_path is None:
            self.notice(f"cache entry {path} is corrupt ({why}); ignoring it")
            return
        try:
            st = path.stat()
            if (st.st_dev, st.st_ino) == inode:
                _remove(path)
            self.notice(f"cache entry {path} was corrupt ({why}); removed it and rebuilding")
        except FileNotFoundError:
            self.notice(f"cache entry {path} was corrupt ({why}); rebuilding")
        except OSError as exc:
            self.notice(f"cache entry {path} is corrupt ({why}) and could not be removed "
                        f"({_first_line(exc)}); ignoring it")
        finally:
            _release(lock_path)

    # -- writing ------------------------------------------------------------------------------
    @staticmethod
    def _check_attr_names(attrs: dict | None) -> None:
        clash = sorted(set(attrs or {}) & set(_SYSTEM_ATTRS))
        if clash:
            raise ValueError(f"attribute names reserved by the cache: {clash}")

    def _header(self, kind: str, key: str, parts, attrs: dict | None, names: list[str]) -> dict:
        self._check_attr_names(attrs)
        attrs = dict(attrs or {})
        parts = parts if parts is not None else self._parts.get(key)
        header = {"cnnexplain_kind": kind, "format_version": FORMAT_VERSIONS[kind], "key": key,
                  "created": _now(), "complete": 0,
                  "parts_json": json.dumps(to_jsonable(parts), sort_keys=True),
                  "datasets": names}
        header.update(attrs)
        return header

    def save(self, kind: str, key: str, arrays: Mapping[str, np.ndarray],
             attrs: dict | None = None, dataset_attrs: dict[str, dict] | None = None,
             float16: bool = False, parts: dict | None = None) -> Path:
        """Write a complete entry atomically (under the key's lock); its path.

        ``arrays``: name -> array (a name with ``/`` creates groups; str arrays become UTF-8
        string datasets). ``attrs``: root attributes; ``dataset_attrs``: name -> attributes
        (``description``, ``shape``, ``units``, ...). ``float16``: store floating arrays as
        float16 (an out-of-range value is a one-line error). ``parts``: the key parts to record
        in ``parts_json`` (default: those this Cache last digested into ``key``).
        """
        if not arrays:
            raise ValueError("save() needs at least one array")
        dataset_attrs = dataset_attrs or {}
        stored = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind == "U":
                arr = arr.astype(object)
                stored[name] = (arr, h5py.string_dtype())
            else:
                stored[name] = (_to_stored(name, arr, _stored_dtype(arr.dtype, float16)), None)
        path = self.path(kind, key)
        header = self._header(kind, key, parts, attrs, list(stored))
        header["complete"] = 1
        with self.lock(kind, key, timeout=self.lock_timeout):
            cleanup_stale_tmp(path.parent)
            # built in memory, then written with plain file I/O: a full disk surfaces as a
            # clean OSError (one line, temporary removed) instead of an HDF5 flush failure
            buf = io.BytesIO()
            with h5py.File(buf, "w", locking=False) as f:
                _set_attrs(f, header)
                for name, (arr, dtype) in stored.items():
                    dtype = dtype or arr.dtype
                    block = _block_rows([(arr.shape[1:], np.dtype(arr.dtype))])
                    ds = f.create_dataset(name, data=arr, dtype=dtype,
                                          **_storage(arr.shape, np.dtype(dtype), block))
                    rows = {"rows": arr.shape[0]} if arr.ndim else {}
                    _set_attrs(ds, {**dataset_attrs.get(name, {}), **rows})
            try:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(buf.getbuffer())
            except CnnexplainError as exc:
                raise CnnexplainError(f"{exc.problem} (cache at {self._store()})", exc.fix) from None
        return path

    def get_or_compute(self, kind: str, parts: dict,
                       compute: Callable[[], tuple], float16: bool = False
                       ) -> tuple[Entry, bool]:
        """``(entry, hit)``: the cached entry for ``parts``, or ``compute()`` stored first.

        ``compute()`` returns ``(arrays, attrs)`` or ``(arrays, attrs, dataset_attrs)`` (see
        :meth:`save`). ``float16=True`` joins the key parts as ``float16: true`` (so the key is
        ``self.key(kind, **parts)`` for float32 entries). Holds the key's lock while
        computing, so concurrent processes compute once: the others wait, then read.
        """
        parts = dict(parts)
        if (float16 or "float16" in parts) and parts.setdefault("float16", True) != bool(float16):
            raise ValueError("parts['float16'] disagrees with float16=")
        key = self.key(kind, **parts)
        entry = self.load(kind, key)
        if entry is not None:
            return entry, True
        with self.lock(kind, key, timeout=self.lock_timeout):
            entry = self.load(kind, key)
            if entry is not None:
                return entry, True
            result = compute()
            arrays, attrs = result[0], result[1]
            dataset_attrs = result[2] if len(result) > 2 else None
            path = self.save(kind, key, arrays, attrs, dataset_attrs, float16=float16, parts=parts)
            return self._read_back(kind, key, path), False

    def partial_columns(self, kind: str, key: str) -> dict[str, tuple[tuple[int, ...], str]] | None:
        """The columns (name -> (row shape, stored dtype)) of a resumable partial entry, or None.
        Meant to be called under the key's lock, before :meth:`writer`."""
        if not self.enabled:
            return None
        partial = self.path(kind, key).with_name(key + PARTIAL_SUFFIX)
        if not partial.is_file():
            return None
        try:
            with h5py.File(partial, "r", locking=False) as f:
                a = _read_attrs(f)
                if (a.get("cnnexplain_kind"), a.get("key"), a.get("format_version"),
                        a.get("complete")) != (kind, key, FORMAT_VERSIONS[kind], 0):
                    return None
                return {name: (tuple(f[name].shape[1:]), str(f[name].dtype))
                        for name in a["datasets"]}
        except Exception:  # unreadable partial: the writer discards it with a notice
            return None

    def writer(self, kind: str, key: str, columns: dict[str, tuple[tuple[int, ...], str]],
               total_rows: int, attrs: dict, float16: bool = False,
               dataset_attrs: dict[str, dict] | None = None, parts: dict | None = None,
               lock_timeout: float | None = None) -> StreamWriter:
        """A :class:`StreamWriter` for ``total_rows`` rows of ``columns`` (name -> (row shape,
        dtype)); it holds the key's lock until commit/abort/close (``lock_timeout``: default
        ``self.lock_timeout``). A valid partial file of the same entry is resumed
        (``writer.rows_done`` > 0), an unusable one discarded with a notice. A writer does not
        look for a complete entry: callers :meth:`load` under :meth:`lock` first."""
        path = self.path(kind, key)
        self._check_attr_names(attrs)
        lock_path = self._lock_path(kind, key)
        timeout = self.lock_timeout if lock_timeout is None else lock_timeout
        self._acquire_or_fail(lock_path, timeout)
        w = StreamWriter(self, kind, key, columns, total_rows, attrs, dataset_attrs or {},
                         float16, parts if parts is not None else self._parts.get(key),
                         lambda: _release(lock_path))
        try:
            cleanup_stale_tmp(path.parent)
            w._open()
        except BaseException:
            w.close()
            raise
        return w

    # -- housekeeping -------------------------------------------------------------------------
    def _entry_files(self, kind: str | None = None) -> Iterator[tuple[str, str, Path, bool]]:
        """``(kind, key, path, is_partial)`` for every entry or partial file under the root."""
        if not self.root.is_dir():
            return
        kinds = [kind] if kind is not None else sorted(
            p.name for p in self.root.iterdir() if p.is_dir())
        for k in kinds:
            for p in sorted((self.root / k).glob("*/*.h5")):
                partial = p.name.endswith(PARTIAL_SUFFIX)
                key = p.name[: -len(PARTIAL_SUFFIX)] if partial else p.name[:-3]
                if _KEY_RE.fullmatch(key):
                    yield k, key, p, partial

    def info(self) -> list[dict]:
        """One dict per file in the cache: ``kind``, ``key``, ``path``, ``size`` (bytes),
        ``status`` ("complete", "partial" or "corrupt"), and for complete entries ``created``,
        ``parts``, ``datasets`` (name -> {shape, dtype}) and ``attrs`` (the writer's own);
        ``problem`` for corrupt ones, ``rows_done``/``total_rows`` for partial ones."""
        rows = []
        for kind, key, path, partial in self._entry_files():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            row = {"kind": kind, "key": key, "path": str(path), "size": size}
            if partial:
                row["status"] = "partial"
                with contextlib.suppress(Exception):
                    with h5py.File(path, "r", locking=False) as f:
                        row["rows_done"] = _plain(f.attrs["rows_done"])
                        row["total_rows"] = _plain(f.attrs["total_rows"])
            elif kind not in FORMAT_VERSIONS:
                row.update(status="corrupt", problem=f"unknown kind {kind!r}")
            else:
                why, meta = self._inspect(path, kind, key)
                if why is not None:
                    row.update(status="corrupt", problem=why)
                else:
                    attrs, datasets = meta
                    row.update(status="complete", created=attrs.get("created"),
                               parts=json.loads(attrs.get("parts_json", "null")),
                               datasets={n: {"shape": list(d.shape), "dtype": str(d.dtype)}
                                         for n, d in datasets.items()},
                               attrs={k: v for k, v in attrs.items() if k not in _SYSTEM_ATTRS})
            rows.append(row)
        return rows

    def clear(self, kind: str | None = None) -> int:
        """Remove every entry (of ``kind``), partial files and stale temporary files; the number
        of entry and partial files removed. Entries whose lock another process holds (being
        written right now) are left alone."""
        if kind is not None:
            self._check_kind(kind)
        removed = 0
        by_key: dict[tuple[str, str], list[Path]] = {}
        for k, key, path, _ in self._entry_files(kind):
            by_key.setdefault((k, key), []).append(path)
        base = self.root / kind if kind is not None else self.root
        for lock_path in sorted(base.glob(("" if kind else "*/") + "*/*.h5" + LOCK_SUFFIX)):
            key = lock_path.name[: -len(".h5" + LOCK_SUFFIX)]
            if _KEY_RE.fullmatch(key):  # a lock file left without an entry
                by_key.setdefault((lock_path.parent.parent.name, key), [])
        for (k, key), paths in by_key.items():
            lock_path = (self.root / k / key[:2] / f"{key}.h5{LOCK_SUFFIX}")
            try:
                got = _acquire(lock_path, 0)
            except OSError as exc:
                raise self._oserror(exc, lock_path) from None
            if not got:
                continue
            try:
                for p in paths:
                    _remove(p)
                    removed += 1
                lock_path.unlink(missing_ok=True)  # safe: waiters re-check the path (_flock)
            except OSError as exc:
                raise self._oserror(exc, paths[0]) from None
            finally:
                _release(lock_path)
        if base.is_dir():
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), reverse=True):
                cleanup_stale_tmp(d)
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
        return removed
