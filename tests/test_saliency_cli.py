"""``cnnexplain saliency`` end to end through the real CLI entry point: outputs, cache reuse,
input sources, targets, gated checkpoints, and the one-line error policy (nothing written on
bad input)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from clihelp import assert_one_line_error, run_inproc, snapshot

DATA = "synthetic:n=20,res=32,second=1.0"


def _base(tmp_path, *extra):
    return ["saliency", "--backbone", "smallcnn", "--dataset", DATA, "--limit", "4",
            "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--device", "cpu",
            "--batch-size", "3", *extra]


def test_end_to_end_with_evaluation_then_cached(tmp_path):
    methods = "gradient,guided-backprop,gradcam,lrp-zplus,clrp1"
    args = _base(tmp_path, "--methods", methods, "--target", "label", "--evaluate",
                 "--metrics", "all", "--sanity-steps", "2", "--sanity-limit", "2",
                 "--overlays", "2", "--json")
    r = run_inproc(*args)
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["command"] == "saliency" and summary["pairs"] == 4
    assert set(summary["methods"]) == set(methods.split(","))
    assert all(not m["cached"] for m in summary["methods"].values())
    assert 0.0 <= summary["methods"]["gradcam"]["pointing_game"] <= 1.0
    out = tmp_path / "out" / "saliency"
    with h5py.File(out / "maps.h5") as f:
        assert f["image_index"].shape == (4,) and list(f["target"][()]) == list(f["label"][()])
        for m in methods.split(","):
            assert f[f"maps/{m}"].shape == (4, 32, 32)
            assert f[f"maps/{m}"].attrs["sign"] and f[f"maps/{m}"].attrs["reduction"]
        assert f["raw/gradient"].shape == (4, 3, 32, 32)
        assert f["raw/gradcam"].shape == (4, 8, 8)
        assert f["raw/gradcam"].attrs["shape"].startswith("M x h x w")
        assert f.attrs["target"] == "label"
    ev = pd.read_csv(out / "evaluation.csv")
    assert list(ev["method"]) == methods.split(",")
    for col in ("pointing_game", "pointing_energy_10", "pointing_energy_90", "ablation_drop",
                "ablation_drop_random", "deletion_auc", "insertion_auc", "localization_iou",
                "localization_error", "occlusion_spearman", "sanity_spearman_all",
                "class_map_correlation"):
        assert col in ev.columns, col
    assert (ev["pairs_with_truth"] == 4).all()
    from cnnexplain.explain.saliency.evaluation import METRICS

    for name in METRICS:  # one column per metric, named after it
        assert name.replace("-", "_") in ev.columns, name
    ranks = pd.read_csv(out / "metric_ranks.csv").set_index("method")
    ranked = [m.column for m in METRICS.values() if m.higher_is_better is not None]
    assert list(ranks.columns) == ranked and list(ranks.index) == methods.split(",")
    assert ((ranks >= 1) & (ranks <= 5)).all().all()
    agreement = pd.read_csv(out / "metric_agreement.csv").set_index("metric")
    assert list(agreement.columns) == ranked
    tau = agreement.to_numpy()
    finite = np.isfinite(tau)
    assert finite.any() and (np.abs(tau[finite]) <= 1 + 1e-12).all()
    np.testing.assert_allclose(tau[finite], tau.T[finite])
    with h5py.File(out / "evaluation_curves.h5") as f:
        for m in methods.split(","):
            y = f[f"{m}/deletion/y"][()]
            assert y.shape == (4, 21) and f[f"{m}/deletion/x"][()][-1] == 1.0
            assert f[f"{m}/insertion/y"].attrs["axis"] == "probability"
    sanity = pd.read_csv(out / "sanity.csv")
    assert set(sanity["method"]) == set(methods.split(",")) and set(sanity["step"]) == {1, 2}
    assert len(list((out / "overlays").glob("*.png"))) == 2 * 5
    assert (out / "grid.png").stat().st_size > 1000
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "saliency" in run["commands"]

    rep = run_inproc("report", tmp_path / "out", "--out", tmp_path / "rep", "--quiet")
    assert rep.code == 0, rep.err
    html = (tmp_path / "rep" / "report" / "index.html").read_text()
    assert "How the metrics rank the methods" in html and "evaluation curves" in html
    assert (tmp_path / "rep" / "report" / "saliency-agreement-out.png").stat().st_size > 1000

    again = run_inproc(*args)
    assert again.code == 0, again.err
    cached = json.loads(again.out)
    assert all(m["cached"] for m in cached["methods"].values())
    pd.testing.assert_frame_equal(pd.read_csv(out / "evaluation.csv"), ev)


def test_inputs_npy_with_topk_targets(tmp_path):
    arr = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    r = run_inproc("saliency", "--backbone", "smallcnn", "--inputs", tmp_path / "x.npy",
                   "--target", "topk:2", "--methods", "gradient,cam", "--overlays", "0",
                   "--out", tmp_path / "out", "--no-cache", "--json", "--device", "cpu")
    assert r.code == 0, r.err
    with h5py.File(tmp_path / "out" / "saliency" / "maps.h5") as f:
        assert list(f["image_index"][()]) == [0, 0, 1, 1, 2, 2]
        assert list(f["rank"][()]) == [0, 1] * 3
        assert f["maps/cam"].shape == (6, 32, 32)
    assert not (tmp_path / "out" / "saliency" / "grid.png").exists()


def test_image_files_are_resized_and_normalized(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for i, size in enumerate((40, 48)):
        pixels = (np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")
    r = run_inproc("saliency", "--backbone", "smallcnn", "--images", d, "--resize", "32",
                   "--methods", "gradcam", "--target", "1", "--overlays", "1",
                   "--out", tmp_path / "out", "--no-cache", "--device", "cpu")
    assert r.code == 0, r.err
    with h5py.File(tmp_path / "out" / "saliency" / "maps.h5") as f:
        assert f["maps/gradcam"].shape == (2, 32, 32)
        assert [n.decode() if isinstance(n, bytes) else n for n in f["image_name"][()]] == ["0", "1"]
    assert "gradcam" in r.out  # the Rich table


def _gated_checkpoint(tmp_path):
    from cnnexplain.models.checkpoint import Checkpoint, save_checkpoint
    from cnnexplain.models.smallcnn import smallcnn

    torch.manual_seed(0)
    model = smallcnn(num_classes=6)
    names = ["circle", "square", "triangle", "star", "cross", "ring"]
    meta = {"backbone": "smallcnn", "num_classes": 6, "class_names": names, "layer": "features",
            "method": "cdcnn-r1p2", "gate": {"kind": "cdcnn-r1p2", "layer": "features",
                                             "threshold": 0.5}}
    gate = {"W": torch.rand(64, 6, generator=torch.Generator().manual_seed(0))}
    path = tmp_path / "gated.pt"
    save_checkpoint(path, Checkpoint(meta=meta, state_dict=model.state_dict(), gate=gate))
    return path


def test_gated_checkpoint_runs_gated_cam_and_its_complement(tmp_path):
    ck = _gated_checkpoint(tmp_path)
    r = run_inproc("saliency", "--checkpoint", ck, "--dataset", DATA, "--limit", "3",
                   "--methods", "gated-cam,gated-cam-complement,gradcam", "--target", "label",
                   "--out", tmp_path / "out", "--no-cache", "--json", "--overlays", "0",
                   "--device", "cpu")
    assert r.code == 0, r.err
    with h5py.File(tmp_path / "out" / "saliency" / "maps.h5") as f:
        inside, outside = f["raw/gated-cam"][()], f["raw/gated-cam-complement"][()]
        full = f["raw/gradcam"][()]
    assert inside.shape == outside.shape == full.shape == (3, 8, 8)
    assert not np.allclose(inside, outside)
    # relu(a) + relu(b) >= relu(a + b) for the two halves of Grad-CAM's channel sum
    assert (inside + outside >= full - 1e-6).all()


def test_list_methods(tmp_path):
    r = run_inproc("saliency", "--list-methods")
    assert r.code == 0 and "clrp2" in r.out and "gated-cam" in r.out
    r = run_inproc("saliency", "--list-methods", "--json")
    rows = json.loads(r.out)
    assert {row["name"] for row in rows} >= {"gradient", "lrp-zplus", "lime"}
    assert all(row["sign"] and row["reduction"] for row in rows)


def _npy(tmp_path, arr, name="x.npy"):
    np.save(tmp_path / name, arr, allow_pickle=True)
    return tmp_path / name


ERRORS = [
    ("cam-on-vgg", lambda t: ["--backbone", "vgg11", "--methods", "cam"], 2, ("cam", "GAP", "gradcam")),
    ("gated-without-gate", lambda t: ["--methods", "gated-cam"], 2, ("gated checkpoint",)),
    ("target-range", lambda t: ["--target", "99"], 2, ("out of range",)),
    ("target-syntax", lambda t: ["--target", "top3"], 2, ("topk:K",)),
    ("label-needs-labels", lambda t: ["--inputs", _npy(t, np.zeros((1, 3, 32, 32), np.float32)),
                                      "--target", "label"], 2, ("labels",)),
    ("evaluate-needs-truth", lambda t: ["--inputs", _npy(t, np.zeros((1, 3, 32, 32), np.float32)),
                                        "--evaluate"], 2, ("ground-truth",)),
    ("npy-nan", lambda t: ["--inputs", _npy(t, np.full((1, 3, 32, 32), np.nan, np.float32))], 2,
     ("NaN",)),
    ("npy-shape", lambda t: ["--inputs", _npy(t, np.zeros((2, 32, 32), np.float32))], 2,
     ("N x 3 x H x W",)),
    ("npy-pickle", lambda t: ["--inputs", _npy(t, np.array([{"a": 1}], dtype=object))], 1,
     ("unpickling",)),
    ("unknown-method", lambda t: ["--methods", "gradient,saliencee"], 2, ("unknown saliency method",)),
    ("two-sources", lambda t: ["--dataset", DATA, "--inputs", t / "none.npy"], 2, ("exclude",)),
    ("layer-not-conv", lambda t: ["--methods", "gradcam", "--layer", "fc"], 2, ("convolutional",)),
    ("layer-missing", lambda t: ["--methods", "gradcam", "--layer", "features.99"], 2,
     ("does not exist",)),
    ("smoothgrad-base", lambda t: ["--methods", "smoothgrad", "--smoothgrad-base", "gradcam"], 2,
     ("smoothgrad-base",)),
    ("alexnet-too-small", lambda t: ["--backbone", "alexnet", "--dataset", DATA, "--methods",
                                     "gradient"], 2, ("at least 63",)),
    ("bad-ig-method", lambda t: ["--ig-method", "simpson"], 2, ("ig-method",)),
    ("bad-metric", lambda t: ["--evaluate", "--metrics", "pointing,fun"], 2, ("metrics",)),
    ("subset-too-large", lambda t: ["--evaluate", "--metrics", "faithfulness-correlation",
                                    "--faithfulness-subset", "5000"], 2,
     ("faithfulness-subset", "at most 1023")),
    ("patch-too-large", lambda t: ["--evaluate", "--metrics", "infidelity",
                                   "--infidelity-patch", "40"], 2, ("infidelity-patch", "32x32")),
    ("bad-deletion-baseline", lambda t: ["--evaluate", "--deletion-baseline", "noise"], 2,
     ("deletion-baseline",)),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    _, args, code, words = case
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["saliency", *args(tmp_path), "--out", out, "--cache-dir", cache, "--device", "cpu"]
    if "--backbone" not in argv:
        argv[1:1] = ["--backbone", "smallcnn"]
    if not any(a in argv for a in ("--dataset", "--inputs", "--images")):
        argv += ["--dataset", DATA, "--limit", "2"]
    before = snapshot(out, cache)
    r = run_inproc(*argv)
    assert_one_line_error(r, code, *words)
    assert snapshot(out, cache) == before
    assert not out.exists()
