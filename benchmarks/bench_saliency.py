"""Saliency methods: time per image of ours versus the fastest peer library that offers the same
method (captum, zennit, pytorch-grad-cam) on the same model, inputs and device, in one run; and
gradient methods versus one plain forward + backward pass.

Targets (reported, never asserted): ours / fastest peer <= 1 for every method a peer offers;
gradient methods (gradient, input-x-gradient, guided-backprop, deconvnet) <= 1.3 x one
forward + backward. Repetitions are interleaved (every implementation runs once per round, in
an order shuffled afresh each round from a fixed seed, after one warm-up round) and medians
reported: with a fixed order the job that ran first after the baseline paid for it (gradient
measured 2.8x captum where input-x-gradient, the same passes, measured 1.0x). The model is a
random-weight resnet18 with BatchNorm statistics randomized; ``size="small"`` (a smoke test):
48 px, batch 2, 2 rounds; ``"full"``: 224 px, batch 4, 5 rounds. The many-evaluation methods
use the same settings for ours and the peers (full: SmoothGrad 8 samples, integrated
gradients 16 steps, occlusion window side/4 stride side/8, LIME 64 samples on our SLIC
superpixels, whose time is counted for both) and evaluate the same number of perturbed images
per forward pass, our :func:`pass_size` of ``internal_batch_size`` 32 (8 at 224 px on a CPU;
captum's ``perturbations_per_eval`` and ``nt_samples_batch_size`` count per input image, so
they get that number / batch; zennit runs one sample of the batch per pass).
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from typing import Callable

import pandas as pd
import torch
from torch import nn

from cnnexplain.explain.saliency import METHODS, Context, MethodOptions
from cnnexplain.explain.saliency.base import pass_size
from cnnexplain.explain.saliency.lrp import make_composite
from benchmarks.device import sync
from benchmarks.models import resnet18_with_bn_statistics

SIZES = {"small": (48, 2, 2), "full": (224, 4, 5)}  # side, batch, rounds
SAMPLES = {"small": (4, 8, 32), "full": (8, 16, 64)}  # SmoothGrad samples, IG steps, LIME samples
GRADIENT_METHODS = ("gradient", "input-x-gradient", "guided-backprop", "deconvnet")


def _model() -> nn.Module:
    return resnet18_with_bn_statistics()


def _peers(model, x, t, opts: MethodOptions, ctx: Context, side: int) -> dict[str, dict[str, Callable]]:
    """method -> {peer name: zero-argument callable computing the same attribution}."""
    from captum.attr import (Deconvolution, GuidedBackprop, GuidedGradCam, InputXGradient,
                             IntegratedGradients, LayerGradCam, Lime, NoiseTunnel, Occlusion,
                             Saliency)
    from captum._utils.models.linear_model import SkLearnRidge
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from zennit.attribution import Gradient, IntegratedGradients as ZennitIG, SmoothGrad as ZennitSG
    from zennit.composites import DeconvNet as ZDeconv, GuidedBackprop as ZGuided

    from cnnexplain.explain.saliency.perturbation import lime_kernel, slic

    onehot = torch.eye(10, device=x.device)[t]
    layer = model.layer4
    win, stride = opts.occlusion_window, opts.occlusion_stride
    per_pass = pass_size(opts.internal_batch_size, x)  # what ours evaluates per pass

    def zennit(composite_fn, seed=onehot, attributor=Gradient, **kw):
        def call():
            with attributor(model=model, composite=composite_fn(), **kw) as attr:
                return attr(x, seed)
        return call

    def zennit_lrp(rule):
        return zennit(lambda: make_composite(rule, model, ctx, x.device, x.dtype))

    def zennit_clrp(kind):
        def call():
            r_t = zennit_lrp("zplus")()[1]
            if kind == "clrp1":
                dual = (1.0 - onehot) / 9.0
                r_d = zennit(lambda: make_composite("zplus", model, ctx, x.device, x.dtype), dual)()[1]
            else:
                head = model.fc
                head.weight.data.neg_()
                head.bias.data.neg_()
                try:
                    r_d = zennit_lrp("zplus")()[1]
                finally:
                    head.weight.data.neg_()
                    head.bias.data.neg_()
            return (r_t - r_d).clamp(min=0)
        return call

    def pgc():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

    def captum_lime():
        images = ctx.preprocessing.denormalize(x).clamp(0, 1).cpu()  # ours segments on the CPU
        out = []
        for i in range(len(x)):
            seg = slic(images[i], opts.lime_segments).to(x.device)
            lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0),
                        similarity_func=lambda o, p, interp, **kw: lime_kernel(interp, 0.25))
            out.append(lime.attribute(x[i:i + 1], target=int(t[i]), baselines=0.0,
                                      feature_mask=seg[None, None].expand(1, 3, side, side),
                                      n_samples=opts.lime_samples,
                                      perturbations_per_eval=per_pass))
        return out

    sigma = float(opts.smoothgrad_sigma * (x.max() - x.min()))
    return {
        "gradient": {"captum": lambda: Saliency(model).attribute(x, target=t, abs=False),
                     "zennit": zennit(lambda: None)},
        "input-x-gradient": {"captum": lambda: InputXGradient(model).attribute(x, target=t)},
        "guided-backprop": {"captum": lambda: GuidedBackprop(model).attribute(x, target=t),
                            "zennit": zennit(ZGuided)},
        "deconvnet": {"captum": lambda: Deconvolution(model).attribute(x, target=t),
                      "zennit": zennit(ZDeconv)},
        "integrated-gradients": {
            "captum": lambda: IntegratedGradients(model).attribute(
                x, target=t, n_steps=opts.ig_steps, method=opts.ig_method,
                internal_batch_size=per_pass),
            "zennit (riemann_right, 1 step/pass)": zennit(lambda: None, attributor=ZennitIG,
                                                          n_iter=opts.ig_steps)},
        "smoothgrad": {
            "captum": lambda: NoiseTunnel(Saliency(model)).attribute(
                x, nt_type="smoothgrad", nt_samples=opts.smoothgrad_samples, stdevs=sigma,
                target=t, abs=False,
                nt_samples_batch_size=max(1, per_pass // len(x))),
            "zennit (1 sample/pass)": zennit(lambda: None, attributor=ZennitSG,
                                             noise_level=opts.smoothgrad_sigma,
                                             n_iter=opts.smoothgrad_samples)},
        "gradcam": {"pytorch-grad-cam": pgc,
                    "captum": lambda: LayerGradCam(model, layer).attribute(
                        x, target=t, relu_attributions=True)},
        "gradcam-counterfactual": {"captum": lambda: LayerGradCam(lambda z: -model(z), layer).attribute(
            x, target=t, relu_attributions=True)},
        "guided-gradcam": {"captum": lambda: GuidedGradCam(model, layer).attribute(
            x, target=t, interpolate_mode="bilinear")},
        "lrp-epsilon": {"zennit": zennit_lrp("epsilon")},
        "lrp-alpha2beta1": {"zennit": zennit_lrp("alpha2beta1")},
        "lrp-zplus": {"zennit": zennit_lrp("zplus")},
        "clrp1": {"zennit (2 passes)": zennit_clrp("clrp1")},
        "clrp2": {"zennit (2 passes)": zennit_clrp("clrp2")},
        "occlusion": {"captum": lambda: Occlusion(model).attribute(
            x, target=t, sliding_window_shapes=(3, win, win), strides=(3, stride, stride),
            baselines=0, perturbations_per_eval=max(1, per_pass // len(x)))},
        "lime": {"captum": captum_lime},
        "cam": {},
    }


def run(size: str = "small", device: str = "cpu", batch: int | None = None,
        methods: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per method: ms per image of ours and of each peer (median over rounds), the
    fastest peer, ``ours / peer`` with the range of the same ratio taken within each round
    (its noise), and, for gradient methods, ``ours / fwd+bwd``; on ``device`` (every side on
    it; CUDA timings synchronize), ``batch`` images (default: the size's), ``methods`` (default:
    every method a peer offers, and cam)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    side, default_batch, rounds = SIZES[size]
    batch = batch or default_batch
    device = torch.device(device)
    warnings.filterwarnings("ignore")
    model = _model().to(device)
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    t = (torch.arange(batch) % 10).to(device)
    sg, ig, lime = SAMPLES[size]
    opts = MethodOptions(smoothgrad_samples=sg, ig_steps=ig, occlusion_window=side // 4,
                         occlusion_stride=side // 8, lime_samples=lime, lime_segments=25,
                         internal_batch_size=32)
    ctx = Context(options=opts, classifier="fc", backbone="resnet18")
    peers = _peers(model, x, t, opts, ctx, side)
    if methods is not None:
        peers = {name: peers[name] for name in methods}

    def fwd_bwd():
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        torch.autograd.grad(out.gather(1, t[:, None]).sum(), xx)

    jobs: list[tuple[str, str, Callable]] = [("forward+backward", "baseline", fwd_bwd)]
    for name in peers:
        jobs.append((name, "ours", lambda n=name: METHODS[n].attribute(model, x, t, layer="layer4",
                                                                         context=ctx)))
        for peer, fn in peers[name].items():
            jobs.append((name, peer, fn))
    times: dict[tuple[str, str], list[float]] = {(m, who): [] for m, who, _ in jobs}
    order = random.Random(0)
    for r in range(rounds + 1):  # round 0 warms up
        for method, who, fn in order.sample(jobs, len(jobs)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            elapsed = time.perf_counter() - start
            if r > 0:
                times[(method, who)].append(1000.0 * elapsed / batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[("forward+backward", "baseline")]
    rows = []
    for name in peers:
        ours = med[(name, "ours")]
        peer_times = {p: med[(name, p)] for p in peers[name]}
        best = min(peer_times, key=peer_times.get) if peer_times else None
        paired = ([a / b for a, b in zip(times[(name, "ours")], times[(name, best)])]
                  if best else [float("nan")])  # ours / peer within each round
        rows.append({
            "method": name,
            "ours_ms_per_image": ours,
            "fastest_peer": best or "none",
            "peer_ms_per_image": peer_times[best] if best else float("nan"),
            "ours_over_peer": ours / peer_times[best] if best else float("nan"),
            "round_ratio_min": min(paired),
            "round_ratio_max": max(paired),
            "ours_over_fwd_bwd": ours / base if name in GRADIENT_METHODS else float("nan"),
            "all_peers": "; ".join(f"{p} {v:.1f}" for p, v in peer_times.items()),
        })
    rows.append({"method": "forward+backward", "ours_ms_per_image": base, "fastest_peer": "-",
                 "peer_ms_per_image": float("nan"), "ours_over_peer": float("nan"),
                 "round_ratio_min": float("nan"), "round_ratio_max": float("nan"),
                 "ours_over_fwd_bwd": 1.0, "all_peers": ""})
    frame = pd.DataFrame(rows)
    frame["side_px"] = side
    frame["batch"] = batch
    frame["device"] = device.type
    return frame


if __name__ == "__main__":
    print(run().to_string(index=False))
