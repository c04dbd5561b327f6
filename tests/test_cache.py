"""The HDF5 cache: keys, plain-HDF5 files, hits and misses, corrupt and partial files, locks,
streaming writes, housekeeping, unwritable directories and two processes at once."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cnnexplain.cache import layout as cache_layout
from cnnexplain.cache import locks as cache_locks
from cnnexplain.cache.layout import FORMAT_VERSIONS, STORAGE
from cnnexplain.cache.store import Cache
from cnnexplain.errors import CnnexplainError

WORKER = Path(__file__).with_name("cache_worker.py")
W = np.arange(12, dtype=np.float32).reshape(3, 4)
PARTS = {"model": "m1", "layer": "layer4"}


class Compute:
    """A compute() for get_or_compute that counts its calls."""

    def __init__(self, arrays=None):
        self.calls = 0
        self.arrays = arrays if arrays is not None else {"W": W}

    def __call__(self):
        self.calls += 1
        return self.arrays, {"note": "gate of a test"}


def one_line_error(exc_info, *words):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for w in words:
        assert w in text, text


def held_elsewhere(lock_path: Path) -> int:
    """Hold ``lock_path`` through a separate open file, as another process would."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def lock_of(cache: Cache, kind: str, key: str) -> Path:
    path = cache.path(kind, key)
    return path.with_name(path.name + ".lock")


# ------------------------------------------------------------------------------------------
# keys and files
# ------------------------------------------------------------------------------------------

def test_key_is_a_digest_of_kind_version_and_every_part(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "a")
    k = cache.key("gate", model="m", layer="l4", n=3)
    assert re.fullmatch(r"[0-9a-f]{20}", k)
    assert k == cache.key("gate", n=3, layer="l4", model="m")  # order of parts is irrelevant
    assert k == Cache(tmp_path / "b").key("gate", model="m", layer="l4", n=3)  # so is the root
    variants = {k, cache.key("gate", model="m2", layer="l4", n=3),
                cache.key("gate", model="m", layer="l3", n=3),
                cache.key("gate", model="m", layer="l4", n=4),
                cache.key("cav", model="m", layer="l4", n=3),
                cache.key("gate", model="m", layer="l4")}
    assert len(variants) == 6
    assert cache.key("gate", layers=("a", "b")) == cache.key("gate", layers=["a", "b"])
    assert cache.key("gate", kind="x") != cache.key("gate", kind="y")  # "kind" is a usable part
    monkeypatch.setitem(FORMAT_VERSIONS, "gate", FORMAT_VERSIONS["gate"] + 1)
    assert cache.key("gate", model="m", layer="l4", n=3) != k
    with pytest.raises(ValueError, match="unknown cache kind 'gates'.*did you mean 'gate'"):
        cache.key("gates", model="m")
    with pytest.raises(TypeError, match="JSON-able"):
        cache.key("gate", model=object())
    assert cache.path("gate", k) == (tmp_path / "a" / "gate" / k[:2] / f"{k}.h5").absolute()
    with pytest.raises(ValueError, match="not a cache key"):
        cache.path("gate", "../../etc")


def test_entries_written_gzip_compressed_by_earlier_versions_still_load(monkeypatch, tmp_path):
    """Earlier versions gzip-compressed every dataset; such entries stay valid hits, while new
    entries are written uncompressed (with their checksums)."""
    cache = Cache(tmp_path)
    key = cache.key("features", model="m")
    acts = np.random.default_rng(0).random((40, 8, 4, 4)).astype(np.float32)
    with monkeypatch.context() as m:
        m.setitem(cache_layout.STORAGE, "filters",
                  {"compression": "gzip", "compression_opts": 1, "shuffle": True})
        path = cache.save("features", key, {"acts": acts})
    with h5py.File(path, "r") as f:
        assert f["acts"].compression == "gzip"
    np.testing.assert_array_equal(Cache(tmp_path).load("features", key)["acts"], acts)
    key2 = cache.key("features", model="n")
    path2 = cache.save("features", key2, {"acts": acts})
    with h5py.File(path2, "r") as f:
        assert f["acts"].compression is None and f["acts"].fletcher32


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNEXPLAIN_CACHE", str(tmp_path / "env"))
    assert Cache().root == tmp_path / "env"
    monkeypatch.delenv("CNNEXPLAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Cache.default_root() == tmp_path / "xdg" / "cnnexplain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert Cache.default_root() == Path.home() / ".cache" / "cnnexplain"


def test_entries_are_plain_hdf5_with_descriptive_attributes(tmp_path):
    cache = Cache(tmp_path)
    parts = {"model": "abc", "layer": "layer4", "concepts": ["dog", "cat"]}
    key = cache.key("dissection", **parts)
    iou = np.random.default_rng(0).random((5, 3))
    path = cache.save("dissection", key,
                      {"iou": iou, "names": np.array(["sky", "grass", "dog"]),
                       "threshold": np.float32(2.5)},
                      attrs={"layer": "layer4", "classes": ["x", "y"], "quantile": 0.005,
                             "note": None},
                      dataset_attrs={"iou": {"description": "IoU per unit and concept",
                                             "shape": "K x C", "units": "ratio"}})
    with h5py.File(path, "r") as f:
        assert f.attrs["cnnexplain_kind"] == "dissection"
        assert f.attrs["format_version"] == FORMAT_VERSIONS["dissection"]
        assert f.attrs["key"] == key and f.attrs["complete"] == 1
        assert json.loads(f.attrs["parts_json"]) == parts
        assert f.attrs["layer"] == "layer4" and json.loads(f.attrs["classes"]) == ["x", "y"]
        ds = f["iou"]
        assert ds.compression == STORAGE["filters"].get("compression")
        assert ds.fletcher32 and ds.chunks is not None
        assert ds.attrs["shape"] == "K x C" and ds.attrs["rows"] == 5
        np.testing.assert_array_equal(ds[()], iou)
    entry = cache.load("dissection", key)
    assert sorted(entry.names) == ["iou", "names", "threshold"]
    assert entry.parts == parts
    assert entry.attrs["classes"] == ["x", "y"] and entry.attrs["note"] is None
    assert entry.attrs["quantile"] == 0.005
    np.testing.assert_array_equal(entry["iou"], iou)
    assert entry["names"].tolist() == ["sky", "grass", "dog"]
    assert entry["threshold"] == np.float32(2.5)
    lazy = entry.dataset("iou")
    assert lazy.shape == (5, 3) and lazy.attrs["units"] == "ratio"
    np.testing.assert_array_equal(lazy[1:3], iou[1:3])
    np.testing.assert_array_equal(lazy.take([4, 0, 4]), iou[[4, 0, 4]])
    with entry.open() as f:
        assert f["iou"].shape == (5, 3)
    with pytest.raises(KeyError, match="no dataset 'iuo'"):
        entry.dataset("iuo")
    with pytest.raises(ValueError, match="reserved"):
        cache.save("dissection", key, {"iou": iou}, attrs={"complete": 0})


# ------------------------------------------------------------------------------------------
# hits, misses, float16, --no-cache
# ------------------------------------------------------------------------------------------

def test_get_or_compute_hits_after_the_first_call(tmp_path, monkeypatch):
    compute = Compute()
    entry, hit = Cache(tmp_path).get_or_compute("gate", PARTS, compute)
    assert (hit, compute.calls) == (False, 1)
    np.testing.assert_array_equal(entry["W"], W)
    again, hit = Cache(tmp_path).get_or_compute("gate", PARTS, compute)
    assert (hit, compute.calls) == (True, 1) and again.path == entry.path
    _, hit = Cache(tmp_path).get_or_compute("gate", {**PARTS, "model": "m2"}, compute)
    assert (hit, compute.calls) == (False, 2)
    monkeypatch.setitem(FORMAT_VERSIONS, "gate", FORMAT_VERSIONS["gate"] + 1)
    _, hit = Cache(tmp_path).get_or_compute("gate", PARTS, compute)
    assert (hit, compute.calls) == (False, 3), "a new code format version is a miss"


def test_float16_storage_is_part_of_the_key(tmp_path):
    cache = Cache(tmp_path)
    half, _ = cache.get_or_compute("gate", PARTS, Compute({"W": W / 7, "idx": np.arange(3)}),
                                   float16=True)
    full, _ = cache.get_or_compute("gate", PARTS, Compute({"W": W / 7, "idx": np.arange(3)}))
    assert half.key != full.key
    assert half["W"].dtype == np.float16 and full["W"].dtype == np.float32
    assert half["idx"].dtype == np.int64
    np.testing.assert_allclose(half["W"].astype(np.float32), W / 7, rtol=1e-3)
    with pytest.raises(CnnexplainError) as err:
        cache.get_or_compute("gate", {"model": "big"}, Compute({"W": W * 1e5}), float16=True)
    one_line_error(err, "float16 range", "`float16`")
    assert not list(tmp_path.rglob(".cnnexplain-tmp-*"))
    assert len(list(tmp_path.rglob("*.h5"))) == 2


def test_disabled_cache_never_hits_and_writes_nothing_under_its_root(tmp_path):
    cache = Cache(tmp_path / "c", enabled=False)
    compute = Compute()
    first, hit1 = cache.get_or_compute("gate", PARTS, compute)
    second, hit2 = cache.get_or_compute("gate", PARTS, compute)
    assert (hit1, hit2, compute.calls) == (False, False, 2)
    assert cache.load("gate", first.key) is None
    np.testing.assert_array_equal(second["W"], W)
    assert not (tmp_path / "c").exists()
    scratch = first.path.parents[2]
    del cache, first, second
    gc.collect()
    assert not scratch.exists()


def test_a_hit_takes_no_lock_so_read_only_caches_work(tmp_path):
    cache = Cache(tmp_path)
    entry, _ = cache.get_or_compute("gate", PARTS, Compute())
    lock = lock_of(cache, "gate", entry.key)
    lock.unlink()
    _, hit = Cache(tmp_path).get_or_compute("gate", PARTS, Compute())
    assert hit and not lock.exists()


# ------------------------------------------------------------------------------------------
# corrupt, truncated, foreign and stale files
# ------------------------------------------------------------------------------------------

def _damage(how: str, path: Path, cache: Cache) -> None:
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(3000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "a directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("x")
    elif how == "another entry":
        other, _ = cache.get_or_compute("gate", {"model": "other"}, Compute())
        os.replace(other.path, path)
    elif how == "unfinished write":  # every row written, killed before commit, then moved
        w = cache.writer("gate", path.stem, {"W": ((4,), "float32")}, total_rows=3, attrs={})
        w.append({"W": W})
        w.close()
        os.replace(w.partial, path)


@pytest.mark.parametrize("how", ["truncated", "random bytes", "empty", "a directory",
                                 "another entry", "unfinished write"])
def test_a_bad_file_at_an_entry_path_is_reported_removed_and_rebuilt(tmp_path, how):
    notes = []
    cache = Cache(tmp_path, warn=notes.append)
    entry, _ = cache.get_or_compute("gate", PARTS, Compute())
    _damage(how, entry.path, cache)
    assert cache.load("gate", entry.key) is None
    assert len(notes) == 1, notes
    assert "corrupt" in notes[0] and str(entry.path) in notes[0] and "\n" not in notes[0]
    assert not entry.path.exists()
    compute = Compute()
    rebuilt, hit = cache.get_or_compute("gate", PARTS, compute)
    assert (hit, compute.calls) == (False, 1)
    np.testing.assert_array_equal(rebuilt["W"], W)
    assert cache.load("gate", entry.key) is not None and len(notes) == 1


def test_a_flipped_byte_in_the_data_is_caught_by_the_checksum(tmp_path):
    notes = []
    cache = Cache(tmp_path, warn=notes.append)
    entry, _ = cache.get_or_compute("gate", PARTS, Compute({"W": np.ones((64, 64), np.float32)}))
    with h5py.File(entry.path, "r") as f:
        info = f["W"].id.get_chunk_info(0)
    with open(entry.path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    loaded = Cache(tmp_path).load("gate", entry.key)  # metadata is intact: looks valid
    with pytest.raises(CnnexplainError) as err:
        loaded["W"]
    one_line_error(err, "is corrupt", "re-run")
    assert not entry.path.exists()
    compute = Compute()
    _, hit = cache.get_or_compute("gate", PARTS, compute)
    assert not hit and compute.calls == 1


def test_stale_temporary_files_are_ignored_and_swept(tmp_path):
    cache = Cache(tmp_path)
    key = cache.key("gate", **PARTS)
    d = cache.path("gate", key).parent
    d.mkdir(parents=True)
    old, fresh = d / ".cnnexplain-tmp-old.h5", d / ".cnnexplain-tmp-new.h5"
    old.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    entry, hit = cache.get_or_compute("gate", PARTS, Compute())
    assert not hit and not old.exists() and fresh.exists()
    assert [e["key"] for e in cache.info()] == [entry.key]


# ------------------------------------------------------------------------------------------
# locks
# ------------------------------------------------------------------------------------------

def test_lock_times_out_in_one_line_and_is_reentrant(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_locks, "WAIT_NOTICE_S", 0.05)
    cache = Cache(tmp_path, lock_timeout=0.3)
    key = cache.key("gate", **PARTS)
    fd = held_elsewhere(lock_of(cache, "gate", key))
    try:
        start = time.monotonic()
        with pytest.raises(CnnexplainError) as err:
            with cache.lock("gate", key, timeout=0.2):
                pass
        assert time.monotonic() - start < 5
        one_line_error(err, "timed out", "waiting for the lock", "`cache_dir`")
        compute = Compute()
        with pytest.raises(CnnexplainError, match="timed out"):
            cache.get_or_compute("gate", PARTS, compute)
        assert compute.calls == 0
        assert any("waiting for another cnnexplain process" in n for n in cache.notices)
    finally:
        os.close(fd)
    with cache.lock("gate", key, timeout=1):
        with cache.lock("gate", key, timeout=1):  # same process: re-entrant, no deadlock
            assert not is_free(lock_of(cache, "gate", key))
        assert not is_free(lock_of(cache, "gate", key))
    assert is_free(lock_of(cache, "gate", key))


def test_lock_excludes_other_threads(tmp_path):
    cache = Cache(tmp_path)
    key = cache.key("gate", **PARTS)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with cache.lock("gate", key):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        inside.wait(10)
        with pytest.raises(CnnexplainError, match="timed out"):
            with cache.lock("gate", key, timeout=0.1):
                pass
    finally:
        release.set()
        t.join()
    with cache.lock("gate", key, timeout=1):
        pass


# ------------------------------------------------------------------------------------------
# streaming writes
# ------------------------------------------------------------------------------------------

COLUMNS = {"x": ((2,), "float32"), "y": ((), "int64")}


def rows(lo, hi):
    return {"x": np.arange(lo * 2, hi * 2, dtype=np.float32).reshape(-1, 2),
            "y": np.arange(lo, hi, dtype=np.int64)}


def test_writer_streams_in_chunks_resumes_and_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_layout, "CHUNK_BYTES", 4 * 8)  # 4 rows per chunk
    cache = Cache(tmp_path)
    key = cache.key("features", name="stream")
    w = cache.writer("features", key, COLUMNS, total_rows=10, attrs={"note": "streamed"},
                     dataset_attrs={"x": {"shape": "N x 2"}})
    assert w.rows_done == 0 and w.block_rows == 4
    w.append(rows(0, 3))
    assert w.rows_done == 0  # buffered until a whole chunk is there
    w.append(rows(3, 6))
    assert w.rows_done == 4
    with pytest.raises(ValueError, match="column x"):
        w.append({"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match="commit"):
        w.commit()
    w.close()  # stopped half-way: rows 0-3 are kept, rows 4-5 were only buffered
    assert cache.load("features", key) is None and w.partial.exists()
    assert is_free(lock_of(cache, "features", key))
    assert cache.partial_columns("features", key) == {"x": ((2,), "float32"), "y": ((), "int64")}

    with cache.writer("features", key, COLUMNS, total_rows=10, attrs={"note": "streamed"}) as w2:
        assert w2.rows_done == 4
        assert not is_free(lock_of(cache, "features", key))
        w2.append(rows(4, 9))
        with pytest.raises(ValueError, match="exceeds total_rows"):
            w2.append(rows(9, 11))
        w2.append(rows(9, 10))
        entry = w2.commit()
    assert not w2.partial.exists() and is_free(lock_of(cache, "features", key))
    np.testing.assert_array_equal(entry["x"], rows(0, 10)["x"])
    np.testing.assert_array_equal(entry["y"], np.arange(10))
    assert entry.attrs["note"] == "streamed" and entry.dataset("x").attrs["shape"] == "N x 2"
    assert entry.dataset("x").chunks == (4, 2)
    assert [s for s, _ in entry.dataset("y").blocks(3)] == [0, 3, 6, 9]
    assert cache.load("features", key) is not None and cache.notices == []


@pytest.mark.parametrize("bad", ["garbage", "other total"])
def test_writer_discards_an_unusable_partial_with_a_notice(tmp_path, bad):
    cache = Cache(tmp_path)
    key = cache.key("features", name="stream")
    partial = cache.path("features", key).with_name(key + ".partial.h5")
    if bad == "garbage":
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    else:
        w = cache.writer("features", key, COLUMNS, total_rows=20, attrs={})
        w.append(rows(0, 20))
        w.close()
    w = cache.writer("features", key, COLUMNS, total_rows=10, attrs={})
    assert w.rows_done == 0
    assert len(cache.notices) == 1 and "discarding partial cache entry" in cache.notices[0]
    w.append(rows(0, 10))
    np.testing.assert_array_equal(w.commit()["y"], np.arange(10))


def test_writer_abort_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)
    key = cache.key("features", name="stream")
    w = cache.writer("features", key, COLUMNS, total_rows=10, attrs={})
    w.append(rows(0, 10))
    w.abort()
    assert not w.partial.exists() and cache.load("features", key) is None
    assert is_free(lock_of(cache, "features", key))


# ------------------------------------------------------------------------------------------
# housekeeping
# ------------------------------------------------------------------------------------------

def test_info_and_clear(tmp_path):
    cache = Cache(tmp_path)
    gate, _ = cache.get_or_compute("gate", PARTS, Compute())
    cav, _ = cache.get_or_compute("cav", {"concept": "striped"}, Compute())
    key = cache.key("features", name="stream")
    w = cache.writer("features", key, COLUMNS, total_rows=10, attrs={})
    w.append(rows(0, 4))
    w.close()
    bad = cache.path("gate", cache.key("gate", model="broken"))
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not hdf5")
    info = {e["key"]: e for e in cache.info()}
    assert {e["status"] for e in info.values()} == {"complete", "partial", "corrupt"}
    assert info[gate.key]["parts"] == PARTS
    assert info[gate.key]["datasets"] == {"W": {"shape": [3, 4], "dtype": "float32"}}
    assert info[gate.key]["attrs"] == {"note": "gate of a test"} and info[gate.key]["size"] > 0
    assert info[key]["status"] == "partial" and info[key]["total_rows"] == 10
    assert info[bad.stem]["problem"] == "not an HDF5 file"

    fd = held_elsewhere(lock_of(cache, "cav", cav.key))  # being rewritten by someone: kept
    try:
        assert cache.clear("gate") == 2
        assert not gate.path.exists() and cav.path.exists() and w.partial.exists()
        assert cache.clear() == 1
        assert cav.path.exists()
    finally:
        os.close(fd)
    assert cache.clear() == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------------------
# unwritable places
# ------------------------------------------------------------------------------------------

def unwritable_root(tmp_path: Path) -> Path:
    """A cache root that cannot be created: under a read-only directory, or -- where
    permission bits do not bind (running as root) -- under a regular file."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").touch()
    except PermissionError:
        return ro / "cache"
    (ro / "probe").unlink()
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    return blocker / "cache"


def test_unwritable_cache_dir_is_one_line_at_the_first_write(tmp_path):
    root = unwritable_root(tmp_path)
    try:
        cache = Cache(root)  # constructing and reading work
        assert cache.load("gate", cache.key("gate", **PARTS)) is None
        with pytest.raises(CnnexplainError) as err:
            cache.get_or_compute("gate", PARTS, Compute())
        one_line_error(err, "cache directory", "`cache_dir`", "CNNEXPLAIN_CACHE")
        with pytest.raises(CnnexplainError) as err:
            cache.writer("features", cache.key("features", n=1), COLUMNS, 3, {})
        one_line_error(err, "cache directory", "`cache_dir`")
    finally:
        (tmp_path / "read-only").chmod(0o700)


def test_a_file_at_the_cache_root_is_one_line(tmp_path):
    root = tmp_path / "cachefile"
    root.write_text("x")
    with pytest.raises(CnnexplainError) as err:
        Cache(root)
    one_line_error(err, str(root), "is a file", "`cache_dir`")
    Cache(root, enabled=False)  # --no-cache does not care


# ------------------------------------------------------------------------------------------
# two processes
# ------------------------------------------------------------------------------------------

def test_two_processes_get_or_compute_once(tmp_path):
    root, log, go = tmp_path / "cache", tmp_path / "log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "gate", str(root),
                               str(tmp_path / f"out{i}.npz"), "--log", str(log), "--delay", "0.5",
                               "--ready", str(tmp_path / f"ready{i}"), "--go", str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.02)
        go.touch()
        for p in procs:
            assert p.wait(120) == 0, p.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert log.read_text() == "computed\n"
    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    assert sorted(bool(o["hit"]) for o in outs) == [False, True]
    for o in outs:
        np.testing.assert_array_equal(o["W"], W)
