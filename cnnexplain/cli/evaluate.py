"""``cnnexplain evaluate-entanglement``: options, one job, tables."""

from __future__ import annotations

from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, printer
from cnnexplain.cli.main import app
from cnnexplain.config.evaluate import EvaluateOptions

HELP = """Measure how class-specific the channels of a layer are (ACC1/ACC2/ACC3 and MIS of
Guo et al. 2024's PICNN, R0/R1 of Liang's CDCNN report), to compare a gated model with a standard
one and to gate it in CI.

Example: cnnexplain evaluate-entanglement --checkpoint runs/picnn/best.pt --fail-under MIS=0.15

Writes entanglement.csv, entanglement_per_class.csv and run.json in --out (features.h5 with
--save-features); --help-methods defines every metric."""

METHODS = """[bold]ACC1[/] full pathway; [bold]ACC2[/] only the class-specific cluster of the
predicted class; [bold]ACC3[/] all channels but the true class's cluster (Guo et al. 2024,
PICNN). ACC2/ACC3 are the paper's single stochastic draw (pseudo-label ỹ ~ softmax, mask z ~
Ber(P[ỹ])) averaged over --draws with their standard deviation, and ACC2_det/ACC3_det the
deterministic variants (argmax, membership > threshold).

[bold]MIS[/]: mean over channels of the max over classes of the k-NN (k = 3) mutual information
between the pooled activation and the one-vs-rest class, in nats, as scikit-learn's
mutual_info_classif computes it (vectorized in torch).

[bold]R0/R1[/] (Liang, CDCNN): with the network frozen, the cross-entropy of the gated
pathway under the best one-hot W (R0) or binary sparse W (R1, + mu·density); lower = more
disentangled.

A checkpoint's learned gate (W or P) defines the clusters; a model without one (std, any
torchvision weights) gets them from R0's one-hot solution, so the numbers are comparable.
checkpoint.pt (last epoch) and best.pt (best validation epoch) of train-gated both work.

Features come from the HDF5 cache (a second evaluation does not run the network again); R0/R1
solutions too. --fail-under / --fail-over turn a metric into a CI gate: exit code 1 and one line
naming the violated bound."""


def evaluate(options: EvaluateOptions):
    from cnnexplain.jobs import evaluate as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    report, loaded = output.result, output.model
    table = Table(title=f"entanglement of {loaded.backbone} ({loaded.method}) at "
                        f"{report.layer}; clusters: {report.gate_source}")
    for col in ("metric", "value", "std", "note"):
        table.add_column(col, overflow="fold")
    for r in report.rows:
        std = "" if r["std"] is None else f"{r['std']:.3f}"
        table.add_row(r["metric"], f"{r['value']:.4g}", std, r.get("detail", ""))
    term.print(table)
    pc = Table(title="per class")
    cols = ["name", "n", "acc1", "acc2", "acc3", "cluster_channels", "mi_max"]
    for col in cols:
        pc.add_column(col)
    for r in report.per_class:
        pc.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                     for c in cols])
    term.print(pc)


command(app, "evaluate-entanglement", EvaluateOptions, evaluate, help=HELP,
        extra=[eager_flag("help_methods", "--help-methods", "Define every metric and exit.")],
        eager={"help_methods": printer(METHODS)})
