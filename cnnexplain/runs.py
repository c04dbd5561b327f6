"""Run directories and their ``run.json`` manifest.

Every command writes its results under ``out`` = DIR (train-gated: checkpoint.pt, train_log.csv;
evaluate-entanglement: entanglement.csv; saliency/, dissect/, tcav/, report/ subfolders) and
records itself in ``DIR/run.json``::

    {"cnnexplain_version": "...", "commands": {"<command>": {argv, options, versions, seed,
     device, started, wall_time_s, model, data, results, summary}}}

One entry per command name (the latest invocation), updated atomically under a lock so that
commands run one after another (or at once) into the same directory each keep their entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

from cnnexplain import __version__
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.io import write_json
from cnnexplain.layout import MANIFEST



def check_out_dir(out: Path) -> Path:
    """Validate ``out`` without creating anything (bad input must leave no file behind)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out={out}` is an existing file, not a directory",
                         "pass a directory path for `out`")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"`out={out}` lies under {probe}, which is a file",
                         "pass a directory path for `out`")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise CnnexplainError(f"`out={out}` is not writable (no write permission on {probe})",
                              "choose a writable `out` directory")
    return out


def versions() -> dict:
    import numpy
    import torch
    import torchvision

    return {"cnnexplain": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(out: Path) -> dict:
    """The run.json of ``out`` (empty skeleton when absent; a damaged file reads as empty)."""
    path = Path(out) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("commands"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"cnnexplain_version": __version__, "commands": {}}


def record_command(out: Path, command: str, entry: dict) -> Path:
    """Add or replace ``command``'s entry in ``out/run.json`` (atomic, locked)."""
    out = Path(out)
    with _locked(out / ".run.json.lock"):
        manifest = read_manifest(out)
        manifest["cnnexplain_version"] = __version__
        manifest["commands"][command] = entry
        write_json(out / MANIFEST, manifest)
    return out / MANIFEST


def argv() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
