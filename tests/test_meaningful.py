"""Explanations of a model that learned, checked against the synthetic world's ground truth:
Grad-CAM points at the explained object far more often than a random point, and dissection
finds a shape detector. A small CNN trained in the test (about a minute on two cores), so that a
regression to uniform maps or noise detectors cannot pass silently."""

from __future__ import annotations

import pandas as pd
import pytest

from cnnexplain.config.common import ComputeOptions, ModelOptions, RunOptions
from cnnexplain.config.data import SynthOptions
from cnnexplain.config.dissect import DissectConfig, DissectData, DissectModel, DissectOptions
from cnnexplain.config.saliency import SaliencyData, SaliencyOptions
from cnnexplain.config.train import TrainConfig, TrainData, TrainOptions
from cnnexplain.jobs import dissect, saliency, synth, train
from cnnexplain.jobs.base import execute

WORLD = "synthetic:n=1500,ntest=120,classes=circle+square+cross+ring"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learned")
    compute = ComputeOptions(device="cpu", cache_dir=tmp / "cache")
    out = tmp / "std"
    output = execute(train, TrainOptions(
        config=TrainConfig(backbone="smallcnn", method="std", epochs=6, batch_size=32),
        data=TrainData(dataset=WORLD), run=RunOptions(out=out, quiet=True), compute=compute))
    return tmp, out, compute, output


def test_the_model_learned(learned):
    _, _, _, output = learned
    assert output.summary["best_val_acc1"] >= 0.6  # chance: 0.25


def test_gradcam_points_at_the_object_far_more_often_than_a_random_point(learned):
    tmp, out, compute, _ = learned
    output = execute(saliency, SaliencyOptions(
        model=ModelOptions(checkpoint=out / "best.pt"),
        data=SaliencyData(split="test", limit=60), methods="gradcam", target="label",
        evaluate=True, metrics="pointing", overlays=0, run=RunOptions(out=out), compute=compute))
    ev = output.result.evaluation.set_index("method")
    pointing = float(ev.loc["gradcam", "pointing_game"])
    random_point = float(ev.loc["gradcam", "pointing_game_random"])
    assert 0.2 < random_point < 0.6  # the objects cover about a third of the image
    assert pointing >= random_point + 0.25, (pointing, random_point)


def test_dissection_finds_a_shape_detector(learned):
    """At a quantile matched to the world's object size (objects cover about a third of an
    image, so the paper's top 0.5% of a unit's activations could cover at most a tenth of one
    class's object pixels)."""
    tmp, out, compute, _ = learned
    broden = tmp / "broden"
    execute(synth, SynthOptions(fmt="broden", world=WORLD, num_images=120,
                                run=RunOptions(out=broden, quiet=True)))
    output = execute(dissect, DissectOptions(
        model=DissectModel(checkpoint=out / "best.pt"), data=DissectData(broden=str(broden)),
        config=DissectConfig(quantile=0.05, top_images=0), run=RunOptions(out=out),
        compute=compute))
    result, _ = output.result
    lr = next(iter(result.layers.values()))
    tally = pd.read_csv(out / "dissect" / "tally.csv")
    best = tally.groupby("object-label")["object-iou"].max()
    shapes = best[best.index.isin(["circle", "square", "cross", "ring"])]
    assert (shapes >= 0.2).any(), shapes.to_dict()
    assert lr.units == 64


def test_both_removal_orders_agree_for_gradcam_on_the_learned_model(learned):
    """Removing Grad-CAM's most relevant blocks first hurts the class more than removing its
    least relevant first (region perturbation, Samek et al. 2017; pixel flipping's symmetric
    relevance gain, Blücher et al. 2024), and its relevance mass on the object mask beats the
    object box's share of the image (more than the mask's share)."""
    tmp, out, compute, _ = learned
    output = execute(saliency, SaliencyOptions(
        model=ModelOptions(checkpoint=out / "best.pt"),
        data=SaliencyData(split="test", limit=40), methods="gradcam", target="label",
        evaluate=True, overlays=0,
        metrics="region-perturbation,symmetric-relevance-gain,relevance-mass,pointing",
        run=RunOptions(out=out), compute=compute))
    ev = output.result.evaluation.set_index("method").loc["gradcam"]
    assert ev["region_perturbation"] > ev["region_perturbation_lerf"] + 0.05, ev.to_dict()
    assert ev["region_perturbation_srg"] > 0.05 and ev["symmetric_relevance_gain"] > 0.05
    assert ev["relevance_mass"] > ev["pointing_game_random"], ev.to_dict()
