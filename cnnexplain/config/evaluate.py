"""``evaluate-entanglement``'s options."""

from __future__ import annotations

from dataclasses import dataclass

from cnnexplain.config.common import (ComputeOptions, DataOptions, FileOptions, ModelOptions,
                                      PrepOptions, RunOptions)
from cnnexplain.config.fields import check, group, option

METRICS_PANEL = "Metrics"
GATES_PANEL = "CI gates"
POOLS = ("mean", "sum")


@dataclass
class EntanglementOptions:
    """How the metrics are computed (Liang's R0 / R1, Guo et al. 2024's ACC2 / ACC3 and MIS)."""

    pool: str = option("mean", choices=POOLS, help="Pooling over space of the features MIS "
                       "uses: mean (CSG) or sum (PICNN).", panel=METRICS_PANEL)
    draws: int = option(10, low=0, help="Stochastic draws averaged for ACC2/ACC3 (Guo et al. 2024's "
                        "single draw varies by 0.01-0.02 on its own).", panel=METRICS_PANEL)
    threshold: float | None = option(None, low=0, high=1, low_open=True, high_open=True,
                                     help="Membership above which a channel is in a class's "
                                     "cluster (default: the checkpoint's, else 0.5).",
                                     panel=METRICS_PANEL, show_default=False, example=0.5)
    scores: bool = option(True, negatable=True, help="Compute R0 and R1 (Liang, CDCNN).",
                          panel=METRICS_PANEL)
    score_steps: int = option(300, low=1, help="Optimization steps for R0/R1's W (and the "
                              "post-hoc gate).", panel=METRICS_PANEL)
    score_lr: float = option(0.1, low=0, low_open=True, help="Adam learning rate for R0/R1's "
                             "W.", panel=METRICS_PANEL)
    mu: float = option(0.5, low=0, help="R1's sparsity weight μ (on ||W||_0 / (K·C)).",
                       panel=METRICS_PANEL)
    save_features: bool = option(False, help="Also write features.h5 (datasets features [N, K] "
                                 "pooled, labels [N]).", panel=METRICS_PANEL)


@dataclass
class BoundOptions:
    """CI gates: a metric outside its bound fails the command (exit 1)."""

    fail_under: list[str] | None = option(None, help="NAME=VALUE (repeatable): exit 1 when "
                                          "the metric is under VALUE, e.g. MIS=0.15.",
                                          panel=GATES_PANEL, show_default=False)
    fail_over: list[str] | None = option(None, help="NAME=VALUE (repeatable): exit 1 when the "
                                         "metric is over VALUE, e.g. ACC3=0.4.",
                                         panel=GATES_PANEL, show_default=False)


@dataclass
class EvaluateOptions:
    """``cnnexplain evaluate-entanglement``."""

    model: ModelOptions = group(ModelOptions)
    data: DataOptions = group(DataOptions)
    prep: PrepOptions = group(PrepOptions)
    files: FileOptions = group(FileOptions)
    metrics: EntanglementOptions = group(EntanglementOptions)
    bounds: BoundOptions = group(BoundOptions)
    run: RunOptions = group(RunOptions)
    compute: ComputeOptions = group(ComputeOptions)

    def validate(self) -> "EvaluateOptions":
        return check(self)
