"""``cnnexplain cache info`` and ``cnnexplain cache clear``: see and reclaim the HDF5 cache."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.main import app

cache_app = typer.Typer(help="Inspect or clear the HDF5 cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

Kind = Annotated[Optional[str], typer.Option("--kind", help="Only entries of this kind "
                                             "(activations, gate, saliency, dissection, cav, ...).")]


@cache_app.command("info")
def info(kind: Kind = None, cache_dir: O.CacheDir = None, json_output: O.Json = False):
    """List cache entries: kind, key, size, status and what produced them."""
    from cnnexplain.cache import Cache

    cache = Cache(cache_dir)
    rows = [r for r in cache.info() if kind is None or r["kind"] == kind]
    if json_output:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    table = Table(title=f"cache {cache.root}")
    for col in ("kind", "key", "size", "status", "created"):
        table.add_column(col)
    total = 0
    for r in rows:
        total += r["size"]
        table.add_row(r["kind"], r["key"], _human(r["size"]), r.get("status", ""),
                      str(r.get("created", ""))[:19])
    Console().print(table)
    Console().print(f"{len(rows)} entries, {_human(total)}")


@cache_app.command("clear")
def clear(kind: Kind = None, cache_dir: O.CacheDir = None, json_output: O.Json = False):
    """Remove cache entries (all, or of one --kind); entries being written are left alone."""
    from cnnexplain.cache import Cache

    cache = Cache(cache_dir)
    n = cache.clear(kind)
    if json_output:
        sys.stdout.write(json.dumps({"removed": n, "root": str(cache.root)}) + "\n")
    else:
        Console().print(f"removed {n} files from {cache.root}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
