"""The conditions a calibration covers and the relevant population it describes: which recordings
a calibration may give a likelihood ratio for (its comparison channels, its SNR range; header
facts as warnings) and how its trials' population is stated. Read by the open-set judge,
``devrecd calibrate``, ``compare`` and the report alike.
"""

from __future__ import annotations

from typing import Any, Sequence


def describe_conditions(recordings: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Recording conditions of a set of recordings (from ``Recording.describe()``-like dicts)."""
    durations = [float(r["duration"]) for r in recordings if r.get("duration") is not None]
    snrs = [float(r["condition"]["snr_db"]) for r in recordings
            if isinstance(r.get("condition"), dict) and r["condition"].get("snr_db") is not None]
    return {
        "native_rates": sorted({int(r["native_rate"]) for r in recordings if r.get("native_rate")}),
        "codecs": sorted({str(r["codec"]) for r in recordings if r.get("codec")}),
        "containers": sorted({str(r["container"]) for r in recordings if r.get("container")}),
        "duration_min": round(min(durations), 3) if durations else None,
        "duration_max": round(max(durations), 3) if durations else None,
        "recordings": len(recordings),
        # The SNR measured on each recording (devrecd.audio.noise): the range the calibration saw.
        "snr_db_min": round(min(snrs), 1) if snrs else None,
        "snr_db_max": round(max(snrs), 1) if snrs else None,
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

    A measured comparison condition (band limit, lossy channel) the calibration was not made under
    blocks the LR (device traces do not survive a change of channel: the calibration says nothing
    about it). A calibration that records its comparison channels (every one made since they are
    recorded: the open-set judge, ``compare`` and the report then apply the same rule) takes a
    different header codec or native rate as a warning: the measured channel decides, as in the
    verdict. One that does not (older) blocks on them. An SNR below the calibration's recordings
    blocks it too where the references were brought to that noise (``recording["comparison"]
    ["noise_matched"]``: noise-matched comparisons of noisier recordings score higher than any trial
    it was fitted on), else it is a warning. A duration outside the calibrated range is a warning
    (the score is still of the same kind, its spread is not).
    """
    blocking, warnings = [], []
    headers = warnings if conditions.get("channels") else blocking
    rate, codec, dur = recording.get("native_rate"), recording.get("codec"), recording.get("duration")
    if rate and conditions.get("native_rates") and int(rate) not in conditions["native_rates"]:
        headers.append(f"native rate {rate} Hz not in the calibration's {conditions['native_rates']}")
    if codec and conditions.get("codecs") and codec not in conditions["codecs"]:
        headers.append(f"codec {codec} not in the calibration's {conditions['codecs']}")
    if recording.get("condition") and conditions.get("channels"):
        # A band limit survives re-packaging (an AMR call saved as a 32 kHz WAV): the measured
        # condition, not the header, says whether the calibration covers the recording.
        channel = comparison_channel(recording["condition"])
        if channel not in conditions["channels"]:
            blocking.append(f"measured condition {channel} not in the calibration's {conditions['channels']}")
    lo, hi = conditions.get("duration_min"), conditions.get("duration_max")
    if dur is not None and lo is not None and hi is not None and not lo <= float(dur) <= hi:
        warnings.append(f"duration {float(dur):.1f} s outside the calibration's {lo:.1f}-{hi:.1f} s")
    snr = snr_outside(recording.get("condition"), conditions)
    if snr:
        # Blocking where the references were brought to the recording's noise (what takes a comparison
        # outside what the calibration saw); a noisy phone compared with its equally noisy references
        # is a comparison of the calibration's kind, said with a warning.
        (blocking if (recording.get("comparison") or {}).get("noise_matched") else warnings).append(snr)
    return blocking, warnings


# A questioned SNR below the lowest SNR validated on is outside the range. No margin: with 3 dB, white
# noise at 20 dB SNR (measured 19-21 dB) half passed against a lowest of 22.7 dB, and those verdicts
# named an enrolled phone for 20 of 30 never-enrolled recordings (benchmarks/conditions.py, seed 0).
# The closed-set network's range (devrecd.pipeline.verdict) is held to the same rule: at 20 dB SNR it
# named the right phone for 40 of 90 recordings (docs/model.md, "Case conditions").
SNR_MARGIN_DB = 0.0


def snr_below(condition: dict[str, Any] | None, lowest: float | None) -> float | None:
    """The recording's measured SNR (``condition["snr_db"]``) when it lies below ``lowest`` (the lowest
    SNR a calibration or a network was validated on; ``SNR_MARGIN_DB`` below it), else None (inside,
    or either not known). The one rule of the open and the closed set."""
    snr = (condition or {}).get("snr_db")
    if snr is None or lowest is None or float(snr) >= float(lowest) - SNR_MARGIN_DB:
        return None
    return float(snr)


def snr_outside(condition: dict[str, Any] | None, conditions: dict[str, Any]) -> str | None:
    """A statement when a recording's measured SNR lies below the SNRs of the calibration's
    recordings (its noise-matched comparison is then calibrated on cleaner ones), else None."""
    lo, hi = conditions.get("snr_db_min"), conditions.get("snr_db_max")
    snr = snr_below(condition, lo)
    if snr is None:
        return None
    return (f"SNR {snr:.1f} dB below the calibration's recordings ({float(lo):.1f}-{float(hi):.1f} dB): "
            "outside the SNR range it was validated on")


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
