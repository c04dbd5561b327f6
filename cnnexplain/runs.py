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
        raise CnnexplainError(f"`out={out}` is not writable (no write permission on "
                              f"{probe.absolute()})",
                              "choose a writable `out` directory")
    return out


def versions() -> dict:
    import numpy
    import torch
    import torchvision

    return {"cnnexplain": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


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
    """Add or replace ``command``'s entry in ``out/run.json`` (atomic; the command holds
    ``out`` exclusively, :func:`hold`)."""
    out = Path(out)
    manifest = read_manifest(out)
    manifest["cnnexplain_version"] = __version__
    manifest["commands"][command] = entry
    write_json(out / MANIFEST, manifest)
    return out / MANIFEST


LOCK_DIR = "cnnexplain-locks"
"""Folder (under the system's temporary directory) of the locks that keep two commands off one
run directory; a lock lives outside the run directory and goes with the process that holds
it (flock), so a killed command leaves nothing that blocks the next one."""


class OutLock:
    """The exclusive hold of one run directory by one command (:func:`hold`)."""

    def __init__(self, out: Path, command: str):
        import hashlib
        import tempfile

        self.out = Path(out)
        key = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:24]
        self.path = Path(tempfile.gettempdir()) / LOCK_DIR / f"{key}.lock"
        self.command = command
        self.fh = None

    def acquire(self) -> "OutLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise CnnexplainError(f"`out` {self.out} is in use by another cnnexplain "
                                      f"command ({holder})", "wait for it to finish, or choose "
                                      "another `out`") from None
            # the file may have been unlinked by its last holder between our open and flock
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: {self.command}")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def hold(out: Path, command: str) -> OutLock:
    """Hold ``out`` exclusively for ``command`` until :meth:`OutLock.release` (or the end of
    the process): a second command on the same directory fails at once, naming the first."""
    return OutLock(out, command).acquire()


def argv() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
