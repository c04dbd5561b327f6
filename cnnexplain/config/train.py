"""``train-gated``'s options: :class:`TrainConfig` (everything that changes the trained weights,
recorded in the checkpoint) and :class:`TrainOptions` (the command: config, data, run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from cnnexplain.config.common import (DATA, MODEL, STEM_CHOICES, STEM_HELP, ComputeOptions,
                                      FileOptions, PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option
from cnnexplain.errors import UsageError

METHOD = "Method"
TRAINING = "Training"

METHODS = ("std", "cdcnn-r1p2", "cdcnn-r1p1", "cdcnn-r0p1", "picnn")
"""``std`` (the baseline), CDCNN's three update algorithms (Liang, CDCNN) and PICNN (Guo et al. 2024); the
gates themselves are registered in :data:`cnnexplain.models.gates.GATES`."""
LABEL_SOURCES = ("true", "pseudo")
"""Which class row a cdcnn-* gate uses in training: the label (Liang, CDCNN) or a pseudo-label."""
SAMPLES = ("matched", "all")
"""Which samples count in the gated loss under pseudo-labels."""
GATED_TAILS = ("shared", "frozen")
"""Whether the gated pathway's loss trains the tail (``shared``) or not (``frozen``)."""
SAMPLINGS = ("bernoulli", "gumbel")
"""How picnn draws its Bernoulli masks: seed 004's reparameterization (eq. 5-6) or the
Gumbel-softmax relaxation it compares with."""
AUGMENTATIONS = ("auto", "none", "flip", "flip-crop", "dihedral")
"""Training-time augmentation: horizontal flips with probability 1/2; flip-crop adds random
crops of the image padded by 1/8 of its side with zeros (the usual CIFAR recipe); dihedral adds
random quarter turns (the eight symmetries of the square: for data whose classes they keep, as
the synthetic world's shapes); auto: the dataset's own (the synthetic world: dihedral; CIFAR,
STL-10: flip-crop; anything else: none, since a flip can change a digit or a letter)."""
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("stable-decay", "cosine", "constant")
PRESETS = {
    "default": {"lambda_neg": 1.0, "lambda_comp": 1.0, "gate_label": "pseudo",
                "gate_warmup": "half"},
    "paper": {"lambda_neg": 0.0, "lambda_comp": 0.0, "gate_label": "true", "gate_warmup": 0},
}
"""Loss presets: ``paper`` is the seeds' exact losses (no wrong-mask or complement term, cdcnn-*
gated by the true label, gates trained from the first epoch); ``default`` adds the remedies
that make the channels class-specific (README, "Gated training"): the wrong-mask term against
label leakage, the complement term, pseudo-label gates for cdcnn-*, and plain training for the
first half of the epochs (``"half"``: ``epochs // 2``; 0 when ``weights`` start the network
trained) so that the gate starts on learned features.
Explicit ``lambda_neg`` / ``lambda_comp`` / ``gate_label`` / ``gate_warmup`` win."""
MAX_LR = 1e30
"""Largest accepted learning rate (beyond it the optimizers' float32 arithmetic overflows)."""


@dataclass
class TrainConfig:
    """Every option that changes the trained weights (recorded in the checkpoint; a resumed run
    must have the same values). The seeds' values where the seeds give one."""

    backbone: str = option("resnet18", help="Backbone name (see `cnnexplain backbones`).",
                           panel=MODEL)
    num_classes: int | None = option(None, low=1, help="Classes of the head (default: the "
                                     "dataset's).", panel=MODEL, show_default=False)
    weights: str | None = option(None, help="PATH to a torchvision state_dict or to a "
                                 "cnnexplain checkpoint (its network's weights: gated training "
                                 "of a trained std model), or 'imagenet' (torchvision's weights "
                                 "from the local torch hub cache). Default: random init.",
                                 panel=MODEL, show_default=False)
    stem: str = option("auto", choices=STEM_CHOICES, help=STEM_HELP, panel=MODEL)
    layer: str | None = option(None, help="Dotted module name of the gated layer, e.g. layer4 "
                               "(see `cnnexplain layers`). Default: the backbone's last conv "
                               "block.", panel=MODEL, show_default=False)
    insert_conv: int | None = option(None, low=1, help="Insert a new N-filter 3x3 conv after "
                                     "`layer` and gate it (PICNN's setup; the paper uses 12.8 "
                                     "filters per class).", panel=MODEL, show_default=False,
                                     example=64)
    method: str = option("picnn", choices=METHODS, help="std, cdcnn-r1p2, cdcnn-r1p1, "
                         "cdcnn-r0p1 or picnn (see `help_methods`).", panel=METHOD)
    preset: str = option("default", choices=tuple(PRESETS), help="default: the remedies "
                         "for class-specific clusters (`lambda_neg` 1, `lambda_comp` 1, cdcnn-* "
                         "gated by pseudo-labels, `gate_warmup` half the epochs); paper: the "
                         "papers' exact losses (both terms 0, true-label gates, no warm-up). "
                         "Explicit values win.", panel=METHOD)
    lambda1: float = option(1.0, low=0, help="cdcnn-*: weight λ1 of the gated cross-entropy "
                            "CE(y, ŷ_W).", panel=METHOD)
    lambda2: float = option(0.05, low=0, help="cdcnn-r1p2 / r1p1: weight λ2 of the sparsity "
                            "term ||W||_(1,2).", panel=METHOD)
    lam: float = option(2.0, low=0, name="lambda", help="picnn: weight λ of L_int (Guo et al. 2024: "
                        "2).", panel=METHOD)
    lambda_neg: float | None = option(None, low=0, help="Weight of the wrong-mask term (not in "
                                      "the papers): the tail also runs on the maps masked by "
                                      "another class's row and is pulled towards no answer "
                                      "(see `help_methods`). Default: the preset's (1; paper: "
                                      "0).", panel=METHOD, example=1, show_default=False)
    lambda_comp: float | None = option(None, low=0, help="Weight of the complement term (not "
                                       "in the papers): the tail also runs on every channel but "
                                       "the true class's cluster and is pulled towards no "
                                       "answer, so that removing a class's cluster removes the "
                                       "class (ACC3). Default: the preset's (1; paper: 0).",
                                       panel=METHOD, example=1, show_default=False)
    delta_start: float = option(1.0, low=0, low_open=True, help="cdcnn-r1p1 / r0p1: initial "
                                "temperature δ.", panel=METHOD)
    delta_end: float = option(0.05, low=0, low_open=True, help="cdcnn-r1p1 / r0p1: final δ "
                              "(geometric annealing over the gated steps).", panel=METHOD)
    gate_lr: float = option(0.05, low=0, high=MAX_LR, low_open=True, help="Learning rate of the "
                            "gate's own Adam optimizer (W, Ω or P's logits).", panel=METHOD)
    gate_temperature: float = option(1.0, low=0, low_open=True, help="picnn: temperature T of "
                                     "P = softmax(Θ/T) over classes.", panel=METHOD)
    gate_sampling: str = option("bernoulli", choices=SAMPLINGS, help="picnn: Bernoulli masks "
                                "by Guo et al. 2024's reparameterization (bernoulli) or by the "
                                "Gumbel-softmax relaxation (gumbel; Jang et al. 2017).",
                                panel=METHOD)
    gumbel_temperature: float = option(0.5, low=0, low_open=True, help="picnn with "
                                       "`gate_sampling` gumbel: temperature of the relaxation.",
                                       panel=METHOD)
    gate_threshold: float = option(0.5, low=0, high=1, low_open=True, high_open=True,
                                   help="Membership above which a channel is in a class's "
                                   "cluster (recorded in the checkpoint; used for validation "
                                   "ACC2/ACC3).", panel=METHOD)
    gate_label: str | None = option(None, choices=LABEL_SOURCES, help="cdcnn-*: gate by the "
                                    "true label (Liang, CDCNN) or by a pseudo-label drawn from "
                                    "the prediction (Guo et al. 2024's remedy against label "
                                    "leakage). Default: the preset's (pseudo; paper: true).",
                                    panel=METHOD, show_default=False)
    gate_samples: str = option("matched", choices=SAMPLES, help="With pseudo-labels: which "
                               "samples count in the gated loss: matched (pseudo-label == label, "
                               "the reference code) or all (Guo et al. 2024's L_int).", panel=METHOD)
    gated_tail: str = option("shared", choices=GATED_TAILS, help="shared: the gated loss also "
                             "trains the layers after the gate (the papers); frozen: only the "
                             "layers up to the gate and the gate.", panel=METHOD)
    gate_warmup: int | None = option(None, low=0, help="Epochs of plain training before the "
                                     "gated pathway starts. Default: the preset's (half the "
                                     "epochs, rounded down, or 0 from `weights`; paper: 0).",
                                     panel=METHOD, example=5, show_default=False)
    epochs: int = option(10, low=1, help="Training epochs.", panel=TRAINING)
    batch_size: int = option(64, low=1, help="Images per step (global batch under torchrun).",
                             panel=DATA)
    val_fraction: float = option(0.1, low=0, high=1, low_open=True, high_open=True,
                                 help="Share of the training images held out for validation "
                                 "where the dataset has no val split.", panel=DATA)
    augment: str = option("auto", choices=AUGMENTATIONS, help="Training augmentation: none, "
                          "flip (horizontal, p = 1/2), flip-crop (also random crops of the "
                          "image zero-padded by 1/8 of its side), dihedral (flips and quarter "
                          "turns), or auto: the dataset's own (synthetic world: dihedral; "
                          "CIFAR, STL-10: flip-crop; else none).", panel=DATA)
    optimizer: str = option("adam", choices=OPTIMIZERS, help="sgd or adam (the network's).",
                            panel=TRAINING)
    lr: float = option(1e-3, low=0, high=MAX_LR, low_open=True, help="Learning rate of the "
                       "network.", panel=TRAINING)
    momentum: float = option(0.9, low=0, high=1, high_open=True, help="SGD momentum.",
                             panel=TRAINING)
    weight_decay: float = option(1e-4, low=0, help="L2 weight decay of the network.",
                                 panel=TRAINING)
    schedule: str = option("stable-decay", choices=SCHEDULES, help="stable-decay (constant, "
                           "then a cosine to 0.001 x lr over the last `decay_share` of the "
                           "steps), cosine (over all steps) or constant; applies to `lr` and "
                           "`gate_lr`.", panel=TRAINING)
    decay_share: float = option(0.2, low=0, high=1, low_open=True, help="stable-decay: the "
                                "share of the steps, at the end, over which the learning rate "
                                "anneals.", panel=TRAINING)
    grad_clip: float | None = option(None, low=0, low_open=True, help="Clip the global gradient "
                                     "norm to this value.", panel=TRAINING, show_default=False,
                                     example=5)
    amp: bool = option(False, help="Mixed precision: float16 autocast with loss scaling on "
                       "CUDA, bfloat16 autocast on a CPU that supports it (ignored with a "
                       "notice elsewhere); validation and every explanation stay in float32 "
                       "on CPU.", panel=TRAINING)
    channels_last: bool = option(True, negatable=True, help="channels_last memory format on "
                                 "CUDA, and on CPU with `amp`.", panel=TRAINING)
    seed: int = option(0, cli=False, help="The run's seed (from `seed`).")
    sync_bn: bool = option(True, cli=False, help="BatchNorm over the global batch under "
                           "torchrun.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "TrainConfig":
        """Usage errors for impossible values (before anything is built or written)."""
        check(self)
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:  # std has no gate: no gated terms, no warmup
                if self.method == "std" and name.startswith(("lambda", "gate_warmup")):
                    value = 0.0 if name.startswith("lambda") else 0
                elif value == "half":  # no warm-up for a network that starts trained
                    value = 0 if self.weights is not None else self.epochs // 2
                setattr(self, name, value)
        if not (0 <= self.gate_warmup < self.epochs or self.method == "std"):
            raise UsageError(f"`gate_warmup` {self.gate_warmup} must be less than `epochs` "
                             f"{self.epochs}", "lower `gate_warmup` or raise `epochs`")
        return self

    def gate_hparams(self) -> dict:
        return {"delta_start": self.delta_start, "delta_end": self.delta_end,
                "temperature": self.gate_temperature, "threshold": self.gate_threshold,
                "label_source": self.gate_label, "samples": self.gate_samples,
                "sampling": self.gate_sampling, "gumbel_temperature": self.gumbel_temperature}


@dataclass
class TrainData:
    """The data train-gated reads (its val split is carved with ``val_fraction`` where the
    dataset has none)."""

    dataset: str = option("synthetic", help="synthetic[:opts], cifar10:ROOT, cifar100:ROOT, "
                          "stl10:ROOT, imagefolder:ROOT or broden:ROOT.", panel=DATA)
    limit: int | None = option(None, low=1, help="Use only the first N images of the train and "
                               "of the val split.", panel=DATA, show_default=False)
    workers: int = option(0, low=0, help="DataLoader worker processes.", panel=DATA)


@dataclass
class TrainOptions:
    """``cnnexplain train-gated``."""

    config: TrainConfig = group(TrainConfig)
    data: TrainData = group(TrainData)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    resume: bool = option(False, help="Continue the run in `out` from its last checkpoint (same "
                          "options); ends with the same result as an uninterrupted run.",
                          panel=TRAINING)
    overwrite: bool = option(False, help="Start over in an `out` that already holds a "
                             "checkpoint.", panel=TRAINING)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def validate(self) -> "TrainOptions":
        check(self)
        self.config.seed = self.compute.seed
        self.config.validate()
        if self.resume and self.overwrite:
            raise UsageError("`resume` and `overwrite` exclude each other",
                             "pass `resume=true` to continue the run, or `overwrite=true` to "
                             "start over")
        return self
