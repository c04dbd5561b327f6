"""``lrp-zplus`` against an independent matrix-form reference (no zennit), as zennit's own
tests/unit/test_rules.py checks its rules, and relevance conservation layer by layer.

The reference (Bach et al. 2015; Montavon et al. 2017; seed 003 sec. 3.1, "z+ everywhere, zB
on the first convolution, biases bypassed") writes every layer as a matrix ``W`` [out, in]
(a convolution as the explicit matrix of its linear map) and propagates, in float64:

- z+ (dense and convolutional layers past the first convolution)::

      R_i = sum_j x_i w_ij^+ / (sum_i x_i w_ij^+) R_j

  (for inputs x >= 0, as behind a ReLU; zennit's ZPlus also passes x_i^- w_ij^- for negative
  inputs, a convention that matters only for a dense first layer with signed inputs: tested
  separately below);
- zB (the first convolution, pixel bounds l = (0 - mean) / std, h = (1 - mean) / std)::

      R_i = sum_j (x_i w_ij - l_i w_ij^+ - h_i w_ij^-) / (sum_i ...) R_j

- ReLU: relevance passes unchanged; biases never enter a rule (forward activations keep them).

Denominators get zennit's stabilizer ``z + 1e-6 sign(z)`` (sign(0) = +1), so the comparison
can be tight. Conservation: every rule above hands on exactly the relevance it receives
(``sum_i R_i = sum_j R_j`` whenever no receiving neuron has a zero denominator), so with a
unit seed every layer's relevance sums to 1 -- *also with biases*, since lrp-zplus bypasses
them: the bias changes the activations x (and so how relevance is split), not how much is
passed on. A rule that kept the bias as an input neuron (``z_j = sum_i x_i w_ij^+ + b_j^+``)
would instead absorb ``sum_j b_j^+ / z_j R_j`` at each layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.saliency import METHODS, Context

EPS = 1e-6  # zennit's default stabilizer
PREP = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
TOL = 1e-9  # float64 throughout


def _stab(z: np.ndarray) -> np.ndarray:
    return z + np.where(z == 0, 1.0, np.sign(z)) * EPS


def zplus(x: np.ndarray, w: np.ndarray, r_out: np.ndarray) -> np.ndarray:
    """Textbook z+: x [in] (>= 0), w [out, in], r_out [out] -> R [in]."""
    wp = np.clip(w, 0, None)
    return x * (wp.T @ (r_out / _stab(wp @ x)))


def zplus_signed(x: np.ndarray, w: np.ndarray, r_out: np.ndarray) -> np.ndarray:
    """zennit's ZPlus convention for signed inputs: z = x+ w+ + x- w- (alpha=1, beta=0)."""
    xp, xn = np.clip(x, 0, None), np.clip(x, None, 0)
    wp, wn = np.clip(w, 0, None), np.clip(w, None, 0)
    s = r_out / _stab(wp @ xp + wn @ xn)
    return xp * (wp.T @ s) + xn * (wn.T @ s)


def zbox(x: np.ndarray, w: np.ndarray, low: np.ndarray, high: np.ndarray,
         r_out: np.ndarray) -> np.ndarray:
    """zB: x, low, high [in], w [out, in], r_out [out] -> R [in]."""
    wp, wn = np.clip(w, 0, None), np.clip(w, None, 0)
    s = r_out / _stab(w @ x - wp @ low - wn @ high)
    return x * (w.T @ s) - low * (wp.T @ s) - high * (wn.T @ s)


def conv_matrix(conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> np.ndarray:
    """The convolution's linear map (bias left out) as an explicit matrix [out, in], column i
    being the image of the i-th basis vector (C order)."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        cols = nn.functional.conv2d(basis, conv.weight.double(), None, conv.stride,
                                    conv.padding, conv.dilation, conv.groups)
    return cols.reshape(n, -1).T.numpy()


def reference(model: nn.Sequential, x: torch.Tensor, target: int,
              first: str) -> list[np.ndarray]:
    """Relevance at every module boundary of ``model`` for one input ``x`` [3, H, W]:
    element k is the relevance of module k's input (flattened), the last one the unit seed
    at the output. ``first``: the first layer's rule, "zbox" or "zplus_signed"."""
    acts, mats = [x.double().reshape(-1).numpy()], []
    h = x.double().unsqueeze(0)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                mats.append(conv_matrix(m, tuple(h.shape[1:])))
            elif isinstance(m, nn.Linear):
                mats.append(m.weight.double().numpy())
            else:
                mats.append(None)
            h = m.double()(h)
            acts.append(h.reshape(-1).numpy())
    r = np.zeros_like(acts[-1])
    r[target] = 1.0
    rel = [r]
    low = np.repeat(((0 - np.array(PREP.mean)) / np.array(PREP.std)), acts[0].size // 3)
    high = np.repeat(((1 - np.array(PREP.mean)) / np.array(PREP.std)), acts[0].size // 3)
    first_k = next(k for k, w in enumerate(mats) if w is not None)
    for k in range(len(model) - 1, -1, -1):
        w, a = mats[k], acts[k]
        if w is None:  # ReLU, Flatten: relevance passes unchanged
            r = r.reshape(-1)
        elif k == first_k and first == "zbox":
            r = zbox(a, w, low, high, r)
        elif k == first_k:
            r = zplus_signed(a, w, r)
        else:
            assert (a >= 0).all()  # behind a ReLU
            r = zplus(a, w, r)
        rel.insert(0, r)
    return rel


def ours(model: nn.Sequential, x: torch.Tensor, target: int) -> list[np.ndarray]:
    """cnnexplain's lrp-zplus through the public method API, with the relevance at every
    module boundary read off as the gradient of the module outputs during its modified
    backward pass (zennit's hooks make that gradient the relevance)."""
    grads: dict[int, torch.Tensor] = {}
    handles = []
    for k, m in enumerate(model):
        def hook(module, inp, out, k=k):
            out.register_hook(lambda g: grads.__setitem__(k, g.detach().clone()))
        handles.append(m.register_forward_hook(hook))
    try:
        raw = METHODS["lrp-zplus"].attribute(model, x.unsqueeze(0), torch.tensor([target]),
                                             context=Context(preprocessing=PREP)).raw
    finally:
        for h in handles:
            h.remove()
    return [raw.reshape(-1).numpy()] + [grads[k].reshape(-1).numpy()
                                        for k in range(len(model))]


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 8),
                         nn.ReLU(), nn.Linear(8, 3)).double().eval()


def convnet(seed: int, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 3, bias=bias)).double().eval()


def pixels(seed: int, size: int) -> torch.Tensor:
    """A normalized image whose pixels lie in [0, 1] before normalization (inside zB's box)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(3, size, size, generator=g, dtype=torch.float64)
    mean = torch.tensor(PREP.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(PREP.std, dtype=torch.float64).view(3, 1, 1)
    return (raw - mean) / std


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_conv_matrix_is_the_convolution():
    model = convnet(0)
    x = pixels(0, 8)
    m = conv_matrix(model[0], (3, 8, 8))
    with torch.no_grad():
        want = nn.functional.conv2d(x.unsqueeze(0), model[0].weight, None, 1, 1)
    np.testing.assert_allclose(m @ x.reshape(-1).numpy(), want.reshape(-1).numpy(), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_lrp_zplus_equals_the_matrix_reference_on_a_conv_net(seed, bias):
    """zB on the first convolution, z+ on the second and on the dense head, at every layer."""
    model = convnet(seed, bias)
    x = pixels(seed, 8)
    target = seed % 3
    want = reference(model, x, target, first="zbox")
    got = ours(model, x, target)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        assert _rel_err(g, w) < TOL, f"relevance at the input of module {k} differs"
    assert np.abs(want[0]).max() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_lrp_zplus_equals_the_matrix_reference_on_an_mlp(seed):
    """Linear-ReLU-Linear-ReLU-Linear with non-negative inputs: textbook z+ at every layer
    (the first layer is dense, so zB, which lrp-zplus puts on the first *convolution*, does
    not apply)."""
    model = mlp(seed)
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = reference(model, x, 1, first="zplus_signed")  # = textbook z+ for x >= 0
    first_textbook = zplus(x.reshape(-1).numpy(), model[1].weight.detach().numpy(), want[2])
    np.testing.assert_allclose(want[1], first_textbook, rtol=1e-12, atol=0)
    got = ours(model, x, 1)
    for k, (g, w) in enumerate(zip(got, want)):
        assert _rel_err(g, w) < TOL, f"relevance at the input of module {k} differs"


def test_dense_first_layer_with_signed_inputs_follows_zennits_zplus_convention():
    """Documented convention, not a bug: with signed inputs a dense first layer also passes
    x^- w^- (alpha=1, beta=0), so it differs from the textbook z+ (which drops x^-)."""
    model = mlp(3)
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = reference(model, x, 2, first="zplus_signed")
    got = ours(model, x, 2)
    assert _rel_err(got[0], want[0]) < TOL
    textbook = zplus(np.clip(x.reshape(-1).numpy(), 0, None), model[1].weight.detach().numpy(), want[2])
    assert _rel_err(got[0], textbook) > 1e-3  # the two conventions really differ here


@pytest.mark.parametrize("bias", [False, True])
def test_relevance_is_conserved_at_every_layer(bias):
    """Each layer's relevance sums to the unit seed, with and without biases (bypassed)."""
    model = convnet(4, bias)
    if bias:
        with torch.no_grad():  # negative and positive biases alike
            for m in model:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.bias.uniform_(-0.3, 0.3)
    x = pixels(4, 8)
    for k, r in enumerate(ours(model, x, 0)):
        assert abs(float(r.sum()) - 1.0) < 1e-5, f"layer input {k}: sum {r.sum()}"
    for k, r in enumerate(reference(model, x, 0, first="zbox")):
        assert abs(float(r.sum()) - 1.0) < 1e-5, f"reference, layer input {k}: sum {r.sum()}"


def test_a_bias_kept_in_the_rule_would_absorb_relevance():
    """What conservation means with biases: had the rule kept b^+ in the denominator, the
    head alone would absorb b_t^+ / (z_t^+ + b_t^+) of the seed. lrp-zplus loses nothing."""
    model = convnet(5)
    with torch.no_grad():
        model[5].bias.fill_(0.5)
    x = pixels(5, 8)
    with torch.no_grad():
        a = model[:5](x.unsqueeze(0)).reshape(-1).numpy()
    w = model[5].weight.detach().numpy()
    zp = np.clip(w, 0, None) @ a
    kept = a * (np.clip(w, 0, None).T @ (np.eye(3)[0] / (zp + 0.5)))
    assert float(kept.sum()) == pytest.approx(zp[0] / (zp[0] + 0.5), rel=1e-12)
    assert float(kept.sum()) < 1 - 1e-3
    # lrp-zplus passes the whole seed on, up to the stabilizer: z^+ / (z^+ + 1e-6)
    passed = float(ours(model, x, 0)[5].sum())
    assert passed == pytest.approx(zp[0] / (zp[0] + EPS), rel=1e-9)
