"""The training loop: resume equivalence, NaN handling, each method's constraint after training,
deterministic data order, and every method x backbone end to end (tiny data, 1 epoch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import SyntheticDataset, WorldConfig
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.models.checkpoint import load_checkpoint
from cnnexplain.models.gates import METHODS
from cnnexplain.config.train import TrainConfig
from cnnexplain.training.loop import LOG_COLUMNS, Trainer, _lr_factor, wrong_mask_loss
from cnnexplain.training.state import EpochBatches, epoch_order

PREP = Preprocessing()


def world(n=64, seed=0):
    cfg = WorldConfig.from_spec(f"synthetic:n={n},nval=16,ntest=16,res=32,seed={seed}")
    return SyntheticDataset(cfg, "train"), SyntheticDataset(cfg, "val")


def prepare(tmp_path, name="run", train=None, val=None, **kw):
    train, val = (train, val) if train is not None else world()
    kw.setdefault("backbone", "smallcnn")
    kw.setdefault("batch_size", 16)
    kw.setdefault("epochs", 2)
    cfg = TrainConfig(**kw)
    return Trainer.prepare(cfg, train, val, class_names=train.class_names, preprocessing=PREP,
                           out=tmp_path / name, overwrite=True)


def tensors(path):
    """Every tensor of a checkpoint file: weights, gate, optimizer states."""
    ck = load_checkpoint(path)
    out = {f"state/{k}": v for k, v in ck.state_dict.items()}
    out.update({f"gate/{k}": v for k, v in ck.gate.items()})

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for key in ("optimizer", "gate_optimizer"):
        walk(key, ck.train_state.get(key))
    return out, ck


@pytest.mark.parametrize("method,extra", [("picnn", {}), ("cdcnn-r1p1", {}),
                                          ("cdcnn-r1p2", {"lambda_neg": 1.0})])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, method, extra):
    full = prepare(tmp_path, "full", method=method, epochs=3, **extra)
    full.run()
    part = prepare(tmp_path, "part", method=method, epochs=3, **extra)
    first = part.run(stop_after=1)          # a run killed after its first epoch
    assert first.stopped_early and len(first.log) == 1
    resumed = Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=16, epochs=3,
                                          method=method, **extra), *world(),
                              class_names=world()[0].class_names, preprocessing=PREP,
                              out=tmp_path / "part", resume=True)
    result = resumed.run()
    assert result.resumed_from == 1 and [r["epoch"] for r in result.log] == [1, 2, 3]
    a, ck_a = tensors(tmp_path / "full" / "checkpoint.pt")
    b, ck_b = tensors(tmp_path / "part" / "checkpoint.pt")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ck_a.train_state["epoch"] == ck_b.train_state["epoch"] == 3
    def strip(log):  # NaN-aware (NaN marks columns a method has not), wall time dropped
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in r.items() if k != "epoch_time_s"} for r in log]

    assert strip(ck_a.train_state["log"]) == strip(ck_b.train_state["log"])


def test_resume_refuses_other_options_and_missing_checkpoint(tmp_path):
    prepare(tmp_path, "r", method="picnn", epochs=2).run(stop_after=1)
    train, val = world()
    with pytest.raises(UsageError, match="`lam` 3.0 differs"):
        Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=16, epochs=2, lam=3.0), train,
                        val, class_names=train.class_names, preprocessing=PREP,
                        out=tmp_path / "r", resume=True)
    with pytest.raises(UsageError, match="nothing to resume"):
        Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=16), train, val,
                        class_names=train.class_names, preprocessing=PREP, out=tmp_path / "none",
                        resume=True)
    with pytest.raises(UsageError, match="already holds"):
        Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=16), train, val,
                        class_names=train.class_names, preprocessing=PREP, out=tmp_path / "r")


class _Poisoned(Dataset):
    """A dataset whose images turn into NaN once ``poison`` is set."""

    def __init__(self, base):
        self.base = base
        self.class_names = base.class_names
        self.poison = False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if self.poison:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    train, val = world()
    poisoned = _Poisoned(train)
    cfg = dict(backbone="smallcnn", batch_size=16, epochs=3, method="picnn")
    t = Trainer.prepare(TrainConfig(**cfg), poisoned, val, class_names=train.class_names,
                        preprocessing=PREP, out=tmp_path / "nan", overwrite=True, workers=1)
    t.run(stop_after=1)
    ckpt = tmp_path / "nan" / "checkpoint.pt"
    before = ckpt.read_bytes()
    poisoned.poison = True
    t2 = Trainer.prepare(TrainConfig(**cfg), poisoned, val, class_names=train.class_names,
                         preprocessing=PREP, out=tmp_path / "nan", resume=True, workers=1)
    with pytest.raises(CnnexplainError) as err:
        t2.run()
    assert str(err.value) == ("loss term L_dis became NaN at epoch 2 step 1; lower `lr` / "
                              "`gate_lr` or enable `grad_clip`")
    assert ckpt.read_bytes() == before
    assert load_checkpoint(ckpt).train_state["epoch"] == 1


def test_nan_in_the_gated_term_names_it(tmp_path, monkeypatch):
    from cnnexplain.models import gates

    real = gates.PICNNGate.draw

    def bad(self, logits, labels, noise):
        d = real(self, logits, labels, noise)
        d.mask = d.mask * float("nan")
        return d

    monkeypatch.setattr(gates.PICNNGate, "draw", bad)
    t = prepare(tmp_path, "nan2", method="picnn", epochs=1)
    with pytest.raises(CnnexplainError, match=r"^loss term L_int became NaN at epoch 1 step 1;"):
        t.run()
    assert not (tmp_path / "nan2" / "checkpoint.pt").exists()


def test_huge_learning_rate_diverges_into_the_nan_error(tmp_path):
    t = prepare(tmp_path, "div", method="cdcnn-r1p2", optimizer="sgd", lr=1e30, momentum=0.0,
                weight_decay=0.0, epochs=2)
    with pytest.raises(CnnexplainError, match=r"became (NaN|infinite) at epoch \d step \d+; lower"):
        t.run()


def test_constraints_hold_after_training(tmp_path):
    t = prepare(tmp_path, "r1p2", method="cdcnn-r1p2", epochs=2)
    r = t.run()
    w = r.gate.matrix().detach()
    assert w.min() >= 0 and w.max() <= 1
    assert torch.allclose(w.max(1).values, torch.ones(w.shape[0]))
    t = prepare(tmp_path, "r0p1", method="cdcnn-r0p1", epochs=2, delta_end=0.005)
    w = t.run().gate.matrix().detach()
    assert torch.allclose(w.sum(1), torch.ones(w.shape[0]), atol=1e-5)
    # annealed to one-hot rows (a row whose two largest Ω are within δ of each other may still
    # be split between two classes)
    assert (w.max(1).values > 0.99).float().mean() > 0.9
    log = t.log[-1]
    assert abs(log["delta"] - 0.005) < 1e-6 and log["gate_peakedness"] > 0.95


def test_log_columns_and_checkpoints(tmp_path):
    import pandas as pd

    r = prepare(tmp_path, "log", method="picnn", epochs=2).run()
    frame = pd.read_csv(r.log_path)
    assert list(frame.columns) == LOG_COLUMNS and list(frame["epoch"]) == [1, 2]
    assert frame["loss_gated"].notna().all() and frame["gate_peakedness"].between(0, 1).all()
    assert frame["lr"].iloc[-1] < frame["lr"].iloc[0]  # cosine
    ck = load_checkpoint(r.checkpoint)
    assert ck.meta["gate"]["kind"] == "picnn" and ck.meta["gate"]["layer"] == "features"
    assert tuple(ck.gate["P"].shape) == (6, 64) and "Theta" in ck.gate
    best = load_checkpoint(r.best)
    assert best.train_state is None and best.meta["epoch"] == r.best_epoch
    assert math.isfinite(r.best_val_acc1)


def test_leakage_diagnostics_in_the_log(tmp_path):
    """``gated_follows_mask``: with true-label gates the mask row is the label, so it equals the
    gated accuracy exactly; with pseudo-labels it is a share in [0, 1] and ``pseudo_match`` says
    how often the row was the label. ``--gate-samples all`` trains with every sample counted and
    is recorded in the checkpoint's gate description."""
    r = prepare(tmp_path, "true", method="cdcnn-r1p2", epochs=1, preset="paper").run()
    row = r.log[-1]
    assert row["pseudo_match"] == 1.0
    assert row["gated_follows_mask"] == row["train_gated_acc"]
    r = prepare(tmp_path, "all", method="picnn", epochs=1, gate_samples="all").run()
    row = r.log[-1]
    assert 0 <= row["gated_follows_mask"] <= 1 and 0 < row["pseudo_match"] < 1
    ck = load_checkpoint(r.checkpoint)
    assert ck.meta["gate"]["samples"] == "all"
    with pytest.raises(UsageError, match="`gate_samples` 'some'; choose one of: matched, all"):
        TrainConfig(gate_samples="some").validate()
    with pytest.raises(UsageError, match="`gated_tail` 'detached'; choose one of: shared, frozen"):
        TrainConfig(gated_tail="detached").validate()


def test_wrong_mask_loss_is_the_kl_from_uniform():
    """``-mean_j log p_j - log C``: 0 for a uniform answer, the KL divergence otherwise, finite
    for extreme logits."""
    z = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [300.0, -300.0, 0.0]])
    per = []
    for row in z:
        p = torch.softmax(row.double(), 0)
        u = torch.full_like(p, 1 / 3)
        per.append(float((u * (u.log() - p.log())).sum()))
    assert per[0] == 0 and min(per[1:]) > 0
    got = wrong_mask_loss(z)
    assert math.isfinite(float(got)) and abs(float(got) - sum(per) / 3) < 1e-3
    assert float(wrong_mask_loss(z[:1])) == pytest.approx(0.0, abs=1e-7)


def test_wrong_mask_term_is_logged_and_trains(tmp_path):
    """``--lambda-neg``: ``loss_neg`` in the log (NaN when off), recorded in the checkpoint; it
    adds to the total loss."""
    r = prepare(tmp_path, "neg", method="cdcnn-r1p2", epochs=1, lambda_neg=2.0,
                lambda_comp=0.0).run()
    row = r.log[-1]
    assert row["loss_neg"] >= 0 and math.isfinite(row["loss_neg"])
    assert row["loss"] == pytest.approx(row["loss_main"] + row["loss_gated"]
                                        + 0.05 * row["loss_reg"] + 2.0 * row["loss_neg"], rel=1e-6)
    assert load_checkpoint(r.checkpoint).meta["training"]["lambda_neg"] == 2.0
    off = prepare(tmp_path, "off", method="cdcnn-r1p2", epochs=1, preset="paper").run()
    assert math.isnan(off.log[-1]["loss_neg"])
    with pytest.raises(UsageError, match="`lambda_neg` must be at least 0"):
        TrainConfig(lambda_neg=-1).validate()


def test_data_order_depends_only_on_seed_and_epoch_and_ranks_partition_the_batch():
    assert torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 2))
    assert not torch.equal(epoch_order(50, 3, 2), epoch_order(50, 3, 1))
    single = list(EpochBatches(50, 8, seed=1, epoch=0))
    r0 = list(EpochBatches(50, 8, seed=1, epoch=0, rank=0, world=2))
    r1 = list(EpochBatches(50, 8, seed=1, epoch=0, rank=1, world=2))
    assert len(single) == 6  # drop_last
    for s, a, b in zip(single, r0, r1):
        assert s == a + b
    assert _lr_factor("cosine", 0, 100) == 1.0 and abs(_lr_factor("cosine", 99, 100) - 0.001) < 1e-12
    assert _lr_factor("constant", 50, 100) == 1.0
    # stable-decay: full rate for the first 80% of the steps, then the same cosine to 0.001
    assert _lr_factor("stable-decay", 0, 101) == _lr_factor("stable-decay", 80, 101) == 1.0
    assert 0.001 < _lr_factor("stable-decay", 90, 101) < 1.0
    assert abs(_lr_factor("stable-decay", 100, 101) - 0.001) < 1e-12
    # decay_share: the annealed share; half of it gives the cosine's midpoint at 3/4 of the run
    assert _lr_factor("stable-decay", 50, 101, decay_share=0.5) == 1.0
    assert _lr_factor("stable-decay", 75, 101, decay_share=0.5) == pytest.approx(0.5005)
    assert _lr_factor("stable-decay", 90, 101, decay_share=0.2) == pytest.approx(0.5005)
    assert abs(_lr_factor("stable-decay", 100, 101, decay_share=0.5) - 0.001) < 1e-12


def test_validation_errors_before_anything_is_written(tmp_path):
    train, val = world(n=20)
    with pytest.raises(UsageError, match="fewer than `batch_size="):
        Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=64), train, val,
                        class_names=train.class_names, preprocessing=PREP, out=tmp_path / "x")
    with pytest.raises(UsageError, match="`num_classes=3` does not match"):
        Trainer.prepare(TrainConfig(backbone="smallcnn", batch_size=4, num_classes=3), train, val,
                        class_names=train.class_names, preprocessing=PREP, out=tmp_path / "x")
    with pytest.raises(UsageError, match="`gate_warmup`"):
        TrainConfig(epochs=2, gate_warmup=2).validate()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18", "vgg11_bn", "mobilenet_v2"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_every_backbone(tmp_path, backbone, method):
    train, val = world(n=32)
    t = prepare(tmp_path, f"{backbone}-{method}", train=train, val=val, backbone=backbone,
                method=method, epochs=1, batch_size=16)
    r = t.run()
    row = r.log[-1]
    assert math.isfinite(row["loss"]) and 0 <= row["train_acc1"] <= 1
    if method != "std":
        assert math.isfinite(row["loss_gated"]) and 0 <= row["val_acc3"] <= 1
        K = r.gate.matrix().shape[0]
        assert r.gate.matrix().shape == (K, 6)
    assert r.checkpoint.exists() and r.best.exists()


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18", "vgg11_bn", "mobilenet_v2"])
@pytest.mark.parametrize("method,extra", [("picnn", {}), ("cdcnn-r1p2", {"gate_label": "pseudo"})])
def test_default_gated_terms_on_every_backbone(tmp_path, backbone, method, extra):
    """The default preset's wrong-mask and complement terms: the extra tail runs work on every
    backbone's layers after the gate (pooling + fc, BatchNorm'd heads, classifier blocks)."""
    train, val = world(n=32)
    r = prepare(tmp_path, f"{backbone}-{method}", train=train, val=val, backbone=backbone,
                method=method, epochs=1, batch_size=16, **extra).run()
    row = r.log[-1]
    for term in ("loss_neg", "loss_comp"):
        assert math.isfinite(row[term]) and row[term] >= 0
    gated_weight, reg = (2.0, 0.0) if method == "picnn" else (1.0, 0.05 * row["loss_reg"])
    assert row["loss"] == pytest.approx(row["loss_main"] + gated_weight * row["loss_gated"] + reg
                                        + row["loss_neg"] + row["loss_comp"], rel=1e-6)


def test_insert_conv_gates_the_new_filters(tmp_path):
    r = prepare(tmp_path, "ins", method="picnn", insert_conv=12, epochs=1).run()
    assert r.gate.matrix().shape == (12, 6)
    ck = load_checkpoint(r.checkpoint)
    assert ck.meta["insert_conv"] == 12 and "features.12.weight" in ck.state_dict


def test_augmentation_is_a_function_of_the_global_batch_draws():
    from cnnexplain.training.augment import augment_batch
    from cnnexplain.training.state import generator

    x = torch.rand(8, 3, 16, 16)
    full = augment_batch(x, "flip-crop", generator(0, "augment", 1, 2))
    halves = torch.cat([augment_batch(x[:4], "flip-crop", generator(0, "augment", 1, 2), 0, 8),
                        augment_batch(x[4:], "flip-crop", generator(0, "augment", 1, 2), 4, 8)])
    assert torch.equal(full, halves)  # what a rank computes for its slice
    assert not torch.equal(full, x) and full.shape == x.shape
    flipped = augment_batch(x, "flip", generator(0, "augment", 1, 2))
    assert all(torch.equal(f, a) or torch.equal(f, a.flip(-1)) for f, a in zip(flipped, x))
    assert torch.equal(augment_batch(x, "none", generator(0)), x)


def test_presets_fill_only_what_is_not_given():
    """default: the remedies (wrong-mask and complement terms 1, cdcnn-* gated by pseudo-labels,
    gates from the second half of the epochs); paper: the seeds' losses; an explicit value wins;
    std has no gated term to weigh and no gate to warm up."""
    d = TrainConfig(method="cdcnn-r1p2", epochs=7).validate()
    assert (d.lambda_neg, d.lambda_comp, d.gate_label, d.gate_warmup) == (1.0, 1.0, "pseudo", 3)
    paper = TrainConfig(method="cdcnn-r1p2", preset="paper", epochs=7).validate()
    assert (paper.lambda_neg, paper.lambda_comp, paper.gate_label, paper.gate_warmup) == \
        (0.0, 0.0, "true", 0)
    mixed = TrainConfig(method="cdcnn-r1p2", preset="paper", lambda_neg=2.0,
                        gate_warmup=1).validate()
    assert (mixed.lambda_neg, mixed.gate_label, mixed.gate_warmup) == (2.0, "true", 1)
    assert TrainConfig(method="picnn", epochs=1).validate().gate_warmup == 0
    s = TrainConfig(method="std").validate()
    assert (s.lambda_neg, s.lambda_comp, s.gate_warmup) == (0.0, 0.0, 0)


def test_paper_preset_trains_exactly_the_seeds_losses(tmp_path):
    """``preset="paper"`` is the same run as the seeds' losses spelled out (no wrong-mask term,
    true-label gates): identical checkpoints."""
    a = prepare(tmp_path, "paper", method="cdcnn-r1p2", epochs=1, preset="paper").run()
    b = prepare(tmp_path, "spelled", method="cdcnn-r1p2", epochs=1, lambda_neg=0.0,
                lambda_comp=0.0, gate_label="true").run()
    (ta, _), (tb, _) = tensors(a.checkpoint), tensors(b.checkpoint)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_dihedral_augmentation_is_a_symmetry_of_the_square():
    """Each image becomes one of its eight flips / quarter turns (drawn per global batch)."""
    from cnnexplain.training.augment import augment_batch
    from cnnexplain.training.state import generator

    x = torch.rand(16, 3, 8, 8)
    y = augment_batch(x, "dihedral", generator(0, "augment", 0, 0))
    for a, b in zip(x, y):
        images = [torch.rot90(v, k, dims=(-2, -1)) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, im) for im in images)
    assert not torch.equal(x, y)


def test_complement_term_is_the_tail_without_the_true_class_cluster(tmp_path):
    """``lambda_comp``: the tail on every channel but the true class's cluster (mask 1 - M[y])
    pulled towards no answer; logged as loss_comp and added to the total with its weight."""
    from cnnexplain.models.gates import GateNoise, GatedNetwork, make_gate
    from cnnexplain.training.loop import wrong_mask_loss

    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    tail = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 3))

    class Body(torch.nn.Module):
        def forward(self, x):
            return (body(x),)

    gate = make_gate("cdcnn-r1p2", 4, 3)
    net = GatedNetwork(Body(), tail, gate, complement=True)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    noise = GateNoise.draw(torch.Generator().manual_seed(0), 5, 4)
    _, _, draw = net(x, y, noise)
    expected = tail(body(x) * (1 - gate.matrix().t()[y])[:, :, None, None])
    torch.testing.assert_close(draw.complement_logits, expected)
    r = prepare(tmp_path, "comp", method="cdcnn-r1p2", epochs=1, lambda_neg=0.0,
                lambda_comp=3.0).run()
    row = r.log[-1]
    assert row["loss_comp"] >= 0 and math.isfinite(row["loss_comp"])
    assert row["loss"] == pytest.approx(row["loss_main"] + row["loss_gated"]
                                        + 0.05 * row["loss_reg"] + 3.0 * row["loss_comp"],
                                        rel=1e-6)
    off = prepare(tmp_path, "nocomp", method="cdcnn-r1p2", epochs=1, preset="paper").run()
    assert math.isnan(off.log[-1]["loss_comp"])
    assert wrong_mask_loss(torch.zeros(2, 3)).item() == pytest.approx(0.0, abs=1e-7)


def test_gated_training_can_start_from_a_trained_checkpoint(tmp_path):
    """`weights` may be a cnnexplain checkpoint: the gated run starts from that network (gated
    fine-tuning of a trained std model, as PICNN fine-tunes a trained network), and the default
    preset then skips its warm-up (the features are learned already)."""
    from cnnexplain.training.loop import build_model

    std = prepare(tmp_path, "std", method="std", epochs=1).run()
    cfg = TrainConfig(backbone="smallcnn", method="picnn", epochs=4,
                      weights=str(std.best)).validate()
    assert cfg.gate_warmup == 0 and TrainConfig(method="picnn", epochs=4).validate().gate_warmup == 2
    model, _ = build_model(cfg, num_classes=6)
    trained = load_checkpoint(std.best).state_dict
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    r = prepare(tmp_path, "ft", method="picnn", epochs=1, weights=str(std.best)).run()
    assert math.isfinite(r.log[-1]["loss_gated"])
