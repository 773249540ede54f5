"""Window scores -> one file verdict, and the verdict record written to the journal and the log.

Aggregation: the file's score for each device is the mean over windows of the log-probability
(the log of the geometric mean of the window probabilities), which treats the windows as
independent evidence and lets a few confident windows not drown out the rest the way a max would.
The file-level probabilities are those means renormalised with a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from devrecd import __version__
from devrecd.provenance import utc_timestamp

_EPS = 1e-12  # probabilities are clamped before the log (a backend may return exact zeros)


@dataclass(frozen=True)
class FileScore:
    """Aggregated scores of one recording."""

    label: str
    score: float  # file-level probability of ``label`` (renormalised geometric mean)
    mean_log_prob: np.ndarray  # (N,) mean over windows of log p
    probs: np.ndarray  # (N,) renormalised file-level probabilities
    window_labels: np.ndarray  # (n,) argmax per window
    window_scores: np.ndarray  # (n,) max probability per window


def aggregate(window_probs: np.ndarray, labels: Sequence[str]) -> FileScore:
    """Aggregate (n_windows, N) probabilities into one :class:`FileScore`."""
    p = np.asarray(window_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != len(labels):
        raise ValueError(f"expected (n>0, {len(labels)}) window probabilities, got {p.shape}")
    mean_log = np.log(np.clip(p, _EPS, 1.0)).mean(axis=0)
    probs = np.exp(mean_log - mean_log.max())
    probs /= probs.sum()
    best = int(np.argmax(mean_log))
    return FileScore(label=labels[best], score=float(probs[best]), mean_log_prob=mean_log, probs=probs,
                     window_labels=p.argmax(axis=1), window_scores=p.max(axis=1))


def top_k(score: FileScore, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k best devices, best first."""
    order = np.argsort(-score.mean_log_prob, kind="stable")[: max(1, k)]
    return [{"device": labels[i], "score": round(float(score.probs[i]), 6),
             "mean_log_prob": round(float(score.mean_log_prob[i]), 6)} for i in order]


def windows_detail(score: FileScore, labels: Sequence[str], starts_s: Sequence[float]) -> list[dict[str, Any]]:
    """Per-window detail: start time, best device and its probability."""
    return [{"start": round(float(t), 3), "device": labels[int(j)], "score": round(float(s), 6)}
            for t, j, s in zip(starts_s, score.window_labels, score.window_scores)]


def judged_record(recording: dict, window_probs: np.ndarray, labels: Sequence[str], starts_s: Sequence[float], *,
                  k: int, backend: dict, timings: dict[str, float]) -> dict[str, Any]:
    """The verdict of a judged file: who made it, how sure, and everything needed to check it."""
    score = aggregate(window_probs, labels)
    return {
        "outcome": "judged",
        **recording,
        "device": score.label,
        "score": round(score.score, 6),
        "top_k": top_k(score, labels, k),
        "windows": windows_detail(score, labels, starts_s),
        **_provenance(backend, timings),
    }


def open_set_record(recording: dict, open_set: dict[str, Any], *, serving: dict,
                    timings: dict[str, float]) -> dict[str, Any]:
    """The verdict of a file judged by the device registry alone (no closed-set model served):
    the registry's fields (which carry the comparison's condition status), and in place of the
    model and contract hashes the scorer that made the registry's profiles (``serving["scorer"]``)."""
    return {
        "outcome": "judged",
        **recording,
        **open_set,
        "closed_set": None,
        "backend": serving.get("name"),
        "scorer": serving.get("scorer"),
        "software_version": __version__,
        "timings": _round(timings),
        "judged_at": utc_timestamp(),
    }


CLOSED_SET_FIELDS = ("device", "candidate", "score", "top_k", "condition_status", "comparison")


def with_open_set(record: dict[str, Any], open_set: dict[str, Any], closed: dict[str, Any]) -> dict[str, Any]:
    """A judged record with the registry's open-set verdict in front and the closed-set one beside it
    (``closed``: the network's verdict as :func:`with_comparison` holds it to the model's validation,
    its :data:`CLOSED_SET_FIELDS` kept under ``closed_set``)."""
    return {**record, **open_set, "closed_set": {k: closed[k] for k in CLOSED_SET_FIELDS if k in closed}}


@dataclass(frozen=True)
class ModelValidation:
    """What the served closed-set model was validated on: the comparison conditions
    (``backend.validated_conditions``) and the measured SNR range, ``snr_db`` = [low, high] dB
    (``backend.validated_snr_db`` when set, else the range the model's contract or checkpoint records
    from its training recordings; None: not recorded, a model exported before ranges were)."""

    conditions: tuple[str, ...] = ("clean",)
    snr_db: tuple[float, float] | None = None
    snr_source: str = ""  # where ``snr_db`` comes from: "backend.validated_snr_db" | "contract" | "checkpoint"


def model_validation(backend: Any, served: dict[str, Any]) -> ModelValidation:
    """The validation of the served model: ``backend`` is the ``[backend]`` section, ``served`` the
    backend's ``describe()`` (its ``validated_snr_db``: the contract's, or a checkpoint's). Made once
    when serving starts; every closed-set verdict path passes it to :func:`with_comparison`."""
    conditions = tuple(backend.validated_conditions)
    if backend.validated_snr_db:
        lo, hi = backend.validated_snr_db
        return ModelValidation(conditions, (float(lo), float(hi)), "backend.validated_snr_db")
    snr = served.get("validated_snr_db")
    if snr:
        source = "contract" if served.get("contract_sha256") else "checkpoint"
        return ModelValidation(conditions, (float(snr[0]), float(snr[1])), source)
    return ModelValidation(conditions)


def with_comparison(record: dict[str, Any], recording: dict[str, Any], open_set: dict[str, Any] | None,
                    validation: ModelValidation) -> dict[str, Any]:
    """A judged record completed: the condition the model judged under and whether it was validated
    there (:func:`closed_set_comparison`), and with the registry's open-set verdict (``open_set``, which
    says which condition it compared under) that one in front, the network's under ``closed_set``. The
    one place a closed-set verdict is held to the model's validation, whether it is the verdict or
    kept beside the registry's: the daemon's writer, ``batch`` and ``listen`` all come here."""
    out = {**record, **closed_set_comparison(recording.get("condition"), validation)}
    if out["condition_status"] != "validated":
        # A condition the model was never validated under names no device (a call recording is
        # named with probability 0.999 by a network trained on WAV, a recording with white noise at
        # 20 dB SNR wrongly for 50 of 90 by one trained on the clean recordings); the candidates stay listed.
        out = naming_no_device(out)
    if open_set is not None:
        return with_open_set(record, open_set, out)
    return out


def naming_no_device(verdict: dict[str, Any]) -> dict[str, Any]:
    """``verdict`` (a closed-set record, or a live running verdict) naming no device: its device becomes
    its ``candidate`` and ``device`` is inconclusive (a verdict outside the model's validation)."""
    from devrecd.openset.scoring import INCONCLUSIVE

    return {**verdict, "candidate": verdict["device"], "device": INCONCLUSIVE}


def closed_set_comparison(condition: dict[str, Any] | None, validation: ModelValidation) -> dict[str, Any]:
    """Verdict fields for a closed-set verdict: the condition it was judged under, and whether the
    model was validated under it: its codec or channel (``validation.conditions``) and its measured
    SNR (``validation.snr_db``, :func:`closed_set_snr`). The training data is not at hand when
    serving, so nothing is matched: a questioned codec, or an SNR, outside validation is said to be so."""
    from devrecd.openset.matching import CLEAN, condition_report, questioned_channel

    try:
        channel = questioned_channel(condition)
        under = channel.name if channel is not None else CLEAN
    except ValueError:
        under = "unknown"
    rep = condition_report(condition, under, "training data (not matched: not at hand when serving)",
                           validation.conditions)
    rep.pop("questioned")
    rep.update(closed_set_snr(condition, validation))
    if rep["snr_status"] == "outside":
        rep["status"] = "unvalidated"
        rep.setdefault("statement", rep["snr_statement"])
    return {"comparison": rep, "condition_status": rep["status"]}


def closed_set_snr(condition: dict[str, Any] | None, validation: ModelValidation) -> dict[str, Any]:
    """The comparison's SNR fields: ``validated_snr_db`` (the model's range, None: not recorded),
    ``snr_range_source``, ``snr_status`` and, but for ``inside``, ``snr_statement``.

    ``snr_status``: ``inside`` (at or above the range's low end, less
    :data:`~devrecd.openset.conditions.SNR_MARGIN_DB`, the open set's rule: a cleaner recording than
    any trained on is not outside), ``outside`` (below it: the verdict names no device), ``not_recorded``
    (the model records no range: served as before, saying so) or ``unmeasured`` (no SNR in the condition)."""
    from devrecd.openset.conditions import snr_below

    snr = (condition or {}).get("snr_db")
    if validation.snr_db is None:
        measured = f" ({float(snr):.1f} dB)" if snr is not None else ""
        return {"validated_snr_db": None, "snr_status": "not_recorded", "snr_statement": (
            "the model records no SNR range it was trained on (trained and exported before devrecd recorded one): "
            f"whether this recording's SNR{measured} lies inside what it was validated on is not known; set "
            "backend.validated_snr_db to the range it was validated on, or retrain and re-export it")}
    lo, hi = validation.snr_db
    where = {"contract": "its contract", "checkpoint": "its checkpoint"}.get(validation.snr_source, validation.snr_source)
    out: dict[str, Any] = {"validated_snr_db": [lo, hi], "snr_range_source": validation.snr_source}
    below = snr_below(condition, lo)
    if snr is None:
        out.update(snr_status="unmeasured", snr_statement="the recording's SNR was not measured: whether it lies "
                   f"inside the model's SNR range ({lo:.1f} to {hi:.1f} dB) is not known")
    elif below is None:
        out["snr_status"] = "inside"
    else:
        out.update(snr_status="outside", snr_statement=(
            f"SNR {below:.1f} dB below the SNR range the model was trained and validated on ({lo:.1f} to {hi:.1f} dB, "
            f"{where}): outside validation, no device is named"))
    return out


def failed_record(path: str, reason: str, detail: str, *, timings: dict[str, float],
                  sha256: str | None = None, size: int | None = None,
                  resolved_path: str | None = None) -> dict[str, Any]:
    """The record of a file that could not be judged, with the reason; ``sha256`` and ``size`` of
    the bytes read, whenever they were read (chain of custody)."""
    out = {"outcome": "failed", "path": path, "sha256": sha256, "size": size, "reason": reason, "detail": detail,
           "software_version": __version__, "timings": _round(timings), "judged_at": utc_timestamp()}
    if resolved_path:
        out["resolved_path"] = resolved_path
    return out


# What a duplicate repeats of the earlier verdict besides its device, score and top_k: what the answer
# rests on (its LR, its decision, how it was compared and whether that was validated), so that a
# dashboard, `devrecd report` and an examiner reading the duplicate alone see the same verdict, not a
# device without its status.
VERDICT_FIELDS = ("candidate", "log10_lr", "open_set", "comparison", "condition_status", "closed_set")


def duplicate_record(recording: dict, original: dict, *, timings: dict[str, float]) -> dict[str, Any]:
    """The record of a file whose content was judged before under another name: the earlier verdict
    (its device, score, top_k and :data:`VERDICT_FIELDS`)."""
    return {"outcome": "duplicate", **recording, "duplicate_of": original.get("id"),
            "duplicate_of_path": original.get("path"), "device": original.get("device"),
            "score": original.get("score"), "top_k": original.get("top_k"),
            **{k: original[k] for k in VERDICT_FIELDS if k in original},
            "software_version": __version__, "timings": _round(timings), "judged_at": utc_timestamp()}


def _provenance(backend: dict, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "backend": backend.get("name"),
        "model_sha256": backend.get("model_sha256"),
        "contract_sha256": backend.get("contract_sha256"),
        "software_version": __version__,
        "timings": _round(timings),
        "judged_at": utc_timestamp(),
    }


def _round(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in timings.items()}
