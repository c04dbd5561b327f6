"""Content fingerprints: short hex digests of what produced an array.

Used as cache keys (``cnnexplain.cache``) and in run.json manifests. A fingerprint depends on
content, never on a path alone: the same weights under another file name hash the same, a changed
image or weight hashes differently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

DIGEST_CHARS = 20


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest_json(obj) -> str:
    """Digest of a JSON-able object (dict keys sorted)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()[:DIGEST_CHARS]


def digest_parts(*parts) -> str:
    """Digest of several strings / JSON-able parts, in order."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else _canonical(p))
        h.update(b"\x00")
    return h.hexdigest()[:DIGEST_CHARS]


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state_dict: names, dtypes, shapes and values of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            h.update(_canonical([name, repr(value)]))
            continue
        h.update(_canonical([name, str(value.dtype), list(value.shape)]))
        h.update(tensor_bytes(value))
    return h.hexdigest()[:DIGEST_CHARS]


def module_digest(module: torch.nn.Module) -> str:
    """Digest of a module's weights and buffers (its state_dict)."""
    return state_dict_digest(module.state_dict())


def array_digest(a) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(_canonical([str(a.dtype), list(a.shape)]))
    h.update(a.tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()[:DIGEST_CHARS]


def files_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None,
                 mode: str = "content") -> str:
    """Digest of a set of files.

    ``mode="content"`` hashes every byte (exact; for small sets such as TCAV concept folders);
    ``mode="stat"`` hashes relative path, size and modification time (cheap; for large datasets
    such as Broden, where any rewrite of a file changes its mtime).
    """
    h = hashlib.sha256()
    root = Path(root) if root is not None else None
    for p in sorted(Path(x) for x in paths):
        rel = str(p.relative_to(root)) if root is not None else str(p)
        h.update(rel.encode() + b"\x00")
        if mode == "content":
            h.update(file_digest(p).encode())
        elif mode == "stat":
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            raise ValueError(f"unknown fingerprint mode {mode!r}")
    return h.hexdigest()[:DIGEST_CHARS]
