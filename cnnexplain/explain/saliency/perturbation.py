"""Perturbation methods: occlusion (seed 002) and LIME with superpixels (seed 000).

Both evaluate the model on many perturbed copies of each image, batched across images and
perturbations (:func:`~cnnexplain.explain.saliency.base.pass_size` copies per forward pass),
and explain the target logit.
The removed parts are set to 0 in model-input space, i.e. the normalization mean colour (the
"grey square" of seed 002).

- ``occlusion`` (Zeiler & Fergus 2014; seed 002, "Occlusion Map"): a ``w x w`` occluder slides
  with stride ``s`` over the image (positions ``0, s, 2s, ...`` with the last one cropped at the
  border, captum's layout); each pixel gets the mean, over the windows covering it, of
  ``z_c(x) - z_c(x with the window occluded)``. raw ``[B, 3, H, W]`` (the three channels are
  equal, as captum's ``Occlusion`` with a ``(3, w, w)`` window returns); map: mean over
  channels. Positive: occluding the pixel lowers the target logit.
- ``lime`` (Ribeiro et al. 2016; seed 000, 局部黑盒解释): SLIC superpixels (:func:`slic`) are the
  interpretable features; ``n`` binary samples (the first keeps everything, the others keep
  each superpixel with probability 1/2) are scored by the model; a ridge regression
  (``alpha = 1``, intercept, as LIME's default) of the target logit on the samples, weighted by
  LIME's kernel ``sqrt(exp(-d^2 / width^2))`` of the cosine distance ``d`` to the unperturbed
  sample, gives one coefficient per superpixel. raw ``[B, 3, H, W]``: each pixel carries its
  superpixel's coefficient (equal channels); map: mean over channels (signed).
"""

from __future__ import annotations

import math

import torch

from cnnexplain.explain.saliency.base import (
    Attribution,
    SaliencyMethod,
    logits_of,
    passes,
    register,
    target_scores,
)


def occlusion_geometry(height: int, width: int, window: int | None, stride: int | None
                       ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """``(window, stride, rows [P, H] bool, cols [P, W] bool)``: the P occluder positions.

    Defaults: ``window = max(2, min(H, W) // 8)``, ``stride = max(1, window // 2)``; the window
    is capped at the image size."""
    w = int(window) if window else max(2, min(height, width) // 8)
    w = min(w, height, width)
    s = int(stride) if stride else max(1, w // 2)

    def axis(n: int) -> torch.Tensor:
        count = math.ceil(max(0, n - w) / s) + 1
        starts = torch.arange(count) * s
        idx = torch.arange(n)
        return (idx[None, :] >= starts[:, None]) & (idx[None, :] < (starts[:, None] + w))

    r, c = axis(height), axis(width)
    rows = r.repeat_interleave(c.shape[0], dim=0)
    cols = c.repeat(r.shape[0], 1)
    return w, s, rows, cols


@register
class Occlusion(SaliencyMethod):
    name = "occlusion"
    description = "occlusion: logit drop when a sliding grey square hides each region (seed 002)"
    citation = "Zeiler & Fergus 2014; seed 002"
    kind = "pixel"
    reduction = "mean"
    sign = "raw and map signed: positive where occluding lowers the target logit"
    units = "logit drop"
    option_names = ("occlusion_window", "occlusion_stride", "internal_batch_size")
    peer = "captum Occlusion"

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        opts = context.options
        b, _, h, w = inputs.shape
        _, _, rows, cols = occlusion_geometry(h, w, opts.occlusion_window, opts.occlusion_stride)
        masks = (rows[:, :, None] & cols[:, None, :]).to(inputs.device)  # [P, H, W]
        p = masks.shape[0]
        with torch.no_grad():
            base = target_scores(logits_of(model, inputs), targets)
            total = torch.zeros(b, h, w, device=inputs.device, dtype=inputs.dtype)
            for start, stop in passes(b * p, opts.internal_batch_size, inputs):
                flat = torch.arange(start, stop, device=inputs.device)
                img, pos = flat // p, flat % p
                keep = (~masks[pos]).to(inputs.dtype)[:, None]
                scores = target_scores(logits_of(model, inputs[img] * keep), targets[img])
                drop = (base[img] - scores).view(-1, 1, 1)
                total.index_add_(0, img, drop * masks[pos].to(inputs.dtype))
        count = masks.sum(0).to(inputs.dtype)
        per_pixel = total / count
        raw = per_pixel[:, None].expand(b, 3, h, w).contiguous()
        return Attribution(raw=raw, map=per_pixel)


def slic(image: torch.Tensor, segments: int, compactness: float = 10.0, iterations: int = 10
         ) -> torch.Tensor:
    """SLIC superpixels (Achanta et al. 2012) of one image ``[3, H, W]`` in [0, 1] ->
    int64 labels ``[H, W]`` numbered ``0..S-1`` (empty clusters dropped).

    k-means on (colour, position) from a regular grid of about ``segments`` centres, with
    distance ``(100 * d_rgb)^2 + (compactness / S)^2 d_xy^2`` (``S`` the grid step; the factor
    100 puts RGB in [0, 1] on the scale of the CIELAB values ``compactness`` is usually tuned
    for) and centres restricted to a ``2S`` neighbourhood, as in SLIC. Connectivity is not
    enforced (a superpixel may be split, which LIME does not mind)."""
    _, h, w = image.shape
    step = math.sqrt(h * w / max(1, segments))
    ny = max(1, round(h / step))
    nx = max(1, round(w / step))
    cy = (torch.arange(ny, dtype=image.dtype) + 0.5) * h / ny
    cx = (torch.arange(nx, dtype=image.dtype) + 0.5) * w / nx
    yy, xx = torch.meshgrid(torch.arange(h, dtype=image.dtype), torch.arange(w, dtype=image.dtype),
                            indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], dim=1)  # [N, 2]
    col = image.reshape(3, -1).t() * 100.0  # [N, 3]
    centres_pos = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).reshape(-1, 2)
    iy = centres_pos[:, 0].long().clamp(0, h - 1)
    ix = centres_pos[:, 1].long().clamp(0, w - 1)
    centres_col = col.view(h, w, 3)[iy, ix]
    spatial = (float(compactness) / step) ** 2
    labels = torch.zeros(h * w, dtype=torch.long)
    for _ in range(iterations):
        dpos = torch.cdist(pos, centres_pos) ** 2
        dcol = torch.cdist(col, centres_col) ** 2
        far = (pos[:, None, :] - centres_pos[None, :, :]).abs().amax(-1) > 2 * step
        dist = dcol + spatial * dpos
        dist = dist.masked_fill(far, float("inf"))
        labels = dist.argmin(dim=1)
        k = centres_pos.shape[0]
        counts = torch.bincount(labels, minlength=k).to(image.dtype)
        alive = counts > 0
        sums_pos = torch.zeros(k, 2, dtype=image.dtype).index_add_(0, labels, pos)
        sums_col = torch.zeros(k, 3, dtype=image.dtype).index_add_(0, labels, col)
        centres_pos = torch.where(alive[:, None], sums_pos / counts.clamp(min=1)[:, None], centres_pos)
        centres_col = torch.where(alive[:, None], sums_col / counts.clamp(min=1)[:, None], centres_col)
    _, dense = torch.unique(labels, return_inverse=True)
    return dense.view(h, w)


def lime_kernel(samples: torch.Tensor, width: float) -> torch.Tensor:
    """LIME's weights ``sqrt(exp(-d^2 / width^2))`` with ``d`` the cosine distance of each
    binary sample ``[n, S]`` to the all-ones sample (d = 1 for an empty sample)."""
    s = samples.to(torch.float64)
    norm = s.norm(dim=1) * math.sqrt(s.shape[1])
    cos = torch.where(norm > 0, s.sum(1) / norm.clamp(min=1e-12), torch.zeros_like(norm))
    d = 1.0 - cos
    return torch.sqrt(torch.exp(-(d ** 2) / float(width) ** 2))


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef [S], intercept)`` of ridge regression with an unpenalized intercept and sample
    weights, as ``sklearn.linear_model.Ridge(alpha).fit(x, y, sample_weight=weights)``
    (weighted centring, then ``(Xc^T W Xc + alpha I) b = Xc^T W yc``). float64."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    w = weights.to(torch.float64)
    wsum = w.sum()
    x_mean = (w[:, None] * x).sum(0) / wsum
    y_mean = (w * y).sum() / wsum
    xc = x - x_mean
    yc = y - y_mean
    gram = xc.t() @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(gram, xc.t() @ (w * yc))
    return coef, y_mean - x_mean @ coef


@register
class Lime(SaliencyMethod):
    name = "lime"
    description = "LIME: weighted ridge fit of the logit on random SLIC-superpixel masks (seed 000)"
    citation = "Ribeiro, Singh & Guestrin 2016; seed 000"
    kind = "pixel"
    reduction = "mean"
    sign = "raw and map signed: a superpixel's ridge coefficient (logit units)"
    units = "logit units"
    option_names = ("lime_samples", "lime_segments", "lime_kernel_width", "internal_batch_size")
    stochastic = True
    peer = "captum Lime (same samples, sklearn Ridge)"

    def segments(self, inputs: torch.Tensor, context) -> list[torch.Tensor]:
        """Superpixels of each image (computed on its [0, 1] colours, on the CPU)."""
        images = context.preprocessing.denormalize(inputs.detach().float()).clamp(0, 1).cpu()
        return [slic(img, context.options.lime_segments) for img in images]

    def samples(self, count: int, features: int, generator: torch.Generator) -> torch.Tensor:
        """``[count, features]`` binary; row 0 keeps every superpixel."""
        z = (torch.rand(count, features, generator=generator) < 0.5).to(torch.float32)
        z[0] = 1.0
        return z

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        opts = context.options
        b, _, h, w = inputs.shape
        n = int(opts.lime_samples)
        segs = self.segments(inputs, context)
        gens = context.generators(b, self.name)
        zs = [self.samples(n, int(s.max()) + 1, g) for s, g in zip(segs, gens)]
        # pixel keep-masks per sample are built chunk by chunk: [k, H, W]
        scores = torch.zeros(b * n, dtype=torch.float64)
        with torch.no_grad():
            for start, stop in passes(b * n, opts.internal_batch_size, inputs):
                flat = torch.arange(start, stop)
                img, j = flat // n, flat % n
                keep = torch.stack([zs[int(i)][int(k)][segs[int(i)]] for i, k in zip(img, j)])
                keep = keep.to(device=inputs.device, dtype=inputs.dtype)[:, None]
                dev_img = img.to(inputs.device)
                out = logits_of(model, inputs[dev_img] * keep)
                scores[start:stop] = target_scores(out, targets[dev_img]).double().cpu()
        raw = torch.zeros(b, h, w, dtype=inputs.dtype)
        for i in range(b):
            y = scores[i * n:(i + 1) * n]
            weights = lime_kernel(zs[i], opts.lime_kernel_width)
            coef, _ = weighted_ridge(zs[i], y, weights, alpha=1.0)
            raw[i] = coef.to(inputs.dtype)[segs[i]]
        raw = raw.to(inputs.device)
        return Attribution(raw=raw[:, None].expand(b, 3, h, w).contiguous(), map=raw)
