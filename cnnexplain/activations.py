"""Layer activations over a dataset: computed once, batched on the device, streamed to the cache.

:func:`compute_activations` runs the model over the dataset in order and stores, per image, the
output of each requested layer -- the full map ``[K, h, w]`` or, with ``pool``, one value per
channel ``[K]`` (mean, sum or max over space, computed on the device) -- plus the image's label.
Rows go to the cache chunk by chunk, so memory does not grow with the dataset, and a run that
was killed resumes where its partial entry ends: only the missing rows are computed.

The cache key (see :mod:`cnnexplain.cache`) has the parts of :func:`activation_parts`: model
weights digest, the sorted layers, the dataset's content fingerprint, the preprocessing
fingerprint, the pooling and the stored dtype. Batch size, workers and device are not parts.

Entry layout (plain HDF5)::

    activations/<layer>   [N, K] (pooled) or [N, K, h, w], float32 or float16
    labels                [N] int64 (-1 where the dataset has no class labels)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from cnnexplain.cache.entries import Entry, LazyDataset
from cnnexplain.cache.store import Cache
from cnnexplain.cache.streaming import StreamWriter
from cnnexplain.data.base import make_loader
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.models.layers import get_module, record
from cnnexplain.progress import silent

KIND = "activations"
POOLS = ("mean", "sum", "max")


class ProgressTask(Protocol):
    def advance(self, n: float = 1) -> None: ...


ProgressLike = Callable[..., ContextManager[ProgressTask]]
"""``with progress(total=N, description=str) as task: task.advance(n)``, e.g.
:class:`cnnexplain.progress.ProgressFactory` (the CLI's Rich bars); None: silent."""


def dataset_name(layer: str) -> str:
    """The HDF5 dataset holding ``layer``'s activations."""
    return f"activations/{layer}"


def activation_parts(layers: Sequence[str], dataset, *, model_fingerprint: str,
                     preprocessing: Preprocessing, pool: str | None, float16: bool) -> dict:
    """The cache key parts of an activation entry (see the module docstring)."""
    return {"model": model_fingerprint, "layers": sorted(set(layers)),
            "dataset": dataset.fingerprint(), "preprocessing": preprocessing.fingerprint(),
            "pool": pool, "dtype": "float16" if float16 else "float32"}


def pool_activation(a: torch.Tensor, pool: str | None) -> torch.Tensor:
    """``[B, K, *space]`` -> ``[B, K]`` by ``pool`` over every spatial position; unchanged when
    ``pool`` is None or there is no spatial dimension (e.g. a Linear layer's ``[B, K]``)."""
    if pool is None or a.dim() <= 2:
        return a
    dims = tuple(range(2, a.dim()))
    if pool == "mean":
        return a.mean(dim=dims)
    if pool == "sum":
        return a.sum(dim=dims)
    return a.amax(dim=dims)


@dataclass
class ActivationSet:
    """Activations of ``layers`` for the ``n`` images of a dataset, in dataset order.

    ``labels``: [N] int64. Arrays come back as float32 whatever the stored dtype. Reads are
    lazy: :meth:`array` reads what is asked for, :meth:`chunks` streams with bounded memory.
    """

    entry: Entry
    layers: list[str]
    n: int
    pool: str | None
    labels: np.ndarray

    def __len__(self) -> int:
        return self.n

    def _dataset(self, layer: str) -> LazyDataset:
        if layer not in self.layers:
            raise UsageError(f"no activations for layer {layer!r} in this set"
                             f"{close_matches(layer, self.layers)}",
                             f"use one of {', '.join(self.layers)}")
        return self.entry.dataset(dataset_name(layer))

    def shape(self, layer: str) -> tuple[int, ...]:
        """``(N, K)`` pooled or ``(N, K, h, w)``."""
        return tuple(self._dataset(layer).shape)

    def array(self, layer: str, rows: slice | np.ndarray | Sequence[int] | None = None
              ) -> np.ndarray:
        """float32 ``[N, K]`` pooled or ``[N, K, h, w]``; ``rows`` selects images (a slice, integer
        positions in any order, or a boolean mask of length N)."""
        ds = self._dataset(layer)
        if rows is None:
            out = ds[()]
        elif isinstance(rows, slice):
            picked = range(self.n)[rows]
            out = ds[picked.start:picked.stop] if picked.step == 1 else ds.take(np.array(picked))
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                if idx.shape != (self.n,):
                    raise IndexError(f"boolean row mask of shape {idx.shape}, expected ({self.n},)")
                idx = np.flatnonzero(idx)
            out = ds.take(idx)
        return np.asarray(out, dtype=np.float32)

    def chunks(self, layer: str, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, float32 rows)`` for consecutive blocks of ``chunk_rows`` images."""
        for start, block in self._dataset(layer).blocks(chunk_rows):
            yield start, np.asarray(block, dtype=np.float32)


def compute_activations(model: nn.Module, layers: Sequence[str], dataset, *,
                        model_fingerprint: str, preprocessing: Preprocessing,
                        device: torch.device | str = "cpu", batch_size: int = 64,
                        pool: str | None = None, float16: bool = False,
                        cache: Cache | None = None, progress: ProgressLike | None = None,
                        workers: int = 0) -> ActivationSet:
    """The activations of ``layers`` for every image of ``dataset``, from the cache when there.

    ``model`` must already live on ``device``; it runs in eval mode under ``torch.no_grad()``
    (its train/eval mode is restored afterwards) on ``preprocessing.normalize(image)``.
    ``pool``: None (full maps), "mean", "sum" or "max" over space. ``float16``: store float16.
    ``cache``: None computes into a disabled :class:`Cache`, whose private temporary HDF5 file
    lives as long as the returned set (memory stays bounded either way). Two processes asking
    for the same activations compute them once; the second waits and reads.
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise UsageError("no layer to record activations from", "pass `layer=NAME`, e.g. layer4")
    if pool not in (None, *POOLS):
        raise UsageError(f"unknown pooling {pool!r}{close_matches(str(pool), POOLS)}",
                         "pass `pool` mean, sum or max, or leave it out to keep full maps")
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be at least 1, got {batch_size}",
                         "pass e.g. `batch_size=64`")
    for layer in layers:
        get_module(model, layer)
    _check_device(model, device)
    n = len(dataset)
    if n == 0:
        name = getattr(dataset, "spec", "") or type(dataset).__name__
        raise CnnexplainError(f"the dataset {name} has no images",
                              "check the dataset path and split")
    cache = cache if cache is not None else Cache(enabled=False)
    parts = activation_parts(layers, dataset, model_fingerprint=model_fingerprint,
                             preprocessing=preprocessing, pool=pool, float16=float16)
    key = cache.key(KIND, **parts)
    entry = cache.load(KIND, key)
    if entry is None:
        with cache.lock(KIND, key, timeout=cache.lock_timeout):
            entry = cache.load(KIND, key)  # another process may have finished it meanwhile
            if entry is None:
                entry = _compute(model, parts, dataset, n, key, cache, device=device,
                                 batch_size=batch_size, pool=pool, float16=float16,
                                 preprocessing=preprocessing, progress=progress, workers=workers)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    return ActivationSet(entry=entry, layers=layers, n=len(labels), pool=pool, labels=labels)


def _check_device(model: nn.Module, device) -> None:
    param = next(model.parameters(), None)
    if param is None:
        return
    want = torch.device(device)
    have = param.device
    if have.type != want.type or (want.index is not None and have.index != want.index):
        raise UsageError(f"the model is on {have} but activations were asked for on {want}",
                         f"move the model with model.to({str(want)!r}) or pass "
                         f"device={str(have)!r}")


def _compute(model: nn.Module, parts: dict, dataset, n: int, key: str, cache: Cache, *, device,
             batch_size: int, pool: str | None, float16: bool, preprocessing: Preprocessing,
             progress: ProgressLike | None, workers: int) -> Entry:
    """Stream the missing rows into the cache (caller holds the key's lock); the entry."""
    layers = parts["layers"]
    names = {layer: dataset_name(layer) for layer in layers}
    attrs = {"description": "layer activations of a model over a dataset, one row per image "
                            "in dataset order (cnnexplain.activations)",
             "model_fingerprint": parts["model"], "layers": layers,
             "dataset_fingerprint": parts["dataset"],
             "dataset_spec": getattr(dataset, "spec", "") or type(dataset).__name__,
             "preprocessing": preprocessing.to_dict(), "pool": pool, "dtype": parts["dtype"],
             "n": n}

    def open_writer(columns) -> StreamWriter:
        return cache.writer(KIND, key, columns, n, attrs, float16=float16, parts=parts,
                            dataset_attrs=_dataset_attrs(columns, names, pool))

    columns = cache.partial_columns(KIND, key)
    writer = open_writer(columns) if columns is not None else None
    start = writer.rows_done if writer is not None else 0
    was_training = model.training
    model.eval()
    try:
        progress = progress or silent()
        with progress(total=n, description=f"activations {', '.join(layers)}") as bar:
            if start:
                bar.advance(start)
            rest = Subset(dataset, range(start, n))
            loader = make_loader(rest, batch_size=batch_size, workers=workers)
            with torch.no_grad(), record(model, layers) as acts:
                for batch in loader:
                    images = batch["image"].to(device)
                    model(preprocessing.normalize(images.float()))
                    missing = [layer for layer in layers if layer not in acts]
                    if missing:
                        raise UsageError(f"layer {missing[0]!r} did not run in the forward pass, "
                                         "so it has no activations",
                                         "choose a layer the model uses")
                    rows = {names[layer]: pool_activation(acts[layer], pool).float().cpu().numpy()
                            for layer in layers}
                    bad = [layer for layer in layers if not np.isfinite(rows[names[layer]]).all()]
                    if bad:
                        if writer is not None:
                            writer.abort()
                            writer = None
                        raise CnnexplainError(
                            f"the model's activations at layer {bad[0]!r} contain NaN or Inf",
                            "check the checkpoint (a diverged training run?) and the inputs; "
                            "nothing was cached")
                    rows["labels"] = batch["label"].reshape(-1).to(torch.int64).cpu().numpy()
                    if writer is None:
                        writer = open_writer({name: (a.shape[1:], a.dtype)
                                              for name, a in rows.items()})
                    writer.append(rows)
                    bar.advance(len(images))
        return writer.commit()
    finally:
        model.train(was_training)
        if writer is not None:
            writer.close()


def _dataset_attrs(columns: dict, names: dict[str, str], pool: str | None) -> dict[str, dict]:
    out = {"labels": {"description": "class index of each image (-1: no class label)",
                      "shape": "N", "units": "class index"}}
    meanings = {1: "N x K", 2: "N x K x L", 3: "N x K x h x w", 4: "N x K x d x h x w"}
    for layer, name in names.items():
        shape, _ = columns[name]
        pooled = f", {pool} over spatial positions" if pool is not None else ""
        out[name] = {"description": f"output of layer {layer}, one row per image{pooled}",
                     "shape": meanings.get(len(shape), f"N x {len(shape)} dims"),
                     "units": "layer output (model units)", "layer": layer, "pool": pool}
    return out
