"""What every job shares: the :class:`Session` it runs in (output directory, device, seed,
processes, progress, notices, the cache) and :func:`execute`, which runs a job's three steps.

A job is a module with three functions:

- ``plan(options, session) -> Plan``: validate and resolve everything (model, data,
  preprocessing, layer) before anything is computed or written;
- ``run(plan, session) -> Result``: the computation, over library functions;
- ``write(plan, result, session) -> Output``: the files, through :mod:`cnnexplain.layout`.

:func:`execute` chains them and records the command in ``run.json``; the CLI builds the options
from its flags, calls :func:`execute` and renders the :class:`Output`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from cnnexplain import runs
from cnnexplain.config.fields import flat
from cnnexplain.io import to_jsonable
from cnnexplain.layout import RunLayout
from cnnexplain.progress import ProgressFactory, silent
from cnnexplain.runtime import Dist, init_distributed, resolve_device, seed_everything


@dataclass
class Session:
    """One invocation of a command: where it writes, what it computes on, how it reports.

    ``notice``: one-line notices for the user (the CLI prints them on stderr);
    ``progress``: a :class:`~cnnexplain.progress.ProgressFactory` (silent by default)."""

    command: str
    out: Path
    device: Any = "cpu"
    seed: int = 0
    dist: Dist = field(default_factory=Dist)
    progress: Callable = field(default_factory=lambda: silent())
    notice: Callable[[str], None] = lambda message: None
    cache_dir: Path | None = None
    use_cache: bool = True
    started: float = field(default_factory=time.time)
    _cache: Any = None
    _lock: Any = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out)

    @property
    def cache(self):
        """The HDF5 cache (disabled when ``use_cache`` is False)."""
        if self._cache is None:
            from cnnexplain.cache.store import Cache

            self._cache = Cache(self.cache_dir, enabled=self.use_cache, warn=self.notice)
        return self._cache

    @classmethod
    def open(cls, command: str, run=None, compute=None, *, default_out: str | None = None,
             progress: ProgressFactory | None = None,
             notice: Callable[[str], None] | None = None) -> "Session":
        """A session from the run / compute option groups: validates the output directory
        (creates nothing), resolves the device, seeds everything, joins torch.distributed
        under torchrun."""
        out = getattr(run, "out", None) or Path("runs") / (default_out or command.replace(" ", "-"))
        out = runs.check_out_dir(Path(out))
        device = resolve_device(getattr(compute, "device", "auto")) if compute is not None \
            else "cpu"
        seed = int(getattr(compute, "seed", 0) or 0)
        if compute is not None:
            seed_everything(seed)
        dist = init_distributed(device) if compute is not None else Dist()
        session = cls(command=command, out=out, device=device, seed=seed, dist=dist,
                      progress=progress or silent(), notice=notice or (lambda m: None),
                      cache_dir=getattr(compute, "cache_dir", None),
                      use_cache=not getattr(compute, "no_cache", False))
        if dist.is_main:  # the ranks of one torchrun job share their run directory
            session._lock = runs.hold(out, command)
        return session

    def close(self) -> None:
        """Let other commands use the run directory again."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@dataclass
class Output:
    """What a job hands back: its ``summary`` (``json_output`` and run.json), the files it wrote,
    what run.json says of the model and data, and the job's own result for rendering."""

    summary: dict
    paths: list[Path] = field(default_factory=list)
    model: Any = None
    data: Any = None
    result: Any = None
    plan: Any = None
    extra: dict | None = None
    entry: dict | None = None
    failure: Exception | None = None
    """A verdict to raise after the output is recorded and shown (a CI bound violated)."""


def record(session: Session, options: Any, output: Output, write: bool = True) -> dict:
    """The command's run.json entry (options, versions, seed, device, times, model, data,
    results and summary), added to ``out/run.json`` on rank 0 when ``write``."""
    wall = time.time() - session.started
    out = session.out
    model, data = output.model, output.data
    entry = {
        "argv": runs.argv(),
        "options": to_jsonable(flat(options)) if options is not None else {},
        "versions": runs.versions(),
        "seed": session.seed,
        "device": str(session.device),
        "world_size": session.dist.world_size,
        "started": datetime.fromtimestamp(session.started, timezone.utc).isoformat(),
        "wall_time_s": round(wall, 3),
        "model": to_jsonable(model.describe()) if hasattr(model, "describe") else to_jsonable(model),
        "data": to_jsonable(data.describe()) if hasattr(data, "describe") else to_jsonable(data),
        "results": [str(Path(r).relative_to(out)) if Path(r).is_relative_to(out) else str(r)
                    for r in output.paths],
        "summary": to_jsonable(output.summary),
    }
    if output.extra:
        entry.update(to_jsonable(output.extra))
    if write and session.dist.is_main:
        runs.record_command(out, session.command, entry)
    output.entry = entry
    return entry


def validate(options: Any) -> Any:
    """``options.validate()`` where the options define cross-field rules, else the declared
    bounds and choices alone (:func:`~cnnexplain.config.fields.check`)."""
    from cnnexplain.config.fields import check

    return options.validate() if hasattr(options, "validate") else check(options)


def execute(job: ModuleType, options: Any, session: Session | None = None, *,
            progress: ProgressFactory | None = None,
            notice: Callable[[str], None] | None = None) -> Output:
    """Validate ``options``, open a session (unless given), then ``plan`` -> ``run`` ->
    ``write`` of ``job`` and record the command in run.json. Nothing is written when
    validation or planning fails."""
    validate(options)
    if session is None:
        session = Session.open(job.COMMAND, getattr(options, "run", None),
                               getattr(options, "compute", None), progress=progress,
                               notice=notice)
    try:
        plan = job.plan(options, session)
        result = job.run(plan, session)
        output = job.write(plan, result, session)
        output.plan = plan
        record(session, options, output, write=getattr(job, "RECORD", True))
        return output
    finally:
        session.close()
        if session.dist.enabled:
            from cnnexplain.runtime import shutdown_distributed

            shutdown_distributed()
