"""Peak memory of a benchmark process."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
"""The repository root: what a benchmark's child process puts on ``sys.path`` to import this."""


def peak_rss_mib() -> float:
    """This process's own peak resident set size in MiB: ``VmHWM`` (Linux; per address space,
    so not inherited from the parent the way ``ru_maxrss`` is across fork + exec: a child of a
    1.2 GB benchmark process reports at least 1.2 GB there), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2 ** 20
