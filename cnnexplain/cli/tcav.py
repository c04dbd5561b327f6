"""``cnnexplain tcav``: options, one job, the table."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, printer
from cnnexplain.cli.main import app
from cnnexplain.config.tcav import TcavOptions

HELP = """Measure how sensitive a class is to a concept at one or more layers: Testing with
Concept Activation Vectors (TCAV, Kim et al. 2018), with the interventional scores I+ / I- and
a significance test against random concept sets.

Example: cnnexplain tcav --checkpoint runs/std/best.pt --concepts data/concepts --target star

Concepts come from --concepts DIR (a folder per concept and random_0, random_1, ...) or --broden
PATH with --concept NAMES; the class inputs are the --target images of the checkpoint's data (or
--dataset, --class-images). Outputs in --out/tcav: tcav.csv, runs.csv, tcav.png.
--help-methods explains the CAVs, the scores and both significance tests."""

METHODS = "\n\n".join([
    "Measure how sensitive a class is to a concept at one or more layers: Testing with Concept "
    "Activation Vectors (TCAV, Kim et al. 2018), with the interventional "
    "scores I+ / I- and a significance test against random concept sets.",
    "[bold]Concepts[/]: --concepts DIR holds one folder of images per concept and random folders "
    "random_0, random_1, ... (`cnnexplain data synth --format concepts` writes one); or --broden "
    "PATH takes the images where each --concept is present (a whole-image label, or a pixel "
    "label covering at least --min-coverage) and draws the random sets, seeded, from the images "
    "where none of them is present.",
    "[bold]Class inputs[/]: the images of --dataset/--split (first --limit images) whose label is "
    "the --target class; or every image of --class-images DIR for every target.",
    "[bold]CAV[/]: a linear classifier on the layer's flattened activations, concept (+1) "
    "against one random set (-1): the sides are truncated to equal size (with "
    "--concept-subsample below 1, the concept side to a random share of its images), 0.33 is "
    "held out (stratified, seeded), and min alpha/2 |w|^2 + mean loss (hinge or logistic; "
    "tcav's SGDClassifier objective with alpha 0.01) is solved to convergence in torch; "
    "v = w/|w| points toward the concept; its balanced accuracy on the images it was not "
    "trained on (those of its two sets, and all other random sets) is reported.",
    "[bold]Scores[/] over the class inputs: sign count = fraction with S > 0, S = grad of the "
    "class logit w.r.t. the activation . v; magnitude = sum |S|[S>0] / sum |S| (captum's). "
    "I+ = fraction of inputs whose class probability rises when --step * v is added to the "
    "activation (--step-units norm: --step * |a| per input), I- = fraction whose probability "
    "falls when it is subtracted; over every image of the class-input data, of every class "
    "(--intervention-inputs all, the default: the test set of their definition) or over the "
    "target class's images only (--intervention-inputs class). tcav.csv's intervention_inputs "
    "column says which.",
    "[bold]Runs[/]: --random-runs N; run k trains each concept against random_k, and a baseline "
    "CAV of random_(k-1) against random_k, whose scores are the chart's random reference (needs "
    "random_0..random_N).",
    "[bold]Significance[/] (--significance; every p-value is reported either way, m = the "
    "number of tests, concepts x classes x layers). ttest (the default, Kim et al. 2018): "
    "p_ttest is a two-sided two-sample t-test of the concept's N TCAV scores against the N "
    "random-vs-random scores (H0: the concept's CAVs score like random directions); significant "
    "when p_ttest_bonferroni = min(1, m p_ttest) < --alpha (p_ttest with --no-bonferroni). It "
    "takes the N runs as independent although they share the concept images, so it is "
    "optimistic. calibrated: significant when two tests both reject at --alpha, each p-value "
    "multiplied by m (capped at 1) unless --no-bonferroni. p (score test): the mean sign count differs "
    "from a random direction's, which is 0.5 by symmetry; a t-test on the probit scale whose "
    "variance is the runs' spread times r/(1-r) + 1/N, r being the share of the concept "
    "images each CAV is trained on, so that the images shared by all runs count as one sample "
    "(the references' t-test divides by N only and calls random image sets significant in about "
    "a third of trials). CAV p (CAV test): each run's CAV tells held-out concept images from "
    "held-out random images (one-sided Fisher exact test), and twice the median of the N "
    "p-values (valid however the runs depend on each other) says the concept is linearly "
    "present at the layer. Concept folders should have the random folders' class "
    "mix, as `cnnexplain data synth --format concepts` writes them.",
    "Activations, CAVs, gradients and scores are cached by content (model weights, images, "
    "preprocessing, options, seed), so a repeated run only reads them back. Outputs in "
    "--out/tcav: tcav.csv (one row per concept, class and layer), runs.csv (every CAV's "
    "scores), tcav.png (the paper's bar chart with the random baseline).",
])


def tcav(options: TcavOptions):
    from cnnexplain.jobs import tcav as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    _print_table(term, output.result, output.plan.config)


def _print_table(term, result, config) -> None:
    correction = (f"Bonferroni-corrected over {result.n_tests} tests" if config.bonferroni
                  else "uncorrected")
    rule = ("t-test p (Kim et al. 2018)" if config.significance == "ttest"
            else "p and CAV p both")
    table = Table(title=f"TCAV ({config.random_runs} runs; p-values {correction}, the raw "
                        f"t-test p in brackets; significant when {rule} < {config.alpha:g}; "
                        f"I+ / I- over {INTERVENTION_LABEL[config.intervention_inputs]})")
    for col in ("concept", "class", "layer", "TCAV score", "random", "magnitude", "I+", "I-",
                "CAV acc", "t-test p", "p", "CAV p", "significant"):
        table.add_column(col, justify="left" if col in ("concept", "class", "layer") else "right")
    for r in result.table.to_dict(orient="records"):
        table.add_row(escape(str(r["concept"])), escape(str(r["class"])), escape(str(r["layer"])),
                      f"{r['score_mean']:.3f} ± {r['score_std']:.3f}",
                      f"{r['random_score_mean']:.3f} ± {r['random_score_std']:.3f}",
                      f"{r['magnitude']:.3f}", f"{r['i_plus']:.3f}", f"{r['i_minus']:.3f}",
                      f"{r['cav_accuracy']:.3f}",
                      f"{r['p_ttest_bonferroni' if config.bonferroni else 'p_ttest']:.3g} "
                      f"({r['p_ttest']:.3g})", f"{r['p_value']:.3g}",
                      f"{r['cav_p_value']:.3g}",
                      "[green]yes[/]" if r["significant"] else "no")
    term.print(table)


INTERVENTION_LABEL = {"all": "all class-input images", "class": "the target class's images"}


command(app, "tcav", TcavOptions, tcav, help=HELP,
        extra=[eager_flag("help_methods", "--help-methods",
                          "Explain the CAVs, scores and significance tests, and exit.")],
        eager={"help_methods": printer(METHODS)})
