"""Gate modules: each method's constraint, the reparameterized draws of seed 004, the helpers."""

import types

import pytest
import torch
from torch import nn

from cnnexplain.errors import UsageError
from cnnexplain.models.gates import (GATES, METHODS, GateNoise, GatedNetwork, PICNNGate, R0P1Gate,
                                     R1P1Gate, R1P2Gate, apply_mask, bernoulli_st, categorical_st,
                                     class_clusters, gate_matrix, gate_threshold, make_gate,
                                     peakedness, sort_channels)


def test_registry_covers_every_gated_method():
    assert set(GATES) == {"cdcnn-r1p2", "cdcnn-r1p1", "cdcnn-r0p1", "picnn"}
    assert METHODS[0] == "std" and make_gate("std", 8, 3) is None
    with pytest.raises(UsageError, match="unknown method"):
        make_gate("cdcnn-r2p2", 8, 3)


def test_r1p2_rows_within_unit_interval_with_max_one():
    torch.manual_seed(0)
    g = R1P2Gate(32, 5)
    w = g.matrix().detach()
    assert w.min() >= 0 and w.max() <= 1
    assert torch.allclose(w.max(dim=1).values, torch.ones(32))
    # after an arbitrary update (negative values, values above 1, a dead row) the projection
    # restores the constraint of algorithm 1
    with torch.no_grad():
        g.W.add_(torch.randn(32, 5) * 3)
        g.W[3] = -1.0
    g.project_()
    w = g.matrix().detach()
    assert w.min() >= 0 and w.max() <= 1
    assert torch.allclose(w.max(dim=1).values, torch.ones(32))
    # the regularizer is ||W||_{1,2}
    expected = torch.sqrt((w.abs().sum(1) ** 2).sum())
    assert torch.allclose(g.regularizer(), expected)


def test_r1p2_sparsity_push_plus_projection_sparsifies_rows():
    torch.manual_seed(1)
    g = R1P2Gate(16, 6)
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    before = g.density()
    for _ in range(100):
        opt.zero_grad()
        g.regularizer().backward()
        opt.step()
        g.project_()
    assert g.density() < before and g.density() < 0.3
    assert torch.allclose(g.matrix().max(dim=1).values, torch.ones(16))


def test_omega_rows_rescaled_to_minus_one_one():
    torch.manual_seed(2)
    for cls in (R1P1Gate, R0P1Gate):
        g = cls(10, 4)
        with torch.no_grad():
            g.Omega.mul_(7).add_(3)
        g.project_()
        assert torch.allclose(g.Omega.min(1).values, -torch.ones(10))
        assert torch.allclose(g.Omega.max(1).values, torch.ones(10))


def test_r0p1_tends_to_one_hot_rows_as_delta_anneals():
    torch.manual_seed(3)
    g = R0P1Gate(20, 5, delta_start=1.0, delta_end=0.01)
    g.anneal(0.0)
    assert g.matrix().max(1).values.max() < 0.9  # soft at the start
    g.anneal(1.0)
    w = g.matrix().detach()
    assert torch.allclose(w.sum(1), torch.ones(20))
    assert (w.max(1).values > 0.99).all()
    assert torch.equal(w.argmax(1), g.Omega.argmax(1))
    assert class_clusters(w, 0.5).sum(0).eq(1).all()  # each channel serves exactly one class


def test_r1p1_tends_to_binary_with_a_one_and_a_zero_per_row():
    torch.manual_seed(4)
    g = R1P1Gate(20, 5, delta_start=1.0, delta_end=0.01)
    g.anneal(1.0)
    w = g.matrix().detach()
    assert ((w < 1e-3) | (w > 1 - 1e-3)).float().mean() > 0.9
    assert (w.max(1).values > 0.999).all() and (w.min(1).values < 1e-3).all()


def test_bernoulli_reparameterization_mean_equals_p():
    torch.manual_seed(5)
    p = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0], requires_grad=True)
    n = 40000
    eps = torch.rand(n, p.numel())
    z = bernoulli_st(p.expand(n, -1), eps)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    mean = z.detach().mean(0)
    se = torch.sqrt(p.detach() * (1 - p.detach()) / n)
    assert (mean - p.detach()).abs().le(5 * se + 1e-9).all(), (mean, p)
    # straight-through: dz/dp = 1
    z.sum().backward()
    assert torch.allclose(p.grad, torch.full_like(p, float(n)))


def test_categorical_reparameterization_frequencies_and_gradient():
    torch.manual_seed(6)
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    n = 40000
    onehot, index = categorical_st(probs.expand(n, -1).clone().requires_grad_(True), torch.rand(n))
    assert torch.equal(onehot.detach().argmax(1), index)
    freq = torch.bincount(index, minlength=4).float() / n
    se = torch.sqrt(probs * (1 - probs) / n)
    assert (freq - probs).abs().le(5 * se + 1e-9).all(), freq
    assert freq[2] == 0  # a class with probability 0 is never drawn


def test_picnn_draw_uses_pseudo_labels_and_binary_masks():
    torch.manual_seed(7)
    g = PICNNGate(12, 3, init_scale=2.0)
    P = g.probabilities()
    assert torch.allclose(P.sum(0), torch.ones(12))  # each filter: a distribution over classes
    assert torch.allclose(g.matrix(), P.t())
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [10.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])
    noise = GateNoise.draw(torch.Generator().manual_seed(0), 4, 12)
    d = g.draw(logits, labels, noise)
    assert torch.equal(d.index, torch.tensor([0, 1, 2, 0]))  # confident predictions
    assert torch.equal(d.weight, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # only ỹ == y counts
    assert set(d.mask.detach().unique().tolist()) <= {0.0, 1.0}
    expected = (P.detach()[d.index] >= noise.eps).float()
    assert torch.equal(d.mask.detach(), expected)
    # gradients reach Theta through the straight-through mask
    d.mask.sum().backward()
    assert g.Theta.grad is not None and g.Theta.grad.abs().sum() > 0


def test_cdcnn_draw_uses_true_label_column_or_pseudo_label():
    torch.manual_seed(8)
    g = R1P2Gate(6, 3)
    labels = torch.tensor([2, 0])
    d = g.draw(torch.zeros(2, 3), labels, GateNoise.draw(torch.Generator(), 2, 6))
    assert torch.equal(d.mask, g.W[:, labels].t())
    assert torch.equal(d.weight, torch.ones(2))
    p = R1P2Gate(6, 3, label_source="pseudo")
    logits = torch.tensor([[0.0, 20.0, 0.0], [20.0, 0.0, 0.0]])
    d = p.draw(logits, labels, GateNoise.draw(torch.Generator(), 2, 6))
    assert torch.equal(d.index, torch.tensor([1, 0]))
    assert torch.allclose(d.mask, p.W[:, [1, 0]].t())
    assert torch.equal(d.weight, torch.tensor([0.0, 1.0]))


def test_gate_samples_all_counts_every_sample_with_the_same_masks():
    """seed 004's L_int = H(y, y_2) over all samples (``samples="all"``) vs the reference
    code's matched-only weighting: same pseudo-labels and masks, only the weights differ."""
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [10.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])
    for make in (lambda **kw: PICNNGate(12, 3, init_scale=2.0, **kw),
                 lambda **kw: R1P2Gate(12, 3, label_source="pseudo", **kw)):
        torch.manual_seed(11)
        matched = make()
        torch.manual_seed(11)
        every = make(samples="all")
        noise = GateNoise.draw(torch.Generator().manual_seed(3), 4, 12)
        dm, da = matched.draw(logits, labels, noise), every.draw(logits, labels, noise)
        assert torch.equal(dm.index, da.index) and torch.equal(dm.mask, da.mask)
        assert torch.equal(dm.weight, torch.tensor([1.0, 1.0, 0.0, 0.0]))
        assert torch.equal(da.weight, torch.ones(4))
        assert every.describe()["samples"] == "all"
    with pytest.raises(UsageError, match="`gate_samples`"):
        PICNNGate(4, 2, samples="some")


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (self.conv(x),)


def test_gated_network_runs_the_body_once_and_masks_the_tail_input():
    torch.manual_seed(9)
    body = _Body()
    tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    gate = R1P2Gate(4, 3)
    net = GatedNetwork(body, tail, gate)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    logits, gated, draw = net(x, y, GateNoise.draw(torch.Generator(), 5, 4))
    assert body.calls == 1
    a = body.conv(x)
    assert torch.allclose(logits, tail(a), atol=1e-6)
    assert torch.allclose(gated, tail(apply_mask(a, gate.W[:, y].t())), atol=1e-6)
    plain, none1, none2 = net(x)
    assert none1 is None and none2 is None and torch.allclose(plain, logits, atol=1e-6)


def test_frozen_gated_tail_trains_body_and_gate_but_not_the_tail():
    """``gated_tail="frozen"``: same gated logits as ``shared``; the gated loss's gradient reaches
    the body and the gate and not the tail's parameters."""
    torch.manual_seed(12)
    body = _Body()
    tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    grads = {}
    for mode in ("shared", "frozen"):
        torch.manual_seed(13)
        gate = R1P2Gate(4, 3)
        net = GatedNetwork(body, tail, gate, gated_tail=mode)
        net.zero_grad(set_to_none=True)
        _, gated, _ = net(x, y, GateNoise.draw(torch.Generator(), 5, 4))
        gated.sum().backward()
        grads[mode] = (gated.detach(), tail[2].weight.grad, body.conv.weight.grad.clone(),
                       gate.W.grad.clone())
    assert torch.equal(grads["shared"][0], grads["frozen"][0])
    assert grads["shared"][1] is not None and grads["frozen"][1] is None
    for i in (2, 3):
        assert torch.allclose(grads["shared"][i], grads["frozen"][i], atol=1e-6)
        assert grads["frozen"][i].abs().sum() > 0
    with pytest.raises(UsageError, match="`gated_tail`"):
        GatedNetwork(body, tail, None, gated_tail="detached")


def test_mask_gradient_is_reproducible_on_a_multithreaded_cpu():
    """``Gate.mask``'s backward gives the same bits every time (the backward of plain indexing
    ``W.t()[index]`` summed in a varying order with 2 threads: 200 of 200 repeats differed,
    which made cdcnn-* runs irreproducible at ResNet-18 scale) and the exact per-class sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(30)
        for kind in GATES:
            g = make_gate(kind, 512, 6)
            index = torch.randint(0, 6, (64,))
            upstream = torch.randn(64, 512)
            raw = next(g.parameters())

            def grad():
                raw.grad = None
                (g.mask(index) * upstream).sum().backward()
                return raw.grad.clone()

            first = grad()
            assert all(torch.equal(first, grad()) for _ in range(20)), kind
        w = R1P2Gate(512, 6)
        w.W.grad = None
        (w.mask(index) * upstream).sum().backward()
        expected = torch.zeros(6, 512, dtype=torch.float64).index_add_(0, index, upstream.double())
        assert torch.allclose(w.W.grad.double(), expected.t(), atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_other_class_is_uniform_over_the_other_classes():
    """:meth:`Gate.other_class`: never the label, each other class with probability 1/(C-1)."""
    g = R1P2Gate(4, 5)
    labels = torch.arange(5).repeat_interleave(4000)
    other = g.other_class(labels, torch.rand(labels.numel(), generator=torch.Generator().manual_seed(2)))
    assert not (other == labels).any() and other.min() >= 0 and other.max() < 5
    for y in range(5):
        counts = torch.bincount(other[labels == y], minlength=5).float() / 4000
        expected = torch.full((5,), 0.25)
        expected[y] = 0
        assert torch.allclose(counts, expected, atol=0.03)
    # the edges of U(0, 1): u = 0 gives y + 1, u -> 1 gives y + C - 1 = y - 1
    edge = g.other_class(torch.tensor([2, 2]), torch.tensor([0.0, 1.0 - 1e-9]))
    assert edge.tolist() == [3, 1]


def test_wrong_mask_pathway_masks_the_tail_input_by_another_class_row():
    torch.manual_seed(21)
    body = _Body()
    tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    gate = R1P2Gate(4, 3)
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    noise = GateNoise.draw(torch.Generator().manual_seed(4), 5, 4)
    logits, gated, draw = GatedNetwork(body, tail, gate, wrong_mask=True)(x, y, noise)
    assert body.calls == 1
    assert torch.equal(draw.other, gate.other_class(y, noise.other)) and not (draw.other == y).any()
    a = body.conv(x)
    assert torch.allclose(draw.other_logits, tail(apply_mask(a, gate.W[:, draw.other].t())), atol=1e-6)
    # off by default: the same draws and logits, no wrong-mask pass
    _, gated0, draw0 = GatedNetwork(body, tail, gate)(x, y, noise)
    assert torch.equal(gated0, gated) and draw0.other is None and draw0.other_logits is None
    # adding the wrong-mask draw left the earlier draws of the same generator unchanged
    old = torch.Generator().manual_seed(4)
    assert torch.equal(noise.xi, torch.rand(5, generator=old, dtype=torch.float64).float())
    assert torch.equal(noise.eps, torch.rand(5, 4, generator=old))


def test_state_tensors_round_trip_and_checkpoint_keys():
    torch.manual_seed(10)
    for kind, cls in GATES.items():
        g = make_gate(kind, 7, 3)
        g.anneal(0.5)
        t = g.state_tensors()
        key = "P" if kind == "picnn" else "W"
        assert key in t
        shape = (3, 7) if key == "P" else (7, 3)
        assert tuple(t[key].shape) == shape
        fresh = make_gate(kind, 7, 3)
        fresh.load_state_tensors(t)
        assert torch.allclose(fresh.matrix(), g.matrix())


def test_public_helpers_for_consumers():
    w = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.6, 0.55]])
    loaded = types.SimpleNamespace(gate={"W": w}, meta={"gate": {"threshold": 0.6}})
    assert torch.equal(gate_matrix(loaded), w)
    assert gate_threshold(loaded) == 0.6
    picnn = types.SimpleNamespace(gate={"P": w.t().contiguous()}, meta={})
    assert torch.equal(gate_matrix(picnn), w) and gate_threshold(picnn) == 0.5
    assert gate_matrix(types.SimpleNamespace(gate={}, meta={})) is None
    clusters = class_clusters(w, 0.5)
    assert clusters.dtype == torch.bool and tuple(clusters.shape) == (2, 3)
    assert clusters.tolist() == [[True, False, True], [False, True, True]]
    assert abs(peakedness(torch.eye(3)) - 1.0) < 1e-6
    assert abs(peakedness(torch.ones(4, 5)) - 0.2) < 1e-6
    assert sort_channels(w).tolist() == [0, 2, 1]
