"""``cnnexplain visualize``: options, one job, the table."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, printer
from cnnexplain.cli.main import app
from cnnexplain.config.visualize import VIS, VisualizeOptions

HELP = """Show what units of a layer respond to: images optimized to maximize (or minimize) each
unit, as in Feature Visualization (Olah et al. 2017), beside the dataset images that excite it
most and least, with the unit's map over them.

Example: cnnexplain visualize --checkpoint runs/std/best.pt --units top:8 --direction both

Units: --units (channels: 0,5,7, all or top:K), --neuron x,y (one position), --objective layer
(DeepDream) or direction (--direction-vector), or --target CLASS (the pre-softmax logit).
Outputs in --out/visualize: index.csv, images/, examples/, grid.png and index.html.
--help-methods explains the optimization."""

METHODS = "\n\n".join([
    "Show what units of a layer respond to: images optimized to maximize (or minimize) each "
    "unit, as in Feature Visualization (Olah, Mordvintsev and Schubert 2017, Distill), beside "
    "the dataset images that excite it most and least.",
    "[bold]Objectives[/]: --objective channel (default): the mean of a channel over the "
    "layer's map; neuron (or --neuron x,y): a channel at one position, x the column and y the "
    "row (default the centre); layer: the mean squared activation of the whole layer, the "
    "objective of DeepDream (Mordvintsev, Olah and Tyka 2015); direction: the mean dot "
    "product of the activation vector with a unit direction in channel space (lucid's "
    "direction objective; --direction-vector FILE.npy of K floats, or D x K, else one random "
    "direction drawn with --seed); --target CLASS: the class's pre-softmax logit, which Olah "
    "et al. 2017 found gives better images than the probability (that can rise by "
    "suppressing the other classes). --direction max, min (the negative images of Olah et al. "
    "2017) or both; after a ReLU the minimum is 0, so a pre-ReLU --layer shows more.",
    "[bold]Parameterization[/] (--param fourier, the default): each image is a real-FFT "
    "spectrum scaled by 1/frequency (equal energy per frequency), with lucid's colour "
    "decorrelation (--no-decorrelate turns it off) and a sigmoid, so every pixel stays in "
    "[0, 1]; the model's preprocessing (--mean, --std) is applied after. --param pixel "
    "learns the pixels directly.",
    "[bold]Transformation robustness[/] (--transforms standard): at each step every image is "
    "jittered (up to side/16 + side/32 px, lucid's 8 + 4 at 128 px), scaled by 0.9-1.1 and "
    "rotated by -10..10 degrees in one bilinear resampling, grey outside. --tv and --l2 add a "
    "total-variation and a grey-L2 penalty.",
    "[bold]Optimization[/]: Adam (--lr 0.05, --steps 256, lucid's settings), all units at "
    "once in batches of --batch-size images; each image has its own seed (from --seed and its "
    "unit), so batching does not change the images and the same seed gives the same images "
    "on CPU (not bit for bit on CUDA, whose grid-sample backward is not deterministic). The "
    "model runs in eval mode with frozen weights. --diversity N optimizes N images per unit "
    "and direction with lucid's diversity term, minus --diversity-weight times the mean "
    "cosine similarity of their Gram matrices at the layer (Olah et al. 2017).",
    "[bold]Dataset examples[/]: the dataset's activations at the layer are computed once and "
    "cached (mean over the map, or full maps for neuron and layer objectives); per unit the "
    "top and bottom --examples images are shown with the unit's map, upsampled bilinearly, "
    "over them. top_example_objective is the objective evaluated on the unit's best example "
    "(the top one for max, the bottom one for min), for comparison with objective_value, the "
    "optimized image's objective without transforms.",
    "Outputs in --out/visualize: index.csv (one row per image: layer, unit, direction, "
    "objective, objective_value, top_example_objective, image, ...), images/*.png (at the "
    "image's own resolution), examples/*.png, grid.png and a self-contained index.html.",
])


def visualize(options: VisualizeOptions):
    from cnnexplain.jobs import visualize as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    plan, result = output.plan, output.result
    r, ex = result.rendered, result.examples
    where = output.summary["layer"]
    table = Table(title=f"visualize: {len(result.goals)} images, {plan.objective.name} at "
                        f"{escape(str(where))}, {plan.settings.steps} steps, {r.seconds:.1f} s")
    for col in ("unit", "direction", "replica", "objective", "best example", "ratio"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    index = {u.label: i for i, u in enumerate(result.units)}
    for i, g in enumerate(result.goals):
        value = float(r.values[i])
        best = ex.best(index[g.unit], g.sign)
        ratio = value / best if best and best == best else float("nan")
        table.add_row(escape(g.unit), g.direction, str(g.replica), f"{value:.4g}",
                      f"{best:.4g}", "-" if ratio != ratio else f"{ratio:.2f}")
    term.print(table)


command(app, "visualize", VisualizeOptions, visualize, help=HELP,
        extra=[eager_flag("help_methods", "--help-methods",
                          "Explain the objectives, the parameterization and the optimization, "
                          "and exit.", panel=VIS)],
        eager={"help_methods": printer(METHODS)})
