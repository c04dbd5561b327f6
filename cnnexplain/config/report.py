"""``report``'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.common import RunOptions
from cnnexplain.config.fields import group, option
from cnnexplain.errors import UsageError


@dataclass
class ReportOptions:
    """``cnnexplain report RUN_DIR [RUN_DIR ...]``."""

    run_dirs: list[Path] = option(factory=list, argument=True, help="Run directories (from "
                                  "train-gated, evaluate-entanglement, saliency, dissect, tcav).",
                                  metavar="RUN_DIRS...")
    run: RunOptions = group(RunOptions)

    def validate(self) -> "ReportOptions":
        """The run directories exist; ``out`` defaults to the run directory (one run) or the
        runs' common parent."""
        if not self.run_dirs:
            raise UsageError("no run directory given", "pass one or more run directories")
        for d in self.run_dirs:
            if not Path(d).is_dir():
                raise UsageError(f"run directory {d} does not exist" if not Path(d).exists()
                                 else f"{d} is a file, not a run directory",
                                 "pass directories written with `out` by other cnnexplain "
                                 "commands")
        if self.run.out is None:
            dirs = [Path(d) for d in self.run_dirs]
            self.run.out = dirs[0] if len(dirs) == 1 else \
                Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
        return self
