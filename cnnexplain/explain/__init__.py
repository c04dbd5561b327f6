"""Explanations of a CNN's decisions (saliency maps, LRP / CLRP, dissection, TCAV).

- :mod:`cnnexplain.explain.saliency`: pixel-level saliency methods behind one registry
  (``METHODS``): gradients, guided backprop, SmoothGrad, integrated gradients, CAM / Grad-CAM
  and their variants, LRP and CLRP (zennit-based), occlusion and LIME
  (seeds ``002_d3d71848a193426f.txt``, ``003_0c687514e405e536.txt``,
  ``000_d60c53f3ec4d0e03.txt``, ``004_64660bc76be64243.txt``).
- :mod:`cnnexplain.explain.saliency.outputs`: maps.h5, PNG overlays and the comparison grid.
"""
