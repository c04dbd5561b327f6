"""The training and validation items as ``(image, label)`` tensor pairs, memoized in memory."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ImageLabel(Dataset):
    """``(image [3, H, W] float, label int64)`` pairs of a dataset, memoized in memory when
    ``memo`` (a pure speed-up: items are deterministic functions of their index)."""

    def __init__(self, dataset: Dataset, memo: bool = False):
        self.dataset = dataset
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if memo else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        if self.memo is not None and i in self.memo:
            return self.memo[i]
        item = self.dataset[i]
        pair = (item["image"].float(), torch.as_tensor(item["label"], dtype=torch.int64).reshape(()))
        if self.memo is not None:
            self.memo[i] = pair
        return pair

    def for_epoch(self, epoch: int) -> "ImageLabel":
        """The items of ``epoch``: a dataset that draws new images every epoch (the synthetic
        world's ``epoch_view``) gives a new, unmemoized view; any other gives this one."""
        view = getattr(self.dataset, "epoch_view", None)
        if view is None:
            return self
        data = view(epoch)
        return self if data is self.dataset else ImageLabel(data, memo=False)


def _collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


MEMO_BYTES = 1 << 30
