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

from typing import Sequence

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


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``seed`` (same seed, same order)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=workers, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False)
