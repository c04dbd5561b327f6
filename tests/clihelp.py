"""Run the real CLI in a subprocess and inspect what a user would see."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_inproc(*args, env=None) -> Result:
    """Run ``cnnexplain ARGS`` in this process (the same ``main`` entry point as the console
    script) with stdout/stderr captured; much faster than a subprocess (no torch import)."""
    import contextlib
    import io

    from cnnexplain.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_env = dict(os.environ)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return Result(code, out.getvalue(), err.getvalue())


def run_cli(*args, cwd=None, env=None, timeout=600, preexec_fn=None) -> Result:
    e = dict(os.environ)
    e.setdefault("PYTHONHASHSEED", "0")
    e["COLUMNS"] = "200"
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "cnnexplain", *map(str, args)], cwd=cwd, env=e,
                       capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(r: Result, code: int, *words: str) -> None:
    """Non-zero exit ``code``, exactly one line on stderr containing ``words``, no traceback."""
    assert r.code == code, (r.code, r.out, r.err)
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert lines[0].startswith("error:"), lines[0]
    low = lines[0].lower()
    for w in words:
        assert w.lower() in low, (w, lines[0])


def snapshot(*dirs) -> dict:
    """Paths, sizes and mtimes of every file under ``dirs`` (to prove nothing changed)."""
    snap = {}
    for d in dirs:
        d = Path(d)
        if d.exists():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    snap[str(p)] = (st.st_size, st.st_mtime_ns)
    return snap


def run_torchrun(*args, env=None, nproc: int = 2, timeout: int = 900) -> Result:
    """``cnnexplain *args`` under ``torch.distributed.run --standalone`` with ``nproc`` CPU
    processes (``env`` added to the environment, PYTHONHASHSEED fixed)."""
    full = {**os.environ, **(env or {}), "PYTHONHASHSEED": "0"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", "--module", "cnnexplain",
                        *[str(a) for a in args]], env=full, capture_output=True, text=True,
                       timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_torchrun_matches_one_process(args, out: Path, files, env=None) -> tuple[Path, Path]:
    """``cnnexplain *args`` once in one process (``out/one``) and once under torchrun with two
    (``out/two``): both succeed and every file of ``files`` (relative to each run directory) is
    byte-identical. Returns the two run directories."""
    one, two = out / "one", out / "two"
    r = run_cli(*args, "--out", one, env=env)
    assert r.code == 0, r.err
    p = run_torchrun(*args, "--out", two, env=env)
    assert p.code == 0, p.err[-3000:]
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    return one, two
