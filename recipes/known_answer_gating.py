"""Known-answer experiment: train std, picnn and cdcnn-r1p2 on the synthetic world with the
recipe ``recipes/known-answer-gating.yaml`` (ResNet-18 at 32 px), evaluate each with
``cnnexplain evaluate-entanglement`` on the test split, print the table, and check:

- MIS of picnn and of cdcnn-r1p2 at least ``--mis-margin`` (default 0.03 nats) above std's;
- ACC3 of the gated models at least ``--acc3-gap`` (default 0.3) below their ACC1;
- ACC1 of the gated models within ``--acc1-tolerance`` (default 0.05) of std's.

    python recipes/known_answer_gating.py [--out runs/known-answer] [--device cpu]

Exit code 0 when every check passes, 1 otherwise. Re-running reuses finished runs (pass
``--fresh`` to retrain); evaluation features come from the HDF5 cache.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "known-answer-gating.yaml"
METHODS = {"std": [], "picnn": [], "cdcnn-r1p2": []}
COLUMNS = ["ACC1", "ACC2", "ACC3", "ACC2_det", "ACC3_det", "MIS", "MIS_margin", "R0", "R1",
           "gate_density", "gate_peakedness"]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cnnexplain", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/known-answer"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fresh", action="store_true", help="retrain even when a run is complete")
    ap.add_argument("--mis-margin", type=float, default=0.03)
    ap.add_argument("--acc3-gap", type=float, default=0.3)
    ap.add_argument("--acc1-tolerance", type=float, default=0.05)
    a = ap.parse_args(argv)
    rows = []
    for method, extra in METHODS.items():
        out = a.out / method
        if a.fresh and out.exists():
            shutil.rmtree(out)
        t0 = time.time()
        if not (out / "checkpoint.pt").exists():
            cli("train-gated", "--recipe", str(RECIPE), "--method", method, *extra,
                "--device", a.device, "--out", str(out), "--quiet")
        train_s = time.time() - t0
        cli("evaluate-entanglement", "--recipe", str(RECIPE), "--checkpoint",
            str(out / "checkpoint.pt"), "--device", a.device, "--out", str(out), "--quiet")
        metrics = pd.read_csv(out / "entanglement.csv").set_index("metric")["value"]
        rows.append({"method": method, **{c: float(metrics[c]) for c in COLUMNS if c in metrics},
                     "train_s": round(train_s, 1)})
    table = pd.DataFrame(rows).set_index("method")
    cols = list(table.columns)
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m, r in table.iterrows():
        print(f"| {m} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    std = table.loc["std"]
    checks = []
    for m in ("picnn", "cdcnn-r1p2"):
        r = table.loc[m]
        checks += [
            (f"MIS({m}) {r.MIS:.3f} >= MIS(std) {std.MIS:.3f} + {a.mis_margin}",
             r.MIS >= std.MIS + a.mis_margin),
            (f"ACC3({m}) {r.ACC3:.3f} <= ACC1({m}) {r.ACC1:.3f} - {a.acc3_gap}",
             r.ACC3 <= r.ACC1 - a.acc3_gap),
            (f"|ACC1({m}) - ACC1(std)| = {abs(r.ACC1 - std.ACC1):.3f} <= {a.acc1_tolerance}",
             abs(r.ACC1 - std.ACC1) <= a.acc1_tolerance),
        ]
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    table.to_csv(a.out / "known_answer.csv")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
