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

``root`` is ``cache_dir``, else ``$CNNEXPLAIN_CACHE``, else ``$XDG_CACHE_HOME/cnnexplain``,
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
dimension (about ``CHUNK_BYTES`` per chunk), stored with :data:`~cnnexplain.cache.layout.
STORAGE`'s filters (uncompressed: writing stays a small fraction of the forward pass it caches)
and fletcher32-checksummed, so a flipped byte is detected when it is read. ``float16=True`` stores
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
  (``cache_dir`` or ``CNNEXPLAIN_CACHE``). A file at the cache root is reported at construction.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Iterator, Mapping

import h5py
import numpy as np

from cnnexplain.cache.attrs import _first_line, _now, _plain, _read_attrs, _remove, _set_attrs
from cnnexplain.cache.entries import DatasetInfo, Entry
from cnnexplain.cache.layout import (FORMAT_VERSIONS, PARTIAL_SUFFIX, _block_rows, _storage,
                                     _stored_dtype, _to_stored)
from cnnexplain.cache.locks import _acquire, _release
from cnnexplain.cache.streaming import StreamWriter
from cnnexplain.errors import CnnexplainError, close_matches
from cnnexplain.fingerprint import digest_json
from cnnexplain.io import atomic_path, cleanup_stale_tmp, to_jsonable

ENV_VAR = "CNNEXPLAIN_CACHE"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
LOCK_SUFFIX = ".lock"

_KIND_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_KEY_RE = re.compile(r"[0-9a-f]{8,64}")
_SYSTEM_ATTRS = ("cnnexplain_kind", "format_version", "key", "created", "complete", "parts_json",
                 "datasets", "rows_done", "total_rows", "json_attrs")
_FIX = "pass `cache_dir` with a writable directory, set CNNEXPLAIN_CACHE, or use `no_cache=true`"


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

class Cache:
    """The shared HDF5 store (see the module docstring for keys, layout and guarantees).

    ``root``: the directory (None: :meth:`default_root`). ``enabled=False`` (``no_cache``):
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
                                  "pass `cache_dir` with a directory, set CNNEXPLAIN_CACHE, or "
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
                                   f"(writing {path})", "free some disk space, pass `cache_dir` "
                                   "on another disk, or use `no_cache=true`")
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
                                  "`cache_dir` / `no_cache=true`")

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
                                  "check the disk, or use `no_cache=true`")
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
