"""Preprocessing: the explicit resize and normalization a model expects.

Preprocessing is part of every cache key and is recorded in checkpoints and run.json: with
another normalization, 15-30% of a layer's units change their dissection label (see
../shared/reference/broden-and-dissection.md). Datasets yield float images in [0, 1] of shape
[3, H, W] already resized; :meth:`Preprocessing.normalize` is applied per batch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F

from cnnexplain.errors import UsageError
from cnnexplain.fingerprint import digest_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """``resize``: square side in pixels images are resized to (None: keep native size);
    ``mean``/``std``: per-channel normalization of [0, 1] RGB images."""

    resize: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.resize is not None and int(self.resize) <= 0:
            raise UsageError(f"`resize` must be a positive number of pixels, got {self.resize}",
                             "pass e.g. `resize=64`, or leave it out to keep the native size")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) != 3:
                raise UsageError(f"--{name} needs 3 comma-separated values (R,G,B), got {list(v)}",
                                 f"pass e.g. --{name} 0.5,0.5,0.5")
        if any(s <= 0 for s in self.std):
            raise UsageError(f"`std` values must be positive, got {list(self.std)}",
                             "pass e.g. `std=0.229,0.224,0.225`")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing":
        if not d:
            return cls()
        return cls(resize=d.get("resize"), mean=tuple(d.get("mean", IMAGENET_MEAN)),
                   std=tuple(d.get("std", IMAGENET_STD)))

    def fingerprint(self) -> str:
        return digest_json(self.to_dict())

    def replace(self, **kw) -> "Preprocessing":
        d = {"resize": self.resize, "mean": self.mean, "std": self.std}
        d.update({k: v for k, v in kw.items() if v is not None})
        return Preprocessing(**d)

    def resize_image(self, img: torch.Tensor) -> torch.Tensor:
        """Resize a [3, H, W] or [B, 3, H, W] float image to ``resize`` x ``resize`` (bilinear,
        antialiased); identity when ``resize`` is None or already matches."""
        if self.resize is None or tuple(img.shape[-2:]) == (self.resize, self.resize):
            return img
        batch = img.unsqueeze(0) if img.dim() == 3 else img
        out = F.interpolate(batch, size=(self.resize, self.resize), mode="bilinear",
                            align_corners=False, antialias=True)
        return out[0] if img.dim() == 3 else out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalized model input (same device and dtype)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * std + mean


def parse_triplet(text: str | None, option: str) -> tuple[float, float, float] | None:
    """Parse ``"0.5,0.5,0.5"`` from a CLI option; None passes through."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option} must be 3 comma-separated numbers, got {text!r}",
                         f"pass e.g. {option} 0.5,0.5,0.5") from None
    if len(vals) != 3:
        raise UsageError(f"{option} must be 3 comma-separated numbers, got {text!r}",
                         f"pass e.g. {option} 0.5,0.5,0.5")
    return vals
