"""Evaluation metrics on hand-made maps with known answers, and on the synthetic world's ground
truth (pure functions of cnnexplain.metrics.localization / faithfulness / sanity /
discriminativeness)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from cnnexplain.metrics import discriminativeness as D
from cnnexplain.metrics import faithfulness as F
from cnnexplain.metrics import localization as L
from cnnexplain.metrics import sanity as S

BOX = np.array([[8.0, 4.0, 20.0, 16.0]])  # x0, y0, x1, y1 (exclusive)


def peak(r, c, h=32, w=32, value=1.0):
    m = np.zeros((1, h, w))
    m[0, r, c] = value
    return m


# -- pointing game -------------------------------------------------------------------------------

def test_pointing_game_hit_and_miss_with_exclusive_box_ends():
    assert L.pointing_game(peak(4, 8), boxes=BOX)[0]          # top-left corner is inside
    assert L.pointing_game(peak(15, 19), boxes=BOX)[0]        # last pixel inside
    assert not L.pointing_game(peak(16, 10), boxes=BOX)[0]    # y1 is exclusive
    assert not L.pointing_game(peak(10, 20), boxes=BOX)[0]    # x1 is exclusive
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[0, 10, 10] = 1
    assert L.pointing_game(peak(10, 10), masks=mask)[0]
    assert not L.pointing_game(peak(10, 11), masks=mask)[0]
    with pytest.raises(ValueError):
        L.pointing_game(peak(1, 1))


def test_energy_pointing_game_thresholds():
    m = np.zeros((1, 32, 32))
    m[0, 5:15, 9:19] = 0.07       # 100 px inside the box: 7.0 energy
    m[0, 25, 25] = 3.0            # one strong pixel outside: 3.0 energy (30%)
    hits = L.energy_pointing_game(m, BOX)[0]
    # the outside pixel is the highest: every energy set contains it -> all miss
    assert not hits.any()
    m[0, 25, 25] = 0.01           # now weak: 0.01 / 7.01 of the energy, last in the order
    hits = L.energy_pointing_game(m, BOX)[0]
    assert hits.all()
    m[0, 25, 25] = 0.05           # below the inside values but 0.7% of the energy
    hits = L.energy_pointing_game(m, BOX)[0]
    assert hits.all()  # 90% energy is reached by inside pixels before the outside one
    m[0, 5:15, 9:19] = 0.001
    m[0, 25, 25] = 0.06           # 0.06 / 0.16 = 37.5% outside, smallest pixel is inside
    hits = L.energy_pointing_game(m, BOX)[0]
    np.testing.assert_array_equal(hits, [False] * 9)  # the outside pixel comes first
    assert not L.energy_pointing_game(np.zeros((1, 32, 32)), BOX).any()  # no energy: miss


def test_energy_sets_are_minimal():
    m = np.array([[[4.0, 3.0], [2.0, 1.0]]])
    sizes = [int(L.energy_sets(m, f).sum()) for f in (0.1, 0.4, 0.5, 0.7, 0.71, 0.9, 1.0)]
    assert sizes == [1, 1, 2, 2, 3, 3, 4]


# -- localization ------------------------------------------------------------------------------

def test_localization_iou_of_a_map_equal_to_the_mask_is_one():
    mask = np.zeros((1, 32, 32))
    mask[0, 4:16, 8:20] = 1.0
    iou, pred = L.localization(mask, BOX)
    assert iou[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(pred[0], BOX[0])


def test_localization_takes_the_largest_segment_above_15_percent():
    m = np.zeros((1, 32, 32))
    m[0, 4:16, 8:20] = 0.5                 # big blob = the box
    m[0, 25:27, 25:27] = 1.0               # small, strongest blob elsewhere
    m[0, 0:32, 0:2] = 0.1                  # a 10% halo: below the 15% threshold
    iou, _ = L.localization(m, BOX)
    assert iou[0] == pytest.approx(1.0)
    m[0, 0:32, 0:2] = 0.2                  # now above threshold: a 64-px strip, smaller than 144
    assert L.localization(m, BOX)[0][0] == pytest.approx(1.0)
    m[0, 0:32, 0:6] = 0.2                  # 192 px: now the largest segment
    assert L.localization(m, BOX)[0][0] < 0.2
    assert L.localization(np.zeros((1, 32, 32)), BOX)[0][0] == 0.0
    assert L.localization_error(np.array([0.7, 0.49, 0.5, 0.1])) == 0.5


def test_box_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [1, 1, 2, 2]], dtype=float)
    np.testing.assert_allclose(L.box_iou(a, b), [1.0, 50 / 150, 0.0])


# -- faithfulness -------------------------------------------------------------------------------

class Linear(nn.Module):
    """logit_0 = sum(w * x) over a fixed weight map; logit_1 = 0."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        s = (x * self.weight).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _linear_case():
    g = torch.Generator().manual_seed(0)
    weight = torch.zeros(1, 3, 16, 16)
    weight[..., 4:8, 4:8] = 0.02
    x = torch.rand(4, 3, 16, 16, generator=g) + 0.5
    contrib = (x * weight).sum(1).numpy()  # the perfect map
    return Linear(weight), x, contrib


def test_deletion_of_a_perfect_map_drops_faster_than_random_and_insertion_rises_faster():
    model, x, perfect = _linear_case()
    t = torch.zeros(4, dtype=torch.long)
    rng = np.random.default_rng(0)
    random_maps = rng.random(perfect.shape)
    score = F.probability_score(model)
    d_good = F.curve_auc(F.perturbation_curve(score, x, perfect, t, "deletion", steps=16))
    d_rand = F.curve_auc(F.perturbation_curve(score, x, random_maps, t, "deletion", steps=16))
    d_bad = F.curve_auc(F.perturbation_curve(score, x, -perfect, t, "deletion", steps=16))
    assert (d_good < d_rand).all() and (d_rand < d_bad).all()
    # insertion from the mean image (from a blur, this nearly linear toy barely changes)
    i_good = F.curve_auc(F.perturbation_curve(score, x, perfect, t, "insertion", 16, "mean"))
    i_rand = F.curve_auc(F.perturbation_curve(score, x, random_maps, t, "insertion", 16, "mean"))
    assert (i_good > i_rand).all()


def test_blur_baseline_keeps_constants_and_smooths_edges():
    flat = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(F.baseline_images(flat, "blur"), flat)
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0
    blurred = F.baseline_images(step, "blur")
    assert 0 < float(blurred[0, 0, 0, 7]) < 1 and 0 < float(blurred[0, 0, 0, 8]) < 1
    assert torch.equal(F.baseline_images(step, "mean"), torch.zeros_like(step))


def test_curve_end_points_and_auc():
    model, x, perfect = _linear_case()
    t = torch.zeros(4, dtype=torch.long)
    score = F.probability_score(model)
    curve = F.perturbation_curve(score, x, perfect, t, "deletion", steps=4, batch_size=3)
    np.testing.assert_allclose(curve[:, 0], score(x, t).numpy(), rtol=1e-6)
    np.testing.assert_allclose(curve[:, -1], 0.5, atol=1e-6)  # all pixels at the mean (zeros)
    np.testing.assert_allclose(F.curve_auc(np.array([[1.0, 0.0]])), [0.5])
    np.testing.assert_allclose(F.curve_auc(np.array([[1.0, 1.0, 0.0]])), [0.75])


def test_ablation_at_the_max_point_drops_more_than_at_random():
    model, x, perfect = _linear_case()
    t = torch.zeros(4, dtype=torch.long)
    mean_image = torch.zeros(3, 16, 16)
    drop, rand = F.ablation_drop(F.logit_score(model), x, perfect, t, mean_image, patch=3,
                                 generator=np.random.default_rng(1))
    assert (drop > 0).all() and drop.mean() > 3 * rand.mean()
    boxes = F.patch_boxes(np.array([0, 15]), np.array([0, 15]), 3, 16, 16)
    np.testing.assert_array_equal(boxes, [[0, 3, 0, 3], [13, 16, 13, 16]])


def test_spearman_rows_equal_scipy():
    rng = np.random.default_rng(0)
    a = rng.random((5, 40))
    b = a + rng.random((5, 40)) * 0.5
    b[0, :10] = b[0, 0]  # ties
    ours = F.spearman_rows(a, b)
    for i in range(5):
        assert ours[i] == pytest.approx(spearmanr(a[i], b[i]).statistic)
    assert np.isnan(F.spearman_rows(np.ones((1, 4)), a[:1, :4]))[0]
    np.testing.assert_allclose(F.occlusion_rank_correlation(a.reshape(5, 5, 8), a.reshape(5, 5, 8)), 1)


# -- sanity -------------------------------------------------------------------------------------

def test_cascading_randomization_goes_top_down_and_never_touches_the_model():
    from cnnexplain.models.smallcnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.rand(1, 3, 16, 16)
    layers = S.parametrized_layers(model, example)
    assert layers[0] == "features.0" and layers[-1] == "fc"
    steps = list(S.cascading_randomization(model, example, steps=3, seed=0))
    assert [s.layers[0] for s in steps] == ["fc"] * 3
    assert len(steps[-1].layers) == len(layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(steps[-1].model.fc.weight, model.fc.weight)


def test_sanity_check_fails_a_method_that_ignores_the_weights():
    from cnnexplain.explain.saliency import METHODS, Context

    torch.manual_seed(0)
    from cnnexplain.models.smallcnn import SmallCNN

    model = SmallCNN(num_classes=3, width=8).eval()
    x = torch.rand(4, 3, 16, 16)
    t = torch.tensor([0, 1, 2, 0])

    def edges(_model, _step):  # a "method" that is only an edge detector of the input
        return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(1).numpy()

    rows = S.sanity_check(model, edges, x[:1], steps=3)
    assert all(r["spearman"] == pytest.approx(1.0) for r in rows)

    def gradient(m, _step):
        return METHODS["gradient"].attribute(m, x, t, context=Context()).map.numpy()

    rows = S.sanity_check(model, gradient, x[:1], steps=3)
    assert rows[-1]["spearman"] < 0.9


# -- discriminativeness ---------------------------------------------------------------------------

def test_class_map_correlation():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    np.testing.assert_allclose(D.class_map_correlation(a, a), 1.0)
    np.testing.assert_allclose(D.class_map_correlation(a, -a), -1.0)
    b = rng.random((3, 8, 8))
    assert np.abs(D.class_map_correlation(a, b)).max() < 0.5
    assert np.isnan(D.class_map_correlation(a[:1], np.zeros((1, 8, 8))))[0]
    mask = np.zeros((1, 8, 8))
    mask[0, :4] = 1
    m = np.zeros((1, 8, 8))
    m[0, :4] = 3.0
    m[0, 4:] = 1.0
    assert D.mass_on_object(m, mask)[0] == pytest.approx(0.75)


# -- the synthetic world's ground truth -----------------------------------------------------------

def test_metrics_on_the_synthetic_world_ground_truth():
    """A map equal to an image's object mask points into the object's box and localizes it."""
    from cnnexplain.data.datasets import open_dataset

    ds = open_dataset("synthetic:n=20,res=32,second=1.0", split="train", limit=8)
    items = [ds[i] for i in range(8)]
    masks = np.stack([it["mask"].numpy() for it in items]).astype(float)
    boxes = np.stack([it["box"].numpy() for it in items])
    seconds = np.stack([it["second_box"].numpy() for it in items])
    assert L.pointing_game(masks, boxes=boxes).all()
    assert L.pointing_game(masks, masks=masks).all()
    iou, _ = L.localization(masks, boxes)
    assert (iou > 0.5).mean() >= 0.75  # a mask split by the second object may lose a piece
    assert L.energy_pointing_game(masks, boxes)[:, -1].all()
    # the same maps do not point into the second object's box, unless the boxes overlap
    overlap = L.box_iou(boxes, seconds) > 0
    assert not L.pointing_game(masks, boxes=seconds)[~overlap].any()
