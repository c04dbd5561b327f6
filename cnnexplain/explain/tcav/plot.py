"""The TCAV bar chart (Kim et al. 2018, fig. 4) of a :func:`~cnnexplain.explain.tcav.run.run_tcav`
table."""

from __future__ import annotations

import pandas as pd


def plot_tcav(table: pd.DataFrame, path, title: str = "TCAV") -> None:
    """The TCAV paper's bar chart (Kim et al. 2018, fig. 4): one panel per class, groups per
    layer, one bar per concept (mean sign count over runs, error bars one std); the random
    baseline (mean of the random-vs-random runs, +- one std shaded) marked per group;
    significant bars carry '*', the others are hatched and labelled 'n.s.'. Written atomically
    as PNG (matplotlib Agg)."""
    from cnnexplain.plotting import colormap, figure, save_png

    classes = list(dict.fromkeys(table["class"]))
    layers = list(dict.fromkeys(table["layer"]))
    concepts = list(dict.fromkeys(table["concept"]))
    colors = colormap("tab10")
    width = 0.8 / max(len(concepts), 1)
    fig = figure(max(6.5, 2.8 + 0.6 * len(layers) * (len(concepts) + 1)),
                 0.6 + 2.9 * len(classes), dpi=110)
    axes = fig.subplots(len(classes), 1, squeeze=False)[:, 0]
    for k, (ax, klass) in enumerate(zip(axes, classes)):
        for li, layer in enumerate(layers):
            sel = table[(table["class"] == klass) & (table["layer"] == layer)]
            if sel.empty:
                continue
            rmean = float(sel["random_score_mean"].iloc[0])
            rstd = float(sel["random_score_std"].iloc[0])
            x0, x1 = li - 0.45, li + 0.45
            ax.fill_between([x0, x1], max(0.0, rmean - rstd), min(1.0, rmean + rstd),
                            color="0.92", zorder=0,
                            label="random ± std" if (k, li) == (0, 0) else None)
            ax.plot([x0, x1], [rmean, rmean], color="0.25", linestyle="--", linewidth=1.3,
                    zorder=3, label="random baseline" if (k, li) == (0, 0) else None)
            for ci, concept in enumerate(concepts):
                row = sel[sel["concept"] == concept]
                if row.empty:
                    continue
                r = row.iloc[0]
                x = li - 0.4 + width * (ci + 0.5)
                sig = bool(r["significant"])
                ax.bar(x, r["score_mean"], width * 0.85, yerr=r["score_std"], capsize=3,
                       color=colors(ci % 10), alpha=1.0 if sig else 0.45,
                       hatch=None if sig else "//", edgecolor="black", linewidth=0.5, zorder=2,
                       error_kw={"elinewidth": 1.0, "zorder": 4},
                       label=concept if (k, li) == (0, 0) else None)
                top = min(1.03, float(r["score_mean"] + r["score_std"]) + 0.02)
                ax.text(x, top, "*" if sig else "n.s.", ha="center", va="bottom",
                        fontsize=12 if sig else 7, zorder=5)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers)
        ax.set_xlim(-0.55, len(layers) - 0.45)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("TCAV score")
        ax.set_title(f"class {klass}", fontsize=10)
        if k == 0:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title + "\n* significant; hatched: not significant; error bars: std over runs",
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
