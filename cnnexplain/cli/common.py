"""What every subcommand does around its one library call: merge the recipe, validate
``--out``, pick the device, seed, set up output, progress and the cache, and record run.json."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.markup import escape

from cnnexplain import runs
from cnnexplain.io import to_jsonable
from cnnexplain.progress import ProgressFactory
from cnnexplain.runtime import Dist, init_distributed, resolve_device, seed_everything

@dataclass
class Run:
    """One invocation of a subcommand: merged options and the services it uses."""

    command: str
    opts: SimpleNamespace
    out: Path
    device: object
    seed: int
    quiet: bool
    json: bool
    dist: Dist
    console: Console
    err: Console
    progress: ProgressFactory
    started: float = field(default_factory=time.time)
    _cache: object = None

    @property
    def cache(self):
        """The HDF5 cache (``--cache-dir``; disabled with ``--no-cache``)."""
        if self._cache is None:
            from cnnexplain.cache import Cache

            self._cache = Cache(getattr(self.opts, "cache_dir", None),
                                enabled=not getattr(self.opts, "no_cache", False),
                                warn=self.notice)
        return self._cache

    def notice(self, message: str) -> None:
        """A one-line notice on stderr (not shown with --quiet)."""
        if not self.quiet:
            self.err.print(f"[yellow]note:[/] {escape(message)}", soft_wrap=True, highlight=False)

    def print(self, *renderables) -> None:
        """Human output on stdout (suppressed under --json, where stdout is JSON only)."""
        if not self.json:
            for r in renderables:
                self.console.print(r)

    def finish(self, summary: dict, model=None, data=None, results: list | None = None,
               extra: dict | None = None) -> dict:
        """Record this command in run.json (rank 0 only) and print the --json summary."""
        wall = time.time() - self.started
        entry = {
            "argv": runs.argv(),
            "options": to_jsonable({k: v for k, v in vars(self.opts).items()}),
            "versions": runs.versions(),
            "seed": self.seed,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "wall_time_s": round(wall, 3),
            "model": to_jsonable(model.describe()) if hasattr(model, "describe") else model,
            "data": to_jsonable(data.describe()) if hasattr(data, "describe") else data,
            "results": [str(Path(r).relative_to(self.out)) if Path(r).is_relative_to(self.out)
                        else str(r) for r in (results or [])],
            "summary": to_jsonable(summary),
        }
        if extra:
            entry.update(to_jsonable(extra))
        if self.dist.is_main:
            runs.record_command(self.out, self.command, entry)
            if self.json:
                sys.stdout.write(json.dumps({"command": self.command, "out": str(self.out),
                                             **entry["summary"]}, indent=None) + "\n")
                sys.stdout.flush()
        return entry


def start_run(command: str, values: dict, default_out: str | None = None) -> Run:
    """Set up the run from ``values`` (the command function's locals; a ``--recipe`` was
    already merged into the command line by ``cnnexplain.recipes.expand_recipe``).

    Validates ``--out`` but creates nothing: results are written atomically when ready.
    """
    values = {k: v for k, v in values.items() if k != "ctx"}
    opts = SimpleNamespace(**values)
    out = values.get("out") or Path("runs") / (default_out or command.replace(" ", "-"))
    out = runs.check_out_dir(Path(out))
    opts.out = out
    device = resolve_device(values.get("device", "auto"))
    seed = int(values.get("seed", 0) or 0)
    seed_everything(seed)
    quiet = bool(values.get("quiet", False))
    as_json = bool(values.get("json_output", False))
    dist = init_distributed(device)
    err = Console(stderr=True, soft_wrap=True)
    console = Console(soft_wrap=False)
    show = None if not quiet else False
    if as_json or not dist.is_main:
        show = False
    return Run(command=command, opts=opts, out=out, device=device, seed=seed, quiet=quiet,
               json=as_json, dist=dist, console=console, err=err,
               progress=ProgressFactory(enabled=show, console=err))


def preprocessing_for(run: Run, recorded=None):
    """The run's preprocessing: ``--resize/--mean/--std`` override the model's recorded one."""
    from cnnexplain.data.preprocessing import Preprocessing, parse_triplet

    base = recorded or Preprocessing()
    o = run.opts
    return base.replace(resize=getattr(o, "resize", None),
                        mean=parse_triplet(getattr(o, "mean", None), "--mean"),
                        std=parse_triplet(getattr(o, "std", None), "--std"))


def load_model_for(run: Run, num_classes: int | None = None, class_names=None):
    """The model the run's --checkpoint / --backbone / --num-classes / --weights / --layer
    options name, on the run's device, with the run's preprocessing applied."""
    from cnnexplain.data.preprocessing import Preprocessing
    from cnnexplain.models.loading import load_model

    o = run.opts
    loaded = load_model(checkpoint=getattr(o, "checkpoint", None),
                        backbone=getattr(o, "backbone", None),
                        num_classes=getattr(o, "num_classes", None),
                        weights=getattr(o, "weights", None), device=run.device,
                        layer=None, default_num_classes=num_classes or 10,
                        class_names=class_names)
    loaded.preprocessing = preprocessing_for(run, loaded.preprocessing if loaded.meta else Preprocessing())
    return loaded
