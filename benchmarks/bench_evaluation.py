"""Saliency evaluation: cnnexplain's metrics of the default set against Quantus 0.6.0 (the
field's evaluation library) for the same metrics, on the same model, images, maps, device and
settings, in one run; prints the time of each, the speed ratio (target: the default set at
least 10x faster on the CPU) and, for the deterministic metrics, the largest difference of the
per-image scores.

Model: a random-weight ResNet-18 with the 32-64 px stem at 48 px and BatchNorm statistics (the same
compute as a trained one); images: the synthetic world's test split, its object masks;
(48 px: Quantus's pixel flipping needs H W divisible by its
step of 3 x 16 channel elements); maps: the signed input gradient of the label's logit summed over colour channels. ``small``:
2 images, 20 runs / regions, 36 flipping steps (a smoke test); ``full``: 32 images. Settings
(both sides, full): faithfulness correlation 100 runs of 64 pixels (Quantus: 192 channel
elements; draws differ), region perturbation 2 px blocks, 100 regions, both orders (Quantus:
two calls), pixel flipping 144 steps of 16 pixels
in both orders (Quantus has no LeRF: its MoRF call on the negated map flips least relevant
first, the same work; the scores compared are MoRF's), ROAD at 10..90% with noise 0 (Quantus's ROAD crashes for
3 channels in 0.6.0, so its own loop is timed: its ``noisy_linear_imputation`` then the
forward pass, per image and percentage, MoRF and LeRF), random logit with the gradient as
explanation, sparseness, complexity, relevance mass and rank accuracy, pointing game on the
mask, completeness; every removal baseline 0.0 (the mean colour); ours in chunks of 64 images
(the CLI's), Quantus with its batch = all images. At ``full`` each side runs twice, the better
time counts (the first run warms allocations and caches).

Both sides run the same model, wrapped to count the images it is run on
(``forward_images_ours`` / ``_quantus``: the same work, or the row says otherwise);
``forward_floor_s`` is ours' count times a plain no-grad forward pass's time per image (batches
of 64), the least any implementation of that metric can take on this CPU, and
``quantus_over_floor`` the most speed-up over Quantus that any implementation could show.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import torch

from benchmarks.models import resnet18_with_bn_statistics

SIZES = {"small": {"images": 2, "runs": 20, "regions": 20, "flip": 64, "repeats": 1},
         "full": {"images": 32, "runs": 100, "regions": 100, "flip": 16, "repeats": 2}}
"""images; faithfulness-correlation runs; region-perturbation regions; pixels per flipping step;
timed runs per side (the best counts)."""
SIDE = 48


def _inputs(n: int):
    from cnnexplain.data.preprocessing import Preprocessing
    from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig

    prep = Preprocessing()
    ds = SyntheticDataset(WorldConfig.from_spec(f"synthetic:res={SIDE},ntest={n}"), "test", prep)
    items = [ds[i] for i in range(n)]
    x = prep.normalize(torch.stack([it["image"] for it in items])).float()
    y = torch.stack([it["label"] for it in items])
    masks = torch.stack([it["mask"] for it in items]).float()
    return x, y, masks


def _gradient(model):
    def explain(x, t):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).gather(1, t.view(-1, 1)).sum(), x)
        return g.sum(dim=1).detach()
    return explain


class CountingModel(torch.nn.Module):
    """The model, counting the images it is run on (``images``): both sides' forward work."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += int(x.shape[0])
        return self.inner(x)


def _forward_s_per_image(model, x: torch.Tensor, batch: int = 64) -> float:
    """Best of 3 no-grad forward passes over ``x`` in chunks of ``batch``, seconds per image:
    the floor of a metric that runs the model on ``m`` images is ``m`` times this."""
    with torch.no_grad():
        model(x[:2])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
            best = min(best, time.perf_counter() - t0)
    return best / len(x)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _cases(model, x, y, masks, maps, explain, num_classes: int, size: dict):
    """name -> (ours: () -> per-image scores or None, quantus: () -> scores or None,
    deterministic: compare the scores)."""
    import quantus

    from cnnexplain.metrics import axiomatic as A
    from cnnexplain.metrics import complexity as C
    from cnnexplain.metrics import faithfulness as F
    from cnnexplain.metrics import faithfulness_correlation as FC
    from cnnexplain.metrics import localization as L
    from cnnexplain.metrics import randomization as Rz
    from cnnexplain.metrics import removal as RM
    from cnnexplain.metrics import road as ROAD
    from cnnexplain.metrics.preprocess import prepare, prepared

    n, c, h, w = x.shape
    xb, yb = x.numpy(), y.numpy()
    ab = maps.numpy()[:, None]
    sb = masks.numpy()[:, None]
    per_sample = {"normalise_axes": [1, 2, 3]}
    common = dict(disable_warnings=True)
    prob, logit = F.probability_score(model), F.logit_score(model)
    batch = 64  # the CLI's chunk: saliency's batch size 16 x 4
    pct = list(range(10, 100, 10))

    def q(metric, a_batch=None, **kw):
        a_batch = ab if a_batch is None else a_batch
        return lambda: np.asarray(metric(model=model, x_batch=xb, y_batch=yb, a_batch=a_batch,
                                         s_batch=sb, channel_first=True, batch_size=n,
                                         device="cpu", **kw), dtype=float)

    def quantus_explain(model, inputs, targets, **kw):
        return explain(torch.as_tensor(inputs, dtype=torch.float32),
                       torch.as_tensor(targets)).numpy()[:, None]

    def quantus_road_loop():
        from quantus.functions.perturb_func import noisy_linear_imputation

        order = np.argsort(-maps.numpy().reshape(n, -1), axis=1, kind="stable")
        out = []
        for i in range(n):
            for rank in (order[i], order[i][::-1]):
                for p in pct:
                    idx = rank[: int(h * w * p / 100)]
                    xi = noisy_linear_imputation(arr=xb[i], indices=idx, noise=0.0)
                    with torch.no_grad():
                        out.append(model(torch.as_tensor(xi[None], dtype=torch.float32)))
        return None

    runs, regions, flip = size["runs"], size["regions"], size["flip"]
    region = dict(patch_size=2, regions_evaluation=regions, perturb_baseline=0.0,
                  normalise=False)
    return {
        "faithfulness-correlation": (
            lambda: FC.faithfulness_correlation(logit, x, maps, y, runs=runs, subset_size=64,
                                                generator=torch.Generator().manual_seed(0),
                                                batch_size=batch),
            q(quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=64 * c,
                                              perturb_baseline=0.0, normalise=False,
                                              return_aggregate=False, **common)), False),
        "region-perturbation (both orders)": (
            lambda: RM.region_perturbation(prob, x, maps, y, patch_size=2, regions=regions,
                                           baseline=0.0, batch_size=batch).aopc_morf,
            lambda: np.stack([q(quantus.RegionPerturbation(order=o, **region, **common))()
                              for o in ("morf", "lerf")])[0].sum(axis=1) / (regions + 1), True),
        "pixel-flipping (both orders)": (
            lambda: RM.pixel_flipping(prob, x, maps, y, pixels_per_step=flip, baseline=0.0,
                                      batch_size=batch).morf[:, 1:].mean(axis=1),
            lambda: np.stack([q(quantus.PixelFlipping(features_in_step=flip * c,
                                                      perturb_baseline=0.0, normalise=False,
                                                      **common), a_batch=sign * ab)()
                              for sign in (1.0, -1.0)])[0].mean(axis=1), True),
        "road (both orders, noise 0)": (
            lambda: ROAD.road(model, x, maps, y, percentages=pct, noise=0.0,
                              batch_size=batch).area_morf,
            quantus_road_loop, False),
        "random-logit": (
            lambda: Rz.random_logit(prepared(explain, True, False), x, prepare(maps, True, False),
                                    y, num_classes, generator=torch.Generator().manual_seed(0)),
            q(quantus.RandomLogit(num_classes=num_classes, normalise_func_kwargs=per_sample,
                                  **common), explain_func=quantus_explain), False),
        "sparseness": (lambda: C.sparseness(prepare(maps, True, True)),
                       q(quantus.Sparseness(normalise_func_kwargs=per_sample, **common)), True),
        "complexity": (lambda: C.complexity(prepare(maps, True, True)),
                       q(quantus.Complexity(normalise_func_kwargs=per_sample, **common)), True),
        "relevance-mass": (lambda: L.relevance_mass_accuracy(maps.numpy(), masks.numpy()),
                           q(quantus.RelevanceMassAccuracy(normalise_func_kwargs=per_sample,
                                                           **common)), True),
        "relevance-rank": (lambda: L.relevance_rank_accuracy(maps.numpy(), masks.numpy()),
                           q(quantus.RelevanceRankAccuracy(normalise_func_kwargs=per_sample,
                                                           **common)), True),
        "pointing (mask)": (lambda: L.pointing_game(maps.numpy(), masks=masks.numpy()).astype(float),
                            q(quantus.PointingGame(normalise_func_kwargs=per_sample, **common)),
                            True),
        "completeness": (
            lambda: A.completeness(logit, x, maps, y, baseline_images=torch.zeros_like(x))[0],
            q(quantus.Completeness(normalise=False, perturb_baseline=0.0, **common)), False),
    }


def run(size: str = "full") -> pd.DataFrame:
    n = SIZES[size]["images"]
    torch.manual_seed(0)
    model = CountingModel(resnet18_with_bn_statistics(num_classes=10, small_stem=True)).eval()
    x, y, masks = _inputs(n)
    explain = _gradient(model)
    maps = explain(x, y)
    forward_s = _forward_s_per_image(model.inner, x)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = _cases(model, x, y, masks, maps, explain, 10, SIZES[size])
        for name, (ours, theirs, deterministic) in cases.items():
            repeats = SIZES[size]["repeats"]
            model.images = 0
            t_ours, a = _best(ours, repeats)
            ours_images = model.images // repeats
            model.images = 0
            t_q, b = _best(theirs, repeats)
            quantus_images = model.images // repeats
            diff = float("nan")
            if deterministic and a is not None and b is not None:
                a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
                diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("nan")
            floor = ours_images * forward_s
            rows.append({"metric": name, "images": n, "cnnexplain_s": round(t_ours, 4),
                         "quantus_s": round(t_q, 4), "speedup": round(t_q / max(t_ours, 1e-9), 1),
                         "max_abs_diff": diff, "forward_images_ours": ours_images,
                         "forward_images_quantus": quantus_images, "forward_floor_s": floor,
                         "quantus_over_floor": t_q / floor if floor else float("nan")})
    total_ours = sum(r["cnnexplain_s"] for r in rows)
    total_q = sum(r["quantus_s"] for r in rows)
    floor = sum(r["forward_floor_s"] for r in rows)
    rows.append({"metric": "default set (these metrics)", "images": n,
                 "cnnexplain_s": round(total_ours, 3), "quantus_s": round(total_q, 3),
                 "speedup": round(total_q / max(total_ours, 1e-9), 1), "max_abs_diff": float("nan"),
                 "forward_images_ours": sum(r["forward_images_ours"] for r in rows),
                 "forward_images_quantus": sum(r["forward_images_quantus"] for r in rows),
                 "forward_floor_s": floor, "quantus_over_floor": total_q / floor})
    frame = pd.DataFrame(rows)
    frame["target"] = ["" for _ in rows[:-1]] + [">= 10x"]
    frame["device"] = "cpu"
    frame["torch_threads"] = torch.get_num_threads()
    return frame


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(run(sys.argv[1] if len(sys.argv) > 1 else "small").to_string(index=False))
