"""Open-set identification: a questioned recording's vector against every enrolled device.

Score = the scorer's score (cosine for the embedder and GSV scorers) of the recording's vector
with each profile's. The calibration of the comparison condition (:func:`calibration_for`: the
registry's own, else its scorer's development calibration) turns each score into a bounded log10
LR; the verdict names the best candidate when ITS LR passes the decision threshold
(:class:`~devrecd.openset.calibration.Decision`), else :data:`UNKNOWN`. A condition without a
calibration names no device: :data:`INCONCLUSIVE`, with the ranked candidates and their scores.
A verdict and its LR therefore never disagree.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import RegistryConfig
from devrecd.openset.calibration import LR_DECIMALS, Calibration, Decision
from devrecd.openset.registry import Registry, recording_embedding
from devrecd.openset.vectors import unit

UNKNOWN = "unknown device"
INCONCLUSIVE = "inconclusive"
SHORT_SECONDS = 5.0  # questioned recordings shorter than this are judged under the "/short" calibrations
SHORT = "/short"


def cosine_scores(query: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-length ``query`` rows (q, D) or (D,) with unit-length ``profiles`` (P, D)."""
    return np.asarray(query, dtype=np.float64) @ np.asarray(profiles, dtype=np.float64).T


NOISE_LEVELS = (10, 20, 30)  # dB: the SNR classes of the noise-matched development calibrations
NOISE = "/snr"


def noise_level(snr_db: float) -> int:
    """The SNR class (one of :data:`NOISE_LEVELS`, the nearest) of a measured SNR in dB."""
    return min(NOISE_LEVELS, key=lambda level: (abs(float(snr_db) - level), level))


def calibration_key(compared_under: str, duration: float | None, snr_db: float | None = None) -> str:
    """The calibration a comparison needs: its condition (``clean``, ``amrnb``, ...); then, where the
    references were brought to the questioned recording's noise (``snr_db``: its measured SNR),
    ``/snr10``, ``/snr20`` or ``/snr30`` (:func:`noise_level`: noise-matched references make every
    phone's recording look more alike, at a rate the SNR sets); then ``/short`` for a questioned
    recording shorter than :data:`SHORT_SECONDS` (fewer frames: lower same-device scores)."""
    key = compared_under + (f"{NOISE}{noise_level(snr_db)}" if snr_db is not None else "")
    return key + (SHORT if duration is not None and float(duration) < SHORT_SECONDS else "")


def calibration_keys(compared_under: str, duration: float | None, noise_snr_db: float | None = None) -> list[str]:
    """The calibrations a comparison may be judged under, the one to use first: with references
    brought to the questioned recording's noise (``noise_snr_db``: its measured SNR), the
    noise-matched calibration of its SNR class, then (a scorer trained before those existed) the
    condition's own, which the SNR check then bounds (:func:`devrecd.openset.conditions.snr_outside`)."""
    plain = calibration_key(compared_under, duration)
    return ([calibration_key(compared_under, duration, noise_snr_db)] if noise_snr_db is not None else []) + [plain]


def parse_calibration_key(key: str) -> tuple[str, int | None, bool]:
    """``(channel, SNR class or None, short)`` of a :func:`calibration_key`."""
    short = key.endswith(SHORT)
    channel, _, level = key.removesuffix(SHORT).partition(NOISE)
    return channel, (int(level) if level else None), short


def development_calibrations(registry: Registry) -> dict[str, Calibration]:
    """The calibrations that travel with the registry's scorer (``devrecd train-gsv``/``train-fusion``), by condition."""
    embedder = registry.embedder or {}
    if embedder.get("dev_calibration") and not embedder.get("dev_calibrations"):
        import logging

        logging.getLogger("devrecd.openset").warning(
            "the registry's scorer carries a development calibration of an earlier format (natural-log LLR and a "
            "threshold), which is no longer read: verdicts are inconclusive until `devrecd calibrate` is run, or "
            "the devices are enrolled again with the shipped scorer", extra={"registry": str(registry.path)})
    cals = embedder.get("dev_calibrations") or {}
    return {k: Calibration.from_dict(v) for k, v in cals.items()}


CASE = "case calibration (devrecd calibrate)"
DEVELOPMENT = "scorer's development calibration"
Layers = Sequence[tuple[dict[str, Calibration], str]]


def pick_calibration(layers: Layers, keys: Sequence[str], condition: dict[str, Any] | None
                     ) -> tuple[Calibration | None, str, str]:
    """``(calibration, source, key)`` for a comparison: ``keys`` in order (:func:`calibration_keys`:
    the noise-matched condition of its SNR class first), each looked up in the layers in order (the
    registry's own, then its scorer's development ones), the first whose SNR range covers the
    recording's measured SNR (:func:`~devrecd.openset.conditions.snr_outside`); else the first there
    is (the caller's SNR check then withholds its LR); ``(None, "", keys[-1])`` when there is none.
    A noise-matched comparison is therefore judged under a noise-matched calibration wherever one
    exists: a case calibration (``devrecd calibrate``) is fitted on comparisons with the references
    as enrolled, and covers those (measured: taking it for a mildly noisier clean recording named a
    never-enrolled phone, docs/conditions.md section 9)."""
    from devrecd.openset.conditions import snr_outside

    first: tuple[Calibration | None, str, str] | None = None
    for key in keys:
        for cals, source in layers:
            cal = cals.get(key)
            if cal is None:
                continue
            if snr_outside(condition, cal.conditions) is None:
                return cal, source, key
            first = first or (cal, source, key)
    return first or (None, "", keys[-1])


def calibration_for(registry: Registry, keys: str | Sequence[str], cfg: RegistryConfig | None = None,
                    dev: dict[str, Calibration] | None = None, condition: dict[str, Any] | None = None
                    ) -> tuple[Calibration | None, str, str]:
    """The calibration of a comparison under condition ``keys`` (:func:`calibration_keys`), where it
    came from and its key (:func:`pick_calibration`: the registry's own, ``devrecd calibrate``, else
    its scorer's development one); ``(None, why, key)`` when there is none. The decision rule is the
    configuration's (``[registry]`` decision, prior, costs), for the registry's number of enrolled devices."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    if cfg is not None and not cfg.use_calibration:
        return None, "registry.use_calibration is off", keys[-1]
    dev = dev if dev is not None else development_calibrations(registry)
    cal, source, key = pick_calibration([(registry.calibrations, CASE), (dev, DEVELOPMENT)], keys, condition)
    if cal is None:
        have = sorted(set(registry.calibrations) | set(dev))
        return None, f"no calibration for condition {keys[0]!r} (calibrated: {', '.join(have) or 'none'})", key
    if cfg is not None:
        cal = cal.with_decision(Decision.from_config(cfg), n_candidates=len(registry.profiles))
    return cal, source, key


def identify_with_registry(window_embeddings: np.ndarray, registry: Registry, *, calibration: Calibration | None,
                           k: int = 5, calibration_source: str = "") -> dict[str, Any]:
    """Verdict fields for one recording from its (n_windows, D) network window embeddings (cosine scores);
    see :func:`identify_vectors`."""
    w = np.asarray(window_embeddings, dtype=np.float64)
    return identify_vectors(recording_embedding(w), unit(w), registry, calibration=calibration, k=k,
                            calibration_source=calibration_source)


def identify_vectors(query: np.ndarray, window_vectors: np.ndarray | Sequence[np.ndarray] | None, registry: Registry, *,
                     calibration: Calibration | Sequence[Calibration] | None, k: int = 5,
                     calibration_source: str | Sequence[str] = "",
                     score: Callable[[np.ndarray, np.ndarray], np.ndarray] = cosine_scores) -> dict[str, Any]:
    """Verdict fields for one recording from its vector (and per-window vectors) under a scorer's ``score``.

    Returns ``device`` (a profile name, ``"unknown device"``, or ``"inconclusive"`` without a
    calibration or when the decision threshold is beyond the calibration's upper bound), ``score`` (best score), ``log10_lr`` (bounded log10 LR of the best candidate, or
    None), ``candidate`` (best profile even when rejected), ``open_set`` (the decision: rule, LR
    threshold, the calibration's hash and source, registry path and size, scorer kind), ``top_k``
    (ranked profiles with score and log10_lr) and ``windows_best`` (best profile per window).
    ``window_vectors``: one (n_windows, D) array, or the recording's windows in consecutive chunks
    (a sequence of such arrays: :meth:`~devrecd.openset.gsv.GsvScorer.accumulator`).

    ``calibration`` (and ``calibration_source``) may be one per profile, in ``registry.names``
    order: profiles compared under different conditions (some references brought to the
    questioned recording's noise, others as they are: :func:`~devrecd.openset.matching.resolve_noise_per_profile`).
    Candidates are then ranked by their unbounded LR (scores of different conditions are not
    comparable, LRs are; the bounded ones tie at bounds that differ between calibrations: a
    candidate scoring 0.67 at one calibration's lower bound, -1.8, ranked below one scoring -0.26 at
    another's, -1.48), and decided under its own calibration, on its bounded LR. Candidates
    whose calibration cannot decide (threshold beyond its bounds) are skipped: the best-ranked
    decidable one is named when its own calibration accepts it (the undecidable ones ranked above
    it listed in ``open_set.passed_over``); otherwise no device is named, "unknown device" only
    when every candidate's calibration could decide, else "inconclusive" (``open_set.undecided``
    lists those that could not).
    With one calibration, LR order is score order (the map is increasing).
    """
    names, means = registry.matrix()
    scores = np.asarray(score(np.atleast_2d(query), means), dtype=np.float64)[0]
    per_profile = calibration is not None and not isinstance(calibration, Calibration)
    cals: list[Calibration] | None = (None if calibration is None else list(calibration) if per_profile
                                      else [calibration] * len(names))
    sources = list(calibration_source) if not isinstance(calibration_source, str) else [calibration_source] * len(names)
    if cals is not None and (len(cals) != len(names) or len(sources) != len(names)):
        raise ValueError(f"{len(cals)} calibrations and {len(sources)} sources for {len(names)} profiles")
    if not per_profile:  # one scale: by score (the LR map is increasing)
        lrs = None if calibration is None else np.round(calibration.log10_lr(scores)[0], LR_DECIMALS)
        order = np.argsort(-scores, kind="stable")
    else:  # by the unbounded LR: the bounds differ between calibrations, and ties at them say nothing
        bounded, raw = np.array([c.log10_lr(float(v)) for c, v in zip(cals, scores)]).T
        lrs = np.round(bounded, LR_DECIMALS)
        order = np.lexsort((-scores, -raw))
    best = int(order[0])
    undecided: list[str] = []  # candidates whose calibration cannot decide (per profile)
    passed_over: list[str] = []
    if per_profile:
        # Each candidate is decided under its own calibration. One whose calibration cannot decide (its
        # threshold beyond its bounds: that comparison's LRs can neither reach it nor exclude it) is
        # skipped, and the best-ranked decidable one decides, named or not (one rejected under its own
        # calibration is not passed over for a weaker one, whose threshold may differ, as under the far
        # rule). No device named, every candidate is excluded ("unknown device") only when each could be.
        undecided = [names[int(i)] for i in order if not cals[int(i)].decidable]  # type: ignore[index]
        decidable = [int(i) for i in order if cals[int(i)].decidable]  # type: ignore[index]
        if decidable and cals[decidable[0]].accepts(float(lrs[decidable[0]])):  # type: ignore[index]
            best = decidable[0]
            passed_over = [names[int(i)] for i in order[: list(order).index(best)]]
    cal = None if cals is None else cals[best]
    accepted = cal is not None and cal.accepts(float(lrs[best]))
    # No decision can be made when there is no calibration, or when the decision threshold lies outside
    # the LRs the calibration's trials support (above the upper bound: a narrowband call among many
    # enrolled devices; below the lower one: a prior that names whatever is compared): then no device
    # is named and none is excluded.
    undecidable = cal is None or not cal.decidable or (not accepted and bool(undecided))
    device = names[best] if accepted else (INCONCLUSIVE if undecidable else UNKNOWN)
    decision: dict[str, Any] = {"accepted": accepted, "decidable": not undecidable, "calibration_source": sources[best],
                                "registry": str(registry.path), "profiles": len(names),
                                "embedder": registry.embedder.get("fingerprint"), "scorer": registry.kind}
    if undecided:  # candidates under calibrations that could not decide: neither named nor excluded
        decision["undecided"] = undecided
    if passed_over:  # ranked above the named candidate, under calibrations that could not decide
        decision["passed_over"] = passed_over
    if cal is not None:
        decision.update({"rule": cal.decision["rule"], "prior": cal.decision["prior"],
                         "n_candidates": cal.decision.get("n_candidates"),
                         "log10_threshold": cal.log10_threshold,
                         "threshold": round(float(cal.threshold), 6), "calibration": cal.fitted_sha256,
                         "calibration_basis": cal.basis, "bounds": [cal.lower, cal.upper]})
    chunks = [] if window_vectors is None else \
        [window_vectors] if isinstance(window_vectors, np.ndarray) else list(window_vectors)
    windows_best = [names[int(j)] for c in chunks if len(c) for j in np.asarray(score(c, means)).argmax(axis=1)]
    return {
        "device": device,
        "score": round(float(scores[best]), 6),
        "log10_lr": None if lrs is None else float(lrs[best]),
        "candidate": names[best],
        "open_set": decision,
        "top_k": [{"device": names[i], "score": round(float(scores[i]), 6),
                   **({"log10_lr": float(lrs[i])} if lrs is not None else {})}
                  for i in order[: max(1, k)]],
        "windows_best": windows_best,
    }
