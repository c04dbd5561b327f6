"""``cnnexplain visualize`` (feature visualization, Olah et al. 2017) against known answers: a
colour detector's images have its colour, an optimized image beats the dataset's best example,
seeds and batching do not change images, the neuron convention, the parameterization, the
diversity term; and the real CLI's outputs and one-line errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from clihelp import assert_one_line_error, run_inproc, snapshot
from data_fixtures import broden_export  # noqa: F401  (fixture)
from cnnexplain.activations import compute_activations
from cnnexplain.data.datasets import open_dataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.visualize import outputs, param
from cnnexplain.explain.visualize.examples import dataset_values, pool_for, rank
from cnnexplain.explain.visualize.objectives import (OBJECTIVES, diversity, gram_cosines,
                                                     one_hot)
from cnnexplain.explain.visualize.optimize import Goal, Settings, optimize
from cnnexplain.fingerprint import module_digest
from cnnexplain.models.smallcnn import SmallCNN

DATA = "synthetic:n=48,res=32"
PLAIN = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
PREPS = {"plain": PLAIN, "imagenet": Preprocessing()}


class Colours(nn.Module):
    """``conv`` is a 1x1 conv of the [0, 1] pixels (denormalized first, so it sees colours
    whatever the preprocessing): channel 0 = R - G - B (red), channel 1 = G - R - B (green);
    ``fc`` is the identity, so logit c = the mean of channel c."""

    def __init__(self, prep: Preprocessing = PLAIN):
        super().__init__()
        self.prep = prep
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]])[:, :, None, None])
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.conv(self.prep.denormalize(x))).flatten(1))


def _goals(objective, units, k, signs=(1.0, -1.0), div=1, position=None):
    out, g = [], 0
    for u in units:
        for s in signs:
            for r in range(div):
                out.append(Goal(objective, one_hot(u, k), sign=s, position=position, group=g,
                                replica=r, key=f"{objective}|{u}|{s}|{r}", unit=str(u)))
            g += 1
    return out


def _png_means(image: torch.Tensor) -> np.ndarray:
    """Mean R, G, B in [0, 1] of the PNG the command writes for an image."""
    arr = np.asarray(Image.open(io.BytesIO(outputs.png(outputs.to_uint8(image)))))
    return arr.reshape(-1, 3).mean(0) / 255.0


# -- (a) a colour detector's visualizations are its colour ---------------------------------

@pytest.mark.parametrize("decorrelate", [True, False], ids=["decorrelated", "rgb"])
@pytest.mark.parametrize("prep", sorted(PREPS))
def test_colour_detector_max_is_its_colour_and_min_the_opposite(decorrelate, prep):
    p = PREPS[prep]
    model = Colours(p)
    goals = _goals("channel", [0, 1], 2)  # red max, red min, green max, green min
    steps = 512 if decorrelate else 256  # lucid's colour matrix slows the chroma directions
    r = optimize(model, "conv", goals, Settings(steps=steps, side=32, decorrelate=decorrelate),
                 normalize=p.normalize)
    red_max, red_min, green_max, green_min = (_png_means(im) for im in r.images)
    margin = 0.3 if decorrelate else 0.6
    assert red_max[0] > max(red_max[1], red_max[2]) + margin, red_max
    assert min(red_min[1], red_min[2]) > red_min[0] + margin, red_min  # cyan
    assert green_max[1] > max(green_max[0], green_max[2]) + margin, green_max
    assert min(green_min[0], green_min[2]) > green_min[1] + margin, green_min  # magenta
    if not decorrelate:
        assert red_max[0] > 0.8 and red_min[0] < 0.2
    assert r.values[0] > 0 > r.values[1] and r.values[2] > 0 > r.values[3]


def test_class_logit_of_the_colour_model_is_its_colour():
    """logit 0 = mean of the red channel (an identity head): its image is red."""
    model = Colours()
    goals = [Goal("logit", one_hot(c, 2), key=f"logit|{c}", group=c) for c in (0, 1)]
    r = optimize(model, None, goals, Settings(steps=256, side=32, decorrelate=False),
                 normalize=PLAIN.normalize)
    red, green = (_png_means(im) for im in r.images)
    assert red[0] > 0.8 > 0.2 > max(red[1], red[2])
    assert green[1] > 0.8 > 0.2 > max(green[0], green[2])


# -- (b) the optimized image beats the dataset's best example ------------------------------

def test_optimized_beats_the_best_example_on_the_colour_model():
    model = Colours(Preprocessing())
    data = open_dataset(DATA, "test", Preprocessing())
    obj = OBJECTIVES["channel"]
    acts = compute_activations(model, ["conv"], data, model_fingerprint=module_digest(model),
                               preprocessing=Preprocessing(), pool=pool_for(obj))
    weights = torch.stack([one_hot(c, 2) for c in (0, 1)])
    values = dataset_values(acts, "conv", obj, weights)
    r = optimize(model, "conv", _goals("channel", [0, 1], 2), Settings(steps=256, side=32),
                 normalize=Preprocessing().normalize)
    best_max, best_min = values.max(0), values.min(0)
    assert r.values[0] >= best_max[0] and r.values[2] >= best_max[1]
    assert r.values[1] <= best_min[0] and r.values[3] <= best_min[1]


def test_optimized_beats_the_best_example_on_smallcnn_through_the_cli(tmp_path):
    """A random smallcnn on the synthetic world, three pre-ReLU channels (the BatchNorm before
    the last ReLU), both directions: every max image's objective is at least its best dataset
    example's, every min image's at most its bottom example's."""
    out = tmp_path / "out"
    r = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--layer",
                   "features.12", "--units", "0,5,9", "--direction", "both", "--steps", "128",
                   "--examples", "3", "--out", out, "--cache-dir", tmp_path / "cache",
                   "--device", "cpu", "--json")
    assert r.code == 0, r.err
    table = pd.read_csv(out / "visualize" / "index.csv")
    assert len(table) == 6
    mx, mn = table[table.direction == "max"], table[table.direction == "min"]
    assert (mx.objective_value >= mx.top_example_objective).all(), table
    assert (mn.objective_value <= mn.top_example_objective).all(), table
    assert json.loads(r.out)["reached_best_example"] == 1.0


# -- (c) seeds, (d) batching -------------------------------------------------------------

def _smallcnn():
    torch.manual_seed(0)
    return SmallCNN(10, width=8).eval()


def test_same_seed_same_image_other_seed_other_image():
    model = _smallcnn()
    goals = _goals("channel", [3], 32)
    norm = Preprocessing().normalize
    a = optimize(model, "features.12", goals, Settings(steps=24, side=32), normalize=norm)
    b = optimize(model, "features.12", goals, Settings(steps=24, side=32), normalize=norm)
    c = optimize(model, "features.12", goals, Settings(steps=24, side=32, seed=1),
                 normalize=norm)
    assert torch.equal(a.images, b.images) and torch.equal(a.values, b.values)
    assert (a.images - c.images).abs().max() > 0.05


def test_batching_many_units_gives_the_images_of_one_unit_at_a_time():
    """Units x directions x 2 diverse replicas in one batch, in batches of 4 images, and one
    unit at a time: the same images (each image has its own seed and loss terms)."""
    model = _smallcnn()
    norm = Preprocessing().normalize
    s = Settings(steps=16, side=32, batch_size=64)
    units = [0, 4, 7]
    together = optimize(model, "features.12", _goals("channel", units, 32, div=2), s,
                        normalize=norm)
    small = optimize(model, "features.12", _goals("channel", units, 32, div=2),
                     Settings(steps=16, side=32, batch_size=4), normalize=norm)
    alone = torch.cat([optimize(model, "features.12", _goals("channel", [u], 32, div=2), s,
                                normalize=norm).images for u in units])
    assert together.batches == 1 and small.batches == 3
    torch.testing.assert_close(together.images, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.images, small.images, rtol=0, atol=1e-5)


# -- objectives, parameterization, diversity ---------------------------------------------

def test_neuron_changes_only_its_pixel_at_column_x_row_y():
    """A 1x1 conv, pixel parameterization, no transforms: only pixel (row y, column x)
    receives gradient, so only it leaves grey."""
    model = Colours()
    goal = Goal("neuron", one_hot(0, 2), position=(5, 2), key="n")
    r = optimize(model, "conv", [goal], Settings(steps=64, side=16, param="pixel",
                                                  transforms="none", decorrelate=False),
                 normalize=PLAIN.normalize)
    moved = (r.images[0] - 0.5).abs().amax(0) > 0.05
    assert moved.nonzero().tolist() == [[2, 5]]
    assert r.images[0, 0, 2, 5] > 0.8 and r.images[0, 1, 2, 5] < 0.2


def test_fourier_parameterization_known_values():
    """A zero spectrum is uniform grey 0.5; the DC coefficient's scale is max(H, W); the
    colour matrix is lucid's, normalized by its largest column norm."""
    img = param.FourierImage([torch.Generator().manual_seed(0)], 12, 16)
    with torch.no_grad():
        img.params[0].zero_()
    assert torch.allclose(img(), torch.full((1, 3, 12, 16), 0.5))
    scale = param.spectrum_scale(12, 16)
    assert scale.shape == (12, 9) and scale[0, 0] == 16
    m = param.color_matrix()
    assert torch.allclose(m.norm(dim=0).max(), torch.tensor(1.0))
    assert torch.allclose(m[0], torch.tensor([0.5628, 0.1948, 0.0433]), atol=1e-3)


def test_diversity_term_pushes_a_units_images_apart():
    model = _smallcnn()
    norm = Preprocessing().normalize
    goals = _goals("channel", [2], 32, signs=(1.0,), div=3)
    plain = optimize(model, "features.12", goals, Settings(steps=48, side=32,
                                                          diversity_weight=0.0), normalize=norm)
    diverse = optimize(model, "features.12", goals, Settings(steps=48, side=32,
                                                            diversity_weight=1e2),
                       normalize=norm)

    def similarity(images):
        acts = {}
        h = model.features[12].register_forward_hook(lambda m, i, o: acts.update(a=o.clone()))
        with torch.no_grad():
            model(norm(images))
        h.remove()
        return float(diversity(acts["a"]))

    assert similarity(diverse.images) < similarity(plain.images) - 0.1
    c = gram_cosines(torch.rand(3, 4, 5, 5))
    assert torch.allclose(c.diagonal(), torch.ones(3))


def test_rank_orders_top_and_bottom_examples():
    values = np.array([[0.1, 5.0], [0.9, -1.0], [0.5, 2.0]], np.float32)
    top, bottom = rank(values, 2)
    assert top.tolist() == [[1, 2], [0, 2]] and bottom.tolist() == [[0, 2], [1, 2]]


# -- (f) the CLI's outputs ---------------------------------------------------------------

REQUIRED = ("layer", "unit", "direction", "objective", "objective_value",
            "top_example_objective", "image")


def _readable(path):
    with Image.open(path) as im:
        im.load()
        return im.size


def test_cli_writes_the_index_pngs_grid_and_page(tmp_path):
    out = tmp_path / "out"
    r = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--units",
                   "top:2", "--diversity", "2", "--steps", "8", "--examples", "3", "--out", out,
                   "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert r.code == 0, r.err
    root = out / "visualize"
    table = pd.read_csv(root / "index.csv")
    assert set(REQUIRED) <= set(table.columns)
    assert len(table) == 2 * 2 and set(table.replica) == {0, 1}
    assert table.layer.eq("features").all() and table.objective.eq("channel").all()
    for rel in table.image:
        assert _readable(root / rel) == (32, 32)
    for rel in set(table.top_examples) | set(table.bottom_examples):
        w, h = _readable(root / rel)
        assert h == 96 and w == 3 * 96 + 2 * 2
    assert _readable(root / "grid.png")[0] > 100
    page = (root / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 + 2 * 2 and "src=\"http" not in page
    assert "visualize" in json.loads((out / "run.json").read_text())["commands"]


def test_cli_target_rows_name_the_class_and_other_objectives_run(tmp_path):
    base = ["--backbone", "smallcnn", "--dataset", DATA, "--steps", "4", "--examples", "2",
            "--cache-dir", tmp_path / "cache", "--device", "cpu"]
    r = run_inproc("visualize", *base, "--target", "circle,3", "--out", tmp_path / "t")
    assert r.code == 0, r.err
    t = pd.read_csv(tmp_path / "t" / "visualize" / "index.csv")
    names = open_dataset(DATA, "test").class_names
    assert list(t.unit) == ["circle", names[3]] and t.layer.eq("logits").all()
    assert t.objective.eq("logit").all()
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(2, 64)))
    for extra, objective, rows in (
            (["--neuron", "3,4", "--units", "1"], "neuron", 1),
            (["--objective", "layer", "--direction", "both"], "layer", 2),
            (["--objective", "direction", "--direction-vector", tmp_path / "v.npy"],
             "direction", 2)):
        out = tmp_path / objective
        r = run_inproc("visualize", *base, *extra, "--out", out)
        assert r.code == 0, (objective, r.err)
        t = pd.read_csv(out / "visualize" / "index.csv")
        assert len(t) == rows and t.objective.eq(objective).all()
        assert t.top_example_objective.notna().all()
    assert (pd.read_csv(tmp_path / "neuron" / "visualize" / "index.csv")[["x", "y"]]
            .values.tolist() == [[3, 4]])


# -- (e) bad input: one line, exit 2, nothing written --------------------------------------

ERRORS = [
    ("unknown-unit", ["--units", "0,red"], ("unknown unit",)),
    ("unknown-layer", ["--layer", "features.99"], ("does not exist",)),
    ("unknown-class", ["--target", "giraffe"], ("unknown --target",)),
    ("units-out-of-range", ["--units", "3,64"], ("--units 64 is out of range", "64 channels")),
    ("top-too-many", ["--units", "top:99"], ("more channels",)),
    ("neuron-on-1x1", ["--layer", "avgpool", "--neuron", "0,0"], ("1x1",)),
    ("neuron-outside", ["--neuron", "8,0"], ("outside",)),
    ("steps-0", ["--steps", "0"], ("--steps",)),
    ("size-0", ["--size", "0"], ("--size",)),
    ("target-and-units", ["--target", "circle", "--units", "1"], ("exclude",)),
    ("bad-direction-vector", ["--objective", "direction", "--direction-vector", "missing.npy"],
     ("does not exist",)),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    _, args, words = case
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = snapshot(out, cache)
    r = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--limit", "8",
                   *args, "--out", out, "--cache-dir", cache, "--device", "cpu")
    assert_one_line_error(r, 2, *words)
    assert snapshot(out, cache) == before
    assert not out.exists()


def test_units_carry_their_dissection_label_from_the_same_run_directory(broden_export, tmp_path):
    """Seed 001's building-blocks view: a unit's Network Dissection label and IoU beside its
    visualization, joined from a dissect run of the same model and layer in the same --out;
    a dissect run of another model is never joined."""
    _, root = broden_export
    env = {"CNNEXPLAIN_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    d = run_inproc("dissect", "--backbone", "smallcnn", "--num-classes", "6", "--broden", root,
                   "--layer", "features",
                   "--limit", "12", "--quantile", "0.05", "--top-images", "2", "--out", out,
                   "--device", "cpu", env=env)
    assert d.code == 0, d.err
    tally = pd.read_csv(out / "dissect" / "tally.csv").set_index("unit")
    v = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--units", "0,3,5",
                   "--steps", "2", "--examples", "2", "--out", out, "--device", "cpu", env=env)
    assert v.code == 0, v.err
    table = pd.read_csv(out / "visualize" / "index.csv")
    for row in table.itertuples():
        assert row.dissect_label == tally.loc[row.index + 1, "label"]
        assert row.dissect_iou == pytest.approx(tally.loc[row.index + 1, "score"])
    page = (out / "visualize" / "index.html").read_text()
    assert f"dissection: {table.dissect_label[0]}" in page
    # another model (another seed's initialization) in the same directory: no join
    v = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--units", "0",
                   "--steps", "2", "--examples", "2", "--out", out, "--device", "cpu",
                   "--seed", "1", env=env)
    assert v.code == 0, v.err
    assert pd.read_csv(out / "visualize" / "index.csv").dissect_label.isna().all()


def test_report_shows_the_visualization_section(tmp_path):
    out = tmp_path / "run"
    r = run_inproc("visualize", "--backbone", "smallcnn", "--dataset", DATA, "--units", "0,1",
                   "--steps", "2", "--examples", "2", "--out", out, "--device", "cpu",
                   "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    r = run_inproc("report", out, "--out", tmp_path / "rep", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["sections"] == {"run": ["visualization"]}
    page = (tmp_path / "rep" / "report" / "index.html").read_text()
    body = page.split("Feature visualization</h2>", 1)[1]
    assert "run visualization" in body and "top_example_objective" in body


def test_dissect_page_shows_the_units_visualizations(broden_export, tmp_path):
    """visualize first, then dissect of the same model and layer: dissect/index.html shows each
    visualized unit's image (a relative link into visualize/) beside its label and top images."""
    _, root = broden_export
    env = {"CNNEXPLAIN_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    v = run_inproc("visualize", "--backbone", "smallcnn", "--num-classes", "6", "--dataset",
                   DATA, "--units", "2,4", "--steps", "2", "--examples", "2", "--out", out,
                   "--device", "cpu", env=env)
    assert v.code == 0, v.err
    d = run_inproc("dissect", "--backbone", "smallcnn", "--num-classes", "6", "--broden", root,
                   "--layer", "features", "--limit", "12", "--quantile", "0.05", "--top-images",
                   "2", "--out", out, "--device", "cpu", env=env)
    assert d.code == 0, d.err
    page = (out / "dissect" / "index.html").read_text()
    table = pd.read_csv(out / "visualize" / "index.csv")
    for row in table.itertuples():
        assert f"src='../visualize/{row.image}'" in page
        assert (out / "dissect" / ".." / "visualize" / row.image).is_file()
    assert page.count("class='vis'") == 2


class _DeadOnGrey(nn.Module):
    """Channel 0 = ReLU(R - 0.8): zero on a grey image (R = 0.5), so lucid's near-grey start
    gets no gradient; channel 1 = ReLU(G - 0.3), alive on grey."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[:, :, None, None])
            self.conv.bias.copy_(torch.tensor([-0.8, -0.3]))

    def forward(self, x):
        return self.relu(self.conv(x)).mean((2, 3))


def test_a_unit_dead_on_grey_restarts_from_louder_noise_and_is_not_stalled():
    """A unit that is zero around the near-grey initial image gets no gradient at the first
    step; the optimizer restarts that image from louder noise (its own generator), so it is
    optimized instead of returned grey, and a live unit optimized in the same batch gets the
    image it gets alone."""
    model = _DeadOnGrey()
    dead = Goal("channel", one_hot(0, 2), key="dead", unit="0")
    live = Goal("channel", one_hot(1, 2), key="live", unit="1", group=1)
    s = Settings(steps=64, side=16, seed=0, batch_size=4)
    both = optimize(model, "relu", [dead, live], s, normalize=PLAIN.normalize)
    assert not bool(both.stalled.any())
    assert float(both.values[0]) > 0  # some pixels were pushed past R = 0.8
    alone = optimize(model, "relu", [live], s, normalize=PLAIN.normalize)
    assert torch.equal(both.images[1], alone.images[0])
