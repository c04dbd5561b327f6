"""Broden: export -> reader round trip, the exact tables, and one-line errors for bad inputs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_fixtures import (TINY_BRODEN, _one_thread, broden_export,  # noqa: F401
                           copy_tree, count_decodes)

from cnnexplain.data.broden import (
    ITEM_FIELDS,
    SAMPLE_DECODE_ROWS,
    BrodenDataset,
    broden_truth,
    decode_rg,
    encode_rg,
    export_broden,
    png_size,
)
from cnnexplain.data.datasets import open_dataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import ONTOLOGY, WorldConfig, render
from cnnexplain.errors import CnnexplainError, UsageError

HEADER = b"image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\r\n"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def expected_item(export, i: int, ds: BrodenDataset) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of world image i in the reader's layout, in the export's numbers."""
    sh, sw = ds.mask_size
    pixel, image = broden_truth(render(TINY_BRODEN, i), sh, sw)
    masks = np.zeros((len(ds.layer_categories), sh, sw), np.int32)
    for c in ds.pixel_categories:
        start = ds.layer_categories.index(c)
        for k, layer in enumerate(pixel[c]):
            masks[start + k] = export.to_broden(layer)
    labels = np.array([export.to_broden(image[c][0]) for c in ds.image_label_categories], np.int32)
    return masks, labels


def test_round_trip_identical_labels_and_masks(broden_export):
    export, root = broden_export
    ds = BrodenDataset(root)
    assert len(ds) == TINY_BRODEN.num_images
    assert ds.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert ds.layer_categories == ["color", "object", "part", "part", "material"]
    assert ds.image_label_categories == ["scene", "texture"]
    assert ds.mask_size == (16, 16) and ds.image_size == (32, 32)
    for i in range(len(ds)):
        item = ds[i]
        masks, labels = expected_item(export, i, ds)
        assert np.array_equal(item["masks"].numpy(), masks), i
        assert np.array_equal(item["image_labels"].numpy(), labels), i
        assert item["has_category"].all() and item["label"].item() == -1
        # names survive the renumbering
        names = {ds.label_names[n] for n in np.unique(masks[1]) if n}
        s = render(TINY_BRODEN, i)
        assert names <= {o.shape for o in s.objects} | ({"marker"} if s.hans else set())
        # the JPEG is the rendered image up to compression
        err = np.abs(item["image"].permute(1, 2, 0).numpy() * 255 - s.image).mean()
        assert err < 12


def test_two_part_layers_and_missing_layer(broden_export):
    export, root = broden_export
    rows = read_rows(root / "index.csv")
    layers = {len(r["part"].split(";")) for r in rows}
    assert layers == {1, 2}  # circles and rings have no layer-2 part
    one = next(i for i, r in enumerate(rows) if len(r["part"].split(";")) == 1)
    assert rows[one]["part"].endswith("_part_1.png")
    ds = BrodenDataset(root)
    assert not ds[one]["masks"][3].any()


def test_index_header_and_tables_consistent(broden_export):
    export, root = broden_export
    assert (root / "index.csv").read_bytes().startswith(HEADER)
    assert (
        (root / "label.csv")
        .read_bytes()
        .startswith(b"number,name,category,frequency,coverage,syns\r\n")
    )
    assert (root / "category.csv").read_bytes().startswith(b"name,first,last,count,frequency\r\n")
    labels = read_rows(root / "label.csv")
    numbers = [int(r["number"]) for r in labels]
    assert numbers == list(range(1, len(labels) + 1))
    freq = [int(r["frequency"]) for r in labels]
    assert freq == sorted(freq, reverse=True)
    for r in labels:
        parts = [p.rsplit("(", 1) for p in r["category"].split(";")]
        assert sum(int(n[:-1]) for _, n in parts) == int(r["frequency"])
        assert r["name"] == export.label_names[int(r["number"])]
    cats = read_rows(root / "category.csv")
    firsts = [int(c["first"]) for c in cats]
    assert firsts == sorted(firsts) and {c["name"] for c in cats} == set(ONTOLOGY.categories)
    for c in cats:
        codes = read_rows(root / f"c_{c['name']}.csv")
        assert [int(r["code"]) for r in codes] == list(range(1, len(codes) + 1))
        nums = [int(r["number"]) for r in codes]
        assert (
            len(nums) == int(c["count"])
            and min(nums) == int(c["first"])
            and max(nums) == int(c["last"])
        )
        assert sum(int(r["frequency"]) for r in codes) == int(c["frequency"])
        for r in codes:
            assert labels[int(r["number"]) - 1]["name"] == r["name"]
            assert f"{c['name']}({r['frequency']})" in labels[int(r["number"]) - 1]["category"]
    # label.csv frequencies are what the masks on disk hold
    ds = BrodenDataset(root)
    seen = {}
    for i in range(len(ds)):
        item = ds[i]
        for n in set(np.unique(item["masks"].numpy()).tolist()) | set(
            item["image_labels"].tolist()
        ):
            if n:
                seen[n] = seen.get(n, 0) + 1
    assert seen == {int(r["number"]): int(r["frequency"]) for r in labels}
    blue = int(export.to_broden(ONTOLOGY.number("blue-c")))
    assert ds.category_of(blue) == "color" and ds.label_names[blue] == "blue-c"


def test_mask_encoding_and_png_header(tmp_path):
    values = np.array([[0, 1, 255], [256, 1000, 65535]])
    assert np.array_equal(decode_rg(encode_rg(values)), values)
    p = tmp_path / "m.png"
    Image.fromarray(encode_rg(values)).save(p)
    assert png_size(p) == (3, 2, 8, 2)


def test_reordered_columns_still_read(broden_export, tmp_path):
    export, root = broden_export
    ref = BrodenDataset(root)
    copy = copy_tree(root, tmp_path / "reordered")
    rows = read_rows(copy / "index.csv")
    fields = [
        "image",
        "scene",
        "texture",
        "color",
        "object",
        "part",
        "material",
        "split",
        "sh",
        "sw",
        "ih",
        "iw",
    ]
    write_rows(copy / "index.csv", rows, fields)
    ds = BrodenDataset(copy)
    assert ds.layer_categories == ref.layer_categories
    for i in (0, 5, 11):
        a, b = ds[i], ref[i]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_categories_split_limit_and_loader(broden_export):
    export, root = broden_export
    ds = BrodenDataset(root, categories=["part", "scene"], limit=5, split="train")
    assert ds.categories == ["part", "scene"] and len(ds) == 5
    assert ds.layer_categories == ["part", "part"] and ds.image_label_categories == ["scene"]
    train = BrodenDataset(root, split="train")
    val = BrodenDataset(root, split="val")
    assert len(train) + len(val) == TINY_BRODEN.num_images
    assert {r.split for r in val.rows} == {"val"}
    with pytest.raises(UsageError, match="unknown Broden category 'parts'"):
        BrodenDataset(root, categories=["parts"])
    with pytest.raises(CnnexplainError, match="no images with split 'test'"):
        BrodenDataset(root, split="test")
    batch = next(iter(DataLoader(ds, batch_size=5, num_workers=2)))
    assert batch["masks"].shape == (5, 2, 16, 16) and batch["image"].shape == (5, 3, 32, 32)
    resized = open_dataset(f"broden:{root}", split="all", preprocessing=Preprocessing(resize=24))
    assert resized[0]["image"].shape == (3, 24, 24) and resized[0]["masks"].shape == (5, 16, 16)


def test_an_item_of_some_fields_decodes_only_those(broden_export, monkeypatch):
    export, root = broden_export
    ds = BrodenDataset(root)
    full = ds[3]
    decoded = count_decodes(ds, monkeypatch)
    labels = ds.item(3, ("masks", "image_labels"))
    assert sorted(labels) == ["image_labels", "masks"] and decoded["image"] == 0
    assert torch.equal(labels["masks"], full["masks"])
    assert torch.equal(labels["image_labels"], full["image_labels"])
    masks_read = decoded["mask"]
    assert masks_read > 0
    image = ds.item(3, ("image", "label"))
    assert decoded == {"image": 1, "mask": masks_read}
    assert torch.equal(image["image"], full["image"]) and int(image["label"]) == -1
    assert set(ds.item(3, ITEM_FIELDS)) == set(full)
    assert list(ds.item(3, "label")) == ["label"]  # one field by name, not its letters
    with pytest.raises(KeyError, match="no field 'mask'"):
        ds.item(3, ("mask",))


def test_fingerprint_stable_and_sees_rewrites(broden_export, tmp_path):
    export, root = broden_export
    copy = copy_tree(root, tmp_path / "fp")
    a = BrodenDataset(copy).fingerprint()
    assert a == BrodenDataset(copy).fingerprint()
    assert a != BrodenDataset(copy, limit=3).fingerprint()
    mask = copy / "images" / "synthetic" / "000002_color.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert BrodenDataset(copy).fingerprint() != a


def test_export_refuses_existing_and_leaves_nothing_when_killed(tmp_path):
    cfg = WorldConfig(num_images=4, resolution=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CnnexplainError, match="already exists"):
        export_broden(cfg, out)

    def die(done, total):
        if done > total // 2 + 1:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export_broden(cfg, fresh, progress=die)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    export_broden(cfg, out, overwrite=True)
    assert (out / "index.csv").is_file() and not (out / "keep.txt").exists()


# -- malformed inputs: each gives one line naming the problem --------------------------------


def _drop_column(root: Path) -> None:
    rows = read_rows(root / "index.csv")
    fields = [f for f in rows[0] if f != "sh"]
    write_rows(root / "index.csv", [{k: r[k] for k in fields} for r in rows], fields)


def _edit_row(k: int, **changes):
    def edit(root: Path) -> None:
        rows = read_rows(root / "index.csv")
        rows[k].update(changes)
        write_rows(root / "index.csv", rows, list(rows[0]))

    return edit


def _wrong_size(root: Path) -> None:
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(
        root / "images/synthetic/000003_object.png"
    )


def _unknown_number(root: Path) -> None:
    Image.fromarray(encode_rg(np.full((16, 16), 999))).save(
        root / "images/synthetic/000000_color.png"
    )


def _empty_index(root: Path) -> None:
    (root / "index.csv").write_bytes(HEADER)


MALFORMED = {
    "missing column": (_drop_column, ["index.csv lacks column sh"]),
    "missing mask file": (
        lambda r: (r / "images/synthetic/000004_material.png").unlink(),
        ["line 6", "images/synthetic/000004_material.png is missing"],
    ),
    "missing image file": (
        lambda r: (r / "images/synthetic/000001.jpg").unlink(),
        ["000001.jpg is missing"],
    ),
    "wrong mask size": (_wrong_size, ["000003_object.png is 10x10, expected sh x sw = 16x16"]),
    "unknown label in mask": (
        _unknown_number,
        ["000000_color.png holds label number 999 absent from label.csv"],
    ),
    "unknown scene number": (
        _edit_row(2, scene="4242"),
        ["line 4: scene label 4242 is absent from label.csv"],
    ),
    "dotdot path": (_edit_row(1, color="../../etc/passwd.png"), ["escapes the dataset root"]),
    "absolute path": (
        _edit_row(1, image="/etc/hostname"),
        ["image is absolute path '/etc/hostname'"],
    ),
    "empty index": (_empty_index, ["index.csv lists no images"]),
    "missing index": (lambda r: (r / "index.csv").unlink(), ["index.csv is missing"]),
    "missing c_ file": (lambda r: (r / "c_part.csv").unlink(), ["c_part.csv is missing"]),
    "not a number": (_edit_row(0, sh="big"), ["line 2: ih/iw/sh/sw must be positive integers"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_broden_one_line_error(case, broden_export, tmp_path):
    export, root = broden_export
    copy = copy_tree(root, tmp_path / "bad")
    mutate, words = MALFORMED[case]
    mutate(copy)
    with pytest.raises(CnnexplainError) as exc:
        BrodenDataset(copy)
    line = exc.value.line()
    assert "\n" not in line and "is not a valid Broden dataset" in line
    for w in words:
        assert w in line, line


def test_problems_are_collected_into_one_message(broden_export, tmp_path):
    export, root = broden_export
    copy = copy_tree(root, tmp_path / "many")
    for k in range(5):
        (copy / f"images/synthetic/{k:06d}_material.png").unlink()
    with pytest.raises(CnnexplainError) as exc:
        BrodenDataset(copy)
    line = exc.value.line()
    assert "(5 problems)" in line and "and 2 more" in line and "\n" not in line


def test_unknown_label_outside_the_sample_fails_on_decode(broden_export, tmp_path):
    export, root = broden_export
    copy = copy_tree(root, tmp_path / "late")
    n = TINY_BRODEN.num_images
    sampled = set(np.linspace(0, n - 1, SAMPLE_DECODE_ROWS).round().astype(int).tolist())
    k = next(i for i in range(n) if i not in sampled)
    Image.fromarray(encode_rg(np.full((16, 16), 777))).save(
        copy / f"images/synthetic/{k:06d}_object.png"
    )
    ds = BrodenDataset(copy)
    with pytest.raises(CnnexplainError) as exc:
        ds[k]
    assert f"{k:06d}_object.png holds label numbers 777 absent from label.csv" in exc.value.line()


def test_missing_root(tmp_path):
    with pytest.raises(CnnexplainError) as exc:
        BrodenDataset(tmp_path / "nope")
    assert (
        "Broden dataset not found" in exc.value.line()
        and "data synth` in the Broden format" in exc.value.line()
    )


def test_a_tcav_subset_of_broden_decodes_no_masks(broden_export, monkeypatch):
    from cnnexplain.explain.tcav.concepts import SubsetDataset

    _, root = broden_export
    ds = BrodenDataset(root)
    full = ds[4]
    decoded = count_decodes(ds, monkeypatch)
    item = SubsetDataset(ds, [2, 4], "concept")[1]
    assert decoded == {"image": 1, "mask": 0}
    assert torch.equal(item["image"], full["image"]) and int(item["index"]) == 1
    assert int(item["label"]) == int(full["label"])
