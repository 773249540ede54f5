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


def with_open_set(record: dict[str, Any], open_set: dict[str, Any]) -> dict[str, Any]:
    """A judged record with the registry's open-set verdict in front and the closed-set one beside it."""
    closed = {k: record[k] for k in ("device", "score", "top_k")}
    return {**record, **open_set, "closed_set": closed}


def with_comparison(record: dict[str, Any], recording: dict[str, Any], open_set: dict[str, Any] | None,
                    validated: Sequence[str]) -> dict[str, Any]:
    """A judged record completed: the registry's open-set verdict (``open_set``, which says which
    condition it compared under) in front, or, closed set, the condition the model judged under and
    whether it was validated there (``backend.validated_conditions``)."""
    if open_set is not None:
        return with_open_set(record, open_set)
    from devrecd.openset.scoring import INCONCLUSIVE

    out = {**record, **closed_set_comparison(recording.get("condition"), validated)}
    if out["condition_status"] != "validated":
        # A condition the model was never validated under names no device (a call recording is
        # named with probability 0.999 by a network trained on WAV); the candidates stay listed.
        out["candidate"], out["device"] = out["device"], INCONCLUSIVE
    return out


def closed_set_comparison(condition: dict[str, Any] | None, validated: Sequence[str]) -> dict[str, Any]:
    """Verdict fields for a closed-set verdict: the condition it was judged under, and whether the
    model was validated under it (``backend.validated_conditions``). The training data is not at hand
    when serving, so nothing is matched: a questioned codec outside validation is said to be so."""
    from devrecd.openset.matching import CLEAN, condition_report, questioned_channel

    try:
        channel = questioned_channel(condition)
        under = channel.name if channel is not None else CLEAN
    except ValueError:
        under = "unknown"
    rep = condition_report(condition, under, "training data (not matched: not at hand when serving)", validated)
    rep.pop("questioned")
    return {"comparison": rep, "condition_status": rep["status"]}


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


def duplicate_record(recording: dict, original: dict, *, timings: dict[str, float]) -> dict[str, Any]:
    """The record of a file whose content was judged before under another name: the earlier verdict."""
    return {"outcome": "duplicate", **recording, "duplicate_of": original.get("id"),
            "duplicate_of_path": original.get("path"), "device": original.get("device"),
            "score": original.get("score"), "top_k": original.get("top_k"),
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
