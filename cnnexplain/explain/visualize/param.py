"""Image parameterizations for feature visualization: the learned tensors and the map from them
to RGB images in [0, 1].

:class:`FourierImage` is the decorrelated parameterization of Olah et al. 2017 ("Feature
Visualization", Distill, section "Preconditioning and Parameterization"), as lucid and lucent
implement it: each image is a real-FFT spectrum ``[3, H, W // 2 + 1]`` (complex, stored as real
and imaginary parts), each frequency ``f`` scaled by ``1 / max(f, 1 / max(H, W)) ** decay``
(equal energy per frequency for natural images' 1/f spectrum), brought to pixels by an
orthonormal inverse FFT and divided by lucid's constant 4; then the colour channels are
decorrelated with lucid's square root of the ImageNet colour covariance
(:data:`COLOR_CORRELATION_SVD_SQRT`, normalized by its largest column norm) and squashed to
[0, 1] by a sigmoid. :class:`PixelImage` learns the pixels directly (the same colour map and
sigmoid). Both start near uniform grey (``sd`` = 0.01, lucid's) and keep every pixel valid;
the model's normalization is applied afterwards, by the caller.

The map from parameters to image is a pure function of tensors (:func:`spectrum_scale`,
:func:`fourier_to_pixels`, :func:`to_rgb`); the classes only hold the learned tensor and the
constants. Each image's initial values come from its own generator, so an image does not
depend on the other images optimized in the same batch.
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

import numpy as np
import torch

COLOR_CORRELATION_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                                         [0.27, 0.00, -0.05],
                                         [0.27, -0.09, 0.03]], dtype=np.float32)
"""lucid's ``color_correlation_svd_sqrt`` (``optvis/param/color.py``; the same numbers in
lucent): a square root of the colour covariance of ImageNet images, rows R, G, B."""

MAGIC = 4.0
"""lucid's divisor of the inverse FFT (undocumented there; it lowers the initial saturation)."""

INIT_SD = 0.01
"""Standard deviation of the initial parameters (lucid's and lucent's default)."""


def color_matrix() -> torch.Tensor:
    """float32 ``[3, 3]``: :data:`COLOR_CORRELATION_SVD_SQRT` divided by its largest column L2
    norm (about 0.462), so that ``rgb = M @ t`` never grows a unit vector."""
    m = COLOR_CORRELATION_SVD_SQRT
    return torch.from_numpy(m / np.max(np.linalg.norm(m, axis=0)))


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """float64 ``[h, w // 2 + 1]``: the spatial frequency ``sqrt(fx^2 + fy^2)`` (cycles per
    pixel, ``np.fft.fftfreq``) of each coefficient of a real 2-D FFT of an ``h x w`` image."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """float32 ``[h, w // 2 + 1]``: ``1 / max(f, 1 / max(h, w)) ** decay`` (the DC coefficient
    gets ``max(h, w)``)."""
    f = rfft2d_freqs(h, w)
    return torch.from_numpy(1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay).float()


def fourier_to_pixels(spectrum: torch.Tensor, scale: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Real ``[N, C, h, w // 2 + 1, 2]`` spectra (real, imaginary) -> ``[N, C, h, w]``
    unbounded pixels: ``irfft2(scale * spectrum, norm="ortho") / MAGIC``."""
    z = torch.view_as_complex((spectrum * scale[..., None]).contiguous())
    return torch.fft.irfftn(z, s=(h, w), dim=(-2, -1), norm="ortho") / MAGIC


def decorrelate(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` decorrelated colour -> ``[N, 3, H, W]``: ``rgb = matrix @ t`` per
    pixel."""
    return torch.einsum("ij,njhw->nihw", matrix.to(t), t)


def to_rgb(t: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """``[N, 3, H, W]`` unbounded -> RGB in [0, 1]: colour decorrelation (``matrix``; None:
    none) then a sigmoid (lucid's ``to_valid_rgb``)."""
    if matrix is not None:
        t = decorrelate(t, matrix)
    return torch.sigmoid(t)


def _normal(shape: Sequence[int], generators: Sequence[torch.Generator], sd: float
            ) -> torch.Tensor:
    """``[len(generators), *shape]`` N(0, sd^2) values, row i drawn from ``generators[i]``."""
    return torch.stack([torch.randn(*shape, generator=g) * sd for g in generators])


class ImageParam(abc.ABC):
    """A batch of learned images: ``params`` (the tensors the optimizer updates) and
    ``__call__() -> [N, 3, H, W]`` RGB in [0, 1]."""

    params: list[torch.Tensor]

    @abc.abstractmethod
    def __call__(self) -> torch.Tensor:
        """The images ``[N, 3, H, W]`` in [0, 1] from the current parameters."""

    @property
    def tensor(self) -> torch.Tensor:
        """The one learned tensor, ``[N, ...]`` (row i belongs to image i)."""
        return self.params[0]

    def redraw(self, rows: Sequence[int], generators: Sequence[torch.Generator], sd: float) -> None:
        """Replace the parameters of images ``rows`` by N(0, sd^2) values, row k from
        ``generators[k]`` (the other images are untouched)."""
        t = self.params[0]
        with torch.no_grad():
            t[list(rows)] = _normal(t.shape[1:], generators, sd).to(t)


class FourierImage(ImageParam):
    """``N`` images of ``h x w`` in the decorrelated Fourier basis (module docstring): the
    learned tensor is ``[N, 3, h, w // 2 + 1, 2]``."""

    def __init__(self, generators: Sequence[torch.Generator], h: int, w: int, *,
                 decorrelate: bool = True, sd: float = INIT_SD, decay: float = 1.0,
                 device="cpu"):
        self.h, self.w = int(h), int(w)
        self.scale = spectrum_scale(self.h, self.w, decay).to(device)
        self.matrix = color_matrix().to(device) if decorrelate else None
        init = _normal((3, self.h, self.w // 2 + 1, 2), generators, sd)
        self.params = [init.to(device).requires_grad_(True)]

    def __call__(self) -> torch.Tensor:
        return to_rgb(fourier_to_pixels(self.params[0], self.scale, self.h, self.w), self.matrix)


class PixelImage(ImageParam):
    """``N`` images of ``h x w`` learned pixel by pixel (``[N, 3, h, w]``), through the same
    colour map and sigmoid (the naive parameterization Olah et al. 2017 compare against)."""

    def __init__(self, generators: Sequence[torch.Generator], h: int, w: int, *,
                 decorrelate: bool = True, sd: float = INIT_SD, device="cpu", **_unused):
        self.matrix = color_matrix().to(device) if decorrelate else None
        self.params = [_normal((3, int(h), int(w)), generators, sd).to(device)
                       .requires_grad_(True)]

    def __call__(self) -> torch.Tensor:
        return to_rgb(self.params[0], self.matrix)


PARAMETERIZATIONS: dict[str, Callable[..., ImageParam]] = {
    "fourier": FourierImage,
    "pixel": PixelImage,
}
"""name -> image parameterization (``fourier``: Olah et al. 2017's default)."""
