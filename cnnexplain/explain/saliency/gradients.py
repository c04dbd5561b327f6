"""Gradient methods (seed ``002_d3d71848a193426f.txt``, "Pixel Sensitivity"; seed 000, 显著性图).

All of them explain the target *logit* ``z_c`` (pre-softmax, as in seeds 002 and 003) and return
raw ``[B, 3, H, W]`` in the units of ``d z_c / d x`` (times the input for the attribution
variants), computed for the whole batch with one forward and one backward pass:

- ``gradient``: ``d z_c / d x`` (Simonyan et al. 2013). Map: max over channels of ``|raw|``.
- ``input-x-gradient``: ``x * d z_c / d x`` (seed 002, "The Case of Linear Model"). Map: sum
  over channels (signed contribution).
- ``guided-backprop``: the gradient with ``relu`` applied to the backward signal at every
  ReLU, on top of the forward mask (Springenberg et al. 2014). Map: max-abs.
- ``deconvnet``: only ``relu`` of the backward signal at every ReLU (Zeiler & Fergus 2014).
  Map: max-abs.
- ``smoothgrad``: the mean of a base method's raw output over ``n`` noisy copies
  ``x + N(0, sigma^2)``, ``sigma = smoothgrad_sigma * (max x - min x)`` per image (Smilkov et
  al. 2017; seed 002). Samples are batched (:func:`~cnnexplain.explain.saliency.base.pass_size`
  per pass). Map: the base
  method's reduction of the averaged raw.
- ``integrated-gradients``: ``(x - x0) * sum_k w_k d z_c / d x (x0 + a_k (x - x0))`` with the
  baseline ``x0 = 0`` in model-input space (the normalization mean colour) and captum's
  quadratures (Sundararajan et al. 2017). Path points are batched. Map: sum over channels
  (completeness: the map sums to about ``z_c(x) - z_c(x0)``).

Guided backprop and DeconvNet use :mod:`relu_rules`, so functional and reused ReLUs obey the
rule too (captum and zennit only see ``nn.ReLU`` modules).
"""

from __future__ import annotations

import numpy as np
import torch

from cnnexplain.config.saliency import IG_METHODS
from cnnexplain.errors import UsageError, close_matches
from cnnexplain.explain.saliency.base import (
    METHODS,
    Attribution,
    Context,
    SaliencyMethod,
    input_gradient,
    passes,
    register,
)
from cnnexplain.explain.saliency.relu_rules import relu_rule


class PixelGradientMethod(SaliencyMethod):
    """A pixel method whose raw output comes from gradients; :meth:`raw` is what SmoothGrad
    averages. ``smoothable``: may be a SmoothGrad base."""

    kind = "pixel"
    smoothable = True

    def raw(self, model, x: torch.Tensor, targets: torch.Tensor, context: Context) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement raw()")

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        raw = self.raw(model, inputs, targets, context)
        return Attribution(raw=raw, map=self.reduce(raw, tuple(inputs.shape[-2:])))


@register
class Gradient(PixelGradientMethod):
    name = "gradient"
    description = "vanilla gradient d logit / d input (Simonyan et al. 2013; seeds 000, 002)"
    citation = "Simonyan, Vedaldi & Zisserman 2013; seed 002"
    reduction = "max-abs"
    sign = "raw: signed gradient of the target logit; map: >= 0 (max |raw| over channels)"
    units = "|d logit / d x|"
    peer = "captum Saliency(abs=False)"

    def raw(self, model, x, targets, context):
        return input_gradient(model, x, targets)[0]


@register
class InputXGradient(PixelGradientMethod):
    name = "input-x-gradient"
    description = "input times gradient, the linear-model contribution x * dz/dx (seed 002)"
    citation = "Shrikumar et al. 2016; seed 002"
    reduction = "sum"
    sign = "raw: signed contribution x * dz/dx; map: signed (sum over channels)"
    units = "logit units"
    peer = "captum InputXGradient"

    def raw(self, model, x, targets, context):
        return x * input_gradient(model, x, targets)[0]


@register
class GuidedBackprop(PixelGradientMethod):
    name = "guided-backprop"
    description = "guided backpropagation: relu on the backward signal at every ReLU (seed 002)"
    citation = "Springenberg et al. 2014; seed 002"
    reduction = "max-abs"
    sign = "raw: signed modified gradient; map: >= 0 (max |raw| over channels)"
    units = "|modified gradient|"
    peer = "captum GuidedBackprop"

    def raw(self, model, x, targets, context):
        with relu_rule("guided"):
            return input_gradient(model, x, targets)[0]


@register
class DeconvNet(PixelGradientMethod):
    name = "deconvnet"
    description = "DeconvNet: relu on the backward signal, forward ReLU masks ignored (seed 003)"
    citation = "Zeiler & Fergus 2014; seed 003"
    reduction = "max-abs"
    sign = "raw: signed modified gradient; map: >= 0 (max |raw| over channels)"
    units = "|modified gradient|"
    peer = "captum Deconvolution"

    def raw(self, model, x, targets, context):
        with relu_rule("deconvnet"):
            return input_gradient(model, x, targets)[0]


def ig_quadrature(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of the path integral over [0, 1], captum's definitions:
    riemann_left/right/middle (equal weights 1/n at the left ends, right ends or midpoints),
    riemann_trapezoid (n points including both ends), gausslegendre (Gauss-Legendre nodes)."""
    n = int(steps)
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * w
    if method == "riemann_trapezoid":
        if n < 2:
            raise UsageError("`ig_method` riemann_trapezoid needs `ig_steps` >= 2",
                             "raise `ig_steps` or choose another `ig_method`")
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return np.linspace(0.0, 1.0, n), w
    w = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), w
    if method == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), w
    if method == "riemann_middle":
        return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), w
    raise UsageError(f"unknown `ig_method` {method!r}", f"choose one of: {', '.join(IG_METHODS)}")


@register
class IntegratedGradients(PixelGradientMethod):
    name = "integrated-gradients"
    description = "integrated gradients from a zero (mean-colour) baseline, batched path points"
    citation = "Sundararajan, Taly & Yan 2017; seed 002 references"
    reduction = "sum"
    units = "logit units"
    sign = ("raw: signed attribution, sums to about z(x) - z(0) (completeness); "
            "map: signed (sum over channels)")
    option_names = ("ig_steps", "ig_method", "internal_batch_size")
    peer = "captum IntegratedGradients"

    def raw(self, model, x, targets, context):
        opts = context.options
        alphas, weights = ig_quadrature(opts.ig_steps, opts.ig_method)
        n = len(alphas)
        a = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
        baseline = torch.zeros_like(x)
        diff = x - baseline
        total = torch.zeros_like(x)
        b = x.shape[0]
        for start, stop in passes(b * n, opts.internal_batch_size, x):
            flat = torch.arange(start, stop, device=x.device)
            img, step = flat // n, flat % n
            points = baseline[img] + a[step].view(-1, 1, 1, 1) * diff[img]
            grad, _ = input_gradient(model, points, targets[img])
            total.index_add_(0, img, grad * w[step].view(-1, 1, 1, 1))
        return diff * total


@register
class SmoothGrad(PixelGradientMethod):
    name = "smoothgrad"
    description = "SmoothGrad: mean of a gradient method over noisy copies (`smoothgrad_base`)"
    citation = "Smilkov et al. 2017; seed 002"
    reduction = "max-abs"  # replaced by the base method's reduction in compute()
    sign = "as the base method (`smoothgrad_base`); raw is the mean of the base's raw outputs"
    option_names = ("smoothgrad_base", "smoothgrad_samples", "smoothgrad_sigma",
                    "internal_batch_size")
    stochastic = True
    smoothable = False
    peer = "captum NoiseTunnel(smoothgrad)"

    @property
    def reduction_doc(self) -> str:
        return "the `smoothgrad_base` method's reduction of the averaged raw"

    @staticmethod
    def base_method(name: str) -> PixelGradientMethod:
        bases = [k for k, m in METHODS.items() if getattr(m, "smoothable", False)]
        if name not in bases:
            raise UsageError(f"`smoothgrad_base` {name!r} is not a gradient method"
                             f"{close_matches(name, bases)}", f"choose one of {', '.join(bases)}")
        return METHODS[name]

    def options_used(self, options):
        used = options.subset(self.option_names)
        used["base_options"] = self.base_method(options.smoothgrad_base).options_used(options)
        return used

    def raw(self, model, x, targets, context):
        opts = context.options
        base = self.base_method(opts.smoothgrad_base)
        n = int(opts.smoothgrad_samples)
        b = x.shape[0]
        flat_x = x.flatten(1)
        sigma = float(opts.smoothgrad_sigma) * (flat_x.amax(1) - flat_x.amin(1))  # [B]
        gens = context.generators(b, self.name)
        total = torch.zeros_like(x)
        for start, stop in passes(b * n, opts.internal_batch_size, x):
            img = torch.arange(start, stop) // n
            noise = torch.stack([torch.randn(x.shape[1:], generator=gens[int(i)], dtype=x.dtype)
                                 for i in img]).to(x.device)
            img = img.to(x.device)
            noisy = x[img] + noise * sigma[img].view(-1, 1, 1, 1)
            total.index_add_(0, img, base.raw(model, noisy, targets[img], context))
        return total / n

    def compute(self, model, inputs, targets, *, layer, context) -> Attribution:
        base = self.base_method(context.options.smoothgrad_base)
        raw = self.raw(model, inputs, targets, context)
        return Attribution(raw=raw, map=base.reduce(raw, tuple(inputs.shape[-2:])))
