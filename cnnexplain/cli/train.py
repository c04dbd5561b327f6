"""``cnnexplain train-gated``: train a CNN whose target-layer channels each serve a few classes
(CDCNN, seed 000; PICNN, seed 004), or the plain baseline on the same architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import preprocessing_for, start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError

METHOD = "Method"
TRAINING = "Training"

HELP = """Train a CNN in which each channel of a late conv layer serves a few classes only.

[bold]Methods[/] (--method):
[bold]std[/]: plain cross-entropy on the same architecture (the baseline).
[bold]cdcnn-r1p2[/] (seed 000, algorithm 1): gate W in [0,1]^(K x C) at the layer; the gated
pathway re-runs the tail on W[:, y] * A; loss CE + λ1·CE_W + λ2·||W||_(1,2); after each step every
channel's row is divided by its max and clipped to [0,1].
[bold]cdcnn-r1p1[/] (algorithm 2): W = σ(Ω/δ), Ω rows rescaled to [-1,1] after each step, δ
annealed from --delta-start down to --delta-end so W tends to {0,1}.
[bold]cdcnn-r0p1[/] (algorithm 3): W_k = softmax(Ω_k/δ) over classes, annealed to one-hot rows
(each channel serves exactly one class); loss CE + λ1·CE_W.
[bold]picnn[/] (seed 004): P = softmax over classes per filter; the gated pathway keeps the filters
of a Bernoulli mask z ~ Ber(P[ỹ]) (eq. 5-6) for a pseudo-label ỹ drawn from the model's own
prediction (eq. 8-9); loss L_dis + λ·L_int (see --gate-samples).

[bold]Label leakage[/]: a mask chosen by the true label lets the gated pathway read the label off
the mask instead of the image. picnn draws its mask row from a pseudo-label sampled from the
model's own prediction, never from y; by default only samples whose pseudo-label is right count
(the reference code), --gate-samples all counts every sample (seed 004's L_int), so a wrong mask
row must still lead to y. cdcnn-* follow seed 000 and gate with the true label (in training
only) inside the joint loss; --gate-label pseudo gives them PICNN's remedy. train_log.csv
measures the shortcut: gated_follows_mask is the share of samples whose gated prediction is the
class of their mask row; near 1.0 (above pseudo_match) the gated answer is set by which channels
the mask keeps, not by the image. --lambda-neg adds a wrong-mask term (not in the seeds): the
tail also runs on the maps masked by another class c's row and must then give no answer (KL from
uniform), so c's channels must carry no class evidence on other classes' images and the mask
pattern alone cannot decide. On the synthetic world the seeds' settings leave MIS at std's
level; picnn --lambda-neg 1 and cdcnn-r1p2 --gate-label pseudo --lambda-neg 1 raise it by more
than 0.03 nats with ACC3 well below ACC1 (README, "Gated training: what the known-answer experiment
measures"). --gated-tail frozen keeps the gated loss off the layers after the gate. The full
pathway, trained on the same step without any mask, cannot use the shortcut, so ACC1 stays close
to std's.

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


@app.command("train-gated", help=HELP)
def train_gated(
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone name (see `cnnexplain backbones`).",
                                          rich_help_panel=O.MODEL)] = "resnet18",
    num_classes: O.NumClasses = None,
    weights: O.Weights = None,
    layer: O.Layer = None,
    insert_conv: Annotated[Optional[int], typer.Option(
        "--insert-conv", min=1, help="Insert a new N-filter 3x3 conv after --layer and gate it "
        "(PICNN's setup; the paper uses 12.8 filters per class).", rich_help_panel=O.MODEL,
        show_default=False)] = None,
    dataset: O.Dataset = "synthetic",
    resize: O.Resize = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, help="Use only the first N images of the train and of the val split.",
        rich_help_panel=O.DATA, show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step (global "
                                            "batch under torchrun).", rich_help_panel=O.DATA)] = 64,
    workers: O.Workers = 0,
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", help="Share of the training images held out for validation where the "
        "dataset has no val split.", rich_help_panel=O.DATA)] = 0.1,
    augment: Annotated[str, typer.Option(
        "--augment", help="Training augmentation: none, flip (horizontal, p = 1/2) or flip-crop "
        "(also random crops of the image zero-padded by 1/8 of its side).",
        rich_help_panel=O.DATA)] = "none",
    method: Annotated[str, typer.Option(
        "--method", help="std, cdcnn-r1p2, cdcnn-r1p1, cdcnn-r0p1 or picnn (see above).",
        rich_help_panel=METHOD)] = "picnn",
    lambda1: Annotated[float, typer.Option(
        "--lambda1", help="cdcnn-*: weight λ1 of the gated cross-entropy CE(y, ŷ_W).",
        rich_help_panel=METHOD)] = 1.0,
    lambda2: Annotated[float, typer.Option(
        "--lambda2", help="cdcnn-r1p2 / r1p1: weight λ2 of the sparsity term ||W||_(1,2).",
        rich_help_panel=METHOD)] = 0.05,
    lam: Annotated[float, typer.Option(
        "--lambda", help="picnn: weight λ of L_int (seed 004: 2).", rich_help_panel=METHOD)] = 2.0,
    lambda_neg: Annotated[float, typer.Option(
        "--lambda-neg", help="Weight of the wrong-mask term (not in the seeds; 0 = off, the "
        "seeds' loss): the tail also runs on the maps masked by the row of a class c other than y "
        "(drawn uniformly) and is pulled towards no answer, KL(uniform || p), so c's channels "
        "must carry no class evidence on other classes' images. One more run of the layers after "
        "the gate per step.",
        rich_help_panel=METHOD)] = 0.0,
    delta_start: Annotated[float, typer.Option(
        "--delta-start", help="cdcnn-r1p1 / r0p1: initial temperature δ.", rich_help_panel=METHOD)] = 1.0,
    delta_end: Annotated[float, typer.Option(
        "--delta-end", help="cdcnn-r1p1 / r0p1: final δ (geometric annealing over the gated steps).",
        rich_help_panel=METHOD)] = 0.05,
    gate_lr: Annotated[float, typer.Option(
        "--gate-lr", help="Learning rate of the gate's own Adam optimizer (W, Ω or P's logits).",
        rich_help_panel=METHOD)] = 0.05,
    gate_temperature: Annotated[float, typer.Option(
        "--gate-temperature", help="picnn: temperature T of P = softmax(Θ/T) over classes.",
        rich_help_panel=METHOD)] = 1.0,
    gate_threshold: Annotated[float, typer.Option(
        "--gate-threshold", help="Membership above which a channel is in a class's cluster "
        "(recorded in the checkpoint; used for validation ACC2/ACC3).", rich_help_panel=METHOD)] = 0.5,
    gate_label: Annotated[str, typer.Option(
        "--gate-label", help="cdcnn-*: gate by the true label (seed 000) or by a pseudo-label "
        "drawn from the prediction (seed 004's remedy against label leakage).",
        rich_help_panel=METHOD)] = "true",
    gate_samples: Annotated[str, typer.Option(
        "--gate-samples", help="With pseudo-labels (picnn, --gate-label pseudo): which samples "
        "count in the gated loss: matched (pseudo-label == label, the reference code) or all "
        "(seed 004's L_int; a wrong mask row must still lead to y, so the mask pattern cannot "
        "leak the answer).", rich_help_panel=METHOD)] = "matched",
    gated_tail: Annotated[str, typer.Option(
        "--gated-tail", help="shared: the gated loss also trains the layers after the gate (the "
        "seeds); frozen: it trains only the layers up to the gate and the gate, so the tail cannot "
        "learn to read the mask pattern.", rich_help_panel=METHOD)] = "shared",
    gate_warmup: Annotated[int, typer.Option(
        "--gate-warmup", min=0, help="Epochs of plain training before the gated pathway starts.",
        rich_help_panel=METHOD)] = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.",
                                        rich_help_panel=TRAINING)] = 10,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adam (the network's).",
                                           rich_help_panel=TRAINING)] = "adam",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of the network.",
                                      rich_help_panel=TRAINING)] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.",
                                            rich_help_panel=TRAINING)] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay of the network.",
                                                rich_help_panel=TRAINING)] = 1e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine (to 0.001 x lr, per step) "
                                          "or constant; applies to --lr and --gate-lr.",
                                          rich_help_panel=TRAINING)] = "cosine",
    grad_clip: Annotated[Optional[float], typer.Option(
        "--grad-clip", help="Clip the global gradient norm to this value.",
        rich_help_panel=TRAINING, show_default=False)] = None,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (float16 autocast + loss "
                                      "scaling) on CUDA; ignored with a notice on CPU.",
                                      rich_help_panel=TRAINING)] = False,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last", help="channels_last memory format on CUDA.",
        rich_help_panel=TRAINING)] = True,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its last checkpoint (same options); "
        "ends with the same result as an uninterrupted run.", rich_help_panel=TRAINING)] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over in an --out that already holds a checkpoint.",
        rich_help_panel=TRAINING)] = False,
    out: O.Out = None, device: O.Device = "auto", seed: O.Seed = 0, quiet: O.Quiet = False,
    json_output: O.Json = False, recipe: O.Recipe = None, cache_dir: O.CacheDir = None,
    no_cache: O.NoCache = False,
):
    values = dict(locals())
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.models.gates import METHODS
    from cnnexplain.training import TrainConfig, Trainer

    if method not in METHODS:
        from cnnexplain.errors import close_matches

        raise UsageError(f"unknown --method {method!r}{close_matches(method, METHODS)}",
                         f"choose one of: {', '.join(METHODS)}")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other",
                         "pass --resume to continue the run, or --overwrite to start over")
    config = TrainConfig(
        backbone=backbone, num_classes=num_classes or 0, layer=layer or "", insert_conv=insert_conv,
        weights=weights, method=method, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        schedule=schedule, grad_clip=grad_clip, gate_lr=gate_lr, lambda1=lambda1,
        lambda2=lambda2, lam=lam, lambda_neg=lambda_neg, delta_start=delta_start, delta_end=delta_end,
        gate_temperature=gate_temperature, gate_threshold=gate_threshold, gate_label=gate_label,
        gate_samples=gate_samples, gated_tail=gated_tail,
        gate_warmup=gate_warmup, val_fraction=val_fraction, augment=augment, seed=seed, amp=amp,
        channels_last=channels_last)
    config.validate()
    run = start_run("train-gated", values)
    try:
        return _train(run, config, dataset, limit, workers, resume, overwrite, open_dataset, Trainer)
    finally:
        from cnnexplain.runtime import shutdown_distributed

        shutdown_distributed()


def _check_cache_writable(run) -> None:
    """Fail before training (not after) when the cache cannot be written."""
    if getattr(run.opts, "no_cache", False):
        return
    root = run.cache.root
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"the cache directory {root} is not writable",
                         "pass --cache-dir with a writable directory, set CNNEXPLAIN_CACHE, or "
                         "use --no-cache")


def _train(run, config, dataset_spec, limit, workers, resume, overwrite, open_dataset, Trainer):
    from cnnexplain.models.gates import class_clusters
    from cnnexplain.models.loading import model_fingerprint
    from cnnexplain.training import gate_cache_parts, save_gate_heatmap

    prep = preprocessing_for(run)
    train = open_dataset(dataset_spec, "train", prep, limit=limit, seed=run.seed,
                         val_fraction=config.val_fraction)
    val = open_dataset(dataset_spec, "val", prep, limit=limit, seed=run.seed,
                       val_fraction=config.val_fraction)
    class_names = list(train.class_names)
    _check_cache_writable(run)
    data_info = {"spec": getattr(train, "spec", dataset_spec), "fingerprint": train.fingerprint(),
                 "val_fingerprint": val.fingerprint(), "classes": class_names}
    trainer = Trainer.prepare(config, train, val, class_names=class_names, preprocessing=prep,
                              device=run.device, dist=run.dist, out=run.out, resume=resume,
                              overwrite=overwrite, workers=workers, data_info=data_info,
                              notice=run.notice)
    result = trainer.run(progress=run.progress)
    results = [result.checkpoint, result.best, result.log_path]
    gate_info: dict = {}
    if run.dist.is_main and result.gate is not None:
        tensors = result.gate.state_tensors()
        matrix = result.gate.matrix().detach().float().cpu()
        png = save_gate_heatmap(matrix, class_names, run.out / "gate.png",
                                title=f"{config.method} gate at {result.layer} "
                                      f"({matrix.shape[0]} channels x {matrix.shape[1]} classes)")
        results.append(png)
        fp = model_fingerprint(result.model, tensors, {"backbone": config.backbone,
                                                       "insert_conv": config.insert_conv})
        parts = gate_cache_parts(fp, result.layer, config.method, config.to_dict())
        key = run.cache.key("gate", **parts)
        key_name = "W" if "W" in tensors else "P"
        arrays = {key_name: tensors[key_name].numpy()}
        clusters = class_clusters(matrix, config.gate_threshold)
        arrays["clusters"] = clusters.numpy().astype("uint8")
        if run.cache.enabled:
            run.cache.save("gate", key, arrays, attrs={
                "description": f"gate matrix of a {config.method} model trained by train-gated",
                "method": config.method, "layer": result.layer, "classes": class_names,
                "threshold": config.gate_threshold, "checkpoint": str(result.checkpoint)},
                dataset_attrs={key_name: {"description": "W: channel-class membership" if key_name == "W"
                                          else "P: class-filter correspondence",
                                          "shape": "K x C" if key_name == "W" else "C x K",
                                          "units": "membership in [0, 1]"},
                               "clusters": {"description": "class clusters (membership > threshold)",
                                            "shape": "C x K", "units": "0/1"}})
        gate_info = {"cache_key": key if run.cache.enabled else None,
                     "channels_per_class": clusters.sum(1).tolist()}
    last = result.last
    summary = {"method": config.method, "backbone": config.backbone, "layer": result.layer,
               "epochs": config.epochs, "resumed_from_epoch": result.resumed_from,
               "best_epoch": result.best_epoch, "best_val_acc1": result.best_val_acc1,
               **{k: last.get(k) for k in ("train_acc1", "train_gated_acc", "val_acc1", "val_acc2",
                                           "val_acc3", "gate_density", "gate_peakedness", "loss")},
               "checkpoint": str(result.checkpoint), "best": str(result.best), **gate_info}
    if run.dist.is_main:
        table = Table(title=f"train-gated {config.method} ({config.backbone} at {result.layer})")
        table.add_column("epoch", justify="right")
        for col in ("loss", "train acc1", "gated acc", "val acc1", "val acc2", "val acc3",
                    "density", "peaked", "time s"):
            table.add_column(col, justify="right")
        for r in result.log:
            table.add_row(str(r["epoch"]), *[_fmt(r[k]) for k in (
                "loss", "train_acc1", "train_gated_acc", "val_acc1", "val_acc2", "val_acc3",
                "gate_density", "gate_peakedness", "epoch_time_s")])
        run.print(table)
    run.finish(summary=summary, model={"backbone": config.backbone, "layer": result.layer,
                                       "method": config.method, "insert_conv": config.insert_conv,
                                       "num_classes": config.num_classes},
               data=train, results=[Path(p) for p in results])
    return 0


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
