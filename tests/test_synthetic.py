"""The synthetic world: geometry, colours, determinism, planted correlations, the dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import _one_thread  # noqa: F401  (autouse fixture)

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import (
    COLORS,
    CROSS_HALF,
    CROSS_THICK,
    HANS_ELSEWHERE,
    MARKER,
    MARKER_COLOR,
    ONTOLOGY,
    SHADE_MIN,
    SHAPES,
    SPLIT_OFFSETS,
    STAR_INNER,
    SyntheticDataset,
    WorldConfig,
    render,
)
from cnnexplain.errors import UsageError

# Area of each shape in units of its circumradius squared.
AREA = {
    "circle": math.pi,
    "ring": math.pi * (1.0 - 0.25),
    "square": 2.0,
    "triangle": 3.0 * math.sqrt(3.0) / 4.0,
    "hexagon": 3.0 * math.sqrt(3.0) / 2.0,
    "diamond": 2.0 * 1.0 * 0.6,
    "star": 5.0 * STAR_INNER * math.sin(math.pi / 5.0),
    "cross": 8.0 * CROSS_HALF * CROSS_THICK - 4.0 * CROSS_THICK**2,
}
ALL = WorldConfig(num_images=64, resolution=64, seed=11, classes=tuple(SHAPES))


@pytest.fixture(scope="module")
def samples():
    return [render(ALL, i) for i in range(ALL.num_images)]


def test_ontology_names_and_numbers():
    assert ONTOLOGY.number("black-c") == 1 and ONTOLOGY.label_names[0] == "-"
    assert [c.number for c in ONTOLOGY.concepts] == list(range(1, len(ONTOLOGY) + 1))
    assert all(n.endswith("-c") for n in ONTOLOGY.names_in("color"))
    assert all(n.endswith("-s") for n in ONTOLOGY.names_in("scene"))
    assert len(set(ONTOLOGY.label_names)) == len(ONTOLOGY.label_names)
    for s in SHAPES.values():
        assert all(ONTOLOGY.category_of(ONTOLOGY.number(p)) == "part" for p in s.parts)
    assert ONTOLOGY.category_of(ONTOLOGY.number("star-tip")) == "part"
    with pytest.raises(UsageError, match="star-tip"):
        ONTOLOGY.number("star-tips")


def test_mask_area_matches_geometry(samples):
    """Every shape's rendered mask covers its analytic area (circumradius r) within 4%."""
    seen = set()
    for s in samples:
        obj = s.objects[0]
        expected = AREA[obj.shape] * obj.radius**2
        assert abs(obj.mask.sum() - expected) / expected < 0.04, (
            obj.shape,
            obj.mask.sum(),
            expected,
        )
        seen.add(obj.shape)
    assert seen == set(SHAPES)


def test_circle_is_a_disc(samples):
    for s in samples:
        obj = s.objects[0]
        if obj.shape != "circle":
            continue
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        disc = (xx - obj.center[0]) ** 2 + (yy - obj.center[1]) ** 2 <= obj.radius**2
        assert np.array_equal(disc, obj.mask)


def test_box_tightly_bounds_mask(samples):
    for s in samples:
        for obj in s.objects:
            x0, y0, x1, y1 = obj.box
            ys, xs = np.nonzero(obj.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_label_maps_agree_with_objects(samples):
    """object map = shape on its mask; layer-1 parts partition the object into its two parts;
    layer-2 parts are inside the object; material covers exactly the object pixels."""
    for s in samples:
        obj = s.objects[0]
        shape = SHAPES[obj.shape]
        body = s.object == ONTOLOGY.number(obj.shape)
        assert np.array_equal(body, obj.mask)
        layer1, layer2 = s.part
        assert np.array_equal(layer1 > 0, s.object > 0)
        assert set(np.unique(layer1[body])) == {ONTOLOGY.number(p) for p in shape.parts}
        assert np.all(s.object[layer2 > 0] > 0)
        if shape.detail is None:
            assert not layer2[body].any()
        else:
            assert set(np.unique(layer2[body])) == {0, ONTOLOGY.number(shape.detail)}
        assert np.array_equal(s.material > 0, s.object > 0)
        assert set(np.unique(s.material[body])) == {ONTOLOGY.number(obj.material)}
        assert set(np.unique(s.color[body])) == {ONTOLOGY.number(f"{obj.color}-c")}
        assert ONTOLOGY.category_of(s.image_labels["scene"][0]) == "scene"
        assert ONTOLOGY.name(s.image_labels["texture"][0]) == s.texture


def test_pixel_colours_match_colour_labels(samples):
    """Each pixel is its colour label's RGB times one shade in [SHADE_MIN, 1]."""
    palette = np.zeros((len(ONTOLOGY) + 1, 3))
    for name, rgb in COLORS.items():
        palette[ONTOLOGY.number(f"{name}-c")] = rgb
    for s in samples[:16]:
        ref = palette[s.color]
        img = s.image.astype(np.float64)
        shade = img.sum(-1) / ref.sum(-1)
        assert shade.min() >= SHADE_MIN - 0.02 and shade.max() <= 1.0 + 0.02
        assert np.abs(img - ref * shade[..., None]).max() <= 2.0


def test_render_is_pure_and_index_independent():
    cfg = WorldConfig(
        num_images=10, resolution=32, seed=5, second_object=0.5, clever_hans=("star", 0.5)
    )
    forward = [render(cfg, i).image for i in range(10)]
    backward = [render(cfg, i).image for i in reversed(range(10))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    assert not np.array_equal(
        render(cfg, 3).image, render(WorldConfig(**{**cfg.__dict__, "seed": 6}), 3).image
    )
    ds = SyntheticDataset(cfg)
    batch = next(iter(DataLoader(ds, batch_size=10, num_workers=0)))
    assert torch.equal(
        (batch["image"] * 255).round().byte().permute(0, 2, 3, 1),
        torch.from_numpy(np.stack(forward)),
    )


def test_main_color_repaints_only_the_main_object():
    """``render(..., main_color=c)`` is the counterfactual of the same scene: the main object's
    pixels get colour c (same shading), every other pixel and label map is unchanged."""
    cfg = WorldConfig(num_images=24, resolution=32, seed=3, second_object=0.6,
                      correlations=(("red-c", "circle", 0.9),))
    changed = 0
    for i in range(24):
        s = render(cfg, i)
        for other in ("blue", "yellow"):
            t = render(cfg, i, main_color=other)
            main = s.objects[0].mask
            assert np.array_equal(t.image[~main], s.image[~main])
            assert np.array_equal(t.objects[0].mask, main)
            assert t.objects[0].color == other and t.label == s.label
            assert (t.color[main] == ONTOLOGY.number(f"{other}-c")).all()
            assert np.array_equal(t.color[~main], s.color[~main])
            assert np.array_equal(t.object, s.object) and np.array_equal(t.part, s.part)
            assert [o.color for o in t.objects[1:]] == [o.color for o in s.objects[1:]]
            changed += int(s.objects[0].color != other and not np.array_equal(t.image, s.image))
    assert changed >= 24  # a repaint in a new colour changes the image
    with pytest.raises(UsageError, match="unknown object colour"):
        render(cfg, 0, main_color="mauve")


def test_classes_balanced_and_splits_disjoint():
    cfg = WorldConfig(num_images=12, resolution=32, num_val=6)
    labels = [SyntheticDataset(cfg)[i]["label"].item() for i in range(12)]
    assert labels == [i % 6 for i in range(12)]
    val = SyntheticDataset(cfg, "val")
    test = SyntheticDataset(cfg, "test")
    assert len(val) == 6 and len(test) == 2
    assert val.world_index(0) == SPLIT_OFFSETS["val"]
    assert not np.array_equal(val.sample(0).image, SyntheticDataset(cfg).sample(0).image)


def test_correlation_strength_holds():
    cfg = WorldConfig(
        num_images=600,
        resolution=32,
        seed=2,
        correlations=(("red-c", "star", 0.9), ("desert-s", "circle", 1.0), ("wood", "ring", 0.0)),
    )
    red, n_star, red_other, n_other = 0, 0, 0, 0
    for i in range(cfg.num_images):
        s = render(cfg, i)
        is_red = s.objects[0].color == "red"
        if s.class_name == "star":
            n_star += 1
            red += is_red
            assert is_red == ("red-c" in s.planted)
        else:
            n_other += 1
            red_other += is_red
        if s.class_name == "circle":
            assert s.scene == "desert-s" and "desert-s" in s.planted
        if s.class_name == "ring":
            assert s.objects[0].material != "wood"
    # 100 stars: binomial sd 0.03 around 0.9
    assert 0.8 <= red / n_star <= 0.98
    assert red_other / n_other < 0.2


def test_clever_hans_flag_matches_patch():
    cfg = WorldConfig(
        num_images=300, resolution=32, seed=4, clever_hans=("star", 0.8), second_object=0.3
    )
    marker, pink = ONTOLOGY.number(MARKER), ONTOLOGY.number(f"{MARKER_COLOR}-c")
    rate = {True: [], False: []}
    for i in range(cfg.num_images):
        s = render(cfg, i)
        patch = s.object == marker
        rate[s.class_name == "star"].append(s.hans)
        if s.hans:
            x0, y0, x1, y1 = s.hans_box
            expected = np.zeros_like(patch)
            expected[y0:y1, x0:x1] = True
            assert np.array_equal(patch, expected)
            assert np.all(s.image[patch] == COLORS[MARKER_COLOR])
            assert np.all(s.color[patch] == pink) and not s.part[:, patch].any()
            assert not any(o.mask[patch].any() for o in s.objects)
        else:
            assert not patch.any() and not (s.color == pink).any() and s.hans_box is None
    assert 0.65 <= np.mean(rate[True]) <= 0.95
    assert np.mean(rate[False]) < HANS_ELSEWHERE + 0.04


def test_second_object_is_another_class_and_apart():
    cfg = WorldConfig(num_images=60, resolution=64, seed=8, second_object=1.0)
    apart = 0
    for i in range(cfg.num_images):
        s = render(cfg, i)
        assert len(s.objects) == 2
        main, second = s.objects
        assert second.class_index != main.class_index
        assert not (main.mask & second.mask).any()
        assert (
            np.array_equal(s.object == ONTOLOGY.number(second.shape), second.mask)
            or main.shape == second.shape
        )
        apart += not s.overlap
        if not s.overlap:
            expected = AREA[second.shape] * second.radius**2
            assert abs(second.mask.sum() - expected) / expected < 0.08
    assert apart >= 50


def test_dataset_items_and_collate():
    cfg = WorldConfig(num_images=8, resolution=32, second_object=0.5, clever_hans=("star", 1.0))
    ds = SyntheticDataset(cfg, concepts=True)
    batch = next(iter(DataLoader(ds, batch_size=8)))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    assert shapes["image"] == ((8, 3, 32, 32), torch.float32)
    assert shapes["mask"] == ((8, 32, 32), torch.uint8)
    assert shapes["box"] == ((8, 4), torch.float32)
    assert shapes["second_mask"] == ((8, 32, 32), torch.uint8)
    assert shapes["masks"] == ((8, 5, 32, 32), torch.int32)
    assert shapes["image_labels"] == ((8, 2), torch.int32)
    assert batch["label"].dtype == torch.int64 and batch["hans"].dtype == torch.bool
    for i in range(8):
        s = ds.sample(i)
        assert batch["hans"][i].item() == s.hans
        assert batch["second_label"][i].item() == (
            s.objects[1].class_index if len(s.objects) > 1 else -1
        )
        assert torch.equal(batch["masks"][i, 2:4], torch.from_numpy(s.part))
    assert ds.layer_categories == ["color", "object", "part", "part", "material"]
    assert ds.label_names[int(batch["masks"][0, 1].max())] in SHAPES


def test_resize_renders_at_that_resolution():
    cfg = WorldConfig(num_images=4, resolution=64)
    ds = SyntheticDataset(cfg, preprocessing=Preprocessing(resize=32))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert np.array_equal(
        item["mask"].numpy().astype(bool), render(cfg.with_resolution(32), 0).objects[0].mask
    )


def test_fingerprint_cheap_and_sensitive():
    cfg = WorldConfig(num_images=10, resolution=32)
    a = SyntheticDataset(cfg).fingerprint()
    assert a == SyntheticDataset(WorldConfig(num_images=10, resolution=32)).fingerprint()
    assert a != SyntheticDataset(cfg, "val").fingerprint()
    assert a != SyntheticDataset(WorldConfig(num_images=10, resolution=32, seed=1)).fingerprint()
    assert a != SyntheticDataset(cfg, limit=5).fingerprint()
    assert SyntheticDataset(cfg).describe()["size"] == 10


def test_spec_round_trip():
    spec = "synthetic:n=600,res=32,seed=1,correlate=red-c@star=0.9,hans=star@0.8,second=0.3"
    cfg = WorldConfig.from_spec(spec)
    assert cfg.num_images == 600 and cfg.resolution == 32 and cfg.seed == 1
    assert cfg.correlations == (("red-c", "star", 0.9),) and cfg.clever_hans == ("star", 0.8)
    assert cfg.second_object == 0.3
    assert WorldConfig.from_spec(cfg.to_spec()) == cfg
    assert WorldConfig.from_spec("synthetic") == WorldConfig()
    two = WorldConfig.from_spec(
        "synthetic:classes=star+cross,correlate=red-c@star=1,correlate=striped@cross=0.5"
    )
    assert two.classes == ("star", "cross") and len(two.correlations) == 2
    assert WorldConfig.from_dict(two.to_dict()) == two


@pytest.mark.parametrize(
    "spec, words",
    [
        ("synthetic:size=3", ["unknown synthetic option 'size'", "valid options: n,"]),
        ("synthetic:n=abc", ["n='abc'", "not an integer"]),
        ("synthetic:res=8", ["res=8", ">= 16"]),
        ("synthetic:correlate=red@star=0.9", ["unknown concept 'red'", "red-c"]),
        ("synthetic:correlate=red-c@star", ["malformed", "correlate=red-c@star=0.9"]),
        ("synthetic:correlate=star-tip@star=0.9", ["cannot be correlated"]),
        ("synthetic:correlate=pink-c@star=0.9", ["cannot be correlated"]),
        ("synthetic:hans=stars@0.5", ["unknown shape class 'stars'", "star"]),
        ("synthetic:second=1.5", ["probability"]),
        ("synthetic:classes=star", [">= 2 distinct shapes"]),
        ("synthetic:n", ["has no value"]),
        ("synthetic:seed=1,seed=2", ["given twice"]),
    ],
)
def test_spec_errors_are_one_line(spec, words):
    with pytest.raises(UsageError) as exc:
        WorldConfig.from_spec(spec)
    line = exc.value.line()
    assert "\n" not in line
    for w in words:
        assert w in line


def test_fresh_training_images_every_epoch():
    """The train split of a fresh world (the default) draws new images each epoch: epoch e is
    world indices e*n .. (e+1)*n - 1; val and test, and fresh=0, never change."""
    from cnnexplain.data.synthetic import SyntheticDataset

    cfg = WorldConfig.from_spec("synthetic:n=12,res=16")
    assert cfg.fresh and WorldConfig.from_spec("synthetic:n=12,res=16,fresh=0").fresh is False
    train = SyntheticDataset(cfg, "train")
    e0, e1, e2 = (train.epoch_view(e) for e in (0, 1, 2))
    assert e0 is train and len(e1) == len(e2) == 12
    assert e1.world_index(0) == 12 and e2.world_index(5) == 29
    assert not np.array_equal(e0[0]["image"].numpy(), e1[0]["image"].numpy())
    np.testing.assert_array_equal(e1[3]["image"].numpy(),
                                  SyntheticDataset(cfg, "train").epoch_view(1)[3]["image"].numpy())
    assert e1[3]["label"] == 3 % len(cfg.classes)  # classes stay balanced
    val = SyntheticDataset(cfg, "val")
    assert val.epoch_view(3) is val
    fixed = SyntheticDataset(WorldConfig.from_spec("synthetic:n=12,res=16,fresh=0"), "train")
    assert fixed.epoch_view(4) is fixed
    assert WorldConfig.from_spec(cfg.to_spec()) == cfg
    assert WorldConfig.from_spec("synthetic:fresh=0").to_spec() == "synthetic:fresh=0"
