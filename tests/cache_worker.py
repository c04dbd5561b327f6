"""A second process for the cache tests, plus the tiny model and dataset they share.

    python tests/cache_worker.py activations CACHE OUT [--n N] [--delay S] [--block-at I]
                                 [--seen FILE] [--chunk-bytes B] [--ready FILE] [--go FILE]
    python tests/cache_worker.py gate CACHE OUT --log FILE [--delay S] [--ready FILE] [--go FILE]

``activations`` computes the tiny model's activations through the cache at CACHE and writes them
to OUT (.npz); ``gate`` runs ``Cache.get_or_compute`` with a slow compute that appends one line
to ``--log`` per call, and writes the arrays and whether it was a hit. ``--ready``/``--go`` line
two processes up: each touches its ready file after importing, then waits for the go file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from cnnexplain.activations import compute_activations  # noqa: E402
from cnnexplain.cache import layout as cache_layout  # noqa: E402
from cnnexplain.cache.store import Cache  # noqa: E402
from cnnexplain.data.preprocessing import Preprocessing  # noqa: E402
from cnnexplain.fingerprint import array_digest, digest_parts, module_digest  # noqa: E402

LAYERS = ["2", "0"]
BATCH = 2


class TinyDataset(Dataset):
    """``n`` random 3x8x8 images (fixed by ``seed``) following the dataset contract.

    ``fetched`` lists every index served; ``seen`` (a file) gets one line per index too, for
    counting across processes. ``delay`` slows every item; ``fail_at`` raises at that index;
    ``block_at`` sleeps there for minutes (a process to kill at a known point).
    """

    def __init__(self, n: int = 10, seed: int = 0, delay: float = 0.0, seen: str | None = None,
                 fail_at: int | None = None, block_at: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=gen)
        self.labels = torch.arange(n) % 3
        self.delay, self.seen, self.fail_at, self.block_at = delay, seen, fail_at, block_at
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise RuntimeError(f"simulated failure at item {i}")
        self.fetched.append(i)
        if self.seen:
            with open(self.seen, "a") as fh:
                fh.write(f"{i}\n")
        if i == self.block_at:
            time.sleep(600)
        if self.delay:
            time.sleep(self.delay)
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}

    def fingerprint(self) -> str:
        return digest_parts(array_digest(self.images.numpy()), array_digest(self.labels.numpy()))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())


def _sync(ready: str | None, go: str | None) -> None:
    if ready:
        Path(ready).touch()
    if go:
        deadline = time.monotonic() + 120
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.005)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["activations", "gate"])
    ap.add_argument("cache")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--block-at", type=int, default=None)
    ap.add_argument("--seen", default=None)
    ap.add_argument("--log", default=None)
    ap.add_argument("--chunk-bytes", type=int, default=None)
    ap.add_argument("--ready", default=None)
    ap.add_argument("--go", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.chunk_bytes:
        cache_layout.CHUNK_BYTES = args.chunk_bytes
    cache = Cache(args.cache)
    _sync(args.ready, args.go)
    if args.mode == "activations":
        model = tiny_model()
        data = TinyDataset(args.n, delay=args.delay, seen=args.seen, block_at=args.block_at)
        acts = compute_activations(model, LAYERS, data, model_fingerprint=module_digest(model),
                                   preprocessing=Preprocessing(), batch_size=BATCH, cache=cache)
        arrays = {f"layer_{layer}": acts.array(layer) for layer in LAYERS}
        np.savez(args.out, labels=acts.labels, **arrays)
        return

    def compute():
        with open(args.log, "a") as fh:
            fh.write("computed\n")
        time.sleep(args.delay)
        return {"W": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"note": "test"}

    entry, hit = cache.get_or_compute("gate", {"model": "m1", "layer": "2"}, compute)
    np.savez(args.out, W=entry["W"], hit=np.array(hit))


if __name__ == "__main__":
    main()
