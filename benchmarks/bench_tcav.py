"""TCAV: a second run with a warm cache versus the first, and our CAV solver versus
scikit-learn's SGDClassifier (what tensorflow/tcav trains) on the same activations.

1. ``cnnexplain.explain.tcav.run_tcav`` twice on the same model, concept folders and class
   inputs: cold (empty cache: activations, CAVs, class-logit gradients, scores computed) and
   warm (a new Cache object on the same directory: everything read back). Target: warm at
   least 10x faster.
2. On the cached activations of concept-vs-random pairs, with the same training rows (equal
   truncation and the seeded stratified 0.33 hold-out of ``train_cav``): our torch solver (exact
   optimum of alpha/2 |w|^2 + mean hinge, alpha 0.01) versus SGDClassifier(alpha=0.01,
   max_iter=1000, tol=1e-3); wall time per CAV, their speed ratio, and the cosine between the
   two unit CAVs. scikit-learn's LinearSVC solved to 1e-10 with the same objective is the
   exact reference both are compared to. Each solver fits once untimed first (one-off start-up
   costs). Target: ours at least as fast as SGDClassifier, at cosine 1 to the optimum.

Timings are reported, never asserted (the machine's cores may be shared).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnnexplain.activations import compute_activations
from cnnexplain.cache.store import Cache
from cnnexplain.data.export import export_concepts
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig
from cnnexplain.explain import tcav as T
from cnnexplain.fingerprint import module_digest
from cnnexplain.models.smallcnn import SmallCNN

SIZES = {
    # images per folder, random runs, class-input images, resolution, layers
    "small": dict(per=30, runs=5, inputs=60, res=32, layers=("features.10",)),
    "full": dict(per=100, runs=10, inputs=300, res=64, layers=("features.6", "features.10")),
}
PREP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CONCEPTS = ("red-c", "striped")


def _run(model, sets, inputs, layers, runs, cache_dir: Path):
    start = time.perf_counter()
    result = T.run_tcav(model, list(layers), sets.concepts, sets.randoms, inputs,
                        [(0, "circle"), (3, "star")], model_fingerprint=module_digest(model),
                        preprocessing=PREP, config=T.TCAVConfig(random_runs=runs),
                        cache=Cache(cache_dir))
    return time.perf_counter() - start, result


def _train_rows(pos: np.ndarray, neg: np.ndarray, seed: int):
    """The training rows and labels train_cav uses for this seed (+1 concept, -1 random)."""
    config = T.CAVConfig()
    m = min(len(pos), len(neg))
    ss = np.random.SeedSequence(seed).spawn(2)
    tr_p, _ = T.stratified_split(m, config.test_fraction, int(ss[0].generate_state(1)[0]))
    tr_n, _ = T.stratified_split(m, config.test_fraction, int(ss[1].generate_state(1)[0]))
    x = np.concatenate([pos[:m][tr_p], neg[:m][tr_n]]).reshape(len(tr_p) + len(tr_n), -1)
    y = np.r_[np.ones(len(tr_p)), -np.ones(len(tr_n))]
    return x.astype(np.float64), y


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w)


def _solver_comparison(model, sets, layer: str, cache: Cache) -> list[tuple]:
    from sklearn.linear_model import SGDClassifier
    from sklearn.svm import LinearSVC

    def acts(ds):
        return compute_activations(model, [layer], ds, model_fingerprint=module_digest(model),
                                   preprocessing=PREP, cache=cache).array(layer)

    negatives = [acts(ds) for _, ds in sets.randoms[1:]]
    # one untimed fit of each first: the first call of either pays one-off costs (LAPACK and
    # thread-pool start-up for torch, imports for scikit-learn) that a run of many CAVs does not
    first = acts(next(iter(sets.concepts.values())))
    x0, y0 = _train_rows(first, negatives[0], 999)
    T.train_cav(first, negatives[0], T.CAVConfig(), seed=999)
    SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=0).fit(x0, y0)
    ours_s, sgd_s, cos_sgd, cos_ours_ref, cos_sgd_ref, dims = [], [], [], [], [], None
    for concept, ds in sets.concepts.items():
        pos = acts(ds)
        for i, neg in enumerate(negatives):
            seed = 1000 + i
            x, y = _train_rows(pos, neg, seed)
            dims = x.shape
            start = time.perf_counter()
            cav = T.train_cav(pos, neg, T.CAVConfig(), seed=seed)
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            sgd = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=i).fit(x, y)
            sgd_s.append(time.perf_counter() - start)
            ref = LinearSVC(C=1.0 / (len(y) * 0.01), loss="hinge", dual=True, tol=1e-10,
                            max_iter=1_000_000,
                            intercept_scaling=float(np.sqrt((x ** 2).sum(1).mean()))).fit(x, y)
            w_sgd, w_ref = _unit(sgd.coef_[0]), _unit(ref.coef_[0])
            cos_sgd.append(float(w_sgd @ cav.vector))
            cos_ours_ref.append(float(w_ref @ cav.vector))
            cos_sgd_ref.append(float(w_sgd @ w_ref))
    ratio = float(np.mean(sgd_s) / np.mean(ours_s))
    n = len(ours_s)
    shape = f"{dims[0]} x {dims[1]}"
    return [
        (f"CAV training, ours (torch, exact; {n} CAVs of {shape} at {layer})",
         float(np.mean(ours_s)), "s/CAV", None),
        ("CAV training, sklearn SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3)",
         float(np.mean(sgd_s)), "s/CAV", None),
        ("speed: SGDClassifier time / ours (target >= 1, at cosine 1 to the exact optimum)",
         ratio, "x", ratio),
        ("cosine(ours, SGDClassifier), mean", float(np.mean(cos_sgd)), "cos", None),
        ("cosine(ours, SGDClassifier), min", float(np.min(cos_sgd)), "cos", None),
        ("cosine(ours, exact LinearSVC optimum), min", float(np.min(cos_ours_ref)), "cos", None),
        ("cosine(SGDClassifier, exact LinearSVC optimum), mean", float(np.mean(cos_sgd_ref)),
         "cos", None),
    ]


def run(size: str = "small") -> pd.DataFrame:
    """Rows (measurement, value, unit, ratio): cold and warm wall time of a TCAV run and their
    ratio, then the CAV solver comparison (module docstring)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    p = SIZES[size]
    world = WorldConfig(num_images=p["inputs"], num_test=p["inputs"], resolution=p["res"],
                        seed=0, correlations=(("red-c", "star", 0.9),))
    torch.manual_seed(0)
    model = SmallCNN(len(world.classes)).eval()
    with tempfile.TemporaryDirectory(prefix="bench-tcav-") as tmp:
        tmp = Path(tmp)
        root = tmp / "concepts"
        export_concepts(world, root, CONCEPTS, n_per_concept=p["per"],
                        n_random_sets=p["runs"] + 1)
        sets = T.folder_concept_sets(root, list(CONCEPTS), random_sets=p["runs"] + 1,
                                     preprocessing=PREP)
        inputs = SyntheticDataset(world, "test", PREP)
        cold_s, cold = _run(model, sets, inputs, p["layers"], p["runs"], tmp / "cache")
        warm_s, warm = _run(model, sets, inputs, p["layers"], p["runs"], tmp / "cache")
        same = bool(cold.table.equals(warm.table))
        ratio = cold_s / warm_s
        n_cavs = cold.stats["cav_trained"]
        rows = [
            (f"TCAV run, cold cache ({len(CONCEPTS)} concepts, {p['runs']} runs, "
             f"{len(p['layers'])} layer(s), 2 classes, {n_cavs} CAVs)", cold_s, "s", None),
            ("TCAV run, warm cache (same inputs, everything read back)", warm_s, "s", None),
            ("cold / warm", ratio, "x", ratio),
            ("warm run: CAVs trained + activation sets read",
             warm.stats["cav_trained"] + warm.stats["activations_read"], "count", None),
            ("warm run: score entries read (one per layer and class)",
             warm.stats["scores_cached"], "entries", None),
            ("warm run gives the identical table", float(same), "bool", None),
        ]
        rows += _solver_comparison(model, sets, p["layers"][-1], Cache(tmp / "cache"))
    return pd.DataFrame(rows, columns=["measurement", "value", "unit", "ratio"])


if __name__ == "__main__":
    print(run().to_string(index=False))
