"""HDF5 attributes of cache entries (plain HDF5 where possible, JSON strings otherwise), and
small helpers shared by the cache modules."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np

from cnnexplain.io import to_jsonable


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


# --------------------------------------------------------------------------------------------
# Small helpers shared by the cache modules
# --------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
