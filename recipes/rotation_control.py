"""The random-rotation control of Network Dissection (Bau et al. 2017, section 3.2; the
interpretability book's fig. 7.10): a layer's units detect more unique concepts than the same
layer after a random orthogonal rotation of its channels, which keeps everything the layer
can discriminate, so interpretability is aligned with the units' axes.

Trains a ResNet-18 with the std method on the default synthetic world (``cnnexplain
train-gated --backbone resnet18 --method std``, about 6 minutes on 2 CPU cores; reused when
OUT/std/best.pt exists, or skipped with ``--checkpoint``), exports the world's Broden set
(``cnnexplain data synth --format broden --num-images 240``), dissects the model's target
layer (or ``--layer``) without and with ``--rotate SEED`` (``--quantile 0.05``: the world's
objects are large) and prints detector units and unique concepts per category for both::

    python recipes/rotation_control.py [--checkpoint PATH] [--out runs/rotation-control]
        [--rotate 0] [--quantile 0.05] [--iou-threshold 0.04] [--num-images 240]
        [--layer NAME] [--device auto]

The second dissection reads the layer's maps back from the cache and also recomputes the
unrotated counts, which must equal the first run's; the exit code is 1 if they do not, 0
otherwise (whether rotation lowered the count is printed, not enforced: a small trained model
need not show it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def cli(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "cnnexplain", *args]
    print("$", " ".join(["cnnexplain", *args]), flush=True)
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout if capture else ""


def dissect(a, checkpoint: Path, broden: Path, out: Path, *extra: str) -> dict:
    layer = ["--layer", a.layer] if a.layer else []
    text = cli("dissect", "--checkpoint", str(checkpoint), "--broden", str(broden), *layer,
               "--quantile", str(a.quantile), "--iou-threshold", str(a.iou_threshold),
               "--device", a.device, "--out", str(out),
               "--json", *extra, capture=True)
    return json.loads(text.strip().splitlines()[-1])


def table(plain: dict, rotated: dict, layer: str) -> list[tuple]:
    """(category, detectors, unique concepts, rotated detectors, rotated unique concepts)."""
    base = plain["layers"][layer]
    rot = rotated["rotated"][layer]
    rows = [(cat, c["detector_units"], c["unique_concepts"],
             rot["by_category"][cat]["detector_units"],
             rot["by_category"][cat]["unique_concepts"])
            for cat, c in base["by_category"].items()]
    rows.append(("all", base["detectors"], base["unique_concepts"], rot["detectors"],
                 rot["unique_concepts"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="An existing checkpoint (skips training).")
    p.add_argument("--out", type=Path, default=Path("runs/rotation-control"))
    p.add_argument("--rotate", type=int, default=0, help="Seed of the random rotation.")
    p.add_argument("--quantile", type=float, default=0.05)
    p.add_argument("--iou-threshold", type=float, default=0.04,
                   help="Detector threshold (Bau et al.: 0.04; a stricter one counts only "
                        "units that localize their concept well).")
    p.add_argument("--num-images", type=int, default=240, help="Images of the Broden export.")
    p.add_argument("--layer", help="Layer to dissect (default: the model's target layer).")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)

    checkpoint = a.checkpoint
    if checkpoint is None:
        checkpoint = a.out / "std" / "best.pt"
        if not checkpoint.exists():
            cli("train-gated", "--backbone", "resnet18", "--method", "std", "--device",
                a.device, "--out", str(a.out / "std"), "--quiet", "--overwrite")
    elif not checkpoint.is_file():
        p.error(f"no checkpoint at {checkpoint}")
    broden = a.out / "broden"
    if not (broden / "index.csv").exists():
        cli("data", "synth", "--format", "broden", "--num-images", str(a.num_images),
            "--out", str(broden), "--quiet", "--overwrite")

    plain = dissect(a, checkpoint, broden, a.out / "dissect")
    rotated = dissect(a, checkpoint, broden, a.out / "dissect-rotated", "--rotate",
                      str(a.rotate))
    layer = list(plain["layers"])[-1]
    rows = table(plain, rotated, layer)
    units = plain["layers"][layer]["units"]
    print(f"\nNetwork Dissection of {layer} ({units} units, {plain['images']} images, "
          f"q = {a.quantile}, detectors at IoU > {plain['iou_threshold']}), unrotated and "
          f"after a random rotation (seed {a.rotate}):")
    head = ("category", "detectors", "unique", "rotated detectors", "rotated unique")
    width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                        for i, (v, w) in enumerate(zip(r, width))))
    fewer = rows[-1][4] < rows[-1][2]
    print(f"\nrotation {'lowered' if fewer else 'did not lower'} the unique concepts "
          f"({rows[-1][2]} -> {rows[-1][4]}); files: {a.out / 'dissect-rotated' / 'dissect'}"
          "/rotation.csv")
    if rotated["layers"] != plain["layers"]:
        print("error: the unrotated counts of the two dissections differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
