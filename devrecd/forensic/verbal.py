"""The ENFSI verbal scale (ENFSI Guideline for Evaluative Reporting in Forensic Science, 2015).

The one place where the thresholds and the words live. The verbal equivalent accompanies the
number; it never replaces it. An LR below 1 is expressed as support for the defence proposition Hd
with the reciprocal of the LR.
"""

from __future__ import annotations

import math

# (lowest LR of the band, support). A band runs up to the next band's lowest LR.
ENFSI_SCALE: tuple[tuple[float, str], ...] = (
    (1.0, "no support for either proposition"),
    (2.0, "weak support"),
    (10.0, "moderate support"),
    (100.0, "moderately strong support"),
    (1_000.0, "strong support"),
    (10_000.0, "very strong support"),
    (1_000_000.0, "extremely strong support"),
)
NEUTRAL = ENFSI_SCALE[0][1]


def verbal(log10_lr: float, *, hp: str = "Hp", hd: str = "Hd") -> str:
    """The verbal equivalent of a log10 LR, naming the proposition it supports.

    >>> verbal(1.5)
    'moderate support for Hp'
    >>> verbal(-3.2)
    'strong support for Hd'
    """
    if not math.isfinite(log10_lr):
        raise ValueError(f"a reportable LR is finite, got log10 LR {log10_lr}")
    lr = 10.0 ** abs(log10_lr)  # the reciprocal for Hd
    words = NEUTRAL
    for lowest, support in ENFSI_SCALE:
        if lr >= lowest:
            words = support
    if words == NEUTRAL:
        return words
    return f"{words} for {hp if log10_lr > 0 else hd}"


def scale_rows() -> list[dict[str, str]]:
    """The scale as table rows (LR band, words), for reports."""
    rows = []
    for i, (lowest, support) in enumerate(ENFSI_SCALE):
        upper = ENFSI_SCALE[i + 1][0] if i + 1 < len(ENFSI_SCALE) else None
        if i == 0:
            band = f"1 - {upper:g}"
        else:
            band = f"{lowest:,.0f} - {upper:,.0f}" if upper else f"> {lowest:,.0f}"
        rows.append({"lr": band, "support": support})
    return rows
