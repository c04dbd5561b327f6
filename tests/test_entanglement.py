"""ACC1/ACC2/ACC3, R0/R1, gate statistics and ``cnnexplain evaluate-entanglement``."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from clihelp import assert_one_line_error, run_cli
from cnnexplain.cache.store import Cache
from cnnexplain.data.datasets import open_dataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.entanglement import evaluate_entanglement
from cnnexplain.metrics.entanglement import (METRICS, PooledTail, gate_statistics,
                                             pathway_accuracies, r0_score, r1_score,
                                             tail_starts_with_gap)
from cnnexplain.models import zoo
from cnnexplain.models.gates import METHODS
from cnnexplain.models.layers import split_at
from cnnexplain.models.loading import load_model
from cnnexplain.config.train import TrainConfig
from cnnexplain.training.loop import Trainer

WORLD = "synthetic:n=48,nval=16,ntest=24,res=32"


@pytest.mark.parametrize("backbone,layer,gap", [
    ("resnet18", "layer4", True), ("smallcnn", "features", True), ("mobilenet_v2", "features", True),
    ("vgg11_bn", "features.27", False), ("resnet18", "layer3", False)])
def test_tail_structure_detection(backbone, layer, gap):
    model = zoo.build(backbone, num_classes=4).eval()
    assert tail_starts_with_gap(split_at(model, layer).tail) is gap


def test_pooled_tail_is_exact_for_gap_tails():
    torch.manual_seed(0)
    model = zoo.build("resnet18", num_classes=4).eval()
    split = split_at(model, "layer4")
    with torch.no_grad():
        a, = split.body(torch.randn(3, 3, 64, 64))
        assert a.shape[-1] == 2  # real spatial maps, not 1 x 1
        mask = (torch.rand(3, 512) > 0.5).float()
        full = split.tail(a * mask[:, :, None, None])
        pooled = PooledTail(split.tail)(a.mean((2, 3)) * mask)
    assert torch.allclose(full, pooled, atol=1e-5)


def _planted(n=300, c=3, per=4, entangled=False, seed=0):
    """Features [N, K] whose channel k belongs to class k // per, a linear head that reads them,
    and the planted one-hot membership; ``entangled`` mixes every channel with every class."""
    g = torch.Generator().manual_seed(seed)
    k = c * per
    y = torch.randint(0, c, (n,), generator=g)
    owner = torch.arange(k) // per
    member = (owner[None, :] == y[:, None]).float()
    if entangled:
        mix = torch.randn(k, k, generator=g)
        f = torch.relu(member @ mix + 0.1 * torch.randn(n, k, generator=g))
        head = nn.Linear(k, c)
        with torch.no_grad():
            w = torch.linalg.lstsq(f, torch.nn.functional.one_hot(y, c).float()).solution
            head.weight.copy_(w.t())
            head.bias.zero_()
    else:
        f = 2.0 * member + 0.1 * torch.rand(n, k, generator=g)
        head = nn.Linear(k, c)
        with torch.no_grad():
            head.weight.copy_(torch.where(owner[None, :] == torch.arange(c)[:, None], 1.0, -0.5))
            head.bias.zero_()
    matrix = torch.nn.functional.one_hot(owner, c).float()
    return f, y, head, matrix


def test_accuracies_on_planted_class_specific_channels():
    f, y, head, m = _planted()
    acc = pathway_accuracies(head, f, y, m, draws=4, seed=1)
    assert acc.acc1 == 1.0 and acc.acc2_det == 1.0
    assert acc.acc3_det < 0.2  # without its own cluster a class is lost
    # binary membership: the Bernoulli draws of ACC3 are the deterministic mask
    assert acc.acc3 == acc.acc3_det and acc.acc3_std == 0.0
    assert len(acc.per_class) == 3 and all(pc["acc1"] == 1.0 for pc in acc.per_class)


def test_accuracies_with_random_clusters_on_entangled_channels():
    f, y, head, _ = _planted(entangled=True, per=6)
    acc1 = pathway_accuracies(head, f, y, torch.zeros(18, 3), draws=0).acc1
    assert acc1 > 0.9
    g = torch.Generator().manual_seed(3)
    random_clusters = torch.nn.functional.one_hot(torch.randint(0, 3, (18,), generator=g), 3).float()
    acc = pathway_accuracies(head, f, y, random_clusters, draws=3)
    assert acc.acc3_det > acc.acc2_det - 0.2  # removing a random third costs little


def test_stochastic_draws_follow_membership_probabilities():
    f, y, head, m = _planted()
    half = torch.full_like(m, 0.5)
    acc = pathway_accuracies(head, f, y, half, draws=8, seed=2)
    assert acc.draws == 8 and acc.acc2_std > 0  # real randomness
    again = pathway_accuracies(head, f, y, half, draws=8, seed=2)
    assert again.acc2 == acc.acc2  # seeded


def test_r0_recovers_the_planted_assignment_and_scores_lower_than_entangled():
    f, y, head, m = _planted()
    r0 = r0_score(head, f, y, 3, steps=150, seed=0)
    # a channel of a class that has others is redundant: it may land elsewhere at no cost
    assert (r0.W.argmax(1) == m.argmax(1)).float().mean() >= 10 / 12 and r0.ce < 0.01
    assert set(r0.W.unique().tolist()) == {0.0, 1.0} and r0.density == pytest.approx(1 / 3)
    fe, ye, he, _ = _planted(entangled=True)
    assert r0.score < r0_score(he, fe, ye, 3, steps=150, seed=0).score
    assert all(p.requires_grad for p in head.parameters())  # frozen only while fitting


def test_r1_is_ce_plus_mu_density_with_binary_rows():
    f, y, head, _ = _planted()
    r1 = r1_score(head, f, y, 3, mu=0.5, steps=150)
    assert set(r1.W.unique().tolist()) <= {0.0, 1.0}
    assert (r1.W.max(1).values == 1).all()  # every channel serves at least one class
    assert r1.score == pytest.approx(r1.ce + 0.5 * r1.density)
    # sparse, not all-ones: planted class-specific channels need about one class each
    # (measured 0.36-0.42 over seeds 0-2); an all-ones gate would be 1
    assert 1 / 3 - 1e-6 <= r1.density <= 0.5


def test_gate_statistics():
    m = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.2, 0.3, 0.1], [0.0, 0.0, 1.0]])
    s = gate_statistics(m, 0.5)
    assert s["density"] == pytest.approx(4 / 12)
    assert s["channels_per_class"] == pytest.approx(4 / 3) and s["channels_per_class_max"] == 2
    assert s["classes_per_channel_max"] == 2 and s["unassigned_channels"] == 1
    assert s["empty_clusters"] == 0 and s["l1_density"] == pytest.approx(float(m.mean()))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 1-epoch smallcnn checkpoint of every train-gated method."""
    root = tmp_path_factory.mktemp("ckpts")
    prep = Preprocessing()
    train = open_dataset(WORLD, "train", prep)
    val = open_dataset(WORLD, "val", prep)
    paths = {}
    for method in METHODS:
        cfg = TrainConfig(backbone="smallcnn", method=method, epochs=1, batch_size=16)
        r = Trainer.prepare(cfg, train, val, class_names=train.class_names, preprocessing=prep,
                            out=root / method).run()
        paths[method] = r.checkpoint
    return paths


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_checkpoints_of_every_method(checkpoints, method, tmp_path):
    loaded = load_model(checkpoint=checkpoints[method])
    test = open_dataset(WORLD, "test", loaded.preprocessing)
    rep = evaluate_entanglement(loaded, test, cache=Cache(tmp_path / "c"), draws=3,
                                score_steps=30)
    # a model without a learned gate has no thresholded learned cluster (ACC2_det / ACC3_det):
    # its ACC2 / ACC3 are seed 004's random-P baseline, its clusters R0's
    expected = [m for m in METRICS if method != "std" or m not in ("ACC2_det", "ACC3_det")]
    assert [r["metric"] for r in rep.rows] == expected
    for r in rep.rows:
        assert math.isfinite(r["value"]), r
    assert 0 <= rep.value("MIS") <= rep.value("MIS_ceiling") + 1e-9
    assert rep.gate_source.startswith("learned" if method != "std" else "post-hoc")
    note = next(r["detail"] for r in rep.rows if r["metric"] == "ACC3")
    assert ("random P" in note) == (method == "std")
    assert rep.ablation.shape == (6, 6)
    assert len(rep.per_class) == 6 and rep.features.shape == (24, 64)


def test_second_evaluation_does_not_run_the_network(checkpoints, tmp_path):
    loaded = load_model(checkpoint=checkpoints["picnn"])
    test = open_dataset(WORLD, "test", loaded.preprocessing)
    calls = []
    loaded.model.features[0].register_forward_hook(lambda *a: calls.append(1))
    cache = Cache(tmp_path / "cache")
    first = evaluate_entanglement(loaded, test, cache=cache, draws=2, score_steps=20, pool="sum")
    assert calls
    calls.clear()
    second = evaluate_entanglement(loaded, test, cache=Cache(tmp_path / "cache"), draws=2,
                                   score_steps=20, pool="sum")
    assert not calls
    assert first.summary() == second.summary()


def test_evaluation_hands_the_network_back_in_its_mode(checkpoints, tmp_path):
    loaded = load_model(checkpoint=checkpoints["std"])
    test = open_dataset(WORLD, "test", loaded.preprocessing)
    loaded.model.train()
    evaluate_entanglement(loaded, test, cache=None, draws=1, scores=False)
    assert loaded.model.training and all(m.training for m in loaded.model.modules())
    loaded.model.eval()
    evaluate_entanglement(loaded, test, cache=None, draws=1, scores=False)
    assert not loaded.model.training


def test_sum_and_mean_pooling_give_the_same_mis(checkpoints, tmp_path):
    loaded = load_model(checkpoint=checkpoints["cdcnn-r1p2"], preprocessing=Preprocessing(resize=48))
    test = open_dataset(WORLD, "test", loaded.preprocessing)
    a = evaluate_entanglement(loaded, test, cache=Cache(enabled=False), scores=False, draws=0,
                              score_steps=5, pool="mean")
    b = evaluate_entanglement(loaded, test, cache=Cache(enabled=False), scores=False, draws=0,
                              score_steps=5, pool="sum")
    assert np.allclose(b.features, a.features * 144, rtol=1e-4, atol=1e-4)  # 12 x 12 maps
    assert abs(a.value("MIS") - b.value("MIS")) < 1e-6


EVAL = ["evaluate-entanglement", "--dataset", WORLD, "--device", "cpu", "--quiet",
        "--draws", "2", "--score-steps", "20"]


def test_cli_outputs_for_a_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "ev"
    r = run_cli(*EVAL, "--checkpoint", checkpoints["picnn"], "--out", out, "--save-features",
                "--json", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["command"] == "evaluate-entanglement" and "MIS" in summary
    frame = pd.read_csv(out / "entanglement.csv")
    assert list(frame.columns) == ["metric", "value", "std", "n", "note"]
    assert list(frame["metric"]) == list(METRICS)
    per = pd.read_csv(out / "entanglement_per_class.csv")
    assert len(per) == 6 and {"acc1", "acc2", "acc3", "mi_max", "r0_ce"} <= set(per.columns)
    with h5py.File(out / "features.h5") as f:
        assert f["features"].shape == (24, 64) and f["labels"].shape == (24,)
        assert f.attrs["layer"] == "features" and f.attrs["pool"] == "mean"
    assert "evaluate-entanglement" in json.loads((out / "run.json").read_text())["commands"]


def test_cli_plain_torchvision_backbone(tmp_path):
    r = run_cli(*EVAL, "--backbone", "resnet18", "--out", tmp_path / "tv", "--no-cache", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["gate_source"].startswith("post-hoc")


def test_cli_bounds(checkpoints, tmp_path):
    out = tmp_path / "gate"
    common = [*EVAL, "--checkpoint", checkpoints["std"], "--out", out,
              "--cache-dir", tmp_path / "cache", "--no-scores"]
    ok = run_cli(*common, "--fail-under", "mis=0", "--fail-over", "ACC3=1")
    assert ok.code == 0, ok.err
    mis = pd.read_csv(out / "entanglement.csv").set_index("metric").loc["MIS", "value"]
    (out / "entanglement.csv").unlink()
    bad = run_cli(*common, "--fail-under", "MIS=5", "--fail-over", "acc1=2")
    assert_one_line_error(bad, 1)
    assert bad.err.strip() == f"error: MIS {mis:.3g} is under the bound 5 (--fail-under MIS=5)"
    assert (out / "entanglement.csv").exists()  # results are written before exiting 1
    unknown = run_cli(*common, "--fail-under", "MISS=0.1")
    assert_one_line_error(unknown, 2, "unknown metric", "MIS", "ACC3")
    malformed = run_cli(*common, "--fail-over", "ACC3")
    assert_one_line_error(malformed, 2, "NAME=VALUE")
    no_scores = run_cli(*common, "--fail-under", "R0=1")
    assert_one_line_error(no_scores, 2, "--no-scores")


def test_cli_layer_with_a_skip_connection_is_refused(tmp_path):
    r = run_cli(*EVAL, "--backbone", "resnet18", "--layer", "layer4.1.conv2",
                "--out", tmp_path / "x", "--no-cache")
    assert_one_line_error(r, 2, "skip connection")
    assert not (tmp_path / "x").exists()
