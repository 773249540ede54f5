"""The likelihood ratio of a comparison, as a report states it: the relevant population, the
recording conditions a calibration covers, and the bounded log10 LR with its verbal equivalent.

Propositions (source level): Hp "the questioned recording was made with the reference device",
Hd "it was made with another device of the relevant population". The LR itself comes from the one
calibration of the product (:class:`devrecd.openset.calibration.Calibration`: logistic regression,
ELUB bounds on held-out LRs, log10); this module says which calibration applies to a recording and
what a report writes about it.
"""

from __future__ import annotations

from typing import Any, Sequence

from devrecd.openset.calibration import HD, HP, Calibration, load_calibration

__all__ = ["HD", "HP", "Calibration", "assess", "comparison_channel", "condition_mismatch", "describe_conditions",
           "describe_population", "load_calibration"]


def describe_conditions(recordings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Recording conditions of a set of recordings (from ``Recording.describe()``-like dicts)."""
    durations = [float(r["duration"]) for r in recordings if r.get("duration") is not None]
    return {
        "native_rates": sorted({int(r["native_rate"]) for r in recordings if r.get("native_rate")}),
        "codecs": sorted({str(r["codec"]) for r in recordings if r.get("codec")}),
        "containers": sorted({str(r["container"]) for r in recordings if r.get("container")}),
        "duration_min": round(min(durations), 3) if durations else None,
        "duration_max": round(max(durations), 3) if durations else None,
        "recordings": len(recordings),
        # The comparison condition measured on each recording (codec, band: devrecd.audio.condition).
        "channels": sorted({comparison_channel(r["condition"]) for r in recordings if r.get("condition")}),
    }


def comparison_channel(condition: dict[str, Any]) -> str:
    """The comparison condition of a recording's measured condition: ``clean`` (broadband, compared
    as it is), the channel it went through (``amrnb``, ``tel``, ``band300-3400``...), or ``unknown``."""
    from devrecd.openset.matching import CLEAN, questioned_channel

    try:
        channel = questioned_channel(condition)
    except ValueError:
        return "unknown"
    return CLEAN if channel is None else channel.name


def condition_mismatch(recording: dict[str, Any], conditions: dict[str, Any]) -> tuple[list[str], list[str]]:
    """How a recording differs from the calibration conditions: ``(blocking, warnings)``.

    A native rate, codec or measured comparison condition (band limit, lossy channel) the
    calibration never saw blocks the LR (device traces do not survive a change of channel: the
    calibration says nothing about it); a duration outside the calibrated
    range is a warning (the score is still of the same kind, its spread is not).
    """
    blocking, warnings = [], []
    rate, codec, dur = recording.get("native_rate"), recording.get("codec"), recording.get("duration")
    if rate and conditions.get("native_rates") and int(rate) not in conditions["native_rates"]:
        blocking.append(f"native rate {rate} Hz not in the calibration's {conditions['native_rates']}")
    if codec and conditions.get("codecs") and codec not in conditions["codecs"]:
        blocking.append(f"codec {codec} not in the calibration's {conditions['codecs']}")
    if recording.get("condition") and conditions.get("channels"):
        # A band limit survives re-packaging (an AMR call saved as a 32 kHz WAV): the measured
        # condition, not the header, says whether the calibration covers the recording.
        channel = comparison_channel(recording["condition"])
        if channel not in conditions["channels"]:
            blocking.append(f"measured condition {channel} not in the calibration's {conditions['channels']}")
    lo, hi = conditions.get("duration_min"), conditions.get("duration_max")
    if dur is not None and lo is not None and hi is not None and not lo <= float(dur) <= hi:
        warnings.append(f"duration {float(dur):.1f} s outside the calibration's {lo:.1f}-{hi:.1f} s")
    return blocking, warnings


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


def describe_population(trials: Any, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The relevant population of :class:`devrecd.openset.workflow.Trials` (every recording against
    every enrolled device), described from the trials themselves."""
    in_trials = sorted(set(trials.devices))
    unenrolled = sorted(set(in_trials) - set(trials.profiles))
    return {
        "description": (f"{len(trials.recordings)} recordings of {len(in_trials)} devices scored against "
                        f"{len(trials.profiles)} enrolled devices"
                        + (f" ({len(unenrolled)} of them not enrolled: different-source trials only)" if unenrolled else "")),
        "enrolled_devices": list(trials.profiles), "trial_devices": in_trials, "unenrolled_devices": unenrolled,
        "recordings": len(trials.recordings),
        **{k: v for k, v in (source or {}).items() if k in ("dataset", "selection", "dataset_sha256")},
    }
