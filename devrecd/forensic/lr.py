"""The likelihood ratio of a comparison, as a report states it: the relevant population, the
recording conditions a calibration covers, and the bounded log10 LR with its verbal equivalent.

Propositions (source level): Hp "the questioned recording was made with the reference device",
Hd "it was made with another device of the relevant population". The LR itself comes from the one
calibration of the product (:class:`devrecd.openset.calibration.Calibration`: logistic regression,
ELUB bounds on held-out LRs, log10); this module says which calibration applies to a recording and
what a report writes about it.
"""

from __future__ import annotations

from typing import Any

from devrecd.openset.calibration import HD, HP, Calibration, load_calibration
from devrecd.openset.conditions import (comparison_channel, condition_mismatch, describe_conditions,
                                        describe_population, snr_outside)

__all__ = ["HD", "HP", "Calibration", "assess", "comparison_channel", "condition_mismatch", "describe_conditions",
           "describe_population", "load_calibration", "snr_outside"]


def assess(cal: Calibration | None, score: float, recording: dict[str, Any], scorer: dict[str, Any]) -> dict[str, Any]:
    """The LR part of a comparison: bounded log10 LR, LR, verbal equivalent, or why none is given."""
    from devrecd.forensic.verbal import verbal

    if cal is None:
        return {"log10_lr": None, "lr": None, "verbal": None,
                "lr_withheld": "no calibration: run `devrecd calibrate` (an uncalibrated score is not an LR)"}
    if cal.scorer.get("fingerprint") != scorer.get("fingerprint"):
        return {"log10_lr": None, "lr": None, "verbal": None,
                "lr_withheld": f"the calibration was fitted on scores of another scorer "
                               f"({str(cal.scorer.get('fingerprint'))[:12]}, this one {str(scorer.get('fingerprint'))[:12]})"}
    blocking, warnings = condition_mismatch(recording, cal.conditions)
    if blocking:
        return {"log10_lr": None, "lr": None, "verbal": None, "condition_warnings": warnings,
                "lr_withheld": "recording condition outside the calibration: " + "; ".join(blocking)}
    bounded, raw = cal.log10_lr(score)
    return {"log10_lr": round(bounded, 4), "log10_lr_unbounded": round(raw, 4), "lr": float(f"{10 ** bounded:.4g}"),
            "bounded": bool(bounded != raw), "bounds": [cal.lower, cal.upper], "verbal": verbal(bounded),
            "condition_warnings": warnings, "lr_withheld": None}


