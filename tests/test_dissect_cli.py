"""``cnnexplain dissect`` end to end on generated data in the real Broden layout: outputs and
their columns, --limit / --categories, several layers, validation before any write, HTML
escaping, a gated checkpoint's cluster table, and torchrun with two CPU processes giving the
single-process result."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clihelp import (assert_one_line_error, assert_torchrun_matches_one_process,
                     run_inproc, snapshot)
from data_fixtures import _one_thread, broden_export, copy_tree  # noqa: F401  (fixtures)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames), list(r)


def lite_columns(categories):
    cols = ["unit", "category", "label", "score"]
    for c in categories:
        cols += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    return cols


def test_dissect_two_layers_with_limit_and_categories(broden_export, tmp_path):
    _, root = broden_export
    out = tmp_path / "run"
    r = run_inproc("dissect", "--backbone", "smallcnn", "--broden", root, "--layer",
                "features.3,features", "--limit", "16", "--categories", "object,part,scene",
                "--quantile", "0.05", "--top-images", "3", "--batch-size", "5", "--out", out,
                "--json", env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), **ONE_THREAD})
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["command"] == "dissect" and summary["images"] == 16
    assert summary["categories"] == ["object", "part", "scene"]
    assert set(summary["layers"]) == {"features.3", "features"}
    d = out / "dissect"
    cats = ["object", "part", "scene"]
    units = {"features.3": 16, "features": 64}
    for layer, k in units.items():
        header, rows = read_csv(d / layer / "tally.csv")
        assert header == lite_columns(cats)
        assert sorted(int(x["unit"]) for x in rows) == list(range(1, k + 1))
        scores = [float(x["score"]) for x in rows]
        assert scores == sorted(scores, reverse=True)
        assert all(x["category"] in cats for x in rows)
        for x in rows:
            for c in cats:
                i, a, t = (int(x[f"{c}-{f}"]) for f in ("intersect", "activation", "truth"))
                iou = float(x[f"{c}-iou"])
                assert iou == pytest.approx(i / (a + t - i) if a + t - i else 0.0, abs=1e-15)
        assert summary["layers"][layer]["units"] == k
    # dissect/tally.csv is the last layer's
    assert (d / "tally.csv").read_bytes() == (d / "features" / "tally.csv").read_bytes()
    with h5py.File(d / "iou.h5") as f:
        assert f.attrs["n_images"] == 16 and f.attrs["iou_mode"] == "original"
        names = [s.decode() for s in f["concept_names"][()]]
        ccat = {s.decode() for s in f["concept_categories"][()]}
        assert ccat <= set(cats) and len(names) == f["concept_numbers"].shape[0]
        for layer, k in units.items():
            g = f[layer]
            assert g["iou"].shape == (k, len(names)) and g["thresholds"].shape == (k,)
            np.testing.assert_array_equal(g["iou"][()], g["iou_original"][()])
            assert (g["iou_lite"][()] >= g["iou_original"][()]).all()
            assert g["intersection"].dtype == np.int64
    _, srows = read_csv(d / "summary.csv")
    assert {(x["layer"], x["category"]) for x in srows} == {
        (layer, c) for layer in units for c in cats + ["all"]}
    last = [x for x in srows if x["layer"] == "features" and x["category"] == "all"][0]
    assert int(last["detector_units"]) == summary["detectors"]
    page = (d / "index.html").read_text()
    assert page.count("<img class='strip'") == sum(units.values())
    assert "detectors-1.png" in page and (d / "detectors-2.png").is_file()
    assert len(list((d / "images").rglob("unit-*.jpg"))) == sum(units.values())
    manifest = json.loads((out / "run.json").read_text())
    assert "dissect" in json.dumps(manifest)


BAD = [
    (["--quantile", "1.5"], 2, "--quantile"),
    (["--iou-mode", "paper"], 2, "--iou-mode"),
    (["--layer", "nosuch"], 2, "nosuch"),
    (["--layer", "fc"], 2, "channel maps"),
    (["--categories", "objekt"], 2, "objekt"),
]


@pytest.mark.parametrize("args,code,word", BAD)
def test_bad_input_fails_in_one_line_and_writes_nothing(broden_export, tmp_path, args, code,
                                                        word):
    _, root = broden_export
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    before = snapshot(tmp_path)
    r = run_inproc("dissect", "--backbone", "smallcnn", "--broden", root, "--out", out, *args,
                env={"CNNEXPLAIN_CACHE": str(cache), **ONE_THREAD})
    assert_one_line_error(r, code, word)
    assert snapshot(tmp_path) == before and not out.exists()


def test_missing_dataset_options(tmp_path):
    r = run_inproc("dissect", "--backbone", "smallcnn", "--out", tmp_path / "o")
    assert_one_line_error(r, 2, "--broden")
    r = run_inproc("dissect", "--backbone", "smallcnn", "--dataset", "cifar10:x",
                "--out", tmp_path / "o")
    assert_one_line_error(r, 2, "broden")
    r = run_inproc("dissect", "--backbone", "smallcnn", "--broden", tmp_path / "absent",
                "--out", tmp_path / "o")
    assert_one_line_error(r, 1, "not found")
    assert not (tmp_path / "o").exists()


def test_html_escapes_every_text_from_data(broden_export, tmp_path):
    _, root = broden_export
    data = copy_tree(root, tmp_path / "evil")
    label_csv = data / "label.csv"
    evil = "<script>alert('x')</script>&\""
    lines = label_csv.read_text().splitlines()
    head, rows = lines[0], list(csv.reader(lines[1:]))
    for row in rows:                                   # rename every label
        row[1] = f"{evil}{row[0]}"
    with open(label_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head.split(","))
        w.writerows(rows)
    out = tmp_path / "run"
    r = run_inproc("dissect", "--backbone", "smallcnn", "--broden", data, "--limit", "8",
                "--quantile", "0.1", "--top-images", "1", "--out", out, "-q", "--no-cache",
                env=ONE_THREAD)
    assert r.code == 0, r.err
    page = (out / "dissect" / "index.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;" in page
    _, rows = read_csv(out / "dissect" / "tally.csv")   # CSV keeps the names as they are
    assert all(x["label"].startswith(evil) for x in rows)


def test_gated_checkpoint_gets_a_cluster_table(broden_export, tmp_path):
    from cnnexplain.models.checkpoint import Checkpoint, save_checkpoint
    from cnnexplain.models.network import build_network

    _, root = broden_export
    torch.manual_seed(0)
    model, layer = build_network("smallcnn", 3, layer="features")
    w = torch.zeros(64, 3)
    w[:20, 0] = 1.0
    w[20:30, 1] = 0.9
    w[30:, 2] = 0.3                                    # below the 0.5 threshold: empty
    ck = tmp_path / "gated.pt"
    save_checkpoint(ck, Checkpoint(
        meta={"backbone": "smallcnn", "num_classes": 3, "class_names": ["a<b", "c", "d"],
              "layer": layer, "method": "cdcnn-r1p2", "insert_conv": None,
              "gate": {"kind": "cdcnn-r1p2", "layer": layer, "threshold": 0.5}},
        state_dict=model.state_dict(), gate={"W": w}))
    out = tmp_path / "run"
    r = run_inproc("dissect", "--checkpoint", ck, "--broden", root, "--limit", "12",
                "--quantile", "0.05", "--top-images", "0", "--out", out, "--json", "--no-cache",
                env=ONE_THREAD)
    assert r.code == 0, r.err
    header, rows = read_csv(out / "dissect" / "clusters.csv")
    assert header == ["class", "class_name", "channels", "detectors", "unique_concepts",
                      "concepts", "units"]
    assert [x["class_name"] for x in rows] == ["a<b", "c", "d"]
    assert [int(x["channels"]) for x in rows] == [20, 10, 0]
    _, tally = read_csv(out / "dissect" / "tally.csv")
    detectors = {int(x["unit"]) for x in tally if float(x["score"]) > 0.04}
    for x, members in zip(rows, [range(1, 21), range(21, 31), []]):
        units = [int(u) for u in x["units"].split(";") if u]
        assert set(units) == detectors & set(members)
        assert int(x["detectors"]) == len(units)
    summary = json.loads(r.out)
    assert [c["channels"] for c in summary["clusters"]] == [20, 10, 0]
    page = (out / "dissect" / "index.html").read_text()
    assert "a&lt;b" in page and "<td>a<b" not in page


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_two_processes_give_the_single_process_result(broden_export, tmp_path):
    _, root = broden_export
    args = ["dissect", "--backbone", "smallcnn", "--broden", str(root), "--layer",
            "features.3,features", "--quantile", "0.02", "--top-images", "2", "--batch-size", "5",
            "--no-cache", "-q"]
    one, two = assert_torchrun_matches_one_process(
        args, tmp_path, ("dissect/tally.csv", "dissect/features/tally.csv",
                         "dissect/features.3/tally.csv", "dissect/summary.csv"), env=ONE_THREAD)
    with h5py.File(one / "dissect/iou.h5") as a, h5py.File(two / "dissect/iou.h5") as b:
        for layer in ("features.3", "features"):
            for name in a[layer]:
                np.testing.assert_array_equal(a[layer][name][()], b[layer][name][()],
                                              err_msg=f"{layer}/{name}")
    manifest = json.loads((two / "run.json").read_text())
    assert '"world_size": 2' in json.dumps(manifest)
    strips_one = sorted(p.name for p in (one / "dissect/images").rglob("*.jpg"))
    strips_two = sorted(p.name for p in (two / "dissect/images").rglob("*.jpg"))
    assert strips_one == strips_two and strips_one
