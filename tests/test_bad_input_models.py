"""The bad-input matrix, part 2: every command that takes a model, data or an output directory
(train-gated, evaluate-entanglement, saliency, dissect, tcav, report) through the real CLI entry
point. Each entry must exit non-zero (2 usage, 1 runtime) with exactly one line on stderr that
names the problem, without a traceback, and leave no new or modified file anywhere under the
test's directory (``--out``, the cache, the inputs). Pickled code must never run."""

from __future__ import annotations

import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from clihelp import assert_one_line_error, run_cli, run_inproc, snapshot

PWNED = Path("/tmp/cnnexplain-matrix-pwned")
WORLD = "synthetic:n=24,ntest=12,res=32"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shared read-only inputs: a good checkpoint, broken variants, a Broden export, concept
    folders, image folders."""
    from PIL import Image

    from cnnexplain.data.broden import export_broden
    from cnnexplain.data.export import export_concepts
    from cnnexplain.data.synthetic import WorldConfig
    from cnnexplain.models import zoo
    from cnnexplain.models.checkpoint import Checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = zoo.build("smallcnn", num_classes=6)
    good = root / "good.pt"
    save_checkpoint(good, Checkpoint(meta={"backbone": "smallcnn", "num_classes": 6},
                                     state_dict=model.state_dict()))
    data = good.read_bytes()
    (root / "trunc.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(zoo.build("resnet18", num_classes=6).state_dict(), root / "resnet18_sd.pt")
    torch.save(model.state_dict(), root / "smallcnn_sd.pt")
    torch.save({"format": "cnnexplain-checkpoint", "payload": _Evil()}, root / "evil.pt")
    torch.save(_Evil(), root / "evil_sd.pt")
    nan_model = zoo.build("smallcnn", num_classes=6)
    with torch.no_grad():
        for p in nan_model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(root / "nan.pt", Checkpoint(meta={"backbone": "smallcnn", "num_classes": 6},
                                                state_dict=nan_model.state_dict()))
    export_broden(WorldConfig(num_images=8, resolution=32), root / "broden")
    export_concepts(WorldConfig(num_images=200, resolution=32), root / "concepts", ["red-c"],
                    n_per_concept=6, n_random_sets=2, n_random=6)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(root / "ok.npy", x)
    x[0, 0, 0, 0] = np.nan
    np.save(root / "nan.npy", x)
    np.save(root / "inf.npy", np.full((2, 3, 32, 32), np.inf, np.float32))
    np.save(root / "rank2.npy", np.zeros((2, 32), np.float32))
    imgs = root / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(imgs / "ok.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "empty").mkdir()
    return root


@dataclass
class Case:
    id: str
    args: Callable[[Path, Path], list]     # (assets, tmp) -> argv after `cnnexplain`
    code: int
    words: tuple = ()
    setup: Callable[[Path], None] | None = None


def _ck(name):
    return lambda a, t: ["--checkpoint", a / name]


MODEL_VARIANTS = [
    ("checkpoint-missing", lambda a, t: ["--checkpoint", a / "nope.pt"], 1, ("does not exist",)),
    ("checkpoint-truncated", _ck("trunc.pt"), 1, ("corrupt",)),
    ("checkpoint-random-bytes", _ck("random.pt"), 1, ("corrupt",)),
    ("checkpoint-pickled-code", _ck("evil.pt"), 1, ("refused",)),
    ("checkpoint-is-plain-state-dict", _ck("smallcnn_sd.pt"), 1, ("plain state_dict",)),
    ("weights-pickled-code", lambda a, t: ["--backbone", "smallcnn", "--weights",
                                           a / "evil_sd.pt"], 1, ("refused",)),
    ("weights-other-backbone", lambda a, t: ["--backbone", "smallcnn", "--weights",
                                             a / "resnet18_sd.pt"], 1, ("smallcnn",)),
    ("weights-num-classes-mismatch", lambda a, t: ["--backbone", "smallcnn", "--weights",
                                                   a / "smallcnn_sd.pt", "--num-classes", "10"],
     2, ("does not match the weights",)),
    ("unknown-backbone", lambda a, t: ["--backbone", "resnet181"], 2, ("resnet18",)),
    ("layer-typo", lambda a, t: ["--backbone", "smallcnn", "--layer", "featurs"], 2,
     ("featurs", "features")),
]

COMMANDS = {
    "evaluate-entanglement": lambda a, t: ["evaluate-entanglement", "--dataset", WORLD,
                                           "--no-scores", "--out", t / "out"],
    "saliency": lambda a, t: ["saliency", "--dataset", WORLD, "--limit", "2", "--methods",
                              "gradient,gradcam", "--out", t / "out"],
    "dissect": lambda a, t: ["dissect", "--broden", a / "broden", "--out", t / "out"],
    "tcav": lambda a, t: ["tcav", "--dataset", WORLD, "--concepts", a / "concepts",
                          "--concept", "red-c", "--target", "circle", "--random-runs", "2",
                          "--out", t / "out"],
}

CASES = [Case(f"{cmd}/{vid}", (lambda c, v: lambda a, t: c(a, t) + v(a, t))(cargs, vargs),
              code, words)
         for cmd, cargs in COMMANDS.items()
         for vid, vargs, code, words in MODEL_VARIANTS]

GOOD = lambda a, t: ["--checkpoint", a / "good.pt"]  # noqa: E731


def _with_good(cmd, extra):
    return lambda a, t: COMMANDS[cmd](a, t) + GOOD(a, t) + extra(a, t)


def _file_at(name):
    def setup(t: Path):
        (t / name).write_text("i am a file")
    return setup


CASES += [
    # method, target, inputs
    Case("saliency/method-typo", _with_good("saliency", lambda a, t: ["--methods", "gradcamm"]),
         2, ("gradcamm", "gradcam")),
    Case("saliency/target-out-of-range", _with_good("saliency", lambda a, t: ["--target", "99"]),
         2, ("99",)),
    Case("saliency/inputs-nan", lambda a, t: ["saliency", "--checkpoint", a / "good.pt",
                                              "--inputs", a / "nan.npy", "--methods", "gradient",
                                              "--out", t / "out"], 2, ("nan",)),
    Case("saliency/inputs-inf", lambda a, t: ["saliency", "--checkpoint", a / "good.pt",
                                              "--inputs", a / "inf.npy", "--methods", "gradient",
                                              "--out", t / "out"], 2, ("inf",)),
    Case("saliency/inputs-wrong-rank", lambda a, t: ["saliency", "--checkpoint", a / "good.pt",
                                                     "--inputs", a / "rank2.npy", "--methods",
                                                     "gradient", "--out", t / "out"], 2, ("rank2",)),
    Case("saliency/unreadable-image", lambda a, t: ["saliency", "--checkpoint", a / "good.pt",
                                                    "--images", a / "imgs" / "broken.png",
                                                    "--methods", "gradient", "--out", t / "out"],
         1, ("broken.png",)),
    Case("saliency/empty-image-folder", lambda a, t: ["saliency", "--checkpoint", a / "good.pt",
                                                      "--images", a / "empty", "--methods",
                                                      "gradient", "--out", t / "out"],
         2, ("empty",)),
    Case("tcav/unknown-concept", _with_good("tcav", lambda a, t: ["--concept", "bleu-c"]), 2,
         ("bleu-c",)),
    Case("tcav/unknown-target", _with_good("tcav", lambda a, t: ["--target", "circel"]), 2,
         ("circel",)),
    # numerical
    Case("evaluate-entanglement/model-outputs-nan",
         lambda a, t: COMMANDS["evaluate-entanglement"](a, t) + ["--checkpoint", a / "nan.pt"],
         1, ("nan",)),
    Case("saliency/model-outputs-nan",
         lambda a, t: COMMANDS["saliency"](a, t) + ["--checkpoint", a / "nan.pt"], 1, ("nan",)),
    # output
    Case("evaluate-entanglement/out-is-a-file", _with_good("evaluate-entanglement", lambda a, t: []),
         2, ("existing file",), setup=_file_at("out")),
    Case("saliency/out-is-a-file", _with_good("saliency", lambda a, t: []), 2, ("existing file",),
         setup=_file_at("out")),
    Case("dissect/out-is-a-file", _with_good("dissect", lambda a, t: []), 2, ("existing file",),
         setup=_file_at("out")),
    Case("tcav/out-is-a-file", _with_good("tcav", lambda a, t: []), 2, ("existing file",),
         setup=_file_at("out")),
    Case("report/out-is-a-file", lambda a, t: ["report", a / "empty", "--out", t / "out"], 2,
         ("existing file",), setup=_file_at("out")),
    Case("train-gated/out-is-a-file", lambda a, t: ["train-gated", "--backbone", "smallcnn",
                                                    "--dataset", WORLD, "--out", t / "out"],
         2, ("existing file",), setup=_file_at("out")),
    Case("train-gated/negative-epochs", lambda a, t: ["train-gated", "--backbone", "smallcnn",
                                                      "--dataset", WORLD, "--epochs", "-1",
                                                      "--out", t / "out"], 2, ("--epochs",)),
    Case("train-gated/method-typo", lambda a, t: ["train-gated", "--backbone", "smallcnn",
                                                  "--dataset", WORLD, "--method", "picnnn",
                                                  "--out", t / "out"], 2, ("picnnn",)),
    Case("train-gated/dataset-missing-root", lambda a, t: ["train-gated", "--backbone", "smallcnn",
                                                           "--dataset", f"cifar10:{t / 'nope'}",
                                                           "--out", t / "out"], 1, ("cifar",)),
    Case("evaluate-entanglement/bad-bound", _with_good("evaluate-entanglement",
                                                       lambda a, t: ["--fail-under", "MISS=0.1"]),
         2, ("MISS",)),
    Case("dissect/cache-dir-is-a-file", _with_good("dissect", lambda a, t: ["--cache-dir",
                                                                            t / "cachefile"]),
         1, ("cache",), setup=_file_at("cachefile")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, assets, tmp_path):
    if case.setup:
        case.setup(tmp_path)
    PWNED.unlink(missing_ok=True)
    before, before_assets = snapshot(tmp_path), snapshot(assets)
    r = run_inproc(*case.args(assets, tmp_path),
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert_one_line_error(r, case.code, *case.words)
    # zero-byte *.lock files of the cache's advisory locks are the one thing that may stay
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".lock")}
    assert after == before, "a failed command left files behind"
    assert snapshot(assets) == before_assets
    assert not PWNED.exists(), "pickled code was executed"


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("command", ["saliency", "evaluate-entanglement"])
def test_disk_full_is_one_line_and_leaves_no_partial_file(assets, tmp_path, command):
    """A file-size limit of 2 KiB makes every larger write fail as on a full disk (EFBIG)."""
    out = tmp_path / "out"
    extra = ["--no-cache"] if command == "saliency" else []
    r = run_cli(*COMMANDS[command](assets, tmp_path), "--checkpoint", assets / "good.pt", *extra,
                env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
                preexec_fn=_limit_file_size(2048))
    assert_one_line_error(r, 1, "file size limit")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and ".cnnexplain-tmp-" in p.name]
    assert not leftovers, leftovers
    results = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".h5", ".png")]
    assert not results, results  # no result file, complete or partial
    # the next run, with room to write, neither crashes nor reuses a half-written entry
    r = run_cli(*COMMANDS[command](assets, tmp_path), "--checkpoint", assets / "good.pt", *extra,
                "--quiet", env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
