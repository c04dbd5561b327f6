"""Network Dissection's pure computation against brute force written with plain numpy loops:
bilinear unit masks, tallies (pixel masks, multi-layer part masks, whole-image labels, category
presence), both IoU denominators and the unit labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import _one_thread, broden_export  # noqa: F401  (fixtures)

from cnnexplain.explain.dissect.labels import (
    ConceptSpace, activation_for, cluster_rows, detector_summary, iou, label_units, tally_columns,
    tally_rows)
from cnnexplain.explain.dissect.tally import (
    Tally, accumulate_tallies, bilinear_matrix, upsample_maps)

# ---------------------------------------------------------------------------------------------
# Brute force (plain loops, float64)
# ---------------------------------------------------------------------------------------------


def bilinear_loop(a: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """align_corners=False bilinear resize, one output pixel at a time."""
    h, w = a.shape
    out = np.zeros((sh, sw))
    for y in range(sh):
        sy = max((y + 0.5) * h / sh - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        ly = sy - y0
        for x in range(sw):
            sx = max((x + 0.5) * w / sw - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            lx = sx - x0
            out[y, x] = ((1 - ly) * ((1 - lx) * a[y0, x0] + lx * a[y0, x1])
                         + ly * ((1 - lx) * a[y1, x0] + lx * a[y1, x1]))
    return out


def brute_force(acts, thresholds, masks, image_labels, label_category, ncat):
    """Every count of the module docstring, image by image, unit by unit, concept by concept."""
    acts, masks, image_labels = (np.asarray(x) for x in (acts, masks, image_labels))
    b, k = acts.shape[:2]
    sh, sw = masks.shape[-2:]
    nl = len(label_category)
    out = {"intersection": np.zeros((k, nl), np.int64), "truth": np.zeros(nl, np.int64),
           "activation": np.zeros(k, np.int64),
           "activation_original": np.zeros((k, ncat), np.int64),
           "activation_lite": np.zeros((k, ncat), np.int64),
           "category_images": np.zeros(ncat, np.int64)}
    for i in range(b):
        concept_mask = {}
        for c in range(1, nl):
            if c in image_labels[i]:
                concept_mask[c] = np.ones((sh, sw), bool)
            else:
                concept_mask[c] = np.zeros((sh, sw), bool)
                for layer in range(masks.shape[1]):
                    concept_mask[c] |= masks[i, layer] == c
            out["truth"][c] += concept_mask[c].sum()
        present = [any(concept_mask[c].any() for c in range(1, nl) if label_category[c] == g)
                   for g in range(ncat)]
        out["category_images"] += np.array(present, np.int64)
        for u in range(k):
            unit_mask = bilinear_loop(acts[i, u].astype(np.float64), sh, sw) > thresholds[u]
            out["activation"][u] += unit_mask.sum()
            for c in range(1, nl):
                out["intersection"][u, c] += (unit_mask & concept_mask[c]).sum()
            for g in range(ncat):
                if present[g]:
                    out["activation_original"][u, g] += unit_mask.sum()
                touches = any((unit_mask & concept_mask[c]).any()
                              for c in range(1, nl) if label_category[c] == g)
                if touches:
                    out["activation_lite"][u, g] += unit_mask.sum()
    return out


def brute_iou(counts, label_category, mode):
    k, nl = counts["intersection"].shape
    act = counts["activation_original" if mode == "original" else "activation_lite"]
    out = np.zeros((k, nl))
    for u in range(k):
        for c in range(nl):
            g = label_category[c]
            if g < 0:
                continue
            i = counts["intersection"][u, c]
            union = act[u, g] + counts["truth"][c] - i
            out[u, c] = i / union if union else 0.0
    return out


def run_tally(acts, thresholds, masks, image_labels, label_category, ncat, batch=None):
    acts = torch.as_tensor(acts)
    k = acts.shape[1]
    t = Tally.zeros(k, len(label_category), ncat)
    b = acts.shape[0]
    step = batch or b
    for s in range(0, b, step):
        accumulate_tallies(acts[s:s + step], torch.as_tensor(thresholds, dtype=torch.float64),
                           torch.as_tensor(masks[s:s + step]),
                           torch.as_tensor(image_labels[s:s + step]),
                           torch.as_tensor(label_category), t)
    return t.numpy()


# categories: 0 color, 1 object, 2 part, 3 scene; numbers 1..10, 11 is a label of no category
LABEL_CATEGORY = np.array([-1, 0, 0, 1, 1, 2, 2, 2, 3, 3, 0, -1])
NCAT = 4


def random_batch(seed, b=6, k=5, h=4, w=4, layers=4, sh=8, sw=8, m=2, sparse=False):
    """Dyadic activations (exact in float32 after bilinear resizing by 2) and label masks
    (``sparse``: most pixels unlabeled)."""
    rng = np.random.default_rng(seed)
    acts = (rng.integers(0, 16, (b, k, h, w)) / 8.0).astype(np.float32)
    masks = np.zeros((b, layers, sh, sw), np.int32)
    masks[:, 0] = rng.choice([0, 1, 2, 10], (b, sh, sw))          # color
    masks[:, 1] = rng.choice([0, 3, 4, 11], (b, sh, sw))          # object
    masks[:, 2] = rng.choice([0, 0, 5, 6], (b, sh, sw))           # part layer 1
    masks[:, 3] = rng.choice([0, 0, 0, 6, 7], (b, sh, sw))        # part layer 2
    image_labels = rng.choice([0, 8, 9], (b, m)).astype(np.int32)
    if sparse:
        masks[rng.random(masks.shape) < 0.85] = 0
        image_labels[:] = 0
    thresholds = rng.choice(np.arange(1, 30) / 16.0 + 1 / 64.0, k)
    return acts, thresholds, masks, image_labels


# ---------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,sh,sw", [(7, 7, 112, 112), (3, 5, 8, 13), (4, 4, 4, 4), (6, 6, 3, 3)])
def test_bilinear_matrix_is_interpolate_align_corners_false(h, w, sh, sw):
    a = torch.rand(3, 2, h, w, dtype=torch.float64)
    ours = upsample_maps(a, (sh, sw))
    ref = F.interpolate(a, size=(sh, sw), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    loop = bilinear_loop(a[0, 0].numpy(), sh, sw)
    np.testing.assert_allclose(ours[0, 0].numpy(), loop, rtol=0, atol=1e-12)
    # and it is not the align_corners=True resampling davidbau/dissect uses
    if (h, w) != (sh, sw):
        other = F.interpolate(a, size=(sh, sw), mode="bilinear", align_corners=True)
        assert not torch.allclose(ours, other)


def test_bilinear_rows_are_convex_weights():
    m = bilinear_matrix(7, 112, torch.float64)
    assert torch.allclose(m.sum(1), torch.ones(112, dtype=torch.float64))
    assert bool((m >= 0).all()) and int((m > 0).sum(1).max()) <= 2


# ---------------------------------------------------------------------------------------------
# Tallies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tallies_equal_brute_force(seed):
    acts, thr, masks, il = random_batch(seed)
    ours = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT, batch=4)
    ref = brute_force(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    for name, arr in ref.items():
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)
    assert ours["images"][0] == acts.shape[0]
    assert ours["intersection"].dtype == np.int64
    assert ours["intersection"][:, 1:].sum() > 0 and ours["activation_lite"].sum() > 0


def test_tallies_do_not_depend_on_the_batching():
    acts, thr, masks, il = random_batch(7, b=9)
    one = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT, batch=9)
    many = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT, batch=2)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)


def test_multi_layer_part_masks_are_sets():
    """A part label in two layers at the same pixel counts once; different part labels in two
    layers at one pixel both count; a part only in layer 2 counts."""
    masks = np.zeros((1, 4, 4, 4), np.int32)
    masks[0, 2, :2, :] = 5            # part 5, layer 1: top half (8 px)
    masks[0, 3, :2, :2] = 5           # part 5 again in layer 2 on 4 of those pixels
    masks[0, 3, 2:, :] = 6            # part 6, layer 2 only: bottom half (8 px)
    masks[0, 2, 3, :] = 7             # part 7 in layer 1 under part 6 (4 px)
    acts = np.ones((1, 1, 4, 4), np.float32)
    out = run_tally(acts, [0.5], masks, np.zeros((1, 1), np.int32), LABEL_CATEGORY, NCAT)
    assert out["truth"][5] == 8 and out["truth"][6] == 8 and out["truth"][7] == 4
    assert list(out["intersection"][0, 5:8]) == [8, 8, 4]
    assert out["activation"][0] == 16


def test_whole_image_labels_cover_the_image():
    masks = np.zeros((2, 4, 4, 4), np.int32)
    masks[0, 0, 0, 0] = 1                                  # color present in image 0 only
    acts = np.zeros((2, 2, 2, 2), np.float32)
    acts[0, 0, 0, 0] = 1.0                                 # unit 0 fires in image 0's corner
    acts[1, 1] = 1.0                                       # unit 1 fires everywhere in image 1
    il = np.array([[8, 8], [9, 0]], np.int32)              # duplicate scene label counts once
    out = run_tally(acts, [0.5, 0.5], masks, il, LABEL_CATEGORY, NCAT)
    assert out["truth"][8] == 16 and out["truth"][9] == 16
    a0 = out["activation"][0]
    assert a0 > 0
    assert out["intersection"][0, 8] == a0 and out["intersection"][0, 9] == 0
    assert out["intersection"][1, 9] == 16 and out["intersection"][1, 8] == 0
    # scene (3) present in both images; color (0) only in image 0
    assert out["activation_original"][1, 3] == 16 and out["activation_original"][1, 0] == 0
    assert list(out["category_images"]) == [1, 0, 0, 2]


def test_presence_comes_from_labels_not_from_index_cells():
    """A mask cell that holds only unlabeled pixels, or labels of no category, does not make
    its category present (NetDissect's count_act_with_labelcat)."""
    masks = np.zeros((1, 4, 4, 4), np.int32)
    masks[0, 1] = 11                                        # object layer: a non-concept label
    acts = np.ones((1, 1, 2, 2), np.float32)
    out = run_tally(acts, [0.5], masks, np.zeros((1, 1), np.int32), LABEL_CATEGORY, NCAT)
    assert out["activation"][0] == 16
    assert out["activation_original"].sum() == 0 and out["category_images"].sum() == 0
    assert out["truth"][11] == 16                           # still tallied, never a concept


def test_unit_below_threshold_everywhere_contributes_nothing():
    acts, thr, masks, il = random_batch(3)
    thr = np.full(acts.shape[1], 10.0)
    out = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    assert out["activation"].sum() == 0 and out["intersection"].sum() == 0
    assert out["truth"].sum() > 0


def test_threshold_is_strict():
    acts = np.full((1, 1, 2, 2), 0.5, np.float32)
    masks = np.ones((1, 1, 4, 4), np.int32)
    at = run_tally(acts, [0.5], masks, np.zeros((1, 1), np.int32), LABEL_CATEGORY, NCAT)
    below = run_tally(acts, [0.499], masks, np.zeros((1, 1), np.int32), LABEL_CATEGORY, NCAT)
    assert at["activation"][0] == 0 and below["activation"][0] == 16


def test_label_beyond_the_table_is_refused():
    masks = np.full((1, 1, 2, 2), 99, np.int32)
    with pytest.raises(ValueError, match="beyond the label table"):
        run_tally(np.ones((1, 1, 1, 1), np.float32), [0.0], masks, np.zeros((1, 1), np.int32),
                  LABEL_CATEGORY, NCAT)


# ---------------------------------------------------------------------------------------------
# IoU: original vs lite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["original", "lite"])
def test_iou_equals_brute_force(mode):
    acts, thr, masks, il = random_batch(11, b=8)
    counts = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    ours = iou(counts["intersection"], counts["truth"], activation_for(counts, mode),
               LABEL_CATEGORY)
    ref = brute_iou(brute_force(acts, thr, masks, il, LABEL_CATEGORY, NCAT), LABEL_CATEGORY, mode)
    np.testing.assert_array_equal(ours, ref)


def test_lite_differs_exactly_where_the_mask_misses_the_category():
    """Unit 0 fires on a color pixel of image 0 (object present there, not touched) and on an
    object pixel of image 1; unit 1 fires on an unlabeled pixel of image 1 (object present).
    The original IoU counts those activations for object concepts, Lite does not, so they
    differ exactly where the activations differ AND the intersection is non-zero."""
    masks = np.zeros((2, 2, 4, 4), np.int32)
    masks[0, 0, :2, :2] = 1           # image 0: color 1 top-left
    masks[0, 1, 2:, 2:] = 3           # image 0: object 3 bottom-right
    masks[1, 1, :, :2] = 3            # image 1: object 3 left half
    acts = np.zeros((2, 2, 4, 4), np.float32)
    acts[0, 0, 0, 0] = 1.0            # unit 0 on color 1 in image 0
    acts[1, 0, 0, 0] = 1.0            # unit 0 on object 3 in image 1
    acts[1, 1, 3, 3] = 1.0            # unit 1 on an unlabeled pixel of image 1
    counts = run_tally(acts, [0.5, 0.5], masks, np.zeros((2, 1), np.int32), LABEL_CATEGORY, NCAT)
    orig = iou(counts["intersection"], counts["truth"], activation_for(counts, "original"),
               LABEL_CATEGORY)
    lite = iou(counts["intersection"], counts["truth"], activation_for(counts, "lite"),
               LABEL_CATEGORY)
    assert counts["truth"][3] == 12 and counts["intersection"][0, 3] == 1
    assert counts["activation_original"][0, 1] == 2 and counts["activation_lite"][0, 1] == 1
    assert counts["activation_original"][1, 1] == 1 and counts["activation_lite"][1, 1] == 0
    assert orig[0, 3] == 1 / 13 and lite[0, 3] == 1 / 12
    assert {tuple(x) for x in np.argwhere(orig != lite)} == {(0, 3)}


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_lite_and_original_differ_exactly_where_predicted(seed):
    acts, thr, masks, il = random_batch(seed, b=8, sparse=True)
    c = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    assert (c["activation_lite"] <= c["activation_original"]).all()
    lite = iou(c["intersection"], c["truth"], c["activation_lite"], LABEL_CATEGORY)
    orig = iou(c["intersection"], c["truth"], c["activation_original"], LABEL_CATEGORY)
    assert (lite >= orig).all()
    valid = LABEL_CATEGORY >= 0
    g = np.where(valid, LABEL_CATEGORY, 0)
    act_differs = (c["activation_lite"] != c["activation_original"])[:, g]
    predicted = act_differs & (c["intersection"] > 0) & valid[None, :]
    np.testing.assert_array_equal(lite != orig, predicted)
    assert predicted.any()


def test_iou_zero_denominator_and_non_concepts():
    inter = np.zeros((1, 4), np.int64)
    out = iou(inter, np.zeros(4, np.int64), np.zeros((1, 2), np.int64), np.array([-1, 0, 1, -1]))
    assert (out == 0).all()


# ---------------------------------------------------------------------------------------------
# Labels, summaries, tally.csv rows
# ---------------------------------------------------------------------------------------------


def _space():
    names = ("-", "red-c", "blue-c", "dog", "cat", "leg", "head", "ear", "street-s", "sea-s",
             "green-c", "junk")
    return ConceptSpace(("color", "object", "part", "scene"), LABEL_CATEGORY, names)


def test_label_units_best_per_category_and_overall():
    m = np.zeros((4, 12))
    m[0, [1, 2, 3, 8]] = [0.10, 0.30, 0.20, 0.05]     # best: blue-c (color)
    m[1, [3, 4, 5]] = [0.02, 0.03, 0.01]              # best: cat (object), no detector
    m[2, [4, 6]] = [0.5, 0.5]                          # tie object/part: earlier category wins
    m[3, 11] = 0.9                                     # non-concept column is ignored
    lab = label_units(m, LABEL_CATEGORY, NCAT)
    assert list(lab.label) == [2, 4, 4, 1]
    assert list(lab.category) == [0, 1, 1, 0]
    np.testing.assert_allclose(lab.score, [0.30, 0.03, 0.5, 0.0])
    assert list(lab.best[0]) == [2, 3, 5, 8]
    assert lab.best_iou[0, 3] == 0.05
    assert list(lab.detectors(0.04)) == [True, False, True, False]


def test_detector_summary_counts_units_and_unique_concepts():
    m = np.zeros((5, 12))
    m[0, 1] = m[1, 1] = m[2, 2] = 0.2                  # two red, one blue detector
    m[3, 3] = 0.3                                      # one dog detector
    m[4, 4] = 0.03                                     # below threshold
    rows = detector_summary(label_units(m, LABEL_CATEGORY, NCAT), _space().categories, 0.04)
    by = {r["category"]: r for r in rows}
    assert by["color"] == {"category": "color", "detector_units": 3, "unique_concepts": 2}
    assert by["object"]["detector_units"] == 1 and by["object"]["unique_concepts"] == 1
    assert by["part"]["detector_units"] == 0
    assert by["all"] == {"category": "all", "detector_units": 4, "unique_concepts": 3}


def test_tally_rows_have_netdissect_lite_columns():
    acts, thr, masks, il = random_batch(2)
    counts = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    space = _space()
    m = iou(counts["intersection"], counts["truth"], counts["activation_original"], LABEL_CATEGORY)
    lab = label_units(m, LABEL_CATEGORY, NCAT)
    rows = tally_rows(lab, counts, "original", space)
    cols = tally_columns(space.categories)
    assert cols[:4] == ["unit", "category", "label", "score"]
    assert cols[4:9] == ["color-label", "color-truth", "color-activation", "color-intersect",
                         "color-iou"]
    assert all(list(r) == cols for r in rows)
    assert sorted(r["unit"] for r in rows) == list(range(1, acts.shape[1] + 1))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        u = r["unit"] - 1
        for g, cat in enumerate(space.categories):
            c = lab.best[u, g]
            assert r[f"{cat}-label"] == space.names[c]
            assert r[f"{cat}-truth"] == counts["truth"][c]
            assert r[f"{cat}-intersect"] == counts["intersection"][u, c]
            assert r[f"{cat}-activation"] == counts["activation_original"][u, g]
            i, a, t = r[f"{cat}-intersect"], r[f"{cat}-activation"], r[f"{cat}-truth"]
            assert r[f"{cat}-iou"] == (i / (a + t - i) if a + t - i else 0.0)
        assert isinstance(r["score"], float)


def test_cluster_rows_list_the_concepts_of_each_class_cluster():
    m = np.zeros((4, 12))
    m[0, 3] = 0.3
    m[1, 8] = 0.2
    m[2, 3] = 0.1
    m[3, 1] = 0.01
    lab = label_units(m, LABEL_CATEGORY, NCAT)
    clusters = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool)
    rows = cluster_rows(lab, clusters, ["a", "b"], _space(), 0.04)
    assert rows[0]["channels"] == 3 and rows[0]["detectors"] == 2
    assert rows[0]["concepts"] == "dog (object)" and rows[0]["units"] == "1;3"
    assert rows[1]["concepts"] == "street-s (scene)" and rows[1]["unique_concepts"] == 1


def test_concept_space_from_a_broden_export(broden_export):
    from cnnexplain.data.broden import BrodenDataset

    _, root = broden_export
    ds = BrodenDataset(root)
    space = ConceptSpace.from_dataset(ds)
    assert space.size == len(ds.label_names)
    assert space.label_category[0] == -1
    for n in space.numbers:
        assert space.categories[space.label_category[n]] == ds.category_of(int(n))
    objects = BrodenDataset(root, categories=["object"])
    sub = ConceptSpace.from_dataset(objects)
    assert sub.categories == ("object",)
    assert {space.names[n] for n in sub.numbers} == {
        space.names[n] for n in space.numbers if space.category_name(n) == "object"}



@pytest.mark.parametrize("layers,m", [(0, 2), (3, 0)])
def test_no_pixel_layers_or_no_whole_image_labels(layers, m):
    """--categories scene,texture (no mask layers) or --categories color,object (no
    whole-image labels) still tally exactly."""
    acts, thr, masks, il = random_batch(8)
    masks = masks[:, :layers]
    il = il[:, :m]
    ours = run_tally(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    ref = brute_force(acts, thr, masks, il, LABEL_CATEGORY, NCAT)
    for name, arr in ref.items():
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)
    assert ours["activation"].sum() > 0
