"""matplotlib, set up once: figures on the Agg canvas through the object-oriented API (no
pyplot, no global backend or figure state), written as PNG bytes or atomically to a file."""

from __future__ import annotations

import io
from pathlib import Path


def figure(width: float, height: float, dpi: int = 100, layout: str | None = None):
    """A new :class:`matplotlib.figure.Figure` of ``width`` x ``height`` inches on an Agg
    canvas (``layout``: e.g. ``"constrained"``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str):
    """A registered colormap by name (``tab10``, ``viridis``, ...)."""
    import matplotlib

    return matplotlib.colormaps[name]


def png_bytes(fig, dpi: int | None = None, tight: bool = True) -> bytes:
    """The figure as PNG bytes (``tight``: crop to the drawn area)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def save_png(fig, path: str | Path, dpi: int | None = None, tight: bool = False) -> Path:
    """Write the figure to ``path`` atomically."""
    from cnnexplain.io import write_bytes

    write_bytes(path, png_bytes(fig, dpi=dpi, tight=tight))
    return Path(path)
