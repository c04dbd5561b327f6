"""Explain a set of (image, class) pairs with one method: batched, on the model's device, with a
progress bar, and cached.

Cache entries (``kind="saliency"``, see :mod:`cnnexplain.cache`) hold ``maps`` ``[M, H, W]`` and
``raw`` (``[M, 3, H, W]`` / ``[M, h, w]``) float32, and the compute time. The key parts are::

    model          the model fingerprint (weights, gate, architecture)
    method         the method name
    options        the method's own options (MethodOptions fields in its option_names;
                   SmoothGrad adds its base method's)
    layer          the explained layer (layer methods only, else null)
    classifier     the classifier's name (cam, clrp2; else null)
    clusters       digest of the class clusters (gated methods; else null)
    inputs         digest of the model-input tensor [N, 3, H, W]
    preprocessing  digest of resize / mean / std
    pairs          digest of (image index, target) of every explained pair
    target         the `target` text
    seed           the seed (methods that draw random numbers; else null)
    extra          what else makes the entry differ (the sanity check's randomization step)

so a repeated run reads the maps instead of recomputing them, and any change that alters a map
misses. Batch size and device are not parts (they only change float rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnnexplain.explain.saliency.base import METHODS, Context, get_method
from cnnexplain.explain.saliency.inputs import pairs_digest
from cnnexplain.fingerprint import array_digest
from cnnexplain.progress import silent


@dataclass
class MethodResult:
    """Maps of one method for M pairs: ``maps`` float32 ``[M, H, W]``, ``raw`` float32
    ``[M, 3, H, W]`` (pixel methods) or ``[M, h, w]`` (layer methods) or None; ``seconds``:
    compute time (the stored one when ``cached``); ``info``: the method's description, options
    and layer (maps.h5 attributes)."""

    method: str
    maps: np.ndarray
    raw: np.ndarray | None
    seconds: float
    cached: bool
    info: dict = field(default_factory=dict)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.maps))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Explainer:
    """Fixed parts of a run: ``images`` float32 ``[N, 3, H, W]`` in model space on the CPU
    (batches move to ``device``), the ``context``, the explained ``layer`` (layer methods), the
    model and inputs fingerprints (cache keys), ``cache`` (None: no caching) and ``progress``."""

    model: nn.Module
    images: torch.Tensor
    context: Context
    device: torch.device | str = "cpu"
    batch_size: int = 16
    layer: str | None = None
    model_fingerprint: str = ""
    inputs_fingerprint: str = ""
    target_text: str = ""
    cache: object | None = None
    progress: object | None = None

    def __post_init__(self):
        if not self.inputs_fingerprint:
            self.inputs_fingerprint = array_digest(self.images.numpy())
        self.progress = self.progress or silent()

    def key_parts(self, name: str, image_index: torch.Tensor, targets: torch.Tensor,
                  extra=None) -> dict:
        method = get_method(name)
        opts = self.context.options
        clusters = self.context.clusters
        return {
            "model": self.model_fingerprint,
            "method": name,
            "options": method.options_used(opts),
            "layer": self.layer if method.needs_layer else None,
            "classifier": self.context.classifier if name in ("cam", "clrp2") else None,
            "clusters": (array_digest(clusters.cpu().numpy()) if method.needs_gate
                         and clusters is not None else None),
            "inputs": self.inputs_fingerprint,
            "preprocessing": self.context.preprocessing.fingerprint(),
            "pairs": pairs_digest(image_index, targets),
            "target": self.target_text,
            "seed": int(self.context.seed) if _stochastic(name, opts) else None,
            "extra": extra,
        }

    def info(self, name: str) -> dict:
        method = get_method(name)
        d = method.describe()
        d["options_used"] = method.options_used(self.context.options)
        d["layer"] = self.layer if method.needs_layer else None
        if name == "smoothgrad":
            base = get_method(self.context.options.smoothgrad_base)
            d["reduction"] = f"{d['reduction']}: {base.reduction_doc}"
            d["sign"] = f"as {base.name}: {base.sign}"
            d["units"] = base.units
        return d

    def compute(self, name: str, image_index: torch.Tensor, targets: torch.Tensor,
                model: nn.Module | None = None, description: str | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, float]:
        """``(maps, raw, seconds)`` for the pairs, batch by batch."""
        method = get_method(name)
        model = model if model is not None else self.model
        maps, raws = [], []
        seconds = 0.0
        m = len(image_index)
        with self.progress(total=m, description=description or name) as task:
            for start in range(0, m, self.batch_size):
                sl = slice(start, min(m, start + self.batch_size))
                idx = image_index[sl]
                x = self.images[idx].to(self.device)
                t = targets[sl].to(self.device)
                ctx = self.context.with_ids(idx)
                _sync(self.device)
                t0 = time.perf_counter()
                att = method.attribute(model, x, t, layer=self.layer, context=ctx)
                _sync(self.device)
                seconds += time.perf_counter() - t0
                maps.append(att.map.float().cpu().numpy())
                if att.raw is not None:
                    raws.append(att.raw.float().cpu().numpy())
                task.advance(len(idx))
        raw = np.concatenate(raws) if raws else None
        return np.concatenate(maps).astype(np.float32), raw, seconds

    def run(self, name: str, image_index: torch.Tensor, targets: torch.Tensor, *,
            model: nn.Module | None = None, extra=None, description: str | None = None
            ) -> MethodResult:
        """Maps of method ``name`` for the pairs (``image_index[m]``, ``targets[m]``), read from
        the cache when an entry with the same key parts exists. ``model``/``extra``: explain
        another model (e.g. a randomized copy) under an extra key part."""
        image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
        targets = torch.as_tensor(targets, dtype=torch.long).cpu()
        info = self.info(name)
        if self.cache is None:
            maps, raw, seconds = self.compute(name, image_index, targets, model, description)
            return MethodResult(name, maps, raw, seconds, False, info)

        def compute():
            maps, raw, seconds = self.compute(name, image_index, targets, model, description)
            arrays = {"maps": maps}
            if raw is not None:
                arrays["raw"] = raw.astype(np.float32)
            return arrays, {"seconds": float(seconds), "method": name}

        entry, hit = self.cache.get_or_compute(
            "saliency", self.key_parts(name, image_index, targets, extra), compute)
        raw = entry["raw"] if "raw" in entry else None
        return MethodResult(name, np.asarray(entry["maps"], dtype=np.float32),
                            None if raw is None else np.asarray(raw, dtype=np.float32),
                            float(entry.attrs.get("seconds", 0.0)), hit, info)


def _stochastic(name: str, options) -> bool:
    method = METHODS[name]
    if name == "smoothgrad":
        return True
    return bool(method.stochastic)
