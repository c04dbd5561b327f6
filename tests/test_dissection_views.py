"""Dissection's other views (Bau et al. 2017): ``negative`` (units labelled by their lowest
activations, seed 001 section 7.1.4) and ``rotate`` (the layer after a random orthogonal
rotation of its channels, Bau et al. 2017 section 3.2 / seed 001 fig. 7.10), on hand-built
models whose maps are ground-truth concept masks of a generated Broden export, and through the
real CLI."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from clihelp import assert_one_line_error, run_inproc, snapshot
from data_fixtures import _one_thread, broden_export  # noqa: F401  (fixtures)
from test_dissection_run import PREP, LookupModel

from cnnexplain.data.broden import BrodenDataset
from cnnexplain.errors import UsageError
from cnnexplain.explain.dissect.labels import ConceptSpace
from cnnexplain.explain.dissect.report import write_dissection
from cnnexplain.explain.dissect.run import (DissectConfig, check_memory, dissect, exact_bytes,
                                            plan_layers, rotate_maps, rotation_matrix,
                                            silent_layers)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def indicator(ds, names: list[str]) -> torch.Tensor:
    """float32 ``[N, len(names), sh, sw]``: 1 exactly on each named concept's pixels (any mask
    layer), at mask resolution (so bilinear upsampling is the identity)."""
    space = ConceptSpace.from_dataset(ds)
    numbers = [space.names.index(n) for n in names]
    sh, sw = ds.mask_size
    out = torch.zeros(len(ds), len(names), sh, sw)
    for i in range(len(ds)):
        m = ds[i]["masks"]
        for u, c in enumerate(numbers):
            out[i, u] = (m == c).any(dim=0).float()
    return out


@pytest.fixture(scope="module")
def ds(broden_export):
    return BrodenDataset(broden_export[1])


def same_layer(a, b) -> None:
    """Two LayerResults are identical (thresholds, every count, IoU, labels, top images)."""
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    for name in a.tally:
        np.testing.assert_array_equal(a.tally[name], b.tally[name], err_msg=name)
    np.testing.assert_array_equal(a.iou, b.iou)
    for f in ("best", "best_iou", "category", "label", "score"):
        np.testing.assert_array_equal(getattr(a.labels, f), getattr(b.labels, f), err_msg=f)
    np.testing.assert_array_equal(a.top_index, b.top_index)
    np.testing.assert_array_equal(a.top_values, b.top_values)
    np.testing.assert_array_equal(a.top_maps, b.top_maps)


# ---------------------------------------------------------------------------------------------
# negative
# ---------------------------------------------------------------------------------------------


def test_negative_labels_a_unit_by_where_it_is_most_negative(ds, tmp_path):
    """unit 0 fires on crosses; unit 1 is strongly negative exactly on circles (0 elsewhere);
    unit 2 is +1 on stars and -1 on rings. Positive view: cross, (nothing), star; negative
    view: (nothing), circle, ring, each with IoU 1 (the mask is the concept exactly)."""
    ind = indicator(ds, ["cross", "circle", "star", "ring"])
    maps = torch.stack([ind[:, 0], -4.0 * ind[:, 1], ind[:, 2] - ind[:, 3]], dim=1)
    model = LookupModel(ds, maps).eval()
    q = 0.1                                    # above every concept's coverage: T = 0 exactly
    base = DissectConfig(quantile=q, batch_size=5, top_images=3)
    plain = dissect(model, ["probe"], ds, preprocessing=PREP, config=base)
    both = dissect(model, ["probe"], ds, preprocessing=PREP,
                   config=DissectConfig(quantile=q, batch_size=5, top_images=3, negative=True))
    assert plain.variants == {} and set(both.variants) == {"negative"}
    same_layer(plain.layers["probe"], both.layers["probe"])     # positive view unchanged
    names = both.space.names
    pos, neg = both.layers["probe"], both.variants["negative"]["probe"]
    assert [names[c] for c in pos.labels.label[[0, 2]]] == ["cross", "star"]
    assert pos.labels.score[0] == 1.0 and pos.labels.score[1] == 0.0
    assert [names[c] for c in neg.labels.label[1:]] == ["circle", "ring"]
    assert list(neg.labels.score[1:]) == [1.0, 1.0] and neg.labels.score[0] == 0.0
    # the negative view is the positive dissection of the negated maps, exactly
    flipped = dissect(LookupModel(ds, -maps).eval(), ["probe"], ds, preprocessing=PREP,
                      config=base)
    same_layer(neg, flipped.layers["probe"])
    # top images of the negative view: the images where the unit is lowest
    lows = (-maps).amax(dim=(2, 3))
    for u in range(3):
        order = sorted(range(len(ds)), key=lambda i: (-float(lows[i, u]), i))[:3]
        assert list(neg.top_index[u]) == order
    # files: the positive ones unchanged, the negative ones beside them
    write_dissection(plain, tmp_path / "a")
    write_dissection(both, tmp_path / "b")
    a, b = tmp_path / "a" / "dissect", tmp_path / "b" / "dissect"
    for name in ("tally.csv", "summary.csv", "detectors-1.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (a / "tally_negative.csv").exists()
    rows = list(csv.DictReader(open(b / "tally_negative.csv", newline="")))
    assert {(r["unit"], r["label"]) for r in rows if float(r["score"]) > 0.04} == {
        ("2", "circle"), ("3", "ring")}
    srows = list(csv.DictReader(open(b / "summary_negative.csv", newline="")))
    assert [r for r in srows if r["category"] == "object"][0]["unique_concepts"] == "2"
    assert (b / "negative-detectors-1.png").is_file()
    page = (b / "index.html").read_text()
    assert "Negative activations" in page and "lowest activations" in page
    with h5py.File(b / "iou_negative.h5") as f:
        # the threshold is the bottom `quantile` of each unit and the mask activation < it
        flat = maps.transpose(0, 1).reshape(3, -1).double().numpy()
        np.testing.assert_allclose(f["probe/thresholds"][()], np.quantile(flat, q, axis=1),
                                   rtol=0, atol=1e-12)
        assert f.attrs["view"] == "negative"
    with h5py.File(a / "iou.h5") as fa, h5py.File(b / "iou.h5") as fb:
        assert set(fa["probe"]) == set(fb["probe"])
        for key in fa["probe"]:
            np.testing.assert_array_equal(fa["probe"][key][()], fb["probe"][key][()])


def test_negative_bottom_quantile_of_a_random_layer(ds):
    """With continuous maps the negative threshold is numpy's bottom quantile and the unit
    mask is where the (upsampled) map is below it: the intersection counts match a direct
    count at mask resolution."""
    gen = torch.Generator().manual_seed(1)
    sh, sw = ds.mask_size
    maps = torch.randn(len(ds), 2, sh, sw, generator=gen)
    q = 0.05
    res = dissect(LookupModel(ds, maps).eval(), ["probe"], ds, preprocessing=PREP,
                  config=DissectConfig(quantile=q, batch_size=7, negative=True))
    neg = res.variants["negative"]["probe"]
    flat = maps.transpose(0, 1).reshape(2, -1).double().numpy()
    bottom = np.quantile(flat, q, axis=1)
    np.testing.assert_allclose(-neg.thresholds, bottom, rtol=0, atol=1e-12)
    below = maps.double().numpy() < -neg.thresholds[None, :, None, None]    # [N, 2, sh, sw]
    assert neg.tally["activation"].tolist() == below.sum(axis=(0, 2, 3)).tolist()
    c = ConceptSpace.from_dataset(ds).names.index("cross")
    cross = indicator(ds, ["cross"])[:, 0].bool().numpy()
    assert neg.tally["intersection"][:, c].tolist() == [int((below[:, u] & cross).sum())
                                                        for u in range(2)]


# ---------------------------------------------------------------------------------------------
# rotate
# ---------------------------------------------------------------------------------------------


def test_rotation_matrix_is_orthogonal_seeded_and_sign_fixed():
    for k in (1, 2, 7, 64):
        q = rotation_matrix(k, 0)
        assert q.shape == (k, k) and q.dtype == torch.float64
        torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=torch.float64), rtol=0,
                                   atol=1e-12)
        assert torch.equal(q, rotation_matrix(k, 0))               # same seed, same Q
        g = torch.randn(k, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        r = q.T @ g                                    # G = Q R with R's diagonal positive
        assert (torch.diagonal(r) > 0).all()
        torch.testing.assert_close(torch.tril(r, -1), torch.zeros(k, k, dtype=torch.float64),
                                   rtol=0, atol=1e-10)
    assert not torch.equal(rotation_matrix(7, 0), rotation_matrix(7, 1))
    a = torch.randn(3, 7, 4, 5)
    torch.testing.assert_close(rotate_maps(a, rotation_matrix(7, 2)),
                               torch.einsum("kj,bjhw->bkhw", rotation_matrix(7, 2).float(), a))
    assert torch.equal(rotate_maps(a, torch.eye(7)), a)


@pytest.mark.parametrize("mode,recompute", [("exact", False), ("sketch", True)])
def test_rotating_by_the_identity_or_a_signed_permutation_is_exact(ds, mode, recompute):
    """Everything after the rotation is the unrotated dissection: Q = I gives the unrotated
    result exactly; a signed permutation gives the dissection of the permuted maps exactly
    (A'_k = sum_j Q[k, j] A_j)."""
    ind = indicator(ds, ["cross", "circle", "star"])
    maps = torch.stack([ind[:, 0], ind[:, 1] - ind[:, 2], 0.5 * ind[:, 2]], dim=1)
    model = LookupModel(ds, maps).eval()
    cfg = DissectConfig(quantile=0.1, batch_size=5, top_images=2, quantile_mode=mode,
                        recompute=recompute)
    res = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg,
                  rotations={"probe": np.eye(3)})
    same_layer(res.variants["rotated"]["probe"], res.layers["probe"])
    np.testing.assert_array_equal(res.rotations["probe"], np.eye(3))
    perm = torch.tensor([[0.0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=torch.float64)
    res = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg,
                  rotations={"probe": perm})
    moved = torch.stack([maps[:, 1], -maps[:, 2], maps[:, 0]], dim=1)
    ref = dissect(LookupModel(ds, moved).eval(), ["probe"], ds, preprocessing=PREP, config=cfg)
    same_layer(res.variants["rotated"]["probe"], ref.layers["probe"])
    with pytest.raises(UsageError, match="shape"):
        dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg,
                rotations={"probe": np.eye(2)})
    with pytest.raises(UsageError, match="not dissected"):
        dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg,
                rotations={"coarse": np.eye(3)})


AXIS_CONCEPTS = ["square", "star", "triangle", "ring", "cross", "circle", "plastic", "metal",
                 "fabric", "wood", "stone", "square-outline"]


def test_rotation_lowers_the_unique_detectors_of_an_axis_aligned_layer(ds, tmp_path):
    """Each channel an exact indicator of one concept: every unit detects its own concept with
    IoU 1. After a random rotation (seed 0) the same information is spread over the channels
    and fewer unique concepts are detected (Bau et al. 2017, fig. 7.10 of seed 001)."""
    maps = indicator(ds, AXIS_CONCEPTS)
    model = LookupModel(ds, maps).eval()
    cfg = DissectConfig(quantile=0.2, batch_size=8, top_images=0, rotate=0)
    res = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg)
    pos, rot = res.layers["probe"], res.variants["rotated"]["probe"]
    names = res.space.names
    assert [names[c] for c in pos.labels.label] == AXIS_CONCEPTS
    assert (pos.labels.score == 1.0).all()
    np.testing.assert_array_equal(res.rotations["probe"],
                                  rotation_matrix(len(AXIS_CONCEPTS), 0).numpy())
    unrotated = res.summary()["probe"]["unique_concepts"]
    rotated = res.summary("rotated")["probe"]["unique_concepts"]
    assert unrotated == len(AXIS_CONCEPTS) and rotated < unrotated
    assert rot.labels.score.max() < 1.0
    # the positive view is the same as without `rotate`
    plain = dissect(model, ["probe"], ds, preprocessing=PREP,
                    config=DissectConfig(quantile=0.2, batch_size=8, top_images=0))
    same_layer(plain.layers["probe"], pos)
    write_dissection(res, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "dissect" / "rotation.csv", newline="")))
    total = [r for r in rows if r["category"] == "all"][0]
    assert (int(total["unique_concepts"]), int(total["unique_concepts_rotated"])) == (
        unrotated, rotated)
    with h5py.File(tmp_path / "dissect" / "iou_rotated.h5") as f:
        np.testing.assert_array_equal(f["probe/rotation"][()], res.rotations["probe"])
        assert int(f.attrs["rotate"]) == 0
    assert "Random rotation" in (tmp_path / "dissect" / "index.html").read_text()


def test_exact_memory_check_counts_every_view(ds):
    model = LookupModel(ds, indicator(ds, ["cross"])).eval()
    plans = plan_layers(model, ["probe"], ds, PREP, "cpu")
    n = 10**6
    need = exact_bytes(plans, n, 0.005)
    check_memory(plans, n, DissectConfig(max_exact_bytes=need))
    with pytest.raises(UsageError, match="GiB"):
        check_memory(plans, n, DissectConfig(max_exact_bytes=need, negative=True))
    with pytest.raises(UsageError, match="GiB"):
        check_memory(plans, n, DissectConfig(max_exact_bytes=2 * need, negative=True, rotate=0))


def test_config_bounds():
    with pytest.raises(UsageError, match="`rotate`"):
        DissectConfig(rotate=-1).validate()
    DissectConfig(rotate=0, negative=True).validate()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_negative_and_rotate_outputs(broden_export, tmp_path):
    _, root = broden_export
    common = ["dissect", "--backbone", "smallcnn", "--broden", root, "--layer",
              "features.12,features",
              "--limit", "12", "--quantile", "0.05", "--top-images", "2", "--json"]
    env = {"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), **ONE_THREAD}
    r = run_inproc(*common, "--out", tmp_path / "plain", env=env)
    assert r.code == 0, r.err
    r = run_inproc(*common, "--negative", "--rotate", "3", "--out", tmp_path / "views", env=env)
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["rotate"] == 3
    assert list(s["negative"]) == list(s["rotated"]) == ["features.12", "features"]
    assert s["unique_concepts_rotated"] == s["rotated"]["features"]["unique_concepts"]
    assert s["unique_concepts_negative"] == s["negative"]["features"]["unique_concepts"]
    plain = json.loads(run_inproc(*common, "--out", tmp_path / "again", env=env).out)
    assert {k: s[k] for k in ("detectors", "unique_concepts", "layers")} == {
        k: plain[k] for k in ("detectors", "unique_concepts", "layers")}
    a, b = tmp_path / "plain" / "dissect", tmp_path / "views" / "dissect"
    for name in ("tally.csv", "summary.csv", "features.12/tally.csv", "features/tally.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("tally_negative.csv", "summary_negative.csv", "iou_negative.h5",
                 "tally_rotated.csv", "summary_rotated.csv", "iou_rotated.h5", "rotation.csv",
                 "negative-detectors-1.png", "negative-detectors-2.png",
                 "features.12/tally_negative.csv", "features/tally_rotated.csv"):
        assert (b / name).is_file(), name
    assert (b / "tally_negative.csv").read_bytes() == (b / "features/tally_negative.csv"
                                                       ).read_bytes()
    assert len(list((b / "images" / "negative").rglob("unit-*.jpg"))) == 128
    rows = list(csv.DictReader(open(b / "rotation.csv", newline="")))
    assert [(r["layer"], r["category"]) for r in rows if r["category"] == "all"] == [
        ("features.12", "all"), ("features", "all")]
    assert not list(a.glob("*_negative*")) and not (a / "rotation.csv").exists()
    with h5py.File(b / "iou_rotated.h5") as f:
        q = f["features/rotation"][()]
        np.testing.assert_array_equal(q, rotation_matrix(64, 3).numpy())
    manifest = json.loads((tmp_path / "views" / "run.json").read_text())
    text = json.dumps(manifest)
    assert "rotation.csv" in text and "tally_negative.csv" in text


def test_negative_view_of_a_non_negative_layer_is_silent(ds):
    """After a ReLU, a unit that is 0 on at least the bottom `quantile` of positions has
    threshold 0 and nothing below it: :func:`silent_layers` names such layers (the job turns
    it into a notice); a layer with negative values is not named."""
    ind = indicator(ds, ["cross", "circle"])                   # >= 0, mostly 0
    cfg = DissectConfig(quantile=0.1, batch_size=8, top_images=0, negative=True)
    relu = dissect(LookupModel(ds, ind).eval(), ["probe"], ds, preprocessing=PREP, config=cfg)
    assert silent_layers(relu) == ["probe"]
    assert (relu.variants["negative"]["probe"].labels.score == 0).all()
    signed = dissect(LookupModel(ds, 0.5 - ind).eval(), ["probe"], ds, preprocessing=PREP,
                     config=cfg)
    assert silent_layers(signed) == [] and silent_layers(signed, "rotated") == []


@pytest.mark.parametrize("args,word", [(["--rotate", "-1"], "--rotate"),
                                       (["--rotate", "one"], "--rotate"),
                                       (["--negative", "yes"], "yes")])
def test_cli_bad_view_values_fail_in_one_line(broden_export, tmp_path, args, word):
    _, root = broden_export
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    r = run_inproc("dissect", "--backbone", "smallcnn", "--broden", root, "--out", out, *args,
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), **ONE_THREAD})
    assert_one_line_error(r, 2, word)
    assert snapshot(tmp_path) == before and not out.exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_views_give_the_single_process_result(broden_export, tmp_path):
    """Every view's thresholds, tallies and top images merge across ranks like the positive
    view's (two CPU processes against one)."""
    from clihelp import assert_torchrun_matches_one_process

    _, root = broden_export
    args = ["dissect", "--backbone", "smallcnn", "--broden", str(root), "--layer", "features.12",
            "--quantile", "0.02", "--top-images", "2", "--batch-size", "5", "--negative",
            "--rotate", "1", "--no-cache", "-q"]
    one, two = assert_torchrun_matches_one_process(
        args, tmp_path, [f"dissect/{f}" for f in ("tally.csv", "tally_negative.csv",
                                                  "tally_rotated.csv", "summary_negative.csv",
                                                  "rotation.csv")], env=ONE_THREAD)
    for name in ("iou_negative.h5", "iou_rotated.h5"):
        with h5py.File(one / "dissect" / name) as a, h5py.File(two / "dissect" / name) as b:
            for key in a["features.12"]:
                np.testing.assert_array_equal(a["features.12"][key][()],
                                              b["features.12"][key][()], err_msg=key)
    strips = [sorted(p.relative_to(d / "dissect/images").as_posix()
                     for p in (d / "dissect/images").rglob("*.jpg")) for d in (one, two)]
    assert strips[0] == strips[1] and any(s.startswith("negative/") for s in strips[0])
