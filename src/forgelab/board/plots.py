"""Curve figures for the board: one panel per metric, runs overlaid."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the board renders figures to images; no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .data import CURVES  # noqa: E402


def curves(series: dict[str, list[dict]], title: str = ""):
    """A figure with loss / tokens/s / memory panels (those any run has), one line per run; None
    when no run has a step yet."""
    panels = [c for c in CURVES if any(r.get(c[1]) is not None for recs in series.values() for r in recs)]
    # device memory when measured, else host RSS (CPU runs): never both panels
    if any(c[1] == "mem_max_allocated" for c in panels):
        panels = [c for c in panels if c[1] != "rss"]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, key, scale, unit) in zip(axes[0], panels):
        for label, recs in series.items():
            pts = [(r["step"], r[key] * scale) for r in recs if r.get(key) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
        ax.set_title(f"{name} ({unit})" if unit else name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)  # gradio renders the figure object; keep pyplot's registry empty
    return fig
