"""Real datasets on tiny files in their real on-disk formats, specs, exports and inspect."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (  # noqa: F401  (fixtures)
    _one_thread,
    broden_export,
    item_uint8,
    write_cifar10_binary,
    write_cifar10_python,
    write_cifar100_binary,
    write_cifar100_python,
    write_pickle,
    write_stl10,
)

from cnnexplain.data.datasets import (
    DATASET_KINDS,
    carve_val,
    concept_images,
    list_concept_folders,
    open_dataset,
)
from cnnexplain.data.export import (
    EXPORT_FORMATS,
    class_quotas,
    concept_present,
    export_concepts,
    export_imagefolder,
)
from cnnexplain.data.inspect import inspect_dataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import ONTOLOGY, SPLIT_OFFSETS, SyntheticDataset, WorldConfig, render
from cnnexplain.errors import CnnexplainError, UsageError


def one_line(exc_info) -> str:
    line = exc_info.value.line()
    assert "\n" not in line
    return line


def check_split(ds, x: np.ndarray, y: np.ndarray, rows) -> None:
    assert len(ds) == len(rows)
    for i, r in enumerate(rows):
        item = ds[i]
        assert np.array_equal(item_uint8(item), x[r])
        assert item["label"].item() == y[r] and item["index"].item() == i


# -- CIFAR / STL-10 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer, prefix",
    [
        (write_cifar10_python, "cifar10"),
        (write_cifar10_binary, "cifar10"),
        (write_cifar100_python, "cifar100"),
        (write_cifar100_binary, "cifar100"),
    ],
)
def test_cifar_formats(writer, prefix, tmp_path):
    data = writer(tmp_path)
    spec = f"{prefix}:{tmp_path}"
    n = len(data["train_y"])
    train_rows, val_rows = carve_val(n, seed=3, val_fraction=0.25)
    train = open_dataset(spec, "train", seed=3, val_fraction=0.25)
    val = open_dataset(spec, "val", seed=3, val_fraction=0.25)
    test = open_dataset(spec, "test")
    assert train.class_names == data["names"]
    check_split(train, data["train_x"], data["train_y"], train_rows)
    check_split(val, data["train_x"], data["train_y"], val_rows)
    check_split(test, data["test_x"], data["test_y"], range(len(data["test_y"])))
    assert set(train_rows).isdisjoint(val_rows) and len(train_rows) + len(val_rows) == n
    assert len(open_dataset(spec, "train", limit=2)) == 2
    assert (
        train.fingerprint() == open_dataset(spec, "train", seed=3, val_fraction=0.25).fingerprint()
    )
    assert train.fingerprint() != val.fingerprint()
    resized = open_dataset(spec, "test", preprocessing=Preprocessing(resize=16))
    assert resized[0]["image"].shape == (3, 16, 16)


def test_cifar_root_may_be_the_batches_folder(tmp_path):
    data = write_cifar10_python(tmp_path)
    ds = open_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "test")
    assert np.array_equal(item_uint8(ds[1]), data["test_x"][1])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_cifar_pickle_is_refused_not_run(tmp_path, protocol):
    write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(
        tmp_path / "cifar-10-batches-py" / "data_batch_3",
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]},
        protocol,
    )
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(f"cifar10:{tmp_path}", "train")
    line = one_line(exc)
    assert "refusing to unpickle" in line and "data_batch_3" in line and "system" in line
    assert not marker.exists()


def test_pickle_with_other_globals_refused(tmp_path):
    write_cifar10_python(tmp_path)
    bad = pickle.dumps({"label_names": [print]}, protocol=2)  # builtins.print
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(bad)
    with pytest.raises(CnnexplainError, match="refusing to unpickle .*it calls __builtin__.print"):
        open_dataset(f"cifar10:{tmp_path}", "test")


def test_stl10_binary(tmp_path):
    data = write_stl10(tmp_path)
    spec = f"stl10:{tmp_path}"
    train_rows, val_rows = carve_val(6, 0, 0.1)
    check_split(open_dataset(spec, "train"), data["train_x"], data["train_y"], train_rows)
    check_split(open_dataset(spec, "val"), data["train_x"], data["train_y"], val_rows)
    test = open_dataset(spec, "test")
    check_split(test, data["test_x"], data["test_y"], range(4))
    assert test.class_names[0] == "airplane" and test[0]["image"].shape == (3, 96, 96)


@pytest.mark.parametrize(
    "spec, words",
    [
        (
            "cifar10:{root}/nothing",
            [
                "CIFAR-10 not found",
                "does not exist",
                "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar.html",
            ],
        ),
        (
            "cifar10:{root}",
            [
                "CIFAR-10 not found in",
                "cifar-10-batches-py/data_batch_1 (python version)",
                "cifar-10-batches-bin/data_batch_1.bin (binary version)",
            ],
        ),
        (
            "cifar100:{root}",
            ["CIFAR-100 not found in", "cifar-100-python/train", "cifar-100-python.tar.gz"],
        ),
        (
            "stl10:{root}",
            ["STL-10 not found in", "stl10_binary/train_X.bin", "stl10_binary.tar.gz"],
        ),
        ("imagefolder:{root}/x", ["image folder not found", "does not exist"]),
    ],
)
def test_missing_dataset_says_what_and_how(spec, words, tmp_path):
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(spec.format(root=tmp_path), "train")
    line = one_line(exc)
    for w in words:
        assert w in line, line


def test_incomplete_cifar_names_the_file(tmp_path):
    write_cifar10_python(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(f"cifar10:{tmp_path}", "test")
    assert "expected" in one_line(exc) and "data_batch_4" in exc.value.line()


# -- image folders ----------------------------------------------------------------------------


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_imagefolder_flat_with_carved_val(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ["b_cat", "a_dog"]:
        for j in range(5):
            save(tmp_path / cls / f"{j}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    deep = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    save(tmp_path / "a_dog" / "nested" / "deep.png", deep)
    train = open_dataset(f"imagefolder:{tmp_path}", "train", seed=1, val_fraction=0.2)
    val = open_dataset(f"imagefolder:{tmp_path}", "val", seed=1, val_fraction=0.2)
    assert train.class_names == ["a_dog", "b_cat"]
    assert len(train) == 9 and len(val) == 2
    assert not set(train.files) & set(val.files)
    item = train[0]
    assert item["image"].shape == (3, 8, 8)
    assert np.array_equal(item_uint8(item).transpose(1, 2, 0), np.array(Image.open(train.files[0])))
    assert item["label"].item() == train.class_names.index(train.files[0].parent.name)
    with pytest.raises(CnnexplainError, match="has no test split"):
        open_dataset(f"imagefolder:{tmp_path}", "test")


def test_imagefolder_split_dirs_and_modes(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    save(tmp_path / "train" / "x" / "gray.png", gray, "L")
    save(tmp_path / "train" / "y" / "rgba.png", rgba, "RGBA")
    save(tmp_path / "val" / "y" / "v.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "test" / "x" / "t.png", np.zeros((8, 8, 3), np.uint8))
    train = open_dataset(f"imagefolder:{tmp_path}", "train")
    assert len(train) == 2 and train.class_names == ["x", "y"]
    g = item_uint8(train[0])
    assert np.array_equal(g, np.stack([gray] * 3))
    a = item_uint8(train[1])
    assert np.all(a[:, :4] == np.array([200, 0, 0])[:, None, None])
    assert np.all(a[:, 4:] == 255)  # transparent pixels composite onto white
    assert len(open_dataset(f"imagefolder:{tmp_path}", "val")) == 1
    assert open_dataset(f"imagefolder:{tmp_path}", "test")[0]["label"].item() == 0
    save(tmp_path / "val" / "z" / "w.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CnnexplainError, match="class folder .*z has no counterpart"):
        open_dataset(f"imagefolder:{tmp_path}", "val")


def test_imagefolder_mixed_sizes_and_bad_files(tmp_path):
    save(tmp_path / "a" / "small.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "a" / "wide.png", np.zeros((8, 12, 3), np.uint8))
    save(tmp_path / "b" / "ok.png", np.zeros((8, 8, 3), np.uint8))
    spec = f"imagefolder:{tmp_path}"
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(spec, "train", val_fraction=0.3)
    line = one_line(exc)
    assert (
        "mixed sizes" in line
        and "small.png is 8x8" in line
        and "wide.png is 8x12" in line
        and "`resize" in line
    )
    ds = open_dataset(spec, "train", preprocessing=Preprocessing(resize=6), val_fraction=0.3)
    assert all(ds[i]["image"].shape == (3, 6, 6) for i in range(len(ds)))
    (tmp_path / "a" / "wide.png").unlink()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(spec, "train", preprocessing=Preprocessing(resize=None), val_fraction=0.01)
    assert "cannot read image" in one_line(exc) and "broken.png" in exc.value.line()
    lazy = open_dataset(spec, "train", preprocessing=Preprocessing(resize=6), val_fraction=0.01)
    k = [p.name for p in lazy.files].index("broken.png")
    with pytest.raises(CnnexplainError, match="cannot read image .*broken.png"):
        lazy[k]


def test_imagefolder_empty(tmp_path):
    with pytest.raises(CnnexplainError) as exc:
        open_dataset(f"imagefolder:{tmp_path}", "train")
    assert "no class folders with images" in one_line(exc)
    save(tmp_path / "loose.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CnnexplainError, match="holds images directly"):
        open_dataset(f"imagefolder:{tmp_path}", "train")


# -- specs ------------------------------------------------------------------------------------


def test_spec_registry_and_errors(tmp_path, broden_export):
    assert set(DATASET_KINDS) == {
        "synthetic",
        "cifar10",
        "cifar100",
        "stl10",
        "imagefolder",
        "broden",
    }
    with pytest.raises(UsageError) as exc:
        open_dataset("cifar1O:/x")
    assert "unknown dataset 'cifar1O'" in one_line(exc) and "cifar10" in exc.value.line()
    with pytest.raises(UsageError, match="needs a root directory; write cifar10:ROOT"):
        open_dataset("cifar10")
    with pytest.raises(UsageError, match="unknown split 'tets'"):
        open_dataset("synthetic:n=10,res=16", "tets")
    with pytest.raises(UsageError, match="`categories` applies to Broden"):
        open_dataset("synthetic", categories=["object"])
    ds = open_dataset("synthetic:n=10,res=16", "val", limit=1)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 1 and ds.spec == "synthetic:n=10,res=16"
    assert len(open_dataset("synthetic")) == 2000
    _, root = broden_export
    b = open_dataset(f"broden:{root}", "all", categories=["object"], limit=4)
    assert b.layer_categories == ["object"] and len(b) == 4
    with pytest.raises(UsageError, match="unknown split 'test'"):
        open_dataset(f"broden:{root}", "test")


def test_carve_val_deterministic_and_disjoint():
    a = carve_val(100, 7, 0.1)
    b = carve_val(100, 7, 0.1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 100
    assert not np.array_equal(a[1], carve_val(100, 8, 0.1)[1])
    with pytest.raises(UsageError):
        carve_val(10, 0, 1.5)


# -- exports of the world ---------------------------------------------------------------------


def test_export_imagefolder_reads_back(tmp_path):
    cfg = WorldConfig(num_images=12, resolution=32, num_val=6)
    out = tmp_path / "folder"
    counts = export_imagefolder(cfg, out)
    assert counts == {"train": 12, "val": 6}
    train = open_dataset(f"imagefolder:{out}", "train")
    val = open_dataset(f"imagefolder:{out}", "val")
    assert len(train) == 12 and len(val) == 6 and train.class_names == sorted(cfg.classes)
    i = [p.name for p in val.files].index("000002.png")
    s = render(cfg, SPLIT_OFFSETS["val"] + 2)
    assert np.array_equal(item_uint8(val[i]).transpose(1, 2, 0), s.image)
    assert val.class_names[val[i]["label"].item()] == s.class_name
    assert (out / "synthetic.json").is_file()
    assert set(EXPORT_FORMATS) == {"broden", "imagefolder", "concepts"}


def test_export_concepts_and_read_them(tmp_path):
    cfg = WorldConfig(num_images=10, resolution=32)
    out = tmp_path / "concepts"
    counts = export_concepts(  # star-tip occurs on stars only: no class balance possible
        cfg, out, ["striped", "red-c", "star-tip"], n_per_concept=3, n_random_sets=2,
        balance_classes=False,
    )
    assert counts == {"striped": 3, "red-c": 3, "star-tip": 3, "random_0": 3, "random_1": 3}
    found = list_concept_folders(out)
    assert found == {
        "concepts": ["red-c", "star-tip", "striped"],
        "randoms": ["random_0", "random_1"],
    }
    for name in ("striped", "red-c", "star-tip"):
        ds = concept_images(out, name)
        assert len(ds) == 3 and ds[0]["label"].item() == -1 and ds[0]["image"].shape == (3, 32, 32)
        for f in ds.files:
            assert concept_present(render(cfg, int(f.stem)), ONTOLOGY.number(name), 0.005)
    r0 = {p.name for p in (out / "random_0").iterdir()}
    assert r0.isdisjoint({p.name for p in (out / "random_1").iterdir()})
    ds = concept_images(out, "striped")
    before = ds.fingerprint()
    assert before == concept_images(out, "striped").fingerprint()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(ds.files[0])
    assert concept_images(out, "striped").fingerprint() != before
    with pytest.raises(CnnexplainError, match="no concept folder .*stripe.*did you mean 'striped'"):
        concept_images(out, "stripe")
    with pytest.raises(CnnexplainError, match="only 0 of"):
        export_concepts(cfg, tmp_path / "never", ["hexagon"], n_per_concept=1)
    assert not (tmp_path / "never").exists()


def test_export_concepts_balances_classes_like_the_random_folders(tmp_path):
    """Concept folders get the random folders' class mix (else a red-c folder from a world
    where 95% of the stars are red is mostly stars, and its CAV points at the class too), in
    world order, with every prefix of the folder balanced as well."""
    import json

    cfg = WorldConfig(num_images=10, resolution=32, classes=("star", "circle", "square"),
                      correlations=(("red-c", "star", 0.95),))
    assert class_quotas(10, 3) == [4, 3, 3] and class_quotas(9, 3) == [3, 3, 3]
    counts = export_concepts(cfg, tmp_path / "bal", ["red-c", "stone"], n_per_concept=12,
                             n_random_sets=2)
    assert counts == {"red-c": 12, "stone": 12, "random_0": 12, "random_1": 12}
    manifest = json.loads((tmp_path / "bal" / "synthetic.json").read_text())
    assert manifest["balance_classes"] is True
    for folder in counts:
        assert manifest["class_counts"][folder] == {"star": 4, "circle": 4, "square": 4}
    for name in ("red-c", "stone"):
        files = concept_images(tmp_path / "bal", name).files  # sorted: world order
        indices = [int(f.stem) for f in files]
        assert indices == sorted(indices)
        got = [0, 0, 0]
        for index in indices:
            sample = render(cfg, index)
            assert concept_present(sample, ONTOLOGY.number(name), 0.005)
            got[sample.label] += 1
            assert max(got) - min(got) <= 1  # every prefix is balanced too
        assert got == [4, 4, 4]
    # without balancing the correlated colour's folder is mostly stars
    export_concepts(cfg, tmp_path / "raw", ["red-c"], n_per_concept=12, n_random_sets=1,
                    balance_classes=False)
    raw = concept_images(tmp_path / "raw", "red-c").files
    labels = [render(cfg, int(f.stem)).label for f in raw]
    assert labels.count(0) >= 8
    assert json.loads((tmp_path / "raw" / "synthetic.json").read_text())["balance_classes"] is False
    # object scope: the colour / material is the main object's, never only a background's
    export_concepts(cfg, tmp_path / "obj", ["red-c", "stone"], n_per_concept=6, n_random_sets=1,
                    scope="object")
    assert json.loads((tmp_path / "obj" / "synthetic.json").read_text())["scope"] == "object"
    for name, attr in (("red-c", lambda o: f"{o.color}-c"), ("stone", lambda o: o.material)):
        for f in concept_images(tmp_path / "obj", name).files:
            assert attr(render(cfg, int(f.stem)).objects[0]) == name
    background = next(s for s in (render(cfg, 3_000_000_000 + k) for k in range(400))
                      if s.objects[0].color != "red"
                      and concept_present(s, ONTOLOGY.number("red-c"), 0.005))
    assert not concept_present(background, ONTOLOGY.number("red-c"), 0.005, scope="object")
    with pytest.raises(UsageError, match="concept scope"):
        export_concepts(cfg, tmp_path / "bad", ["red-c"], n_per_concept=2, scope="pixel")
    # a concept some class never carries cannot be balanced: one line naming the class, no folder
    with pytest.raises(CnnexplainError, match=r"star-tip.*class 'circle'.*`no_balance_classes=true`"):
        export_concepts(cfg, tmp_path / "never", ["star-tip"], n_per_concept=3, n_random_sets=1)
    assert not (tmp_path / "never").exists()


# -- inspect ----------------------------------------------------------------------------------


def groups(rows) -> dict:
    out: dict = {}
    for r in rows:
        assert set(r) == {"group", "name", "count", "detail"}
        out.setdefault(r["group"], {})[r["name"]] = r["count"]
    return out


def test_inspect_any_dataset(tmp_path, broden_export):
    g = groups(inspect_dataset("synthetic:n=12,res=16"))
    assert g["class"] == {k: 2 for k in WorldConfig().classes} and g["split"]["train"] == 12
    assert g["concept"]["star"] == 2
    _, root = broden_export
    g = groups(inspect_dataset(str(root)))
    assert g["dataset"]["images"] == 24 and set(g["category"]) == set(ONTOLOGY.categories)
    assert groups(inspect_dataset(f"broden:{root}"))["dataset"]["images"] == 24
    write_cifar10_binary(tmp_path / "c10")
    g = groups(inspect_dataset(str(tmp_path / "c10")))
    assert g["split"] == {"train": 13, "val": 2, "test": 4} and sum(g["class"].values()) == 19
    export_imagefolder(WorldConfig(num_images=6, resolution=16, num_val=3), tmp_path / "f")
    g = groups(inspect_dataset(str(tmp_path / "f")))
    assert g["split"] == {"train": 6, "val": 3, "test": 0} and g["size"] == {"16x16 RGB": 9}
    export_concepts(
        WorldConfig(resolution=16), tmp_path / "k", ["plain"], n_per_concept=2, n_random_sets=1
    )
    g = groups(inspect_dataset(str(tmp_path / "k")))
    assert g["concept"] == {"plain": 2} and g["random"] == {"random_0": 2}
    with pytest.raises(CnnexplainError, match="neither a directory nor a dataset spec"):
        inspect_dataset(str(tmp_path / "missing"))
