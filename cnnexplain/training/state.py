"""Deterministic randomness of a training run: seeds derived from ``(seed, what, epoch, step)``,
the data order of every epoch, and the RNG states a checkpoint holds for ``resume``."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "order", epoch)``); stable across runs."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``n`` training items for ``epoch`` (depends only on seed, epoch)."""
    return torch.randperm(n, generator=generator(seed, "order", epoch))


class EpochBatches:
    """Batch sampler: the global batches of one epoch (``drop_last``), each cut into
    ``world`` equal contiguous slices; yields this rank's slice."""

    def __init__(self, n: int, batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, epoch
        self.rank, self.world = rank, world
        self.local = batch // world

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for s in range(len(self)):
            idx = order[s * self.batch:(s + 1) * self.batch]
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()


def rng_state() -> dict:
    """torch, numpy, python (and CUDA) RNG states as tensors, ints and lists only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])},
             "python": {"version": int(py_state[0]), "state": [int(x) for x in py_state[1]],
                        "gauss_next": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
