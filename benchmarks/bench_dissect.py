"""Network Dissection throughput and memory: resnet18 (random init), layer4, synthetic Broden
export at 224 px (the layout and sizes of broden1_224).

Reported in one run, on the same model and images:

- ``forward``: the bare forward pass to layer4 (``split_at(model, "layer4").body``) on images
  already in memory, and the same with the images read from disk by the DataLoader;
- ``dissect``: :func:`cnnexplain.explain.dissect.run.dissect` end to end (reading, one forward
  pass with maps streamed to a temporary HDF5 file, thresholds, tallies, top images), with the
  ``recompute`` variant (two forward passes, no disk) and a warm-cache run (maps read back);
  ``dissect / forward`` is the target ratio (>= 0.9: dissection costs little more than the
  forward pass);
- ``tally``: the tally pass per image, vectorized (:func:`accumulate_tallies`) versus a
  straightforward per-image, per-unit Python loop like NetDissect-Lite's ``tally_job`` (PIL
  bilinear resize of each firing unit's map, ``argwhere``, ``bincount``). The loop runs on a
  subset of the images and is extrapolated per image (it is the slow part of the reference);
  ``naive / vectorized`` is the speed-up, and ``naive pipeline`` the whole dissection with the
  loop in place of the vectorized tally (forward + loop);
- ``peak memory``: peak RSS (``VmHWM``, :func:`benchmarks.memory.peak_rss_mib`) of a fresh
  process dissecting 1x, 2x and 4x the images (target: flat), next to a process that only runs
  the forward pass of one batch (torch, the model and one batch of activations: the floor).

Timings are printed, never asserted (shared machine: only same-run ratios mean something).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image

from benchmarks.device import sync
from benchmarks.memory import ROOT
from cnnexplain.cache.store import Cache
from cnnexplain.data.base import make_loader
from cnnexplain.data.broden import BrodenDataset, export_broden
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import WorldConfig
from cnnexplain.explain.dissect.labels import ConceptSpace
from cnnexplain.explain.dissect.run import DissectConfig, dissect
from cnnexplain.explain.dissect.tally import Tally, accumulate_tallies
from cnnexplain.models.layers import record, split_at

SIZES = {"small": 24, "full": 96}   # images at 1x; memory is also measured at 2x and 4x
NAIVE_IMAGES = {"small": 3, "full": 8}
BATCH = 16
LAYER = "layer4"
PREP = Preprocessing()

_MEMORY_SCRIPT = r"""
import sys, torch, torchvision
sys.path.insert(0, sys.argv[4])
from benchmarks.memory import peak_rss_mib
torch.manual_seed(0)
from cnnexplain.cache.store import Cache
from cnnexplain.data.broden import BrodenDataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.dissect.run import DissectConfig, dissect
root, limit, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = torchvision.models.resnet18(weights=None).eval()
if limit == 0:  # baseline: the bare forward pass of one batch
    ds = BrodenDataset(root, limit=batch)
    with torch.no_grad():
        model(torch.stack([ds[i]["image"] for i in range(len(ds))]))
else:
    ds = BrodenDataset(root, limit=limit)
    dissect(model, ["layer4"], ds, preprocessing=Preprocessing(),
            config=DissectConfig(batch_size=batch, top_images=8), cache=Cache(enabled=False))
print(peak_rss_mib())
"""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def _forward_preloaded(body, images: list[torch.Tensor], device="cpu") -> float:
    images = [x.to(device) for x in images]
    with torch.no_grad():
        body(PREP.normalize(images[0][:2]))
        sync(device)
        start = time.perf_counter()
        for x in images:
            body(PREP.normalize(x))
        sync(device)
        return time.perf_counter() - start


class ImagesOnly(torch.utils.data.Dataset):
    """A dataset's images alone (``dataset.item(i, ("image",))``): what a bare forward pass
    reads, the floor dissection is measured against."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return self.base.item(i, ("image",))


def _forward_reading(body, ds, device="cpu") -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in make_loader(ImagesOnly(ds), batch_size=BATCH):
            body(PREP.normalize(batch["image"].to(device)))
    sync(device)
    return time.perf_counter() - start


def throughput(model, ds, device="cpu") -> dict:
    """Seconds for ``ds`` on ``device``: the bare forward to :data:`LAYER` on images in memory
    (``forward``) and read by the DataLoader (``forward_reading``), and :func:`dissect` end to
    end with maps via a temporary HDF5 file (``dissect``; its result ``result``)."""
    model = model.to(device)
    body = split_at(model, LAYER).body
    images = [b["image"] for b in make_loader(ds, batch_size=BATCH)]
    out = {"forward": _forward_preloaded(lambda x: body(x)[0], images, device),
           "forward_reading": _forward_reading(lambda x: body(x)[0], ds, device)}
    start = time.perf_counter()
    out["result"] = dissect(model, [LAYER], ds, preprocessing=PREP,
                            config=DissectConfig(batch_size=BATCH, top_images=8), device=device,
                            cache=Cache(enabled=False))
    sync(device)
    out["dissect"] = time.perf_counter() - start
    return out


def naive_tally(acts: np.ndarray, thresholds: np.ndarray, masks: np.ndarray,
                image_labels: np.ndarray, labelcat: np.ndarray, tally: dict) -> None:
    """NetDissect-Lite's ``tally_job`` inner loop for one image, ported to current NumPy/PIL:
    for every unit whose map exceeds its threshold, a PIL bilinear resize (what
    ``scipy.misc.imresize(mode='F')`` did), ``argwhere`` and ``bincount`` over the label
    layers. ``acts`` ``[K, h, w]``, ``masks`` ``[L, sh, sw]``, ``image_labels`` ``[M]``."""
    sh, sw = masks.shape[-2:]
    scalars = [int(s) for s in image_labels if s > 0]
    pixels = masks.astype(np.int64)
    for unit in range(acts.shape[0]):
        fmap = acts[unit]
        if fmap.max() > thresholds[unit]:
            up = np.asarray(Image.fromarray(fmap.astype(np.float32), mode="F")
                            .resize((sw, sh), Image.BILINEAR))
            idx = np.argwhere(up > thresholds[unit])
            tally["units"][unit] += len(idx)
            bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(),
                             minlength=tally["both"].shape[1])
            bt[0] = 0
            cat = bt @ labelcat
            tally["both"][unit] += bt
            for s in scalars:
                cat = cat + labelcat[s]
                tally["both"][unit, s] += len(idx)
            tally["units_cat"][unit] += len(idx) * (cat > 0)


def _tally_timings(model, ds, n_naive: int, thresholds: np.ndarray) -> dict:
    """Seconds per image of the vectorized and the naive tally on the same activations."""
    space = ConceptSpace.from_dataset(ds)
    ncat = len(space.categories)
    lc = torch.as_tensor(space.label_category)
    labelcat = np.zeros((space.size, ncat), np.int64)
    valid = space.label_category >= 0
    labelcat[np.flatnonzero(valid), space.label_category[valid]] = 1
    batches = []
    with torch.no_grad(), record(model, [LAYER]) as acts:
        for batch in make_loader(ds, batch_size=BATCH):
            model(PREP.normalize(batch["image"]))
            batches.append((acts[LAYER].clone(), batch["masks"], batch["image_labels"]))
    thr = torch.as_tensor(thresholds)
    k = batches[0][0].shape[1]
    t = Tally.zeros(k, space.size, ncat)
    start = time.perf_counter()
    for a, m, il in batches:
        accumulate_tallies(a, thr, m, il, lc, t)
    vec_s = (time.perf_counter() - start) / len(ds)
    naive = {"units": np.zeros(k, np.int64), "both": np.zeros((k, space.size), np.int64),
             "units_cat": np.zeros((k, ncat), np.int64)}
    flat = [(a[i].numpy(), m[i].numpy(), il[i].numpy()) for a, m, il in batches
            for i in range(a.shape[0])][:n_naive]
    start = time.perf_counter()
    for a, m, il in flat:
        naive_tally(a, thresholds, m, il, labelcat, naive)
    naive_s = (time.perf_counter() - start) / len(flat)
    # agreement on the subset (PIL's float32 resize vs ours: ties at the threshold may differ)
    sub = Tally.zeros(k, space.size, ncat)
    for a, m, il in flat:
        accumulate_tallies(torch.from_numpy(a)[None], thr, torch.from_numpy(m)[None],
                           torch.from_numpy(il)[None], lc, sub)
    ours = sub.intersection.numpy()
    agree = 1.0 - np.abs(ours - naive["both"]).sum() / max(1, ours.sum())
    return {"vec_s": vec_s, "naive_s": naive_s, "agree": agree}


def _peak_rss_mb(root: Path, limit: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(root), str(limit), str(BATCH),
                        ROOT], capture_output=True, text=True, env=env, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def run(size: str = "small") -> pd.DataFrame:
    """Rows (measurement, value, unit, ratio); see the module docstring."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    n = SIZES[size]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dissect-") as tmp:
        root = Path(tmp) / "broden224"
        export_broden(WorldConfig(num_images=4 * n, resolution=224, seed=0, second_object=0.3),
                      root)
        ds = BrodenDataset(root, limit=n)
        model = _model()
        timed = throughput(model, ds)
        fwd_s, fwd_read_s, dis_s, res = (timed["forward"], timed["forward_reading"],
                                         timed["dissect"], timed["result"])
        cfg = DissectConfig(batch_size=BATCH, top_images=8)
        start = time.perf_counter()
        dissect(model, [LAYER], ds, preprocessing=PREP,
                config=DissectConfig(batch_size=BATCH, top_images=8, recompute=True))
        rec_s = time.perf_counter() - start
        cache = Cache(Path(tmp) / "cache")
        dissect(model, [LAYER], ds, preprocessing=PREP, config=cfg, cache=cache,
                model_fingerprint="bench")
        start = time.perf_counter()
        dissect(model, [LAYER], ds, preprocessing=PREP, config=cfg, cache=cache,
                model_fingerprint="bench")
        warm_s = time.perf_counter() - start
        tallies = _tally_timings(model, ds, NAIVE_IMAGES[size], res.layers[LAYER].thresholds)
        base_mb = _peak_rss_mb(root, 0)
        mem = {f: _peak_rss_mb(root, f * n) for f in (1, 2, 4)}
    fwd, fwd_read, dis = n / fwd_s, n / fwd_read_s, n / dis_s
    naive_pipeline = 1.0 / (1.0 / fwd_read + tallies["naive_s"])
    rows += [
        (f"images (224 px, resnet18 {LAYER}, {torch.get_num_threads()} threads)", n, "images",
         None),
        ("forward to layer4, images in memory", fwd, "images/s", None),
        ("forward to layer4, reading from disk", fwd_read, "images/s", None),
        ("dissect (one forward, maps via temp HDF5)", dis, "images/s", dis / fwd),
        ("dissect / forward-with-reading", dis / fwd_read, "x", dis / fwd_read),
        ("dissect with recompute (two forwards)", n / rec_s, "images/s", (n / rec_s) / fwd),
        ("dissect, activations from a warm cache", n / warm_s, "images/s", (n / warm_s) / fwd),
        ("tally pass, vectorized", 1000 * tallies["vec_s"], "ms/image", None),
        (f"tally pass, per-unit loop (on {NAIVE_IMAGES[size]} images, extrapolated)",
         1000 * tallies["naive_s"], "ms/image", None),
        ("tally speed-up (loop / vectorized)", tallies["naive_s"] / tallies["vec_s"], "x",
         tallies["naive_s"] / tallies["vec_s"]),
        ("intersection agreement loop vs vectorized", tallies["agree"], "fraction", None),
        ("naive pipeline (forward + loop tally)", naive_pipeline, "images/s",
         naive_pipeline / fwd),
        ("dissect speed-up over naive pipeline", dis / naive_pipeline, "x", dis / naive_pipeline),
    ]
    rows.append((f"peak RSS, forward of one batch of {BATCH} (baseline)", base_mb, "MB", None))
    for f, mb in mem.items():
        rows.append((f"peak RSS, dissect {f * n} images", mb, "MB", mb / mem[1]))
    return pd.DataFrame(rows, columns=["measurement", "value", "unit", "ratio"])


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else "small").to_string(index=False))
