"""``train-gated``: train a CNN whose target-layer channels each serve a few classes (CDCNN,
Liang's CDCNN report; PICNN, Guo et al. 2024), or the plain baseline on the same architecture."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cnnexplain.config.train import TrainOptions
from cnnexplain.errors import UsageError
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.resolve import file_policy, preprocessing

COMMAND = "train-gated"


@dataclass
class Plan:
    options: TrainOptions
    trainer: object
    train_data: object


def check_cache_writable(session: Session) -> None:
    """Fail before training (not after) when the cache cannot be written."""
    if not session.use_cache:
        return
    root = session.cache.root
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"the cache directory {root} is not writable",
                         "pass `cache_dir` with a writable directory, set CNNEXPLAIN_CACHE, or "
                         "use `no_cache=true`")


def plan(options: TrainOptions, session: Session) -> Plan:
    """Open the train and val splits and build the model, gate and optimizers (nothing is
    written; a resumed run is checked against its checkpoint)."""
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.training.loop import Trainer

    config, data = options.config, options.data
    prep = preprocessing(options.prep)
    files = file_policy(options.files)
    train = open_dataset(data.dataset, "train", prep, limit=data.limit, seed=session.seed,
                         val_fraction=config.val_fraction, files=files)
    val = open_dataset(data.dataset, "val", prep, limit=data.limit, seed=session.seed,
                       val_fraction=config.val_fraction, files=files)
    class_names = list(train.class_names)
    check_cache_writable(session)
    data_info = {"spec": getattr(train, "spec", data.dataset), "fingerprint": train.fingerprint(),
                 "val_fingerprint": val.fingerprint(), "classes": class_names}
    trainer = Trainer.prepare(config, train, val, class_names=class_names, preprocessing=prep,
                              device=session.device, dist=session.dist, out=session.out,
                              resume=options.resume, overwrite=options.overwrite,
                              workers=data.workers, data_info=data_info, notice=session.notice)
    return Plan(options, trainer, train)


def run(plan: Plan, session: Session):
    """Train; checkpoints and train_log.csv are written atomically after every epoch (the
    resumable state a killed run continues from)."""
    return plan.trainer.run(progress=session.progress)


def write(plan: Plan, result, session: Session) -> Output:
    """gate.png and the gate's cache entry; the summary."""
    from cnnexplain.report.plots import save_gate_heatmap
    from cnnexplain.training.gate_entry import cache_gate

    config = plan.options.config
    trainer = plan.trainer
    paths = [result.checkpoint, result.best, result.log_path]
    gate_info: dict = {}
    if session.dist.is_main and result.gate is not None:
        matrix = result.gate.matrix().detach().float().cpu()
        paths.append(save_gate_heatmap(
            matrix, trainer.class_names, session.layout.gate_png,
            title=f"{config.method} gate at {result.layer} "
                  f"({matrix.shape[0]} channels x {matrix.shape[1]} classes)"))
        gate_info = cache_gate(session.cache, result, config, trainer.class_names)
    last = result.last
    summary = {"method": config.method, "backbone": config.backbone, "stem": config.stem,
               "layer": result.layer,
               "epochs": config.epochs, "resumed_from_epoch": result.resumed_from,
               "best_epoch": result.best_epoch, "best_val_acc1": result.best_val_acc1,
               **{k: last.get(k) for k in ("train_acc1", "train_gated_acc", "val_acc1", "val_acc2",
                                           "val_acc3", "gate_density", "gate_peakedness", "loss")},
               "checkpoint": str(result.checkpoint), "best": str(result.best), **gate_info}
    model = {"backbone": config.backbone, "layer": result.layer, "method": config.method,
             "insert_conv": config.insert_conv, "num_classes": config.num_classes,
             "stem": config.stem, "preset": config.preset}
    return Output(summary=summary, paths=paths, model=model, data=plan.train_data, result=result)
