"""The evaluation's registry and its seed definitions: metric names, the default set, one column
per metric, how the metrics rank the methods and agree; deletion with random values and the
true class, and the ILSVRC localization error (misclassified images are errors)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cnnexplain.config.saliency import EvalOptions
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import UsageError
from cnnexplain.explain.saliency.base import Context, MethodOptions
from cnnexplain.explain.saliency.evaluation import (
    METRICS,
    EvalData,
    default_metrics,
    evaluate,
    parse_metrics,
)
from cnnexplain.explain.saliency.runner import Explainer, MethodResult
from cnnexplain.metrics import faithfulness as F
from cnnexplain.metrics import localization as L
from cnnexplain.metrics.agreement import method_ranks, rank_agreement


def test_metric_names_columns_and_sets():
    for name, m in METRICS.items():
        assert m.column == name.replace("-", "_")
        assert m.citation and m.description
        assert m.score in m.columns or m.score.startswith(m.columns[0].rsplit("_", 1)[0])
    assert parse_metrics(None) == default_metrics() == parse_metrics("default")
    assert parse_metrics("all") == list(METRICS)
    assert "sanity" not in default_metrics() and "pointing" in default_metrics()
    assert parse_metrics("deletion,default")[0] == "deletion"
    with pytest.raises(UsageError, match="unknown `metrics` entry 'pointng'.*pointing"):
        parse_metrics("pointng")


def test_method_ranks_follow_each_metrics_direction_and_share_ties():
    scores = pd.DataFrame({"up": [0.9, 0.1, 0.5, 0.5], "down": [0.9, 0.1, 0.5, np.nan]},
                          index=["a", "b", "c", "d"])
    ranks = method_ranks(scores, {"up": True, "down": False, "absent": True})
    assert list(ranks.columns) == ["up", "down"]
    assert ranks["up"].tolist() == [1.0, 4.0, 2.5, 2.5]
    assert ranks["down"].tolist()[:3] == [3.0, 1.0, 2.0] and np.isnan(ranks["down"]["d"])


def test_rank_agreement_is_kendalls_tau():
    from scipy.stats import kendalltau

    ranks = pd.DataFrame({"a": [1, 2, 3, 4.0], "same": [1, 2, 3, 4.0], "rev": [4, 3, 2, 1.0],
                          "mixed": [2, 1, 4, 3.0], "flat": [1, 1, 1, 1.0]})
    tau = rank_agreement(ranks)
    assert tau.loc["a", "same"] == pytest.approx(1.0) and tau.loc["a", "rev"] == pytest.approx(-1.0)
    assert tau.loc["a", "mixed"] == pytest.approx(kendalltau([1, 2, 3, 4], [2, 1, 4, 3]).statistic)
    assert tau.loc["mixed", "a"] == tau.loc["a", "mixed"]
    assert np.isnan(tau.loc["a", "flat"]) and np.isnan(tau.loc["flat", "flat"])
    assert np.isnan(rank_agreement(ranks.iloc[:2]).loc["a", "same"])  # two methods: undefined


def test_random_baseline_is_uniform_pixels_in_model_space_and_seeded():
    prep = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.zeros(6, 3, 16, 16)
    a = F.baseline_images(x, "random", torch.Generator().manual_seed(3), prep.normalize)
    b = F.baseline_images(x, "random", torch.Generator().manual_seed(3), prep.normalize)
    assert torch.equal(a, b)
    pixels = prep.denormalize(a)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert abs(float(pixels.mean()) - 0.5) < 0.02 and abs(float(pixels.std()) - 12 ** -0.5) < 0.02


class _Linear(nn.Module):
    """logits = [sum of the left half's channel 0, sum of the right half's channel 0]."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack([x[:, 0, :, :w].sum((1, 2)), x[:, 0, :, w:].sum((1, 2))], dim=1)


def _data(labels, targets, preds, boxes, options=EvalOptions()):
    n = len(labels)
    images = torch.ones(n, 3, 8, 8)
    ctx = Context(options=MethodOptions(), preprocessing=Preprocessing(), classifier=None,
                  clusters=None, seed=0, backbone="x")
    ex = Explainer(model=_Linear(), images=images, context=ctx)
    masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
    truth = {"box": torch.tensor(boxes, dtype=torch.float32), "mask": masks}
    return EvalData(explainer=ex, labels=torch.tensor(labels), truth=truth,
                    image_index=torch.arange(n), targets=torch.tensor(targets),
                    options=options, predictions=torch.tensor(preds))


def test_ilsvrc_localization_error_counts_misclassified_images():
    box = [0.0, 0.0, 4.0, 4.0]  # x0, y0, x1, y1: the top-left quarter
    maps = np.zeros((4, 8, 8), dtype=np.float32)
    maps[:, :4, :4] = 1.0  # every map localizes the box exactly
    res = MethodResult("m", maps, None, 0.0, False)
    # image 2 is misclassified (pred 1, label 0) and explained for its label
    data = _data([0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [box] * 4)
    out = METRICS["localization"].fn(data, res)
    assert out["localization_iou"] == pytest.approx(1.0)
    assert out["localization_error"] == pytest.approx(0.25)
    iou = EvalData(**{**data.__dict__, "options": EvalOptions(localization_criterion="iou")})
    assert METRICS["localization"].fn(iou, res)["localization_error"] == 0.0
    assert L.localization_error(np.array([0.9, 0.2]), correct=np.array([False, True])) == 1.0


def test_deletion_follows_the_true_class_by_default():
    """A map explaining class 1 (the right half) on images labelled 0: with the true class, the
    deleted right half leaves class 0's probability where it was at first."""
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    maps[:, :, 4:] = np.arange(32, dtype=np.float32).reshape(8, 4)  # right half first
    res = MethodResult("m", maps, None, 0.0, False)
    opts = EvalOptions(deletion_baseline="mean", deletion_steps=2)
    label = _data([0, 0], [1, 1], [1, 1], [[0, 0, 4, 4]] * 2, opts)
    target = _data([0, 0], [1, 1], [1, 1], [[0, 0, 4, 4]] * 2,
                   EvalOptions(deletion_baseline="mean", deletion_steps=2, deletion_class="target"))
    _, y_label = (METRICS["deletion"].fn(label, res), label.curves["m"]["deletion"][1])
    _, y_target = (METRICS["deletion"].fn(target, res), target.curves["m"]["deletion"][1])
    # half deleted: the right half is 0, so class 1's logit is 0 and class 0's is 32
    assert y_label[0, 1] == pytest.approx(torch.softmax(torch.tensor([32.0, 0.0]), 0)[0].item())
    assert y_target[0, 1] == pytest.approx(torch.softmax(torch.tensor([32.0, 0.0]), 0)[1].item())
    assert y_label[0, 0] == pytest.approx(0.5) and y_label[0, 2] == pytest.approx(0.5)


def test_evaluate_writes_one_column_per_metric_and_ranks():
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    maps[:, :4, :4] = 1.0
    good = MethodResult("good", maps, None, 0.0, False)
    bad = MethodResult("bad", np.roll(maps, 4, axis=2), None, 0.0, False)
    worse = MethodResult("worse", np.roll(maps, 4, axis=1), None, 0.0, False)
    data = _data([0, 0], [0, 0], [0, 0], [[0, 0, 4, 4]] * 2)
    ev = evaluate(data, [good, bad, worse], ["pointing", "localization"])
    table = pd.DataFrame(ev.rows).set_index("method")
    assert table.loc["good", "pointing"] == 1.0 and table.loc["bad", "pointing"] == 0.0
    assert table.loc["good", "localization"] == table.loc["good", "localization_error"] == 0.0
    assert ev.ranks.loc["good", "pointing"] == 1.0 and ev.ranks.loc["good", "localization"] == 1.0
    assert ev.agreement.loc["pointing", "localization"] == pytest.approx(1.0)
