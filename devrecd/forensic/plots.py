"""Validity plots as PNG bytes: Tippett plot (lir), DET curve, per-window score timeline.

Figures are made on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state, no
display), small and at a fixed DPI so that a report stays light.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

DPI = 110
HP_COLOUR, HD_COLOUR = "#1f5fa8", "#c0392b"


def _figure(width: float = 5.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: reproducible bytes
    return buf.getvalue()


def tippett_png(log10_lrs: Sequence[float], labels: Sequence[int], *, bounds: tuple[float, float] | None = None,
                title: str = "Tippett plot (held-out LRs)") -> bytes:
    """Cumulative proportions of log10 LR >= x for same-device and different-device trials (lir's plot)."""
    from lir.data.models import LLRData
    from lir.plotting import tippett

    llr = np.asarray(log10_lrs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    fig, ax = _figure()
    tippett(LLRData(features=llr, labels=y), plot_type=1, ax=ax)
    lines = ax.get_lines()
    # lir draws Hp (label 1) first, then Hd; name them for a court, with the trial counts.
    lines[0].set_color(HP_COLOUR)
    lines[1].set_color(HD_COLOUR)
    lines[0].set_label(f"same device (Hp true), n={int(np.sum(y == 1))}")
    lines[1].set_label(f"different device (Hd true), n={int(np.sum(y == 0))}")
    if bounds is not None:
        for b in bounds:
            ax.axvline(b, color="#777777", linestyle=":", linewidth=1)
        ax.text(bounds[1], 50, " ELUB", color="#555555", fontsize=7, va="center")
    ax.set_ylabel("% of trials with log10 LR >= x")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, linestyle=":", linewidth=0.5)
    return _png(fig)


def det_png(scores: Sequence[float], labels: Sequence[int], *, title: str = "DET curve") -> bytes:
    """Miss rate against false-alarm rate on normal-deviate axes, with the EER point."""
    from scipy.stats import norm

    from devrecd.openset.measures import eer, error_rates

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    tar, non = s[y == 1], s[y == 0]
    _, frr, far = error_rates(tar, non)
    lo = 0.5 / max(tar.size, non.size)  # rates of 0 or 1 have no normal deviate: draw them at the edge
    clip = lambda v: norm.ppf(np.clip(v, lo, 1 - lo))  # noqa: E731
    fig, ax = _figure(4.2, 3.6)
    ax.plot(clip(far), clip(frr), color=HP_COLOUR, linewidth=1.5, drawstyle="steps-post")
    e = eer(tar, non)
    ax.plot([clip(e)], [clip(e)], "o", color=HD_COLOUR, markersize=4, label=f"EER {e:.2%}")
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95])
    ticks = ticks[(ticks >= lo) & (ticks <= 1 - lo)]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(norm.ppf(ticks))
        axis.set_ticklabels([f"{t:.0%}" if t >= 0.01 else f"{t:.1%}" for t in ticks], fontsize=7)
    edge = norm.ppf([lo, 1 - lo])
    ax.set_xlim(*edge)
    ax.set_ylim(*edge)
    ax.plot(edge, edge, color="#bbbbbb", linewidth=0.5)
    ax.set_xlabel(f"false alarm rate (n={non.size} different-device trials)", fontsize=8)
    ax.set_ylabel(f"miss rate (n={tar.size} same-device trials)", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, linestyle=":", linewidth=0.5)
    return _png(fig)


def timeline_png(starts: Sequence[float], scores: Sequence[float], *, agree: Sequence[bool] | None = None,
                 threshold: float | None = None, ylabel: str = "score", title: str = "") -> bytes:
    """Per-window scores over time; windows that disagree with the file verdict are marked."""
    t = np.asarray(starts, dtype=np.float64)
    v = np.asarray(scores, dtype=np.float64)
    fig, ax = _figure(5.2, 1.9)
    ax.plot(t, v, color=HP_COLOUR, linewidth=1, marker="o", markersize=2.5)
    if agree is not None:
        bad = ~np.asarray(agree, dtype=bool)
        if bad.any():
            ax.plot(t[bad], v[bad], "x", color=HD_COLOUR, markersize=5, label="window names another device")
            ax.legend(fontsize=6, loc="lower right")
    if threshold is not None:
        ax.axhline(threshold, color="#777777", linestyle=":", linewidth=1)
    ax.set_xlabel("window start (s)", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(True, linestyle=":", linewidth=0.5)
    return _png(fig)


def calibration_plots(cal: Any) -> dict[str, bytes]:
    """``{"tippett.png": ..., "det.png": ...}`` of a :class:`~devrecd.openset.calibration.Calibration`."""
    n = cal.metrics.get("n_target", 0), cal.metrics.get("n_nontarget", 0)
    return {
        "tippett.png": tippett_png(cal.heldout_log10_lrs, cal.labels, bounds=(cal.lower, cal.upper),
                                   title=f"Tippett plot, held-out LRs ({n[0]} same / {n[1]} different)"),
        "det.png": det_png(cal.scores, cal.labels, title="DET curve, calibration trials"),
    }
