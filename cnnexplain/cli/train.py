"""``cnnexplain train-gated``: options, one job, the per-epoch table."""

from __future__ import annotations

from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, printer
from cnnexplain.cli.main import app
from cnnexplain.config.train import TrainOptions

HELP = """Train a CNN in which each channel of a late conv layer serves a few classes only
(PICNN, Guo et al. 2024; CDCNN, Liang), or the plain baseline on the same architecture.

Example: cnnexplain train-gated --backbone resnet18 --method picnn --out runs/picnn

Writes checkpoint.pt (resumable), best.pt (best validation ACC1), train_log.csv, gate.png and
run.json in --out. --help-methods explains the methods, label leakage and gate collapse;
torchrun --nproc_per_node=N -m cnnexplain train-gated ... trains on N processes."""

METHODS = """[bold]Methods[/] (--method):
[bold]std[/]: plain cross-entropy on the same architecture (the baseline).
[bold]cdcnn-r1p2[/] (Liang, CDCNN, algorithm 1): gate W in [0,1]^(K x C) at the layer; the gated
pathway re-runs the tail on W[:, y] * A; loss CE + λ1·CE_W + λ2·||W||_(1,2); after each step every
channel's row is divided by its max and clipped to [0,1].
[bold]cdcnn-r1p1[/] (algorithm 2): W = σ(Ω/δ), Ω rows rescaled to [-1,1] after each step, δ
annealed from --delta-start down to --delta-end so W tends to {0,1}.
[bold]cdcnn-r0p1[/] (algorithm 3): W_k = softmax(Ω_k/δ) over classes, annealed to one-hot rows
(each channel serves exactly one class); loss CE + λ1·CE_W.
[bold]picnn[/] (Guo et al. 2024): P = softmax over classes per filter; the gated pathway keeps the filters
of a Bernoulli mask z ~ Ber(P[ỹ]) (eq. 5-6) for a pseudo-label ỹ drawn from the model's own
prediction (eq. 8-9); loss L_dis + λ·L_int (see --gate-samples).

[bold]Label leakage[/]: a mask chosen by the true label lets the gated pathway read the label off
the mask instead of the image. picnn draws its mask row from a pseudo-label sampled from the
model's own prediction, never from y; by default only samples whose pseudo-label is right count
(the reference code), --gate-samples all counts every sample (Guo et al. 2024's L_int), so a wrong mask
row must still lead to y. cdcnn-* follow Liang, CDCNN and gate with the true label (in training
only) inside the joint loss; --gate-label pseudo gives them PICNN's remedy. train_log.csv
measures the shortcut: gated_follows_mask is the share of samples whose gated prediction is the
class of their mask row; near 1.0 (above pseudo_match) the gated answer is set by which channels
the mask keeps, not by the image.

[bold]Presets[/] (--preset): paper is the papers' exact losses (Liang's CDCNN with true-label
gates, Guo et al. 2024's L_dis + λ·L_int), gates trained from the first epoch. default (the
default) adds four remedies, each one flag away: --lambda-neg 1, a wrong-mask term (not in the
papers): the tail also runs on the maps masked by another class c's row and must then give no
answer (KL from uniform), so the mask pattern alone cannot decide; --lambda-comp 1, a
complement term (not in the papers): the tail runs on every channel but the true class's cluster
and must give no answer either, so removing a class's cluster removes the class (what ACC3
measures); --gate-label pseudo for cdcnn-* (PICNN's remedy against leakage); --gate-warmup
epochs//2, plain training for the first half so that the gate starts on learned features. On
the default synthetic world picnn's defaults keep ACC1 at std's, raise MIS by more than 0.05
nats and bring ACC3 below half of std's, where the paper preset does not (README, "Gated
training"). --gated-tail frozen keeps the gated loss off the layers after the gate. The full
pathway, trained on the same step without any mask, cannot use the shortcut.

[bold]Gate collapse[/]: a constant gate under max-normalization stays all-ones, and P trained at
lr 1e-3 stays uniform (random "clusters"). Here W / Ω start random, the gate has its own Adam
optimizer with a larger --gate-lr, r1p2 / r1p1 have the λ2 sparsity term, r1p1 / r0p1 anneal δ, and
train_log.csv reports gate_density and gate_peakedness (1/C: uniform, 1: one class per channel)
every epoch.

Outputs in --out: checkpoint.pt (last epoch, with the training state for --resume), best.pt (best
validation ACC1; evaluate-entanglement accepts either), train_log.csv, gate.png, run.json; the
gate matrix is also stored in the HDF5 cache. Validation uses the dataset's val split (carved
from train with --val-fraction where it has none); the test split is never used.
Distributed: torchrun --nproc_per_node=N -m cnnexplain train-gated ... (gloo on CPU, nccl on
CUDA; --batch-size is the global batch)."""


def train_gated(options: TrainOptions):
    from cnnexplain.jobs import train as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    result, config = output.result, output.plan.options.config
    table = Table(title=f"train-gated {config.method} ({config.backbone}, {config.stem} stem, "
                        f"at {result.layer})")
    table.add_column("epoch", justify="right")
    for col in ("loss", "train acc1", "gated acc", "val acc1", "val acc2", "val acc3",
                "density", "peaked", "time s"):
        table.add_column(col, justify="right")
    for r in result.log:
        table.add_row(str(r["epoch"]), *[_fmt(r[k]) for k in (
            "loss", "train_acc1", "train_gated_acc", "val_acc1", "val_acc2", "val_acc3",
            "gate_density", "gate_peakedness", "epoch_time_s")])
    term.print(table)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


command(app, "train-gated", TrainOptions, train_gated, help=HELP,
        extra=[eager_flag("help_methods", "--help-methods",
                          "Explain the methods, label leakage and gate collapse, and exit.")],
        eager={"help_methods": printer(METHODS)})
