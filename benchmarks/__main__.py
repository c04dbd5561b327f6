"""``python -m benchmarks NAME|all [--size small|full] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


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
    for name in names if args.name == "all" else [args.name]:
        run_one(name, args.size, args.out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
