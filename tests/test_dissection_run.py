"""Known-answer dissection on generated Broden-format data: a model whose units' maps are known
concept masks (looked up per image) is dissected end to end through the dataset reader, the
activation cache and both passes, and every count, threshold and IoU is compared with brute
force computed here with plain numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_fixtures import _one_thread, broden_export, count_decodes  # noqa: F401
from test_dissection import bilinear_loop

from cnnexplain.cache.store import Cache
from cnnexplain.data.broden import BrodenDataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain.dissect.labels import ConceptSpace
from cnnexplain.explain.dissect.quantiles import sketch_rank
from cnnexplain.explain.dissect.run import (
    DissectConfig, TopImages, _Shard, check_memory, dissect, plan_layers, shard_range)

PREP = Preprocessing()


class LookupModel(nn.Module):
    """Recognizes each dataset image (nearest stored normalized image) and outputs its stored
    maps at ``probe`` ([K, h, w] per image) and their 2x2 average at ``coarse``."""

    def __init__(self, dataset, maps: torch.Tensor):
        super().__init__()
        bank = torch.stack([PREP.normalize(dataset[i]["image"][None])[0]
                            for i in range(len(dataset))])
        self.register_buffer("bank", bank.flatten(1))
        self.register_buffer("maps", maps)
        self.probe = nn.Identity()
        self.coarse = nn.AvgPool2d(2)
        self.head = nn.Linear(1, 2)

    def forward(self, x):
        which = torch.cdist(x.flatten(1), self.bank).argmin(dim=1)
        a = self.probe(self.maps[which])
        self.coarse(a)
        return self.head(a.mean(dim=(1, 2, 3))[:, None])


def known_maps(ds: BrodenDataset, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Per image, units = [color concept, object concept, part concept (any part layer),
    scene concept (whole image), texture concept, random dyadic values on the left edge] at
    half the mask
    resolution (2x2 averages of the masks: dyadic values, exact after bilinear upsampling)."""
    space = ConceptSpace.from_dataset(ds)
    pick = {}
    for cat in ("color", "object", "part", "scene", "texture"):
        g = space.categories.index(cat)
        pick[cat] = int(np.flatnonzero(space.label_category == g)[0])
    sh, sw = ds.mask_size
    gen = torch.Generator().manual_seed(seed)
    maps = torch.zeros(len(ds), 6, sh // 2, sw // 2)
    for i in range(len(ds)):
        item = ds[i]
        m, il = item["masks"], item["image_labels"]
        for u, cat in enumerate(("color", "object", "part")):
            hit = (m == pick[cat]).any(dim=0).float()
            maps[i, u] = F.avg_pool2d(hit[None, None], 2)[0, 0]
        maps[i, 3] = float(bool((il == pick["scene"]).any()))
        maps[i, 4] = float(bool((il == pick["texture"]).any())) * 0.5
        maps[i, 5] = torch.randint(0, 16, (sh // 2, sw // 2), generator=gen).float() / 8
        maps[i, 5, :, 2:] = 0                          # two left feature columns only
    return maps, [space.names[pick[c]] for c in ("color", "object", "part", "scene", "texture")]


def brute_force_dissection(ds, maps: np.ndarray, q: float):
    """Thresholds by np.quantile, masks by looped bilinear upsampling, IoU by loops."""
    n, k = maps.shape[:2]
    space = ConceptSpace.from_dataset(ds)
    lc = space.label_category
    ncat = len(space.categories)
    nl = len(lc)
    thr = np.quantile(maps.transpose(1, 0, 2, 3).reshape(k, -1).astype(np.float64), 1 - q,
                      axis=1)
    sh, sw = ds.mask_size
    inter = np.zeros((k, nl), np.int64)
    truth = np.zeros(nl, np.int64)
    a_orig = np.zeros((k, ncat), np.int64)
    a_lite = np.zeros((k, ncat), np.int64)
    for i in range(n):
        item = ds[i]
        masks = item["masks"].numpy()
        il = [int(v) for v in item["image_labels"] if v > 0]
        concept = {}
        for c in range(1, nl):
            concept[c] = np.ones((sh, sw), bool) if c in il else (masks == c).any(axis=0)
            truth[c] += concept[c].sum()
        present = [any(concept[c].any() for c in range(1, nl) if lc[c] == g) for g in range(ncat)]
        for u in range(k):
            unit = bilinear_loop(maps[i, u].astype(np.float64), sh, sw) > thr[u]
            for c in range(1, nl):
                inter[u, c] += (unit & concept[c]).sum()
            for g in range(ncat):
                if present[g]:
                    a_orig[u, g] += unit.sum()
                if any((unit & concept[c]).any() for c in range(1, nl) if lc[c] == g):
                    a_lite[u, g] += unit.sum()
    out = {}
    for mode, act in (("original", a_orig), ("lite", a_lite)):
        m = np.zeros((k, nl))
        for u in range(k):
            for c in range(1, nl):
                if lc[c] < 0:
                    continue
                union = act[u, lc[c]] + truth[c] - inter[u, c]
                m[u, c] = inter[u, c] / union if union else 0.0
        out[mode] = m
    return thr, inter, truth, a_orig, a_lite, out


@pytest.fixture(scope="module")
def lookup(broden_export):
    _, root = broden_export
    ds = BrodenDataset(root)
    maps, names = known_maps(ds)
    return ds, LookupModel(ds, maps).eval(), maps, names


@pytest.mark.parametrize("q", [0.05, 0.5])
@pytest.mark.parametrize("mode", ["original", "lite"])
def test_known_answer_equals_brute_force(lookup, mode, q, tmp_path):
    ds, model, maps, names = lookup
    cfg = DissectConfig(quantile=q, iou_mode=mode, batch_size=5, top_images=3)
    res = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg,
                  cache=Cache(tmp_path / "cache"))
    lr = res.layers["probe"]
    thr, inter, truth, a_orig, a_lite, ious = brute_force_dissection(ds, maps.numpy(), q)
    np.testing.assert_array_equal(lr.thresholds, thr)
    np.testing.assert_array_equal(lr.tally["intersection"], inter)
    np.testing.assert_array_equal(lr.tally["truth"], truth)
    np.testing.assert_array_equal(lr.tally["activation_original"], a_orig)
    np.testing.assert_array_equal(lr.tally["activation_lite"], a_lite)
    np.testing.assert_array_equal(lr.iou, ious[mode])
    assert lr.tally["images"][0] == len(ds)
    assert inter[:, 1:].sum() > 0 and (ious[mode] > 0).any()
    assert (ious["lite"] >= ious["original"]).all()      # lite is never below the original
    if q == 0.5:
        # the random unit fires off the parts of images that have parts: lite differs there
        assert (ious["lite"][5] != ious["original"][5]).any()
        # thresholds below the maps' top value: a unit equal to a whole-image label detects it
        # with IoU exactly 1
        assert thr[3] < 1.0 and thr[4] < 0.5
        assert [res.space.names[c] for c in lr.labels.label[3:5]] == names[3:5]
        assert list(lr.labels.score[3:5]) == [1.0, 1.0]


def test_several_layers_in_one_pass_and_recompute(lookup, tmp_path):
    ds, model, maps, _ = lookup
    cfg = DissectConfig(quantile=0.1, batch_size=6, top_images=2)
    stored = dissect(model, ["probe", "coarse"], ds, preprocessing=PREP, config=cfg,
                     cache=Cache(tmp_path / "c"))
    again = dissect(model, ["probe", "coarse"], ds, preprocessing=PREP,
                    config=DissectConfig(quantile=0.1, batch_size=4, top_images=2,
                                         recompute=True), cache=None)
    coarse = F.avg_pool2d(maps, 2).numpy()
    thr, inter, *_ = brute_force_dissection(ds, coarse, 0.1)
    lr = stored.layers["coarse"]
    assert lr.feature_size == (coarse.shape[2], coarse.shape[3])
    np.testing.assert_array_equal(lr.thresholds, thr)
    np.testing.assert_array_equal(lr.tally["intersection"], inter)
    for layer in ("probe", "coarse"):
        a, b = stored.layers[layer], again.layers[layer]
        np.testing.assert_array_equal(a.thresholds, b.thresholds)
        for name in a.tally:
            np.testing.assert_array_equal(a.tally[name], b.tally[name], err_msg=name)
        np.testing.assert_array_equal(a.top_index, b.top_index)


def test_activations_come_from_the_cache_on_a_second_run(lookup, tmp_path):
    ds, model, _, _ = lookup
    cache = Cache(tmp_path / "cache")
    cfg = DissectConfig(quantile=0.1, batch_size=8)
    first = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg, cache=cache,
                    model_fingerprint="lookup")
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        second = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg, cache=cache,
                         model_fingerprint="lookup")
    finally:
        hook.remove()
    assert len(calls) == 1                                   # the probe image only
    np.testing.assert_array_equal(first.layers["probe"].iou, second.layers["probe"].iou)


def test_each_pass_decodes_only_what_it_reads(broden_export, tmp_path, monkeypatch):
    """The forward pass reads every image once and no mask, the tally pass every image's
    masks once and no image (each used to decode both); planning reads one image more (the
    probe of the layers' sizes)."""
    _, root = broden_export
    ds = BrodenDataset(root)
    model = LookupModel(ds, known_maps(ds)[0]).eval()
    per_image_masks = sum(1 for r in ds.rows for c in ds.pixel_categories
                          for e in r.cells.get(c, ()) if isinstance(e, str))
    counts = count_decodes(ds, monkeypatch)
    dissect(model, ["probe"], ds, preprocessing=PREP, config=DissectConfig(quantile=0.1,
            batch_size=8, top_images=2), cache=Cache(tmp_path / "c"))
    assert counts == {"image": len(ds) + 1, "mask": per_image_masks}


def test_sketch_mode_is_within_its_bound(lookup):
    ds, model, maps, _ = lookup
    q = 0.05
    res = dissect(model, ["probe"], ds, preprocessing=PREP,
                  config=DissectConfig(quantile=q, quantile_mode="sketch", batch_size=7))
    lr = res.layers["probe"]
    k = maps.shape[1]
    flat = maps.transpose(0, 1).reshape(k, -1).double().numpy()
    exact = np.quantile(flat, 1 - q, axis=1)
    j = sketch_rank(flat.shape[1], q)
    err = lr.quantile_info["rank_error"]
    for u in range(k):
        flips = int(((flat[u] > lr.thresholds[u]) != (flat[u] > exact[u])).sum())
        assert flips <= err[u]
        x_j = np.sort(flat[u])[j]
        assert x_j - 2.0 ** -15 * abs(x_j) <= lr.thresholds[u] <= x_j


def test_shards_are_whole_batches_and_top_images_merge_exactly(lookup):
    """Batch-aligned shards cover the images once; merging the shards' top images (what the
    distributed gather does) gives the single-process top images (the full torchrun test is in
    test_dissect_cli.py)."""
    ds, model, _, _ = lookup
    n = len(ds)
    for world in (1, 2, 3, 7, 40):
        ranges = [shard_range(n, 4, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(s % 4 == 0 for s, e in ranges if e > s)
    cfg = DissectConfig(quantile=0.1, batch_size=4, top_images=3)
    whole = dissect(model, ["probe"], ds, preprocessing=PREP, config=cfg).layers["probe"]
    top = TopImages.empty(whole.units, 3, whole.feature_size, "cpu")
    for s, e in [shard_range(n, 4, r, 3) for r in range(3)]:
        part = dissect(model, ["probe"], _SubBroden(ds, s, e), preprocessing=PREP,
                       config=cfg).layers["probe"]
        index = torch.from_numpy(part.top_index)
        top.update(torch.from_numpy(part.top_values), torch.where(index >= 0, index + s, index),
                   torch.from_numpy(part.top_maps))
    np.testing.assert_array_equal(top.index.numpy(), whole.top_index)
    np.testing.assert_array_equal(top.values.numpy(), whole.top_values)
    np.testing.assert_array_equal(top.maps.numpy(), whole.top_maps)


class _SubBroden(_Shard):
    """A shard that still looks like a Broden dataset (for the simulation above)."""

    def __init__(self, base, start, stop):
        super().__init__(base, start, stop)
        for attr in ("categories", "label_names", "mask_size", "image_size"):
            setattr(self, attr, getattr(base, attr))

    def category_of(self, n):
        return self.base.category_of(n)


def test_top_images_are_the_largest_maxima_with_their_maps(lookup):
    ds, model, maps, _ = lookup
    res = dissect(model, ["probe"], ds, preprocessing=PREP,
                  config=DissectConfig(quantile=0.1, batch_size=3, top_images=4))
    lr = res.layers["probe"]
    peaks = maps.amax(dim=(2, 3)).numpy()              # [N, K]
    for u in range(maps.shape[1]):
        order = sorted(range(len(ds)), key=lambda i: (-peaks[i, u], i))[:4]
        assert list(lr.top_index[u]) == order
        np.testing.assert_array_equal(lr.top_maps[u], maps[order, u].numpy())


def test_validation_before_computation(lookup):
    ds, model, _, _ = lookup
    with pytest.raises(UsageError, match="`quantile`"):
        DissectConfig(quantile=1.0).validate()
    with pytest.raises(UsageError, match="`quantile`"):
        DissectConfig(quantile=0.0).validate()
    with pytest.raises(UsageError, match="`iou_mode`"):
        DissectConfig(iou_mode="paper").validate()
    with pytest.raises(UsageError, match="`quantile_mode`"):
        DissectConfig(quantile_mode="kll").validate()
    with pytest.raises(UsageError, match="does not exist"):
        plan_layers(model, ["nope"], ds, PREP, "cpu")
    with pytest.raises(UsageError, match="not channel maps"):
        plan_layers(model, ["head"], ds, PREP, "cpu")
    with pytest.raises(UsageError, match="twice"):
        plan_layers(model, ["probe", "probe"], ds, PREP, "cpu")
    plans = plan_layers(model, ["probe"], ds, PREP, "cpu")
    with pytest.raises(UsageError, match="sketch"):
        check_memory(plans, 10**9, DissectConfig())
    check_memory(plans, 10**9, DissectConfig(quantile_mode="sketch"))


def test_nan_activations_fail_with_one_line(lookup):
    ds, model, maps, _ = lookup
    bad = maps.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CnnexplainError, match="NaN"):
        dissect(LookupModel(ds, bad), ["probe"], ds, preprocessing=PREP,
                config=DissectConfig(batch_size=8))
