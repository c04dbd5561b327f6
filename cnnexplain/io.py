"""Atomic file writes: a file is either absent, the old version, or the complete new version.

Every result file cnnexplain writes goes through :func:`atomic_path` (write to a temporary file in
the same directory, fsync, ``os.replace``), so a crash, a kill -9 or a full disk never leaves a
partial or corrupt file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from cnnexplain.errors import CnnexplainError

TMP_PREFIX = ".cnnexplain-tmp-"


def umask() -> int:
    """The process's file-creation mask, read without changing it (Linux: /proc; elsewhere the
    set-and-restore of ``os.umask``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0o666 minus the umask
    (temporary files are created 0o600; results take this mode when they are moved in)."""
    return 0o666 & ~umask()


def _explain_oserror(exc: OSError, path: Path) -> CnnexplainError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit reached"}[exc.errno]
        return CnnexplainError(f"{what} while writing {path}",
                               "free some disk space or choose another `out` / `cache_dir`")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CnnexplainError(f"cannot write {path}: permission denied",
                               "choose a writable `out` / `cache_dir`")
    return CnnexplainError(f"cannot write {path}: {exc.strerror or exc}",
                           "check the path and free space, then re-run")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it into place atomically.

    On any exception the temporary file is removed and ``path`` is left untouched. OS errors
    (disk full, permission denied) are turned into a one-line :class:`CnnexplainError`.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _explain_oserror(exc, path) from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _explain_oserror(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_jsonable(obj):
    """Round-trip through JSON so the result only holds plain types."""
    return json.loads(json.dumps(obj, default=_json_default))


def cleanup_stale_tmp(directory: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Remove temporary files left by killed writers (older than ``older_than_s``)."""
    import time

    directory = Path(directory)
    n = 0
    if not directory.is_dir():
        return 0
    now = time.time()
    for p in directory.glob(TMP_PREFIX + "*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                p.unlink()
                n += 1
        except OSError:
            pass
    return n
