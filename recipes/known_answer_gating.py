"""Known-answer experiment for class-specific gating: train std, picnn and the three cdcnn
methods with train-gated's defaults (and, for comparison, the seeds' exact losses: ``--preset paper``) on
the default synthetic world or on scikit-learn's digits, over several seeds; evaluate each with
``cnnexplain evaluate-entanglement``; print mean (sd) per row and a paired t-test of gated minus
std per seed for MIS and ACC3; check, on the means, for the default rows:

- ACC1 at most ``--acc1-tolerance`` (default 0.01) below std's (the gates cost no accuracy; a
  gated row above std's, as fine-tuning for more epochs can give, passes);
- MIS at least ``--mis-margin`` (default 0.05 nats) above std's;
- ACC3 (Guo et al. 2024's definition, averaged over draws; std: random P) at most half of std's.

    python recipes/known_answer_gating.py [--dataset synthetic|digits] [--size recipe|quickstart]
        [--seeds 0 1 2] [--out runs/known-answer] [--rows std,picnn,...] [--device cpu]

``--size recipe`` trains with train-gated's defaults (README's recipe); ``--size quickstart``
with the quickstart's world and epochs, the gated rows fine-tuned from std's network. The exit code is 0 when every check of the default rows
passes. Finished runs are reused (``--fresh`` retrains); features come from the HDF5 cache.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
QUICKSTART = {"recipe": str(HERE / "quickstart.yaml"), "finetune": "4",
              "world": "synthetic:n=2000,ntest=500,correlate=red-c@circle=0.9"}
"""The quickstart's training (recipes/quickstart.sh): train-gated with the quickstart's recipe
(std's epochs, ``amp``), the gated rows for ``finetune`` epochs from std's trained network of
the same seed (``--weights``)."""
RUNS = {"std": ["--method", "std"],
        "picnn": ["--method", "picnn"],
        "cdcnn-r1p2": ["--method", "cdcnn-r1p2"],
        "cdcnn-r1p1": ["--method", "cdcnn-r1p1"],
        "cdcnn-r0p1": ["--method", "cdcnn-r0p1"],
        "picnn-paper": ["--method", "picnn", "--preset", "paper"],
        "cdcnn-r1p2-paper": ["--method", "cdcnn-r1p2", "--preset", "paper"]}
"""Row name -> train-gated options."""
DEFAULT_ROWS = ("picnn", "cdcnn-r1p2", "cdcnn-r1p1", "cdcnn-r0p1")
"""The rows whose checks decide the exit code (train-gated's defaults)."""
COLUMNS = ["ACC1", "ACC2", "ACC3", "ACC3_det", "ACC3_R0", "specificity", "MIS", "R0",
           "gate_peakedness"]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cnnexplain", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def data_options(a) -> tuple[list[str], str]:
    """(train-gated data options, evaluation split)."""
    if a.dataset == "digits":
        root = a.out / "digits-data"
        if not root.exists():
            subprocess.run([sys.executable, str(HERE / "digits.py"), str(root)], check=True)
        return ["--dataset", f"imagefolder:{root}"], "val"
    if a.size == "quickstart":
        return ["--dataset", QUICKSTART["world"]], "test"
    return [], "test"


def run_one(out: Path, options: list[str], seed: int, a) -> dict:
    data, split = data_options(a)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "checkpoint.pt").exists():
        size = []
        if a.size == "quickstart":
            size = ["--recipe", QUICKSTART["recipe"]]
            if out.name != "std":
                size += ["--epochs", QUICKSTART["finetune"], "--weights",
                         str(out.parent / "std" / "checkpoint.pt")]
        cli("train-gated", "--backbone", "resnet18", *options, *data, *size, "--seed", str(seed),
            "--device", a.device, "--out", str(out), "--quiet", "--overwrite")
    cli("evaluate-entanglement", "--checkpoint", str(out / "checkpoint.pt"), "--split", split,
        "--device", a.device, "--out", str(out), "--quiet")
    metrics = pd.read_csv(out / "entanglement.csv").set_index("metric")["value"]
    log = pd.read_csv(out / "train_log.csv")
    return {**{c: float(metrics[c]) for c in COLUMNS if c in metrics},
            "train_acc1": float(log["train_acc1"].iloc[-1]),
            "val_acc1": float(log["val_acc1"].iloc[-1]),
            "train_s": float(log["epoch_time_s"].sum())}


def paired(per_seed: pd.DataFrame, row: str, metric: str) -> tuple[float, float]:
    """(mean of gated - std over seeds, two-sided paired t-test p; NaN for one seed)."""
    from scipy import stats

    a = per_seed[per_seed.method == row].set_index("seed")[metric]
    b = per_seed[per_seed.method == "std"].set_index("seed")[metric]
    d = (a - b).dropna()
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(stats.ttest_rel(a[d.index], b[d.index]).pvalue)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("synthetic", "digits"), default="synthetic")
    ap.add_argument("--size", choices=("recipe", "quickstart"), default="recipe")
    ap.add_argument("--out", type=Path, default=Path("runs/known-answer"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", default=",".join(RUNS), help="comma-separated rows of RUNS")
    ap.add_argument("--fresh", action="store_true", help="retrain even when a run is complete")
    ap.add_argument("--mis-margin", type=float, default=0.05)
    ap.add_argument("--acc1-tolerance", type=float, default=0.01)
    a = ap.parse_args(argv)
    a.out = a.out / f"{a.dataset}-{a.size}"
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    rows = ["std"] + [r for r in rows if r != "std"]  # first: the quickstart's gated rows start from it
    results = []
    for seed in a.seeds:
        for name in rows:
            r = run_one(a.out / f"seed{seed}" / name, RUNS[name], seed, a)
            results.append({"method": name, "seed": seed, **r})
    per_seed = pd.DataFrame(results)
    per_seed.to_csv(a.out / "known_answer_per_seed.csv", index=False)
    cols = [c for c in per_seed.columns if c not in ("method", "seed")]
    mean = per_seed.groupby("method", sort=False)[cols].mean()
    sd = per_seed.groupby("method", sort=False)[cols].std(ddof=1)
    print(f"\n{a.dataset}, size {a.size}: mean (sd) over seeds {a.seeds}")
    print("| row | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m in mean.index:
        cells = [f"{mean.loc[m, c]:.3f}" + ("" if pd.isna(sd.loc[m, c]) or c == "train_s"
                                            else f" ({sd.loc[m, c]:.3f})") for c in cols]
        print(f"| {m} | " + " | ".join(cells) + " |")
    mean.join(sd.add_suffix("_sd")).to_csv(a.out / "known_answer.csv")
    std = mean.loc["std"]
    print("\npaired over seeds, gated - std (mean difference, two-sided paired t-test p):")
    for m in (m for m in mean.index if m != "std"):
        for metric in ("MIS", "ACC3", "specificity"):
            diff, p = paired(per_seed, m, metric)
            print(f"  {m}: {metric} {diff:+.3f} (p = {p:.3g})")
    checks = []
    for m in (m for m in mean.index if m != "std"):
        r = mean.loc[m]
        checks += [
            (m, f"ACC1({m}) {r.ACC1:.3f} >= ACC1(std) {std.ACC1:.3f} - {a.acc1_tolerance}",
             r.ACC1 >= std.ACC1 - a.acc1_tolerance),
            (m, f"MIS({m}) {r.MIS:.3f} >= MIS(std) {std.MIS:.3f} + {a.mis_margin}",
             r.MIS >= std.MIS + a.mis_margin),
            (m, f"ACC3({m}) {r.ACC3:.3f} <= ACC3(std) {std.ACC3:.3f} / 2", r.ACC3 <= std.ACC3 / 2),
        ]
    for m, text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text + ("" if m in DEFAULT_ROWS else "   (paper)"))
    required = [ok for m, _, ok in checks if m in DEFAULT_ROWS]
    return 0 if required and all(required) else 1


if __name__ == "__main__":
    sys.exit(main())
