"""The bad-input matrix (reliability issue): every entry runs through the real CLI and must give
a non-zero exit code (2 usage, 1 runtime), exactly one line on stderr naming the problem and the
fix, no traceback, and no new or modified file in --out or the cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from clihelp import assert_one_line_error, run_cli, run_inproc, snapshot


@dataclass
class Case:
    id: str
    args: Callable[[Path], list]          # tmp -> argv (after `cnnexplain`)
    code: int
    words: tuple = ()
    setup: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)


def _world(tmp: Path) -> Path:
    from cnnexplain.data.broden import export_broden
    from cnnexplain.data.synthetic import WorldConfig

    root = tmp / "world"
    if not root.exists():
        export_broden(WorldConfig(num_images=6, resolution=32), root)
    return root


def _recipe(text: str):
    def setup(tmp: Path):
        (tmp / "r.yaml").write_text(text)
    return setup


def _file_at_out(tmp: Path):
    (tmp / "out").write_text("i am a file")


def _mixed_sizes(tmp: Path):
    from PIL import Image

    for cls, size in (("a", 32), ("b", 40)):
        d = tmp / "imgs" / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(d / f"{i}.png")


CASES = [
    # generic usage
    Case("unknown-command", lambda t: ["trian-gated"], 2, ("no such command",)),
    Case("unknown-option", lambda t: ["data", "synth", "--out", t / "out", "--bogus"], 2, ("--bogus",)),
    Case("unknown-backbone", lambda t: ["layers", "--backbone", "resnet181"], 2,
         ("unknown backbone", "resnet18")),
    # data synth
    Case("synth-bad-format", lambda t: ["data", "synth", "--out", t / "out", "--format", "brodn"], 2,
         ("unknown --format", "broden")),
    Case("synth-bad-world-key", lambda t: ["data", "synth", "--out", t / "out", "--world", "synthetic:nn=3"], 2,
         ("nn",)),
    Case("synth-bad-concept", lambda t: ["data", "synth", "--out", t / "out", "--format", "concepts",
                                         "--concepts", "redd-c"], 2, ("redd-c",)),
    Case("synth-out-is-file", lambda t: ["data", "synth", "--out", t / "out", "--num-images", "2"], 2,
         ("existing file",), setup=_file_at_out),
    Case("synth-resolution-too-small", lambda t: ["data", "synth", "--out", t / "out", "--resolution", "4"], 2,
         ("--resolution",)),
    # recipes
    Case("recipe-invalid-yaml", lambda t: ["data", "synth", "--out", t / "out", "--recipe", t / "r.yaml"], 2,
         ("not valid YAML",), setup=_recipe("num-images: [3\n")),
    Case("recipe-unknown-key", lambda t: ["data", "synth", "--out", t / "out", "--recipe", t / "r.yaml"], 2,
         ("unknown key 'num-imags'", "num-images"), setup=_recipe("num-imags: 3\n")),
    Case("recipe-wrong-type", lambda t: ["data", "synth", "--out", t / "out", "--recipe", t / "r.yaml"], 2,
         ("recipe key 'num-images'",), setup=_recipe("num-images: many\n")),
    Case("recipe-negative", lambda t: ["data", "synth", "--out", t / "out", "--recipe", t / "r.yaml"], 2,
         ("recipe key 'num-images'",), setup=_recipe("num-images: -3\n")),
    Case("recipe-missing", lambda t: ["data", "synth", "--out", t / "out", "--recipe", t / "nope.yaml"], 2,
         ("does not exist",)),
    # datasets
    Case("inspect-missing-root", lambda t: ["data", "inspect", f"cifar10:{t / 'nope'}"], 1,
         ("cifar",)),
    Case("inspect-empty-folder", lambda t: ["data", "inspect", f"imagefolder:{t / 'empty'}"], 1,
         ("empty",), setup=lambda t: (t / "empty").mkdir()),
    Case("inspect-bad-spec", lambda t: ["data", "inspect", "mnist:/x"], 2, ("mnist",)),
    # cache
    Case("cache-root-is-file", lambda t: ["cache", "info", "--cache-dir", t / "cachefile"], 1,
         ("cache",), setup=lambda t: (t / "cachefile").write_text("x")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    if case.setup:
        case.setup(tmp_path)
    cache = tmp_path / "cache"
    before = snapshot(tmp_path)
    r = run_inproc(*case.args(tmp_path), env={"CNNEXPLAIN_CACHE": str(cache), **case.env})
    assert_one_line_error(r, case.code, *case.words)
    assert snapshot(tmp_path) == before, "a failed command left files behind"


@pytest.mark.parametrize("args,code", [(["layers", "--backbone", "nope"], 2),
                                       (["data", "inspect", "imagefolder:/nonexistent"], 1)])
def test_bad_input_as_a_real_process(args, code):
    """A few entries through the installed entry point in a subprocess (real exit codes)."""
    r = run_cli(*args)
    assert_one_line_error(r, code)
