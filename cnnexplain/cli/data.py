"""``cnnexplain data synth`` (export the synthetic world) and ``cnnexplain data inspect``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError

data_app = typer.Typer(help="Generate the synthetic world on disk and inspect datasets.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


def _callback_progress(run, description: str):
    """Adapt the data exporters' ``progress(done, total)`` callbacks to a Rich bar."""
    state = {"cm": None, "task": None, "done": 0}

    def progress(done: int, total: int) -> None:
        if state["task"] is None:
            state["cm"] = run.progress(total=total, description=description)
            state["task"] = state["cm"].__enter__()
        state["task"].advance(done - state["done"])
        state["done"] = done
        if done >= total:
            state["cm"].__exit__(None, None, None)

    return progress


@data_app.command("synth")
def synth(
    fmt: Annotated[str, typer.Option("--format", help="broden, imagefolder or concepts.")] = "broden",
    world: Annotated[str, typer.Option("--world", help="World spec, e.g. "
                                       "synthetic:correlate=red-c@star=0.9 (grammar: see README).")] = "synthetic",
    num_images: Annotated[Optional[int], typer.Option("--num-images", min=1, help="Images (train split for imagefolder).")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", min=16, help="Image side in pixels (Broden masks are half of it).")] = None,
    concepts: Annotated[Optional[str], typer.Option("--concepts", help="concepts format: comma-separated concept names, e.g. red-c,striped,star-tip.")] = None,
    per_concept: Annotated[int, typer.Option("--per-concept", min=1, help="concepts format: images per concept folder.")] = 50,
    random_sets: Annotated[int, typer.Option("--random-sets", min=1, help="concepts format: number of random_<i> folders.")] = 5,
    min_coverage: Annotated[float, typer.Option("--min-coverage", min=0.0, max=1.0, help="concepts format: minimum image fraction a pixel concept must cover.")] = 0.005,
    no_balance_classes: Annotated[bool, typer.Option("--no-balance-classes", help="concepts format: fill each concept folder with the first images carrying the concept, whatever their class, instead of the random folders' class mix (needed for concepts only some classes carry, e.g. star-tip).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty --out.")] = False,
    out: O.Out = None, seed: O.Seed = 0, quiet: O.Quiet = False, json_output: O.Json = False,
    recipe: O.Recipe = None,
):
    """Write the synthetic world to --out as a Broden directory, an ImageFolder train/val tree,
    or TCAV concept folders (<concept>/ and random_<i>/). Writes are staged: a killed export
    leaves nothing that looks complete."""
    from cnnexplain.data.export import EXPORT_FORMATS
    from cnnexplain.data.synthetic import WorldConfig

    if fmt not in EXPORT_FORMATS:
        from cnnexplain.errors import close_matches

        raise UsageError(f"unknown --format {fmt!r}{close_matches(fmt, EXPORT_FORMATS)}",
                         f"choose one of: {', '.join(EXPORT_FORMATS)}")
    if out is None:
        raise UsageError("data synth needs --out DIR", "pass the directory to write the world to")
    config = WorldConfig.from_spec(world)
    changes = {"seed": seed} if seed else {}
    if num_images is not None:
        changes["num_images"] = num_images
    if resolution is not None:
        changes["resolution"] = resolution
    config = dataclasses.replace(config, **changes) if changes else config
    extra = {}
    if fmt == "concepts":
        names = [c.strip() for c in (concepts or "").split(",") if c.strip()]
        if not names:
            raise UsageError("--format concepts needs --concepts NAME[,NAME...]",
                             "pass e.g. --concepts red-c,striped")
        extra = {"concepts": names, "n_per_concept": per_concept, "n_random_sets": random_sets,
                 "min_coverage": min_coverage, "balance_classes": not no_balance_classes}
    elif concepts:
        raise UsageError("--concepts only applies to --format concepts", "leave it out")
    elif no_balance_classes:
        raise UsageError("--no-balance-classes only applies to --format concepts", "leave it out")
    run = start_run("data synth", locals())
    result = EXPORT_FORMATS[fmt](config, run.out, progress=_callback_progress(run, f"export {fmt}"),
                                overwrite=overwrite, **extra)
    summary = {"format": fmt, "world": config.to_spec(), "path": str(run.out)}
    if isinstance(result, dict):
        summary["counts"] = result
    if run.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        run.print(f"wrote the {fmt} export of {config.to_spec()} to {run.out}")
    return 0


@data_app.command("inspect")
def inspect(target: Annotated[str, typer.Argument(help="A dataset spec (synthetic:..., cifar10:ROOT, ...) or a directory.")],
            json_output: O.Json = False):
    """Summarise any supported dataset: counts per class / concept, image sizes."""
    from rich.console import Console

    from cnnexplain.data.inspect import inspect_dataset

    rows = inspect_dataset(target)
    if json_output:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    table = Table(title=f"dataset {target}")
    for col in ("group", "name", "count", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.get("group", "")), str(r.get("name", "")),
                      "" if r.get("count") is None else str(r["count"]), str(r.get("detail", "")))
    Console().print(table)
