"""Guo et al. 2024's (PICNN) ablations with train-gated's defaults on the default synthetic
world (ResNet-18, one seed each): Bernoulli sampling by the paper's reparameterization against
the Gumbel-softmax relaxation; the weight λ of L_int from 0 to 10 (the paper's fig. 6: ACC3
falls while ACC1 stays); the filter-to-class ratio of an inserted conv (the paper uses 12.8
filters per class); and an inserted conv against gating the last block (layer4).

    python recipes/gating_ablations.py [--out runs/ablations] [--seed 0] [--only sampling,...]
        [--amp]

Prints one table per ablation (ACC1, ACC3 with its seed-004 definition, ACC3_det, specificity,
MIS) and writes ablations.csv. Finished runs are reused; each run is `train-gated` then
`evaluate-entanglement` on the test split. ``--amp`` trains every run with ``--amp`` (bfloat16
autocast on a CPU that runs it natively: about half the time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

CLASSES = 6
ABLATIONS = {
    "sampling": {"bernoulli": [], "gumbel": ["--gate-sampling", "gumbel"]},
    "lambda": {f"lambda={v:g}" + (" (default)" if v == 2.0 else ""):
               [] if v == 2.0 else ["--lambda", f"{v:g}"] for v in (0.0, 1.0, 2.0, 5.0, 10.0)},
    "ratio": {f"{n} filters ({n / CLASSES:.1f}/class)": ["--insert-conv", str(n)]
              for n in (12, 30, 77, 180)},
    "layer": {"layer4 (512 channels)": [], "inserted conv (77 filters)": ["--insert-conv", "77"]},
}
"""Ablation -> row -> extra train-gated options (on top of `--method picnn`)."""
COLUMNS = ["ACC1", "ACC3", "ACC3_det", "specificity", "MIS", "gate_peakedness"]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cnnexplain", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "_" for c in text)


def run_one(out: Path, extra: list[str], seed: int, device: str, amp: bool = False) -> dict:
    if not (out / "checkpoint.pt").exists():
        cli("train-gated", "--backbone", "resnet18", "--method", "picnn", *extra,
            *(["--amp"] if amp else []), "--seed", str(seed), "--device", device, "--out",
            str(out), "--quiet", "--overwrite")
    cli("evaluate-entanglement", "--checkpoint", str(out / "checkpoint.pt"), "--device", device,
        "--out", str(out), "--quiet")
    m = pd.read_csv(out / "entanglement.csv").set_index("metric")["value"]
    return {c: float(m[c]) for c in COLUMNS if c in m}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=",".join(ABLATIONS))
    ap.add_argument("--amp", action="store_true", help="train with --amp")
    a = ap.parse_args(argv)
    rows = []
    done: dict[tuple, dict] = {}
    for name in (n.strip() for n in a.only.split(",") if n.strip()):
        for row, extra in ABLATIONS[name].items():
            key = tuple(extra)
            if key not in done:  # the same options in two ablations train once
                done[key] = run_one(a.out / slug(" ".join(extra) or "default"), extra, a.seed,
                                    a.device, a.amp)
            rows.append({"ablation": name, "row": row, **done[key]})
    table = pd.DataFrame(rows)
    table.to_csv(a.out / "ablations.csv", index=False)
    for name, part in table.groupby("ablation", sort=False):
        print(f"\n{name} (picnn, seed {a.seed}):")
        print("| row | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for _, r in part.iterrows():
            print(f"| {r['row']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
