"""Every command through its job, without the CLI: options dataclasses in, ``execute`` (plan ->
run -> write -> run.json), the files and summary out. Also: a checkpoint brings its own data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnexplain.config.common import ComputeOptions, DataOptions, ModelOptions, RunOptions
from cnnexplain.config.data import SynthOptions
from cnnexplain.config.dissect import DissectConfig, DissectData, DissectModel, DissectOptions
from cnnexplain.config.evaluate import EntanglementOptions, EvaluateOptions
from cnnexplain.config.report import ReportOptions
from cnnexplain.config.saliency import SaliencyData, SaliencyOptions
from cnnexplain.config.tcav import ConceptOptions, TCAVConfig, TcavData, TcavOptions
from cnnexplain.config.train import TrainConfig, TrainData, TrainOptions
from cnnexplain.data.synthetic import WorldConfig
from cnnexplain.errors import UsageError
from cnnexplain.jobs import dissect, evaluate, report, saliency, synth, tcav, train
from cnnexplain.jobs.base import execute
from cnnexplain.layout import RunLayout

WORLD = "synthetic:n=36,nval=12,ntest=12,res=32,classes=circle+square+cross"


def _compute(tmp: Path) -> ComputeOptions:
    return ComputeOptions(device="cpu", cache_dir=tmp / "cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    out = tmp / "picnn"
    options = TrainOptions(config=TrainConfig(backbone="smallcnn", epochs=1, batch_size=12),
                           data=TrainData(dataset=WORLD), run=RunOptions(out=out),
                           compute=_compute(tmp))
    output = execute(train, options)
    return tmp, out, output


def test_train_job_writes_the_run(trained):
    tmp, out, output = trained
    layout = RunLayout(out)
    for p in (layout.checkpoint, layout.best, layout.train_log, layout.gate_png, layout.manifest):
        assert p.is_file(), p
    assert output.summary["method"] == "picnn" and output.summary["epochs"] == 1
    entry = json.loads(layout.manifest.read_text())["commands"]["train-gated"]
    assert entry["options"]["epochs"] == 1 and entry["options"]["dataset"] == WORLD
    assert entry["model"]["stem"] == "imagenet"  # smallcnn has no small-input variant
    assert entry["results"][0] == "checkpoint.pt"


def test_evaluate_job_defaults_to_the_checkpoints_data(trained):
    tmp, out, _ = trained
    options = EvaluateOptions(model=ModelOptions(checkpoint=out / "best.pt"),
                              data=DataOptions(split="test"),
                              metrics=EntanglementOptions(draws=1, scores=False),
                              run=RunOptions(out=out), compute=_compute(tmp))
    output = execute(evaluate, options)
    # the checkpoint's world, not the default synthetic world
    assert WorldConfig.from_spec(output.plan.resolved.spec) == WorldConfig.from_spec(WORLD)
    assert len(output.plan.resolved.data) == 12
    assert RunLayout(out).entanglement.is_file() and "MIS" in output.summary


def test_evaluate_job_fails_after_writing_when_a_bound_is_violated(trained):
    tmp, out, _ = trained
    options = EvaluateOptions(model=ModelOptions(checkpoint=out / "best.pt"),
                              metrics=EntanglementOptions(draws=1, scores=False),
                              run=RunOptions(out=tmp / "bounded"), compute=_compute(tmp))
    options.bounds.fail_under = ["MIS=100"]
    output = execute(evaluate, options)
    assert output.failure is not None and "`fail_under=MIS=100`" in str(output.failure)
    assert output.summary["violations"][0].endswith("(fail_under MIS=100)")


def test_saliency_job(trained):
    tmp, out, _ = trained
    options = SaliencyOptions(model=ModelOptions(checkpoint=out / "best.pt"),
                              data=SaliencyData(limit=3), methods="gradient,gradcam",
                              overlays=1, run=RunOptions(out=out), compute=_compute(tmp))
    output = execute(saliency, options)
    layout = RunLayout(out)
    assert layout.saliency_maps.is_file() and layout.saliency_grid.is_file()
    assert output.summary["pairs"] == 3 and set(output.summary["methods"]) == {"gradient",
                                                                               "gradcam"}


def test_synth_dissect_tcav_and_report_jobs(trained):
    tmp, out, _ = trained
    broden = tmp / "broden"
    execute(synth, SynthOptions(fmt="broden", world=WORLD, num_images=8, run=RunOptions(out=broden)))
    assert (broden / "index.csv").is_file() and not (broden / "run.json").exists()
    concepts = tmp / "concepts"
    execute(synth, SynthOptions(fmt="concepts", world="synthetic:n=120,res=32", concepts="red-c",
                                per_concept=6, random_sets=3, run=RunOptions(out=concepts)))
    d = execute(dissect, DissectOptions(model=DissectModel(checkpoint=out / "best.pt"),
                                        data=DissectData(broden=str(broden)),
                                        config=DissectConfig(top_images=2, batch_size=4),
                                        run=RunOptions(out=out), compute=_compute(tmp)))
    assert RunLayout(out).dissect_index.is_file() and d.summary["images"] == 8
    t = execute(tcav, TcavOptions(model=ModelOptions(checkpoint=out / "best.pt"),
                                  concepts=ConceptOptions(concepts_dir=concepts),
                                  target=["circle"], data=TcavData(limit=12),
                                  tcav=TCAVConfig(random_runs=2), run=RunOptions(out=out),
                                  compute=_compute(tmp)))
    assert RunLayout(out).tcav_table.is_file() and t.summary["random_runs"] == 2
    r = execute(report, ReportOptions(run_dirs=[out], run=RunOptions(out=out)))
    assert RunLayout(out).report_index.is_file()
    assert set(r.summary["sections"][out.name]) >= {"training", "entanglement", "saliency",
                                                      "dissection", "tcav"}


def test_a_checkpoint_trained_on_an_imagefolder_explains_that_imagefolder(tmp_path):
    """tcav / evaluate with --checkpoint alone take the class inputs from the data the model was
    trained on, not from the synthetic world (whose class names would match)."""
    folder = tmp_path / "folder"
    execute(synth, SynthOptions(fmt="imagefolder", world=WORLD, run=RunOptions(out=folder)))
    spec = f"imagefolder:{folder}"
    out = tmp_path / "run"
    execute(train, TrainOptions(config=TrainConfig(backbone="smallcnn", method="std", epochs=1,
                                                   batch_size=12),
                                data=TrainData(dataset=spec), run=RunOptions(out=out),
                                compute=_compute(tmp_path)))
    output = execute(evaluate, EvaluateOptions(
        model=ModelOptions(checkpoint=out / "best.pt"), data=DataOptions(split="val"),
        metrics=EntanglementOptions(draws=1, scores=False), run=RunOptions(out=out),
        compute=_compute(tmp_path)))
    assert output.plan.resolved.spec == spec
    assert getattr(output.plan.resolved.data, "spec", "").startswith("imagefolder:")


def test_validation_comes_before_anything_is_written(tmp_path):
    options = TrainOptions(config=TrainConfig(backbone="smallcnn", epochs=0),
                           run=RunOptions(out=tmp_path / "out"), compute=_compute(tmp_path))
    with pytest.raises(UsageError, match="`epochs` must be at least 1"):
        execute(train, options)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
