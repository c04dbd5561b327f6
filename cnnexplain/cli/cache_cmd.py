"""``cnnexplain cache info`` and ``cnnexplain cache clear``: see and reclaim the HDF5 cache."""

from __future__ import annotations

import json
import sys
import typer
from rich.console import Console
from rich.table import Table

from cnnexplain.cli.declare import command
from cnnexplain.cli.main import app
from cnnexplain.config.info import CacheOptions

cache_app = typer.Typer(help="Inspect or clear the HDF5 cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def info(options: CacheOptions):
    kind, cache_dir, json_output = options.kind, options.cache_dir, options.json_output
    from cnnexplain.cache.store import Cache

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


def clear(options: CacheOptions):
    kind, cache_dir, json_output = options.kind, options.cache_dir, options.json_output
    from cnnexplain.cache.store import Cache

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


command(cache_app, "info", CacheOptions, info,
        help="List cache entries: kind, key, size, status and what produced them.")
command(cache_app, "clear", CacheOptions, clear,
        help="Remove cache entries (all, or of one --kind); entries being written are left "
             "alone.")
