"""The reliability issue: datasets whose symlinks lead out of their root, decompression bombs,
non-finite normalization, empty class folders, unwritable output directories, two commands on
one run directory, a killed export, and the file modes of results.

Every case runs through the real CLI entry point (``tests/clihelp.py``): a refusal is exactly
one line on stderr with the documented exit code (2 usage, 1 runtime), no traceback, no warning,
and no new or modified file under the test's directory (``--out``, the cache, the inputs)."""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from clihelp import assert_one_line_error, run_cli, run_inproc, snapshot

WORLD = "synthetic:n=24,ntest=12,res=32"
TRAIN = ["train-gated", "--backbone", "smallcnn", "--epochs", "1", "--batch-size", "4",
         "--quiet"]


def _files(tmp: Path) -> dict:
    """Every file under ``tmp`` but the cache's zero-byte advisory ``*.lock`` files."""
    return {k: v for k, v in snapshot(tmp).items() if not k.endswith(".lock")}


def _refused(tmp: Path, args: list, code: int, *words: str, env: dict | None = None):
    """Run ``cnnexplain ARGS`` in-process; it must refuse in one line and leave no file."""
    before = _files(tmp)
    r = run_inproc(*args, env={"CNNEXPLAIN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
                               **(env or {})})
    assert_one_line_error(r, code, *words)
    assert "warning" not in r.err.lower(), r.err
    assert _files(tmp) == before, "a refused command left files behind"
    return r


def _ok(tmp: Path, args: list, env: dict | None = None):
    r = run_inproc(*args, env={"CNNEXPLAIN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
                               **(env or {})})
    assert r.code == 0, (r.code, r.err)
    assert "Traceback" not in r.err and "warning" not in r.err.lower(), r.err
    return r


def _save(path: Path, side: int = 32, value: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)
    return path


def _bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of ``width`` x ``height`` written row by row (a few hundred
    kB on disk however large it claims to be; PIL would need width x height bytes to decode)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    row = b"\x00" + bytes((width + 7) // 8)
    comp = zlib.compressobj(9)
    body, block = [], 256
    for start in range(0, height, block):
        body.append(comp.compress(row * min(block, height - start)))
    body.append(comp.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


def _imagefolder(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            _save(root / c / f"{i}.png", value=40 * k + i)
    return root


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    """A 6-image Broden export (read-only: copy it with :func:`_copy` before changing it)."""
    from cnnexplain.data.broden import export_broden
    from cnnexplain.data.synthetic import WorldConfig

    root = tmp_path_factory.mktemp("broden") / "world"
    export_broden(WorldConfig(num_images=6, resolution=32), root)
    return root


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "world"
    shutil.copytree(src, dst)
    return dst


def _link_out(file: Path, tmp: Path) -> Path:
    """Move ``file`` out of the dataset (to tmp/outside/) and leave a symlink to it."""
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    target = outside / file.name
    shutil.move(file, target)
    file.symlink_to(target)
    return target


def _index_rows(root: Path) -> list[list[str]]:
    with open(root / "index.csv", newline="") as fh:
        return list(csv.reader(fh))


# ---------------------------------------------------------------------------------------------
# 1. Symlinks must not lead out of a dataset's root
# ---------------------------------------------------------------------------------------------


def test_symlinked_broden_image_is_refused(broden, tmp_path):
    root = _copy(broden, tmp_path)
    image = root / "images" / _index_rows(root)[1][0]
    _link_out(image, tmp_path)
    _refused(tmp_path, ["dissect", "--backbone", "smallcnn", "--broden", root,
                        "--out", tmp_path / "out"], 1,
             image.name, "outside the dataset root", str(root), "--follow-symlinks")


def test_symlinked_broden_mask_is_refused(broden, tmp_path):
    root = _copy(broden, tmp_path)
    header, first = _index_rows(root)[:2]
    mask = root / "images" / first[header.index("object")].split(";")[0]
    _link_out(mask, tmp_path)
    _refused(tmp_path, ["data", "inspect", root], 1,
             mask.name, "Broden object mask", "outside the dataset root", "--follow-symlinks")


def test_broden_index_row_through_a_link_to_etc_is_refused(broden, tmp_path):
    root = _copy(broden, tmp_path)
    (root / "images" / "etc_link").symlink_to("/etc")
    rows = _index_rows(root)
    rows[1][0] = "etc_link/passwd"
    with open(root / "index.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    r = _refused(tmp_path, ["data", "inspect", root], 1,
                 "etc_link/passwd", "/etc/passwd", "outside the dataset root",
                 "--follow-symlinks")
    assert "root:" not in r.out  # nothing of /etc/passwd was shown


def _linked_class_folder(tmp: Path) -> Path:
    root = _imagefolder(tmp / "imgs", classes=("a",))
    outside = _imagefolder(tmp / "elsewhere", classes=("b",))
    (root / "b").symlink_to(outside / "b", target_is_directory=True)
    return root


def test_imagefolder_class_folder_linked_outside_is_refused(tmp_path):
    root = _linked_class_folder(tmp_path)
    _refused(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "out"],
             1, "class folder", str(root / "b"), "outside the dataset root", "--follow-symlinks")


def test_imagefolder_class_folder_linked_outside_with_follow_symlinks(tmp_path):
    root = _linked_class_folder(tmp_path)
    out = tmp_path / "out"
    _ok(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", out,
                   "--follow-symlinks"])
    entry = json.loads((out / "run.json").read_text())["commands"]["train-gated"]
    assert entry["options"]["follow_symlinks"] is True  # options are recorded
    assert entry["options"]["max_image_pixels"] == 89_478_485
    assert entry["summary"]["layer"]


def test_concept_folder_linked_outside_is_refused(tmp_path):
    """TCAV concept folders are confined to the concept root as well (library level)."""
    from cnnexplain.data.datasets import concept_images, list_concept_folders
    from cnnexplain.data.files import FilePolicy
    from cnnexplain.errors import CnnexplainError

    root = _imagefolder(tmp_path / "concepts", classes=("striped", "random_0"))
    other = _imagefolder(tmp_path / "elsewhere", classes=("dotted",))
    (root / "dotted").symlink_to(other / "dotted", target_is_directory=True)
    with pytest.raises(CnnexplainError, match="concept folder .*dotted.*outside the dataset"):
        list_concept_folders(root)
    (root / "dotted").unlink()
    _link_out(root / "striped" / "0.png", tmp_path)
    with pytest.raises(CnnexplainError, match="0.png resolves to .*outside the dataset root"):
        concept_images(root, "striped")
    follow = FilePolicy(follow_symlinks=True)
    assert len(concept_images(root, "striped", files=follow)) == 4


def test_a_link_inside_the_root_and_a_linked_root_are_fine(tmp_path):
    """Only links that lead out of the root are refused: a link to a sibling file inside the
    dataset, and a dataset root that is itself a link, read as before."""
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.data.preprocessing import Preprocessing

    real = _imagefolder(tmp_path / "real")
    (real / "a" / "copy.png").symlink_to(real / "b" / "0.png")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    ds = open_dataset(f"imagefolder:{tmp_path / 'alias'}", "train", Preprocessing(),
                      val_fraction=0.2)
    assert len(ds) + 2 == 9 and ds[0]["image"].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# 2. Decompression bombs
# ---------------------------------------------------------------------------------------------


def test_the_default_limit_is_pils_warning_threshold():
    from cnnexplain.config.common import FileOptions
    from cnnexplain.data.files import FilePolicy

    assert FileOptions().max_image_pixels == FilePolicy().max_pixels == 1024 * 1024 * 1024 // 4 // 3
    assert FileOptions().follow_symlinks is FilePolicy().follow_symlinks is False


def test_a_10000_square_bilevel_png_is_refused_by_train_gated(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    big = _bilevel_png(root / "a" / "big.png", 10_000, 10_000)
    _refused(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "out"],
             1, str(big), "10000x10000", "100000000 pixels", "--max-image-pixels")


def test_a_30000_square_png_is_refused_by_data_inspect(tmp_path):
    root = _imagefolder(tmp_path / "imgs", classes=("a",))
    big = _bilevel_png(root / "a" / "big.png", 30_000, 30_000)
    _refused(tmp_path, ["data", "inspect", root], 1, str(big), "30000x30000",
             "900000000 pixels", "--max-image-pixels 900000000")


def test_raising_max_image_pixels_lets_a_large_image_through(tmp_path):
    root = _imagefolder(tmp_path / "imgs", classes=("a",))
    _bilevel_png(root / "a" / "big.png", 30_000, 30_000)
    r = _ok(tmp_path, ["data", "inspect", root, "--json", "--max-image-pixels", "900000000"])
    sizes = {row["name"]: row["count"] for row in json.loads(r.out) if row["group"] == "size"}
    assert sizes == {"30000x30000 1": 1, "32x32 RGB": 4}


def test_lowering_max_image_pixels_refuses_ordinary_images(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    _refused(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "out",
                        "--max-image-pixels", "1000"], 1, "32x32 = 1024 pixels",
             "--max-image-pixels 1024")
    _refused(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "out",
                        "--max-image-pixels", "0"], 2, "--max-image-pixels", "at least 1")


def test_open_image_decodes_within_the_option_and_restores_pils_limit(tmp_path, monkeypatch):
    """With PIL's global threshold made tiny, an image over twice it (PIL would raise
    DecompressionBombError) decodes without a warning when the option allows it, and PIL's
    global is restored afterwards, also after a refusal."""
    from PIL import Image

    from cnnexplain.data.files import FilePolicy, open_image
    from cnnexplain.errors import CnnexplainError

    path = _save(tmp_path / "x.png", side=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_image(path, FilePolicy(max_pixels=64 * 64)) as im:
            assert np.asarray(im.convert("RGB")).shape == (64, 64, 3)
        assert Image.MAX_IMAGE_PIXELS == 1000
        with pytest.raises(CnnexplainError, match="64x64 = 4096 pixels"):
            with open_image(path, FilePolicy(max_pixels=4095)):
                pass
        assert Image.MAX_IMAGE_PIXELS == 1000


def test_broden_checks_the_index_sizes_against_the_limit(broden):
    from cnnexplain.data.broden import BrodenDataset
    from cnnexplain.data.files import FilePolicy
    from cnnexplain.errors import CnnexplainError

    with pytest.raises(CnnexplainError, match="Broden image .* 32x32 = 1024 pixels"):
        BrodenDataset(broden, files=FilePolicy(max_pixels=1000))
    ds = BrodenDataset(broden, files=FilePolicy(max_pixels=1024))
    assert len(ds) == 6 and ds[0]["masks"].shape[-2:] == (16, 16)


# ---------------------------------------------------------------------------------------------
# 4. / 5. Empty class folders and non-finite normalization
# ---------------------------------------------------------------------------------------------


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = _imagefolder(tmp_path / "imgs")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    _refused(tmp_path, [*TRAIN, "--dataset", f"imagefolder:{root}", "--out", tmp_path / "out"],
             1, f"class folder {root / 'c'} holds no images", "add images to it or remove it")


def test_std_nan_fails_up_front(tmp_path):
    _refused(tmp_path, [*TRAIN, "--dataset", WORLD, "--out", tmp_path / "out", "--std",
                        "nan,1,1"], 2, "--std", "finite")


# ---------------------------------------------------------------------------------------------
# 6. The default --out in a read-only working directory
# ---------------------------------------------------------------------------------------------

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _without_root_override():
    """preexec_fn: as root, drop the capabilities that ignore file permissions from the
    bounding set, so that the exec'ed interpreter is refused writes like any user (a 0o555
    directory is writable for root otherwise, and os.access says so)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_default_out_in_a_read_only_working_directory_fails_before_training(tmp_path):
    cwd = tmp_path / "ro"
    cwd.mkdir()
    cwd.chmod(0o555)
    try:
        # writing there really fails for the child (as root too, see _without_root_override)
        probe = subprocess.run([sys.executable, "-c", "open('probe', 'w')"], cwd=cwd,
                               preexec_fn=_without_root_override, capture_output=True, text=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
        before = _files(tmp_path)
        start = time.time()
        r = run_cli("train-gated", "--backbone", "smallcnn", "--dataset", WORLD, "--epochs", "50",
                    cwd=cwd, preexec_fn=_without_root_override,
                    env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
        assert_one_line_error(r, 1, "runs/train-gated", "not writable", str(cwd), "--out")
        assert time.time() - start < 120  # 50 epochs were not trained first
        assert _files(tmp_path) == before and not any(cwd.iterdir())
    finally:
        cwd.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Concurrency, kill -9, file modes
# ---------------------------------------------------------------------------------------------


def _cli(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cnnexplain", *map(str, args)], cwd=cwd,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}: {proc.communicate()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_command_on_a_held_out_fails_at_once(tmp_path):
    from cnnexplain.runs import OutLock

    import torch  # noqa: F401  (imported before the race, so that the second run is quick)

    args = ["train-gated", "--backbone", "smallcnn", "--dataset", "synthetic:n=48,res=32",
            "--batch-size", "16", "--epochs", "3", "--quiet"]
    out = tmp_path / "o"
    env = {"CNNEXPLAIN_CACHE": str(tmp_path / "cache")}
    first = _cli(*args, "--out", "o", cwd=tmp_path, env=env)
    try:
        lock = OutLock(out, "").path
        _wait_for(lock.exists, proc=first)
        second = run_inproc(*args, "--out", out, env={**env, "OMP_NUM_THREADS": "1"})
        assert first.poll() is None, "the first run ended before the second was refused"
        assert_one_line_error(second, 1, "in use by another cnnexplain command",
                              f"pid {first.pid}", "train-gated")
        stdout, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not lock.exists()
    third = run_inproc(*args, "--epochs", "1", "--overwrite", "--out", out,
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert third.code == 0, third.err
    entry = json.loads((out / "run.json").read_text())["commands"]["train-gated"]
    assert entry["options"]["epochs"] == 1


@pytest.mark.slow
def test_a_killed_broden_export_is_cleaned_up_by_the_next_run(tmp_path):
    from cnnexplain.data.broden import BrodenDataset

    args = ["data", "synth", "--format", "broden", "--num-images", "400", "--quiet",
            "--out", tmp_path / "b"]
    proc = _cli(*args, cwd=tmp_path)
    pattern = f".cnnexplain-tmp-b-{proc.pid}-*"

    def writing() -> bool:
        return any(len(list((d / "images" / "synthetic").glob("*.png"))) > 5
                   for d in tmp_path.glob(pattern) if (d / "images" / "synthetic").is_dir())

    try:
        _wait_for(writing, proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    staged = list(tmp_path.glob(pattern))
    assert len(staged) == 1 and staged[0].is_dir()
    assert not (tmp_path / "b").exists()  # nothing that looks complete
    r = run_cli(*args, cwd=tmp_path)
    assert r.code == 0, r.err
    assert not list(tmp_path.glob(".cnnexplain-tmp-*")), list(tmp_path.iterdir())
    ds = BrodenDataset(tmp_path / "b")
    assert len(ds) == 400 and (tmp_path / "b" / "synthetic.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_results_take_the_mode_the_umask_gives(tmp_path, mask):
    out = tmp_path / "out"
    old = os.umask(mask)
    try:
        r = run_inproc(*TRAIN, "--dataset", WORLD, "--out", out,
                       env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    finally:
        os.umask(old)
    assert r.code == 0, r.err
    want = 0o666 & ~mask
    for name in ("run.json", "checkpoint.pt", "train_log.csv"):
        assert (out / name).stat().st_mode & 0o777 == want, (name, oct(want))
