"""One figure style for the whole book: every method keeps its colour in every chapter.

Use ``plotting.setup()`` at the top of a chapter and ``COLORS[name]`` (or :func:`color`) for each curve.

Readable in the book: the online book shows a figure at its natural size (``figure.dpi`` = 100 pixels an inch)
when it fits the content column, and shrinks it to the column when it does not. The column is 784 px wide in a
1400 px window, so a figure at most :data:`COLUMN_INCHES` wide is never shrunk, and a font of
:data:`MIN_FONT_PT` points or more is then at least that size on the screen. ``tests/test_chapter_layout.py``
checks both in every chapter, and at most three panels in a row.
"""
from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt

COLORS: dict[str, str] = {
    # references
    "exact": "#000000",          # closed forms, exact laws
    "data": "#7f7f7f",           # the data / pretrained law
    "pretrained": "#7f7f7f",
    "naive-tilt": "#bcbd22",     # p e^{r/beta} / Z
    "learned": "#17becf",        # a learned score model
    # samplers
    "em": "#1f77b4",
    "ddim": "#ff7f0e",
    "pf-euler": "#2ca02c",
    "pf-heun": "#d62728",
    # fine-tuning algorithms
    "ctpo": "#1f77b4",
    "ctpo-pathwise": "#aec7e8",
    "ddpo": "#d62728",
    "dpok": "#2ca02c",
    "backprop": "#9467bd",
    "optimal": "#000000",
    # steering a frozen sampler (chapter 13)
    "tilted": "#e377c2",         # p_out e^{r/beta} / Z, the target of resampling and SMC
    "best-of-n": "#8c564b",
    "importance": "#e377c2",
    "importance-fixed": "#f7b6d2",
    "smc-exact": "#ff7f0e",
    "smc-exact-fixed": "#ffbb78",
    "smc-tweedie": "#bcbd22",
    "smc-learned": "#17becf",
    "guidance-exact": "#000000",
    "guidance-tweedie": "#d62728",
    "guidance-learned": "#9edae5",
}


# the book's content column is 784 px at a 1400 px window; at figure.dpi = 100 a figure this wide is 760 px,
# plus the 0.1 in the inline backend pads on each side (bbox_inches="tight"): 780 px
COLUMN_INCHES = 7.6
MIN_FONT_PT = 9          # the smallest font a figure may use (tick labels, legends, annotations)
MAX_PANELS_PER_ROW = 3


def color(name: str) -> str:
    """The book-wide colour of a method or reference curve."""
    if name not in COLORS:
        raise KeyError(f"no colour for {name!r}; add it to sacode.plotting.COLORS (known: {', '.join(COLORS)})")
    return COLORS[name]


def setup() -> None:
    """Book-wide matplotlib defaults (readable at the book's column width)."""
    mpl.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.dpi": 100,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "font.size": 10,
    })


def legend_outside(ax, **kw):
    """The axes' legend to the right of the axes, off the data.

    Make the figure with ``layout="constrained"`` so that the axes shrink to leave it room inside the figure
    width; ``kw`` go to ``ax.legend`` (``title``, ``ncol``, ...).
    """
    return ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, **kw})


def loglog_slope_label(ax, x, y, label: str, **kw) -> float:
    """Plot y against x on log-log axes and return the least-squares slope (shown in the legend)."""
    import numpy as np

    slope = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    ax.loglog(x, y, "o-", label=f"{label} (slope {slope:.2f})", **kw)
    return slope


__all__ = ["COLORS", "COLUMN_INCHES", "MIN_FONT_PT", "MAX_PANELS_PER_ROW", "color", "setup",
           "legend_outside", "loglog_slope_label", "plt"]
