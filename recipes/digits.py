"""Write scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as a 32 px ImageFolder
with a seeded 80/20 train/val split (1,438 / 359 images): a small real dataset on which the gated
methods are measured beside the synthetic world (README, "Gated training").

    python recipes/digits.py OUT        # then: cnnexplain train-gated --dataset imagefolder:OUT

Needs scikit-learn (a test dependency: pip install -e '.[test]'); nothing is downloaded, the
digits ship with scikit-learn.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def export(out: Path, seed: int = 0, side: int = 32) -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("recipes/digits.py needs scikit-learn: pip install scikit-learn") from None
    from PIL import Image

    digits = load_digits()
    images = (digits.images / 16.0 * 255).round().astype(np.uint8)  # [N, 8, 8] in 0..255
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(0.2 * len(images)))
    split = {"val": order[:n_val], "train": order[n_val:]}
    counts = {}
    for name, idx in split.items():
        for i in idx:
            folder = out / name / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i]).resize((side, side), Image.BILINEAR).convert("RGB")
            img.save(folder / f"{int(i):04d}.png")
        counts[name] = int(len(idx))
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python recipes/digits.py OUT")
    target = Path(sys.argv[1])
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"{target} is not empty; choose a new directory")
    print(export(target))
