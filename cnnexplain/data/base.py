"""The dataset contract every cnnexplain dataset follows.

An item is a dict of tensors with fixed shapes per dataset, so torch's default collate batches it:

    image   float32 [3, H, W] in [0, 1], already resized per the dataset's Preprocessing
            (normalization is applied later, per batch, on the device)
    label   int64 scalar (class index; -1 where a dataset has no class labels, e.g. Broden)
    index   int64 scalar (position in the dataset)

Datasets with ground truth add more keys (the synthetic world: ``mask``, ``box``, ...; Broden:
``masks``, ``image_labels``, ...): see their modules. ``dataset.item(i, fields)`` is item ``i``
with only some keys, which a dataset may compute without decoding the rest.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from cnnexplain.data.preprocessing import Preprocessing


class ImageDataset(Dataset):
    """Base class: ``class_names``, ``preprocessing``, ``spec`` (the string that opens it again),
    :meth:`fingerprint` (content digest used in cache keys) and :meth:`describe` (for run.json)."""

    class_names: list[str] = []
    preprocessing: Preprocessing = Preprocessing()
    spec: str = ""
    augmentation: str = "none"
    """The training augmentation the data's classes survive (``augment=auto``): none unless a
    dataset knows better (a flip can change a digit or a letter)."""

    def fingerprint(self) -> str:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} must define fingerprint()")

    def item(self, i: int, fields: Sequence[str]) -> dict:
        """Item ``i`` with only ``fields`` (keys of ``self[i]``); a dataset that can skip
        decoding the other fields (Broden's masks for a forward pass, its image for a tally)
        overrides it."""
        full = self[i]
        return {name: full[name] for name in ((fields,) if isinstance(fields, str) else fields)}

    def describe(self) -> dict:
        return {"spec": self.spec, "size": len(self), "classes": len(self.class_names),
                "class_names": [str(c) for c in self.class_names],
                "fingerprint": self.fingerprint(), "preprocessing": self.preprocessing.to_dict()}


PREFETCH_BATCHES = 2
"""Batches a thread reads ahead of a loop over a loader without worker processes
(``make_loader(..., prefetch=True)``): decoding (PIL and zlib release the GIL) overlaps the
loop's work, such as dissection's tally pass, which mostly keeps one core busy."""


class Prefetched:
    """An iterable over ``loader`` whose batches a background thread reads up to ``depth``
    ahead, in the same order; an error reading a batch is raised where that batch would have
    been yielded; leaving the loop early stops the thread."""

    def __init__(self, loader: Iterable, depth: int = PREFETCH_BATCHES):
        self.loader, self.depth = loader, max(1, int(depth))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.loader:
                    if not put((batch, None)):
                        return
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                put((None, error))
                return
            put((done, None))

        thread = threading.Thread(target=produce, name="cnnexplain-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                batch, error = slots.get()
                if error is not None:
                    raise error
                if batch is done:
                    return
                yield batch
        finally:
            stop.set()
            thread.join(timeout=5.0)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                workers: int = 0, drop_last: bool = False, prefetch: bool = False):
    """A DataLoader whose shuffling depends only on ``seed`` (same seed, same order);
    ``prefetch`` and no ``workers``: read :data:`PREFETCH_BATCHES` ahead in a thread
    (:class:`Prefetched`)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                        num_workers=workers, drop_last=drop_last,
                        persistent_workers=False, pin_memory=False)
    return Prefetched(loader) if prefetch and workers == 0 else loader
