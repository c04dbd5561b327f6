"""Does a trained model use a planted colour? The causal ground truth behind TCAV's known answer.

``python recipes/recolour_control.py CHECKPOINT [--split test] [--out FILE.csv]``

For every colour correlation the checkpoint's synthetic world plants (``correlate=red-c@circle=
0.9``: red main objects in 90% of the circle images), two counterfactuals of the same scenes
(``cnnexplain.data.synthetic.render(..., main_color=...)``: every random draw and every other
pixel unchanged):

- remove: the class's images whose main object has the colour, repainted in each other object
  colour that is not one of the scene's background colours (an object in its background's
  colour would lose its shape too); the class's accuracy, mean probability and logit before
  and after;
- add: the other classes' images whose background does not have the colour, their main object
  repainted in it; the share predicted as the class, and its mean probability, before and
  after.

A model that uses the colour for the class loses accuracy in ``remove`` and gains the class in
``add``; TCAV (Kim et al. 2018) should then call the colour's CAV significant for the class. The
table goes to stdout and, with ``--out``, to a CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _inputs(images: list[np.ndarray], prep) -> torch.Tensor:
    from cnnexplain.data.synthetic import image_tensor

    x = torch.stack([image_tensor(im) for im in images])
    return prep.normalize(prep.resize_image(x))


@torch.no_grad()
def _predict(model, x: torch.Tensor, klass: int, batch: int = 128) -> tuple[np.ndarray, ...]:
    """(predicted class [N], probability of ``klass`` [N], logit of ``klass`` [N])."""
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return (logits.argmax(1).numpy(), logits.softmax(1)[:, klass].numpy(),
            logits[:, klass].numpy())


def control(checkpoint: str | Path, split: str = "test", limit: int | None = None) -> pd.DataFrame:
    """One row per (planted colour, class, counterfactual): the measurements described above."""
    from cnnexplain.data.synthetic import (OBJECT_COLORS, ONTOLOGY, SPLIT_OFFSETS, WorldConfig,
                                           check_split, render)
    from cnnexplain.errors import UsageError
    from cnnexplain.models.loading import load_model

    lm = load_model(checkpoint)
    model = lm.model.eval()
    spec = ((lm.meta.get("data") or {}).get("spec") or "")
    if not str(spec).startswith("synthetic"):
        raise UsageError(f"{checkpoint} was not trained on the synthetic world "
                         f"({spec or 'no data spec'})", "pass a checkpoint trained on a "
                         "`synthetic:` dataset with a correlate=")
    world = WorldConfig.from_spec(spec)
    planted = [(c[:-2], k) for c, k, _ in world.correlations if c.endswith("-c")]
    if not planted:
        raise UsageError(f"the world {spec} plants no colour", "train on a world with "
                         "correlate=COLOR-c@CLASS=STRENGTH")
    split = check_split(split)
    n = world.split_size(split) if limit is None else min(limit, world.split_size(split))
    samples = [render(world, SPLIT_OFFSETS[split] + i) for i in range(n)]
    rows = []
    for colour, klass_name in planted:
        k = world.classes.index(klass_name)
        keep, removed, others = [], [], []
        for s in samples:
            owner = np.zeros_like(s.objects[0].mask)
            for o in s.objects:
                owner = owner | o.mask
            background = {ONTOLOGY.name(int(v))[:-2] for v in np.unique(s.color[~owner])}
            if s.label == k and s.objects[0].color == colour:
                for other in OBJECT_COLORS:
                    if other != colour and other not in background:
                        keep.append(s.image)
                        removed.append(render(world, s.index, main_color=other).image)
            elif s.label != k and s.objects[0].color != colour and colour not in background:
                others.append(s)
        added = [render(world, s.index, main_color=colour).image for s in others]
        for name, before, after, labels in (
                ("remove", keep, removed, np.full(len(keep), k)),
                ("add", [s.image for s in others], added, np.array([s.label for s in others]))):
            if not before:
                continue
            p0, q0, z0 = _predict(model, _inputs(before, lm.preprocessing), k)
            p1, q1, z1 = _predict(model, _inputs(after, lm.preprocessing), k)
            rows.append({"colour": f"{colour}-c", "class": klass_name, "counterfactual": name,
                         "pairs": len(before),
                         "class_share_before": float((p0 == k).mean()),
                         "class_share_after": float((p1 == k).mean()),
                         "class_probability_before": float(q0.mean()),
                         "class_probability_after": float(q1.mean()),
                         "class_logit_before": float(z0.mean()),
                         "class_logit_after": float(z1.mean()),
                         "accuracy_before": float((p0 == labels).mean()),
                         "accuracy_after": float((p1 == labels).mean())})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="first N images of the split")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    a = ap.parse_args(argv)
    from cnnexplain.errors import CnnexplainError

    try:
        table = control(a.checkpoint, a.split, a.limit)
    except CnnexplainError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if a.out is not None:
        from cnnexplain.io import write_csv

        write_csv(a.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
