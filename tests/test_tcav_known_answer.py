"""TCAV's known answer on the synthetic world (the issue's "done when").

A smallcnn is trained (here, in seconds) on a two-class world where 95% of the stars are red
(``correlate=red-c@star=0.95``); circles are red at the world's base rate. Then:

- (red-c, star) must get a TCAV score near 1, significant (Student t-test against the
  random-vs-random baseline, Bonferroni-corrected);
- (stone, star) -- an object material the model has no reason to use -- must not be significant.

Concept and random folders are rendered from the same world *without* the correlation and with
the same number of images of each class, so that a concept folder differs from the random
folders only by its concept. (A folder exported from the correlated world would be ~90% stars
for red-c, and any class imbalance of a concept folder shows up in its CAV as class evidence;
see the README's TCAV notes on why the reference test is optimistic.)

The same numbers are then produced by the real CLI from a checkpoint of the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clihelp import run_cli
from data_fixtures import _one_thread  # noqa: F401  (one torch thread: shared cores)

from cnnexplain.cache import Cache
from cnnexplain.data.base import make_loader
from cnnexplain.data.datasets import open_dataset
from cnnexplain.data.export import concept_present, png_bytes
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import ONTOLOGY, SyntheticDataset, WorldConfig, render
from cnnexplain.explain import tcav as T
from cnnexplain.models.checkpoint import Checkpoint, save_checkpoint
from cnnexplain.models.loading import model_fingerprint
from cnnexplain.models.smallcnn import SmallCNN

WORLD = "synthetic:n=300,res=32,ntest=150,seed=1,classes=star+circle,correlate=red-c@star=0.95"
PREP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CONCEPTS = ("red-c", "stone")
RUNS = 10
PER_SET = 80  # images per concept / random folder, half of each class
LAYER = "features.10"  # the last block's input: one conv block before the GAP head
EPOCHS = 8


def train_smallcnn(config: WorldConfig) -> SmallCNN:
    """A minimal seeded training loop (Adam, lr 3e-3, batch 32, EPOCHS epochs) on the train
    split; one thread, so the weights are the same on every run."""
    images, labels = [], []
    for batch in make_loader(SyntheticDataset(config, "train", PREP), batch_size=64):
        images.append(batch["image"])
        labels.append(batch["label"])
    x, y = torch.cat(images), torch.cat(labels)
    torch.manual_seed(0)
    model = SmallCNN(len(config.classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        model.train()
        for s in range(0, len(x), 32):
            i = order[s:s + 32]
            loss = torch.nn.functional.cross_entropy(model(PREP.normalize(x[i])), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(PREP.normalize(x)).argmax(1) == y).float().mean())
    assert acc > 0.85, f"the known-answer model did not train (train accuracy {acc:.3f})"
    return model


def balanced_folder(folder: Path, world: WorldConfig, keep, start: int) -> None:
    """PER_SET images of ``world`` (PER_SET / classes of each class) for which ``keep(sample)``
    holds, searched from world index ``start`` on, as PNGs."""
    folder.mkdir(parents=True)
    want = PER_SET // len(world.classes)
    got = [0] * len(world.classes)
    index = start
    while min(got) < want:
        sample = render(world, index)
        if got[sample.label] < want and keep(sample):
            (folder / f"{index}.png").write_bytes(png_bytes(sample.image))
            got[sample.label] += 1
        index += 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = WorldConfig.from_spec(WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_smallcnn(config)
    finally:
        torch.set_num_threads(threads)
    base = tmp_path_factory.mktemp("tcav-known")
    root = base / "concepts"
    neutral = dataclasses.replace(config, correlations=())
    for j, name in enumerate(CONCEPTS):
        number = ONTOLOGY.number(name)
        balanced_folder(root / name, neutral,
                        lambda s, n=number: concept_present(s, n, 0.005), 3_000_000_000 + j * 10**5)
    for r in range(RUNS + 1):
        balanced_folder(root / f"random_{r}", neutral, lambda s: True, 4_000_000_000 + r * 10**5)
    checkpoint = base / "model.pt"
    save_checkpoint(checkpoint, Checkpoint(
        meta={"backbone": "smallcnn", "num_classes": len(config.classes),
              "class_names": list(config.classes), "layer": "features",
              "preprocessing": PREP.to_dict(), "method": "std"},
        state_dict=model.state_dict()))
    return {"config": config, "model": model, "root": root, "checkpoint": checkpoint,
            "cache": base / "cache"}


def library_run(world) -> T.TCAVResult:
    config, model = world["config"], world["model"]
    sets = T.folder_concept_sets(world["root"], list(CONCEPTS), random_sets=RUNS + 1,
                                 preprocessing=PREP)
    inputs = open_dataset(WORLD, "test", PREP)
    fingerprint = model_fingerprint(model, {}, {"backbone": "smallcnn", "insert_conv": None})
    return T.run_tcav(model, [LAYER], sets.concepts, sets.randoms, inputs,
                      [(config.classes.index("star"), "star")], model_fingerprint=fingerprint,
                      preprocessing=PREP, config=T.TCAVConfig(random_runs=RUNS, seed=0),
                      cache=Cache(world["cache"]))


def test_correlated_colour_is_significant_and_an_unrelated_concept_is_not(world):
    result = library_run(world)
    print(result.table.to_string())
    table = result.table.set_index("concept")
    red, stone = table.loc["red-c"], table.loc["stone"]
    # the planted colour: score near 1, significant with a wide margin
    assert red["score_mean"] >= 0.9
    assert red["i_plus"] >= 0.9 and red["i_minus"] >= 0.9
    assert red["significant"] and red["p_value"] < 0.005
    assert red["random_score_mean"] < 0.7
    assert red["cav_accuracy"] > 0.65  # the colour is linearly readable at the layer
    # an object material: not significant, far from the threshold
    assert not stone["significant"]
    assert stone["p_value_uncorrected"] > 0.3
    assert stone["cav_accuracy"] < 0.6  # and not even readable at the layer
    assert result.n_tests == 2 and (table["n_runs"] == RUNS).all()
    assert (table["n_class_inputs"] == 75).all()  # the 75 stars of the 150 test images


def test_known_answer_through_the_cli(world, tmp_path):
    out = tmp_path / "run"
    r = run_cli("tcav", "--checkpoint", world["checkpoint"], "--concepts", world["root"],
                "--dataset", WORLD, "--split", "test", "--target", "star", "--layer", LAYER,
                "--random-runs", RUNS, "--seed", 0, "--out", out, "--json", "--device", "cpu",
                env={"CNNEXPLAIN_CACHE": str(world["cache"]), "OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["significant"] == [f"red-c|star|{LAYER}"]
    frame = pd.read_csv(out / "tcav" / "tcav.csv")
    assert list(frame.columns) == T.TABLE_COLUMNS
    assert (out / "tcav" / "tcav.png").stat().st_size > 0
    runs = pd.read_csv(out / "tcav" / "runs.csv")
    assert len(runs) == (len(CONCEPTS) + 1) * RUNS
    # the CLI maps checkpoint, preprocessing, dataset and folders to the same content keys as
    # the library call, so it reads the library's cache and prints the same numbers
    expected = library_run(world).table
    for col in ("score_mean", "score_std", "magnitude", "i_plus", "i_minus", "cav_accuracy",
                "p_value"):
        np.testing.assert_allclose(frame[col].to_numpy(), expected[col].to_numpy(), rtol=1e-12)
    cavs = [e for e in Cache(world["cache"]).info() if e["kind"] == "cav"]
    assert len(cavs) == (len(CONCEPTS) + 1) * RUNS
