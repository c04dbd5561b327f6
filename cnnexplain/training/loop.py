"""``train-gated``: train a CNN whose target-layer channels each serve a few classes only.

Methods (``method``, gates in :mod:`cnnexplain.models.gates`):

- ``std``: ``CE(y, ŷ)`` on the same architecture (the baseline).
- ``cdcnn-r1p2`` / ``cdcnn-r1p1`` (seed ``000_d60c53f3ec4d0e03.txt``, ``Loss_1``):
  ``CE(y, ŷ) + λ1 CE(y, ŷ_W) + λ2 ||W||_{1,2}`` with ``ŷ_W = f_{>l}(W_{:,y} ⊙ A)``.
- ``cdcnn-r0p1`` (seed 000, ``Loss_0``): ``CE(y, ŷ) + λ1 CE(y, ŷ_W)``.
- ``picnn`` (seed ``004_64660bc76be64243.txt``, eq. 1-3): ``L_dis + λ L_int``; ``L_int`` is the
  cross-entropy of the pathway masked by ``z ~ Ber(P[ỹ])`` over the samples whose pseudo-label
  ``ỹ`` equals the label (the reference code), normalized by their number.

What makes a run reproducible and resumable
-------------------------------------------
- Data order of epoch ``e`` is a permutation drawn from a generator seeded by ``(seed, e)``;
  every gate draw of step ``s`` (pseudo-label ``xi``, Bernoulli ``eps``) comes from a generator
  seeded by ``(seed, e, s)`` for the whole *global* batch; the learning rate and the annealed
  ``delta`` are pure functions of the global step. A run resumed from the checkpoint of epoch
  ``e`` therefore sees the same batches and draws as an uninterrupted one; the checkpoint also
  holds the optimizer, gate optimizer, AMP scaler and RNG states (torch, numpy, python, CUDA),
  so on CPU the final tensors are bit-identical.
- Under ``torchrun`` each rank takes a contiguous slice of every global batch and the slice of
  the global draws, DistributedDataParallel averages gradients (the gate lives inside the DDP
  module, so its gradients are averaged too and its post-step projection runs on identical
  values), ``L_int`` is normalized by the global number of counted samples, and BatchNorm uses
  global batch statistics (:func:`sync_batchnorm_`), so a 2-process run follows the
  single-process run with the same global batch up to float summation order.
- Validation every epoch on a split carved from the training data (``val_fraction``, seeded);
  ``best.pt`` is the epoch with the best validation ACC1; the test split is never looked at.
- A loss term that becomes NaN or infinite stops the run with one line naming the term, the
  epoch and the step; the last checkpoint (written at the end of the previous epoch) is intact.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.layout import RunLayout
from cnnexplain.models import zoo
from cnnexplain.models.checkpoint import (Checkpoint, load_checkpoint, save_checkpoint)
from cnnexplain.models.gates import (Gate, GateNoise, GatedNetwork, apply_mask, class_clusters,
                                     make_gate)
from cnnexplain.models.layers import get_module, split_at
from cnnexplain.models.network import insert_conv
from cnnexplain.runtime import Dist
from cnnexplain.training.augment import augment_batch
from cnnexplain.config.train import TrainConfig

TERM_NAMES = {"std": ("CE", "", ""), "picnn": ("L_dis", "L_int", ""),
              "cdcnn-r1p2": ("CE", "CE_W", "||W||_12"), "cdcnn-r1p1": ("CE", "CE_W", "||W||_12"),
              "cdcnn-r0p1": ("CE", "CE_W", "")}
"""The seeds' names of (main, gated, regularizer) loss terms per method, used in messages."""

RESUME_IGNORED = {"sync_bn", "channels_last"}
"""Config keys that may differ on a resumed run (they do not change the math)."""
from cnnexplain.training.data import MEMO_BYTES, ImageLabel, _collate
from cnnexplain.training.distributed import sync_batchnorm_
from cnnexplain.training.state import (EpochBatches, derive_seed, generator, rng_state,
                                       set_rng_state)


LOG_COLUMNS = ["epoch", "loss", "loss_main", "loss_gated", "loss_reg", "loss_neg", "loss_comp",
               "train_acc1",
               "train_gated_acc", "pseudo_match", "gated_follows_mask", "val_acc1", "val_acc2",
               "val_acc3", "gate_density", "gate_l1_density", "gate_peakedness", "delta", "lr",
               "gate_lr", "epoch_time_s"]
"""``train_log.csv`` columns. ``loss_main``: CE of the full pathway (seed 000's ``CE(y, ŷ)``,
seed 004's ``L_dis``); ``loss_gated``: CE of the gated pathway (``CE(y, ŷ_W)`` / ``L_int``);
``loss_reg``: ``||W||_{1,2}``; ``loss_comp``: the complement term of ``lambda_comp``
(:func:`wrong_mask_loss` on the tail's answer without the true class's cluster);
``loss_neg``: the wrong-mask term of ``lambda_neg``
(:func:`wrong_mask_loss`); ``loss``: the weighted total. ``train_gated_acc``: accuracy of the
gated pathway on the training masks; ``pseudo_match``: fraction of samples whose mask row
was their true class; ``gated_follows_mask``: fraction of samples whose gated prediction is the
class of their mask row (the label-leakage diagnostic of ../shared/reference/gated-training.md:
near 1 while the mask row is often wrong, or above ``train_acc1`` with true-label gates, means
the gated pathway reads the answer off the mask pattern rather than off the channels);
``val_acc2`` / ``val_acc3``: validation accuracy with only the predicted
class's cluster / without the true class's cluster (deterministic clusters, threshold);
``gate_peakedness``: mean over channels of the largest class share of the channel's row."""


# ---------------------------------------------------------------------------------------------
# Building the network
# ---------------------------------------------------------------------------------------------

def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type of ``amp`` on ``device``: float16 on CUDA (with loss scaling),
    bfloat16 on a CPU whose oneDNN runs it natively (a ResNet-18 step at 32 px, batch 64, took
    0.57-0.61 s against 1.17-1.22 s in float32 on a 2-core AVX-512-BF16 CPU; ``python -m
    benchmarks train`` times std with and without it), else None."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_runs_bfloat16():
        return torch.bfloat16
    return None


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU's oneDNN runs bfloat16 convolutions natively (AVX-512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and
                torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """The autocast context of a training step (:func:`autocast_dtype`; off when not
    ``enabled``)."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The backbone with ``num_classes`` outputs, its stem (``config.stem``, resolved), optional
    weights and inserted conv."""
    spec = zoo.get_spec(config.backbone)
    layer = config.layer or spec.default_layer
    w = config.weights
    if w is None:
        model = zoo.build(config.backbone, num_classes=num_classes, stem=config.stem)
    elif w == "imagenet":
        model = zoo.build(config.backbone, num_classes=num_classes, imagenet=True,
                          stem=config.stem)
    else:
        model, _ = zoo.build_from_weights_file(config.backbone, w, stem=config.stem)
        zoo.replace_classifier(model, spec, num_classes)
    get_module(model, layer)
    if config.insert_conv:
        insert_conv(model, spec, layer, config.insert_conv)
    return model, layer


def resolve_stem(config: TrainConfig, train: Dataset) -> str:
    """``config.stem`` made concrete: ``auto`` is ``small`` for images of at most
    :data:`~cnnexplain.models.zoo.SMALL_INPUT` px on a backbone that has one (a weights file's
    own stem wins, ImageNet weights have the imagenet stem)."""
    spec = zoo.get_spec(config.backbone)
    if config.weights == "imagenet":
        return zoo.choose_stem(spec, "imagenet" if config.stem == "auto" else config.stem, None)
    if config.weights is not None:
        return zoo.stem_of(zoo.safe_load_state_dict(config.weights), spec, config.stem)
    side = None
    if config.stem == "auto" and len(train):
        image = train[0]["image"]
        side = min(int(image.shape[-2]), int(image.shape[-1]))
    return zoo.choose_stem(spec, config.stem, side)


_STEP_SUMS = ("loss", "loss_main", "loss_gated", "loss_reg", "loss_neg", "loss_comp",
              "train_acc1",
              "train_gated_acc", "pseudo_match", "gated_follows_mask", "n")
"""Per-step values :meth:`Trainer._train_epoch` sums (in this order) and averages over the
epoch's steps (``n``, last, counts them); all-reduced in one tensor under DDP."""


def wrong_mask_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(uniform || softmax(logits))`` ``= -mean_j log p_j - log C``:
    the gated pathway run with the mask row of a class ``c`` other than the image's label
    (:meth:`~cnnexplain.models.gates.Gate.other_class`) must give no answer at all, neither
    ``c`` (the mask pattern alone must not give it) nor the true class (``c``'s channels must not
    carry other classes' evidence). The term of ``train-gated``'s ``lambda_neg`` against label
    leakage; not in the seeds.

    ``logits`` ``[B, C]`` (the tail on the wrongly masked maps) -> scalar >= 0."""
    logp = torch.log_softmax(logits, dim=1)
    return (-logp.mean(dim=1) - math.log(logits.shape[1])).mean()


def _lr_factor(schedule: str, step: int, total: int, decay_share: float = 0.2) -> float:
    """The learning-rate factor of ``step`` of ``total`` (a pure function of the step):
    ``cosine`` from 1 to 0.001; ``stable-decay`` 1, then the same cosine over the last
    ``decay_share`` of the steps (Hägele et al. 2024's warmup-stable-decay without warmup);
    ``constant`` 1."""
    if schedule == "constant" or total <= 1:
        return 1.0
    t = min(max(step / (total - 1), 0.0), 1.0)
    if schedule == "stable-decay":
        t = max(0.0, (t - (1.0 - decay_share)) / decay_share)
    return 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished run produced (paths in ``out``; ``log``: one dict per epoch)."""

    model: nn.Module
    gate: Gate | None
    layer: str
    log: list[dict]
    best_epoch: int
    best_val_acc1: float | None
    checkpoint: Path
    best: Path
    log_path: Path
    meta: dict
    resumed_from: int = 0
    stopped_early: bool = False

    @property
    def last(self) -> dict:
        return self.log[-1] if self.log else {}


@dataclass
class Trainer:
    """A validated, ready-to-run training (nothing written yet); :meth:`run` trains."""

    config: TrainConfig
    model: nn.Module
    layer: str
    gate: Gate | None
    net: nn.Module
    train_data: Dataset
    val_data: Dataset | None
    class_names: list[str]
    preprocessing: Preprocessing
    device: torch.device
    dist: Dist
    out: Path
    data_info: dict
    channels: int
    notice: Callable[[str], None] = lambda m: None
    resume_state: dict | None = None
    workers: int = 0
    ddp: nn.Module | None = None
    _opt: torch.optim.Optimizer | None = None
    _gate_opt: torch.optim.Optimizer | None = None
    _scaler: object = None
    log: list[dict] = field(default_factory=list)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: TrainConfig, train: Dataset, val: Dataset | None = None, *,
                class_names: list[str],
                preprocessing: Preprocessing, device: torch.device | str = "cpu",
                dist: Dist | None = None, out: str | Path = "runs/train-gated",
                resume: bool = False, overwrite: bool = False, workers: int = 0,
                data_info: dict | None = None,
                notice: Callable[[str], None] = lambda m: None) -> "Trainer":
        """Validate everything and build the model, gate and optimizers; write nothing.

        ``train`` / ``val``: the training and validation splits (items with ``image`` and
        ``label``; ``open_dataset(spec, "train"|"val", ..., val_fraction=config.val_fraction)``
        carves val from train where a dataset has none). ``resume``: continue
        ``out/checkpoint.pt`` (same options and data required).
        """
        dist = dist or Dist()
        device = torch.device(device)
        out = Path(out)
        config.validate()
        num_classes = len(class_names)
        if config.num_classes and config.num_classes != num_classes:
            raise UsageError(f"`num_classes={config.num_classes}` does not match the dataset's "
                             f"{num_classes} classes", "leave out `num_classes`")
        config.num_classes = num_classes
        if config.method != "std" and num_classes < 2:
            raise UsageError(f"`method={config.method}` needs at least 2 classes, the dataset has "
                             f"{num_classes}", "use a dataset with several classes")
        if config.amp and autocast_dtype(device) is None:
            notice(f"`amp` needs CUDA or a CPU with bfloat16 support; training in float32 on "
                   f"{device}")
            config.amp = False
        if config.channels_last and device.type != "cuda" and not config.amp:
            config.channels_last = False  # on CPU it pays only with bfloat16 (benchmarks train)
        if config.batch_size % dist.world_size:
            raise UsageError(f"`batch_size={config.batch_size}` is not divisible by the "
                             f"{dist.world_size} processes", "pass a global batch size that is a "
                             "multiple of the number of processes")
        if len(train) == 0:
            raise CnnexplainError("the training split has no images", "check `dataset` and `limit`")
        info = dict(data_info or {})
        info.update({"train_images": len(train), "val_images": len(val) if val is not None else 0})
        ckpt_path = RunLayout(out).checkpoint
        config.stem = resolve_stem(config, train)
        if config.augment == "auto":
            config.augment = getattr(train, "augmentation", "none")
        state = None
        if resume:
            if not ckpt_path.is_file():
                raise UsageError(f"nothing to resume: {ckpt_path} does not exist",
                                 "run without `resume` to start training")
            ck = load_checkpoint(ckpt_path)
            if not ck.train_state:
                raise CnnexplainError(f"{ckpt_path} has no training state to resume from",
                                      "run without `resume` into a new `out`")
            _check_resume(config, ck.meta.get("training") or {})
            recorded = ck.meta.get("preprocessing")
            if recorded is not None and recorded != preprocessing.to_dict():
                raise UsageError("`resume`: the preprocessing (`resize`/`mean`/`std`) differs from "
                                 "the checkpoint's", "resume with the options the run was started with")
            before = (ck.meta.get("data") or {}).get("fingerprint")
            if before is not None and info.get("fingerprint") is not None and before != info["fingerprint"]:
                raise UsageError("`resume`: the training data differs from the checkpoint's "
                                 f"({(ck.meta.get('data') or {}).get('spec', '?')})",
                                 "resume with the same `dataset`, `limit` and `val_fraction`")
            state = {"ckpt": ck}
        elif ckpt_path.exists() and not overwrite:
            raise UsageError(f"`out={out}` already holds a train-gated checkpoint",
                             "pass `resume=true` to continue it, `overwrite=true` to start over, or "
                             "choose another `out`")
        if len(train) < config.batch_size:
            raise UsageError(f"the training split has {len(train)} images, fewer than "
                             f"`batch_size={config.batch_size}`",
                             "lower `batch_size` or use more images (`limit`)")
        first = train[0]
        image = first["image"]
        if image.dim() != 3 or image.shape[0] != 3:
            raise CnnexplainError(f"dataset images have shape {list(image.shape)}, expected [3, H, W]",
                                  "check `dataset`")
        spec = zoo.get_spec(config.backbone)
        side = min(int(image.shape[1]), int(image.shape[2]))
        if side < spec.min_size:
            raise UsageError(f"{config.backbone} needs images of at least {spec.min_size} px, the "
                             f"dataset's are {side} px", f"pass `resize={spec.min_size}` or larger")
        # build: model init, then gate init, from the seeded global RNG (same on every rank)
        torch.manual_seed(config.seed)
        model, layer = build_model(config, num_classes)
        if dist.enabled and config.sync_bn:
            sync_batchnorm_(model)
        split = split_at(model, layer)
        model.eval()
        with torch.no_grad():
            a, *_ = split.body(torch.zeros(2, 3, image.shape[1], image.shape[2]))
        if a.dim() < 2:
            raise UsageError(f"layer {layer!r} has output shape {list(a.shape)}, not [B, K, ...]",
                             "choose a conv layer")
        channels = int(a.shape[1])
        gate = make_gate(config.method, channels, num_classes, **config.gate_hparams())
        if config.lambda1 == 0 and config.method.startswith("cdcnn"):
            notice("`lambda1=0` switches the gated pathway off: the gate will not learn")
        if (config.lambda_neg > 0 or config.lambda_comp > 0) and gate is None:
            notice("`lambda_neg` and `lambda_comp` apply to the gated methods only; `method=std` "
                   "trains without them")
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if gate is not None:
            gate.to(device)
        net = GatedNetwork(split.body, split.tail, gate, config.gated_tail,
                           wrong_mask=gate is not None and config.lambda_neg > 0,
                           complement=gate is not None and config.lambda_comp > 0).to(device)
        item_bytes = image.numel() * 4
        total = len(train) + (len(val) if val is not None else 0)
        memo = workers == 0 and item_bytes * total <= MEMO_BYTES
        trainer = cls(config=config, model=model, layer=layer, gate=gate, net=net,
                      train_data=ImageLabel(train, memo=memo),
                      val_data=ImageLabel(val, memo=memo) if val is not None else None,
                      class_names=list(class_names), preprocessing=preprocessing, device=device,
                      dist=dist, out=out, data_info=info, channels=channels, notice=notice,
                      resume_state=state, workers=workers)
        trainer._build_optimizers()
        if state is not None:
            trainer._restore(state["ckpt"])
        return trainer

    def _build_optimizers(self) -> None:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            self._opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                        weight_decay=c.weight_decay)
        else:
            self._opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        if self.gate is not None:
            self._gate_opt = torch.optim.Adam(self.gate.parameters(), lr=c.gate_lr)
        # float16 needs loss scaling, bfloat16 (CPU) has float32's range and does not
        self._scaler = torch.amp.GradScaler("cuda", enabled=bool(c.amp) and
                                            self.device.type == "cuda")
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.net, device_ids=ids)

    # -- checkpoints --------------------------------------------------------------------------
    def meta(self) -> dict:
        c = self.config
        m = {"backbone": c.backbone, "num_classes": c.num_classes, "class_names": self.class_names,
             "layer": self.layer, "insert_conv": c.insert_conv, "stem": c.stem, "method": c.method,
             "preprocessing": self.preprocessing.to_dict(), "training": c.to_dict(),
             "data": self.data_info}
        if self.gate is not None:
            m["gate"] = {**self.gate.describe(), "layer": self.layer}
        return m

    def _gate_tensors(self) -> dict:
        return self.gate.state_tensors() if self.gate is not None else {}

    def _train_state(self, epoch: int, best: dict) -> dict:
        return {"epoch": epoch, "optimizer": self._opt.state_dict(),
                "gate_optimizer": self._gate_opt.state_dict() if self._gate_opt else {},
                "scaler": self._scaler.state_dict() if self._scaler.is_enabled() else {},
                "scheduler": {"kind": self.config.schedule, "steps_per_epoch": self.steps_per_epoch,
                              "global_step": epoch * self.steps_per_epoch},
                "rng": rng_state(), "log": [dict(r) for r in self.log], "best": dict(best),
                "data_order": {"seed": self.config.seed, "next_epoch": epoch}}

    def _restore(self, ck: Checkpoint) -> None:
        zoo.load_state_dict_into(self.model, ck.state_dict, self.config.backbone,
                                 f"checkpoint {RunLayout(self.out).checkpoint}")
        if self.gate is not None:
            self.gate.load_state_tensors({k: v.to(self.device) for k, v in ck.gate.items()})
        ts = ck.train_state
        self._opt.load_state_dict(ts["optimizer"])
        if self._gate_opt is not None and ts.get("gate_optimizer"):
            self._gate_opt.load_state_dict(ts["gate_optimizer"])
        if self._scaler.is_enabled() and ts.get("scaler"):
            self._scaler.load_state_dict(ts["scaler"])
        self.log = [dict(r) for r in ts.get("log", [])]
        self.resume_state = {"epoch": int(ts["epoch"]), "best": dict(ts.get("best") or {}),
                             "rng": ts.get("rng")}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_data) // self.config.batch_size

    # -- one epoch ----------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        sampler = EpochBatches(len(self.train_data), self.config.batch_size, self.config.seed,
                               epoch, self.dist.rank, self.dist.world_size)
        return DataLoader(self.train_data.for_epoch(epoch), batch_sampler=sampler,
                          num_workers=self.workers,
                          collate_fn=_collate, generator=generator(self.config.seed, "loader", epoch),
                          pin_memory=self.device.type == "cuda")

    def _input(self, x: torch.Tensor, epoch: int | None = None, step: int = 0) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        if epoch is not None and self.config.augment != "none":
            local = self.config.batch_size // self.dist.world_size
            x = augment_batch(x, self.config.augment,
                              generator(self.config.seed, "augment", epoch, step),
                              self.dist.rank * local, self.config.batch_size)
        x = self.preprocessing.normalize(x)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce a small CPU tensor across ranks (via the device for nccl); no-op alone."""
        if not self.dist.enabled:
            return t
        import torch.distributed as td

        reduce_op = td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM
        if td.get_backend() == "nccl":
            d = t.to(self.device)
            td.all_reduce(d, op=reduce_op)
            return d.cpu()
        td.all_reduce(t, op=reduce_op)
        return t

    def _train_epoch(self, epoch: int, task) -> dict:
        c = self.config
        net = self.ddp if self.ddp is not None else self.net
        self.model.train()
        if self.gate is not None:
            self.gate.train()
        gated_on = self.gate is not None and epoch >= c.gate_warmup
        weight_gated = (c.lam if c.method == "picnn" else c.lambda1) if gated_on else 0.0
        weight_reg = c.lambda2 if (gated_on and c.method in ("cdcnn-r1p2", "cdcnn-r1p1")) else 0.0
        weight_neg = c.lambda_neg if gated_on else 0.0
        weight_comp = c.lambda_comp if gated_on else 0.0
        names = TERM_NAMES[c.method]
        steps = self.steps_per_epoch
        total = steps * c.epochs
        gated_total = steps * max(c.epochs - c.gate_warmup, 1)
        local = c.batch_size // self.dist.world_size
        sums = torch.zeros(len(_STEP_SUMS), dtype=torch.float64)
        autocast = training_autocast(self.device, c.amp)
        for step, (x, y) in enumerate(self._loader(epoch)):
            gstep = epoch * steps + step
            factor = _lr_factor(c.schedule, gstep, total, c.decay_share)
            for g in self._opt.param_groups:
                g["lr"] = c.lr * factor
            if self._gate_opt is not None:
                for g in self._gate_opt.param_groups:
                    g["lr"] = c.gate_lr * factor
            if self.gate is not None:
                self.gate.anneal((gstep - c.gate_warmup * steps) / max(gated_total - 1, 1)
                                 if gated_on else 0.0)
            x = self._input(x, epoch, step)
            y = y.to(self.device, non_blocking=True)
            noise = None
            if self.gate is not None:
                full = GateNoise.draw(generator(c.seed, "gate", epoch, step), c.batch_size,
                                      self.channels)
                start = self.dist.rank * local
                noise = full.slice(start, start + local, self.device)
            with autocast:
                logits, gated, draw = net(x, y, noise)
            logits = logits.float()
            main = F.cross_entropy(logits, y)
            zero = logits.new_zeros(())
            gated_loss, reg, neg, comp = zero, zero, zero, zero
            match = torch.ones((), device=self.device)
            if gated is not None:
                gated = gated.float()
                per = F.cross_entropy(gated, y, reduction="none")
                count = self._all_reduce(draw.weight.detach().sum().double().cpu().clone())
                n_counted = float(count)
                if n_counted > 0:
                    gated_loss = (per * draw.weight).sum() * (self.dist.world_size / n_counted)
                else:
                    gated_loss = (per * draw.weight).sum()  # zero, keeps the graph connected
                match = (draw.index == y).float().mean()
                if weight_reg > 0:
                    reg = self.gate.regularizer()
                if draw.other_logits is not None:
                    neg = wrong_mask_loss(draw.other_logits.float())
                if draw.complement_logits is not None:
                    comp = wrong_mask_loss(draw.complement_logits.float())
            loss = (main + weight_gated * gated_loss + weight_reg * reg + weight_neg * neg
                    + weight_comp * comp)
            terms = [(names[0], main), (names[1] or "gated", gated_loss), (names[2] or "reg", reg),
                     ("L_neg", neg), ("L_comp", comp)]
            self._check_finite(terms, epoch, step)
            self._opt.zero_grad(set_to_none=True)
            if self._gate_opt is not None:
                self._gate_opt.zero_grad(set_to_none=True)
            self._scaler.scale(loss).backward()
            if c.grad_clip:
                self._scaler.unscale_(self._opt)
                params = [p for p in self.model.parameters() if p.grad is not None]
                if self._gate_opt is not None:
                    self._scaler.unscale_(self._gate_opt)
                    params += [p for p in self.gate.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            self._scaler.step(self._opt)
            if self._gate_opt is not None and gated_on:
                self._scaler.step(self._gate_opt)
            self._scaler.update()
            if self.gate is not None and gated_on:
                self.gate.project_()
            with torch.no_grad():
                acc1 = (logits.argmax(1) == y).float().mean()
                gacc = follows = zero
                if gated is not None:
                    gated_pred = gated.argmax(1)
                    gacc = (gated_pred == y).float().mean()
                    follows = (gated_pred == draw.index).float().mean()
                values = {"loss": loss, "loss_main": main, "loss_gated": gated_loss,
                          "loss_reg": reg, "loss_neg": neg, "loss_comp": comp,
                          "train_acc1": acc1,
                          "train_gated_acc": gacc, "pseudo_match": match,
                          "gated_follows_mask": follows, "n": torch.ones((), device=self.device)}
                row = torch.stack([values[k].detach().float() for k in _STEP_SUMS]).double().cpu()
            sums += row
            task.advance(1)
            task.update(loss=float(row[_STEP_SUMS.index("loss")]),
                        acc=float(row[_STEP_SUMS.index("train_acc1")]))
        sums = self._all_reduce(sums)
        avg = dict(zip(_STEP_SUMS, (sums / max(float(sums[-1]), 1.0)).tolist()))
        del avg["n"]
        has_gate = self.gate is not None
        absent = [k for k, off in (("loss_reg", weight_reg == 0), ("loss_neg", weight_neg == 0),
                                   ("loss_comp", weight_comp == 0)) if off]
        if not has_gate:
            absent += ["loss_gated", "train_gated_acc", "pseudo_match", "gated_follows_mask"]
        return {**avg, **dict.fromkeys(absent, float("nan")),
                "lr": c.lr * _lr_factor(c.schedule, (epoch + 1) * steps - 1, total,
                                        c.decay_share),
                "gate_lr": c.gate_lr * _lr_factor(c.schedule, (epoch + 1) * steps - 1, total,
                                                  c.decay_share)
                if has_gate else float("nan")}

    def _check_finite(self, terms, epoch: int, step: int) -> None:
        values = [float(t.detach()) for _, t in terms]
        flags = torch.tensor([0.0 if math.isfinite(v) else (2.0 if math.isnan(v) else 1.0)
                              for v in values], dtype=torch.float64)
        flags = self._all_reduce(flags, op="max")  # every rank stops at the same step
        for (name, _), f in zip(terms, flags.tolist()):
            if f > 0:
                what = "NaN" if f == 2.0 else "infinite"
                raise CnnexplainError(f"loss term {name} became {what} at epoch {epoch + 1} step "
                                      f"{step + 1}; lower `lr` / `gate_lr` or enable `grad_clip`")

    @torch.no_grad()
    def evaluate(self, data: Dataset | None) -> dict:
        """Validation ACC1, and with a gate ACC2 (only the predicted class's cluster) and ACC3
        (all but the true class's cluster) with the deterministic clusters (threshold)."""
        if data is None or len(data) == 0:
            return {"val_acc1": float("nan"), "val_acc2": float("nan"), "val_acc3": float("nan")}
        self.model.eval()
        idx = list(range(self.dist.rank, len(data), self.dist.world_size))
        loader = DataLoader(Subset(data, idx), batch_size=max(self.config.batch_size, 64),
                            collate_fn=_collate, num_workers=self.workers)
        clusters = None
        if self.gate is not None:
            clusters = class_clusters(self.gate.matrix().detach().float(),
                                      self.config.gate_threshold).to(self.device)
        counts = torch.zeros(4, dtype=torch.float64)
        # validation in the precision the explanations use: float32 on CPU, where bfloat16 could
        # flip near-tied predictions; CUDA keeps its float16 autocast
        autocast = training_autocast(self.device, self.config.amp and self.device.type == "cuda")
        for x, y in loader:
            x = self._input(x)
            y = y.to(self.device)
            with autocast:
                a, *extras = self.net.body(x)
                logits = self.net.tail(a, *extras).float()
                pred = logits.argmax(1)
                c1 = (pred == y).sum()
                c2 = c3 = torch.zeros((), device=self.device)
                if clusters is not None:
                    m2 = clusters[pred].float()
                    m3 = (~clusters[y]).float()
                    c2 = (self.net.tail(apply_mask(a, m2), *extras).argmax(1) == y).sum()
                    c3 = (self.net.tail(apply_mask(a, m3), *extras).argmax(1) == y).sum()
            counts += torch.stack([c1.double().cpu(), c2.double().cpu(), c3.double().cpu(),
                                   torch.tensor(float(len(y)), dtype=torch.float64)])
        counts = self._all_reduce(counts)
        n = max(float(counts[3]), 1.0)
        nan = float("nan")
        return {"val_acc1": float(counts[0]) / n,
                "val_acc2": float(counts[1]) / n if clusters is not None else nan,
                "val_acc3": float(counts[2]) / n if clusters is not None else nan}

    def _gate_stats(self) -> dict:
        nan = float("nan")
        if self.gate is None:
            return {"gate_density": nan, "gate_l1_density": nan, "gate_peakedness": nan,
                    "delta": nan}
        delta = getattr(self.gate, "delta", None)
        return {"gate_density": self.gate.density(), "gate_l1_density": self.gate.l1_density(),
                "gate_peakedness": self.gate.peakedness(),
                "delta": float(delta) if delta is not None else nan}

    def _check_gate_consistent(self) -> None:
        """Under torch.distributed: every rank must hold the same gate (all_gather + compare)."""
        if not self.dist.enabled or self.gate is None:
            return
        import torch.distributed as td

        m = self.gate.matrix().detach().float().contiguous()
        got = [torch.empty_like(m) for _ in range(self.dist.world_size)]
        td.all_gather(got, m)
        if not all(torch.equal(got[0], g) for g in got[1:]):
            raise CnnexplainError("the gate matrices of the ranks diverged",
                                  "report this; re-run with a single process meanwhile")

    # -- the loop -----------------------------------------------------------------------------
    def run(self, progress=None, stop_after: int | None = None) -> TrainResult:
        """Train from the start (or the resumed epoch) to ``config.epochs``; after every epoch
        write ``checkpoint.pt`` (and ``best.pt`` when validation ACC1 improved) and
        ``train_log.csv`` atomically (rank 0). ``stop_after``: return after that many epochs in
        total (tests use it to emulate a killed run)."""
        from cnnexplain.progress import silent

        progress = progress or silent()
        c = self.config
        start = 0
        best = {"epoch": 0, "val_acc1": None}
        if self.resume_state is not None and "epoch" in self.resume_state:
            start = int(self.resume_state["epoch"])
            best = dict(self.resume_state.get("best") or best)
            if self.resume_state.get("rng"):
                set_rng_state(self.resume_state["rng"])
        else:
            torch.manual_seed(derive_seed(c.seed, "train-rng"))
            np.random.seed(derive_seed(c.seed, "numpy") % (2 ** 32))
            random.seed(derive_seed(c.seed, "python"))
        end = c.epochs if stop_after is None else min(c.epochs, stop_after)
        layout = RunLayout(self.out)
        ckpt_path, best_path, log_path = layout.checkpoint, layout.best, layout.train_log
        with progress(total=c.epochs, description=f"train-gated {c.method}") as outer:
            outer.advance(start)
            for epoch in range(start, end):
                t0 = time.perf_counter()
                with progress(total=self.steps_per_epoch, description=f"epoch {epoch + 1}") as task:
                    row = self._train_epoch(epoch, task)
                row.update(self.evaluate(self.val_data))
                row.update(self._gate_stats())
                self._check_gate_consistent()
                row = {"epoch": epoch + 1, **row, "epoch_time_s": time.perf_counter() - t0}
                row = {k: (float(row[k]) if k != "epoch" else int(row[k])) for k in LOG_COLUMNS}
                self.log.append(row)
                improved = best["val_acc1"] is None or (
                    math.isfinite(row["val_acc1"]) and row["val_acc1"] > best["val_acc1"])
                if self.val_data is None:
                    improved = True
                if improved:
                    best = {"epoch": epoch + 1,
                            "val_acc1": row["val_acc1"] if math.isfinite(row["val_acc1"]) else None}
                if self.dist.is_main:
                    self._write(epoch + 1, best, improved, ckpt_path, best_path, log_path)
                if self.dist.enabled:
                    import torch.distributed as td

                    td.barrier()
                outer.advance(1)
                outer.update(loss=row["loss"], acc=row["train_acc1"],
                             val=row["val_acc1"] if math.isfinite(row["val_acc1"]) else "-")
        return TrainResult(model=self.model, gate=self.gate, layer=self.layer, log=self.log,
                           best_epoch=int(best["epoch"]), best_val_acc1=best["val_acc1"],
                           checkpoint=ckpt_path, best=best_path, log_path=log_path,
                           meta=self.meta(), resumed_from=start, stopped_early=end < c.epochs)

    def _write(self, epoch: int, best: dict, improved: bool, ckpt_path: Path, best_path: Path,
               log_path: Path) -> None:
        import pandas as pd

        from cnnexplain.io import write_csv

        meta = self.meta()
        meta["epoch"] = epoch
        state = {k: v for k, v in self.model.state_dict().items()}
        gate = self._gate_tensors()
        if improved:
            save_checkpoint(best_path, Checkpoint(meta={**meta, "selected": "best val ACC1"},
                                                  state_dict=state, gate=gate))
        save_checkpoint(ckpt_path, Checkpoint(meta=meta, state_dict=state, gate=gate,
                                              train_state=self._train_state(epoch, best)))
        write_csv(log_path, pd.DataFrame(self.log, columns=LOG_COLUMNS))


def _check_resume(config: TrainConfig, recorded: dict) -> None:
    """``resume`` continues only the run the checkpoint belongs to: every option that changes
    the math must be the same."""
    now = config.to_dict()
    for key, value in recorded.items():
        if key in RESUME_IGNORED or key not in now:
            continue
        if key == "num_classes" and not now[key]:
            continue
        if now[key] != value:
            raise UsageError(f"`resume`: `{key}` {now[key]!r} differs from the checkpoint's "
                             f"{value!r}", f"resume with the options the run was started with "
                             f"(`{key}={value}`)")


def gate_cache_parts(model_fingerprint: str, layer: str, method: str, config: dict) -> dict:
    """Cache key parts of a trained gate (kind ``gate``)."""
    return {"model": model_fingerprint, "layer": layer, "method": method, "source": "train-gated",
            "training": {k: v for k, v in config.items() if k not in RESUME_IGNORED}}
