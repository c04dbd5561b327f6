"""``python -m benchmarks NAME|all [--size small|full] [--out DIR]``: each benchmark's table
and ``DIR/NAME.csv``, then every headline ratio beside its target (:mod:`benchmarks.targets`,
``DIR/targets.csv``)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from benchmarks.targets import targets


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)])
                  if m.name.startswith("bench_"))


def run_one(name: str, size: str, out: Path, console: Console):
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    t0 = time.perf_counter()
    frame = mod.run(size=size)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    frame.to_csv(path, index=False)
    table = Table(title=f"benchmark {name} ({size}, {wall:.1f} s)")
    for col in frame.columns:
        table.add_column(str(col))
    for _, row in frame.iterrows():
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print(f"wrote {path}")
    return frame


def main(argv=None) -> int:
    names = available()
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("name", choices=names + ["all"])
    ap.add_argument("--size", choices=["small", "full"], default="full")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    console = Console()
    summary = [targets(name, run_one(name, args.size, args.out, console))
               for name in (names if args.name == "all" else [args.name])]
    frame = pd.concat(summary, ignore_index=True)
    table = Table(title=f"targets ({args.size})")
    for col in frame.columns:
        table.add_column(str(col))
    marks = {True: "yes", False: "NO", None: "-"}
    for _, row in frame.iterrows():
        met = None if pd.isna(row["met"]) else bool(row["met"])
        table.add_row(row["benchmark"], row["measure"], f"{row['value']:.4g}", row["target"],
                      marks[met])
    console.print(table)
    path = args.out / "targets.csv"
    frame.to_csv(path, index=False)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
