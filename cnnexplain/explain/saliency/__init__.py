"""Pixel-level saliency methods behind one registry, :data:`METHODS` (name -> method).

Families (one module each): :mod:`.gradients` (gradient, input-x-gradient, guided-backprop,
deconvnet, integrated-gradients, smoothgrad), :mod:`.cam` (cam, gradcam,
gradcam-counterfactual, guided-gradcam, gated-cam, gated-cam-complement), :mod:`.lrp`
(lrp-epsilon, lrp-alpha2beta1, lrp-zplus, clrp1, clrp2; zennit), :mod:`.perturbation`
(occlusion, lime). The contract is in :mod:`.base` (``attribute(model, inputs [B, 3, H, W],
targets [B], *, layer, context) -> Attribution(raw, map)``); :mod:`.relu_rules` holds the
guided / DeconvNet ReLU rules. Around the methods: :mod:`.inputs` (image sets and ``target``),
:mod:`.runner` (batched, cached maps of one method), :mod:`.evaluation` (the metric registry
behind ``evaluate``) and :mod:`.pipeline` (the ``saliency`` command as plan / execute /
write).
"""

from cnnexplain.explain.saliency import (
                                              cam,  # noqa: F401
                                              gradients,  # noqa: F401  (registers its methods)
                                              lrp,  # noqa: F401
                                              perturbation,  # noqa: F401
)
from cnnexplain.explain.saliency.base import (
                                              METHODS,
                                              Attribution,
                                              Context,
                                              MethodOptions,
                                              ModelInfo,
                                              SaliencyMethod,
                                              get_method,
)

__all__ = ["METHODS", "Attribution", "Context", "MethodOptions", "ModelInfo", "SaliencyMethod",
           "get_method"]
