"""The examiner's operations on files: enrol references, build calibration trials, calibrate.

Thin glue between the embedder (files -> embeddings), the registry and the calibration maths; the
CLI and the benchmark call these, the daemon only needs :func:`~devrecd.openset.scoring.identify_with_registry`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import Config
from devrecd.openset.conditions import describe_conditions, describe_population
from devrecd.openset.calibration import PRIOR_TRIALS, CalibrationError
from devrecd.openset.registry import Reference, Registry, RegistryError
from devrecd.provenance import utc_timestamp
from devrecd.openset.scorers import as_scorer, registry_scorer, scorer_accumulator, scorer_arrays, scorer_for_channel
from devrecd.stages import features_for_file

log = logging.getLogger("devrecd.openset")
MATCHED_REGISTRIES = 16  # RegistryJudge: registries matched to a (channel, noise) condition kept in memory


def recording_features(scorer: Any, path: str | os.PathLike, cfg: Config, *, hop_seconds: float | None = None,
                       channel: Any = None) -> tuple[Any, np.ndarray]:
    """Decode a recording and compute its raw windows with the SCORER's frontend (it defines what
    its input means), through the one feature path; passed through ``channel`` first when given
    (a :class:`devrecd.audio.channel.Channel`)."""
    from dataclasses import replace
    from functools import partial

    from devrecd.audio.transmit import apply_channel

    device = getattr(getattr(scorer, "embedder", None), "device", "cpu")
    return features_for_file(path, replace(cfg, frontend=scorer.frontend), device=device, hop_seconds=hop_seconds,
                             transform=None if channel is None else partial(apply_channel, channel))


def enrol_files(registry: Registry, scorer: Any, name: str, paths: Sequence[str | os.PathLike],
                cfg: Config, *, hop_seconds: float | None = None,
                on_file: Callable[[str, int], None] | None = None) -> tuple[int, int]:
    """Add reference recordings to device ``name`` with ``scorer`` (a scorer of
    :mod:`devrecd.openset.scorers`, or a network Embedder); returns (added, skipped duplicates).

    Every file is decoded before the registry changes, so a bad reference leaves it untouched
    (the AudioError of the first bad file is raised). A new registry stores the scorer's arrays.
    """
    scorer = as_scorer(scorer)
    desc = scorer.describe()
    registry.check_embedder(desc)  # fail before any decoding
    refs = []
    for path in paths:
        rec, feats = recording_features(scorer, path, cfg, hop_seconds=hop_seconds)
        refs.append((Reference(sha256=rec.sha256, path=str(path), windows=int(feats.shape[0]),
                               seconds=float(rec.duration), enrolled_at=utc_timestamp()), scorer.recording_vector(feats)))
        if on_file is not None:
            on_file(str(path), int(feats.shape[0]))
    if cfg.registry.keep_references:  # the audio itself, by hash: references can be brought to any condition later
        from devrecd.openset.matching import ReferenceStore

        store = ReferenceStore.for_registry(registry.path)
        for path, (ref, _) in zip(paths, refs):
            store.put(path, sha256=ref.sha256)
    fresh = not registry.profiles
    added = registry.enroll(name, desc, refs)
    if fresh and added[0]:
        registry.scorer_arrays = scorer_arrays(scorer)
    return added


@dataclass(frozen=True)
class Trials:
    """Scores of held-out recordings against every profile, and which pairs are targets."""

    profiles: list[str]
    recordings: list[str]  # paths
    devices: list[str]  # true device of each recording (may be one the registry does not know)
    scores: np.ndarray  # (n_recordings, n_profiles) cosine scores
    conditions: list[dict[str, Any]] = field(default_factory=list)  # each recording's describe() (no samples)

    @property
    def is_target(self) -> np.ndarray:
        return np.array([[d == p for p in self.profiles] for d in self.devices], dtype=bool)

    @property
    def target_scores(self) -> np.ndarray:
        return self.scores[self.is_target]

    @property
    def nontarget_scores(self) -> np.ndarray:
        return self.scores[~self.is_target]

    @property
    def open_set_scores(self) -> np.ndarray:
        """Per recording, its best score over the OTHER devices: what it would score were its own
        device not enrolled (profiles are independent, so leaving one out changes no other score)."""
        masked = np.where(self.is_target, -np.inf, self.scores)
        best = masked.max(axis=1)
        return best[np.isfinite(best)]


def score_recordings(registry: Registry, scorer: Any, items: Sequence[tuple[str, str]], cfg: Config, *,
                     hop_seconds: float | None = None, channel: Any = None, matcher: Any = None,
                     on_recording: Callable[[str], None] | None = None) -> Trials:
    """Score ``(path, true device)`` recordings against every profile of the registry
    (``on_recording(path)`` after each one: progress).

    Recordings that are references of the registry are left out: a reference scored against its
    own profile would make the calibration look better than it is. With a ``channel`` (and the
    :class:`~devrecd.openset.matching.ConditionMatcher` that holds the references' audio), both the
    recordings and the profiles' references are passed through it and vectorised with the scorer's
    model of that channel (:func:`~devrecd.openset.scorers.scorer_for_channel`): trials under that
    condition, as a verdict under it scores them.
    """
    scorer = as_scorer(scorer)
    registry.check_embedder(scorer.describe())
    profiles = registry
    if channel is not None:
        from devrecd.openset.matching import matched_registry

        scorer = scorer_for_channel(scorer, channel)
        profiles = matched_registry(registry, matcher, channel, scorer.recording_vector)
    enrolled = {r.sha256 for p in registry.profiles.values() for r in p.references}
    paths, devices, embs, conditions = [], [], [], []
    for path, device in items:
        rec, feats = recording_features(scorer, path, cfg, hop_seconds=hop_seconds, channel=channel)
        if rec.sha256 in enrolled:
            log.warning("left out of the trials: it is an enrolled reference", extra={"path": str(path)})
            continue
        paths.append(str(path))
        devices.append(device)
        embs.append(scorer.recording_vector(feats))
        conditions.append(rec.describe())
        if on_recording is not None:
            on_recording(str(path))
    if not embs:
        raise CalibrationError("no trial recordings left (all were references, or none were given)")
    names, means = profiles.matrix()
    scores = scorer.score(np.stack(embs), means)
    return Trials(profiles=names, recordings=paths, devices=devices, scores=scores, conditions=conditions)


def calibration_trials_under(registry: Registry, scorer: Any, items: Sequence[tuple[str, str]], cfg: Config,
                             conditions: Sequence[str], on_recording: Callable[[str], None] | None = None) -> dict[str, Trials]:
    """Trials under each named condition (``clean`` = as they are), by condition."""
    from devrecd.audio.channel import get_channel
    from devrecd.errors import ArtifactError
    from devrecd.openset.matching import CLEAN, ConditionMatcher, ReferenceStore

    store = ReferenceStore.for_registry(registry.path)
    missing = [r.sha256 for p in registry.profiles.values() for r in p.references if not store.has(r.sha256)]
    if missing and any(c != CLEAN for c in conditions):
        raise ArtifactError(f"{len(missing)} reference(s) of {registry.path} are not in {store.root}: enrol them "
                            "again (registry.keep_references) to calibrate under a condition", reason="reference_missing")
    scorer = as_scorer(scorer)
    device = getattr(getattr(scorer, "embedder", None), "device", "cpu")
    matcher = ConditionMatcher(store, scorer.frontend, cfg.audio, device=device)
    return {c: score_recordings(registry, scorer, items, cfg, channel=None if c == CLEAN else get_channel(c),
                                matcher=matcher, on_recording=on_recording) for c in conditions}


def calibrate_registry(registry: Registry, trials: dict[str, Trials], *, decision: Any,
                       source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one case calibration per condition of ``trials``, store them in the registry (caller saves)
    and return them. Each is regularised toward the scorer's development calibration of the same
    condition when it has one (few case trials then cannot make it worse; many can refine it)."""
    from devrecd.openset.calibration import fit_calibration
    from devrecd.openset.scoring import SHORT
    from devrecd.openset.scoring import development_calibrations

    dev = development_calibrations(registry)
    cals, info = {}, {"calibrated_at": utc_timestamp(), **(source or {})}
    for cond, t in trials.items():
        if t.profiles != registry.names:
            raise RegistryError("the trials were scored against another set of profiles; score them again")
        groups = np.repeat(np.arange(len(t.recordings)), len(t.profiles))
        prior = dev.get(cond)
        cals[cond] = fit_calibration(
            t.scores.ravel(), t.is_target.ravel().astype(int), groups, decision=decision,
            n_candidates=len(registry.names),
            prior=prior, scorer={k: registry.embedder.get(k) for k in ("kind", "fingerprint")},
            # The channel the trials were made under (the recordings' own headers are WAV): the condition a
            # verdict, compare and the report check against.
            population=describe_population(t, source),
            conditions={**describe_conditions(t.conditions), "channels": [cond.removesuffix(SHORT)], "condition": cond},
            basis=("case trials, regularised toward the scorer's development calibration (worth "
                   f"{int(PRIOR_TRIALS)} trials)" if prior is not None else "case trials"))
        info.setdefault("recordings", {})[cond] = len(t.recordings)
    registry.set_calibrations(cals, info)
    return cals


class RegistryJudge:
    """Open-set verdicts for the daemon and ``identify`` when ``registry.path`` is configured.

    Holds the registry, the scorer its profiles were made with (:func:`registry_scorer`: the GSV
    arrays the registry stores, the network ``model`` or ``registry.embedder_model`` names (a
    checkpoint or its embedder export), else the checkpoint the registry names) and the threshold
    (:func:`~devrecd.openset.scoring.calibration_for`, per comparison condition). ``judge(features)`` takes a recording's
    (n_windows, 128, 73) raw features, the same array the closed-set backend gets, and returns
    verdict fields to merge into the record.

    ``adopt_frontend``: serving open set only (no closed-set model fixes the frontend), the
    pipeline computes the scorer's own frontend (:attr:`frontend`) instead of refusing a configured one.
    """

    def __init__(self, cfg: Config, *, model: str | os.PathLike | None = None, device: str = "cpu",
                 adopt_frontend: bool = False) -> None:
        from devrecd.openset.registry import open_registry
        from devrecd.openset.scoring import development_calibrations

        if not cfg.registry.path:
            raise RegistryError("registry.path is not set", reason="no_registry")
        self.registry = open_registry(cfg.registry.path)
        # The network of an embedder/fusion registry: ``model``, else registry.embedder_model, else the
        # checkpoint the registry recorded (the registry's fingerprint check refuses any other network).
        self.scorer = registry_scorer(self.registry, model=model, configured=cfg.registry.embedder_model,
                                      device=device, threads=cfg.backend.threads)
        self.embedder = getattr(self.scorer, "embedder", None)
        self.frontend = self.scorer.frontend if adopt_frontend else cfg.frontend  # what the pipeline must compute
        if self.scorer.frontend.fingerprint() != self.frontend.fingerprint():
            # The pipeline hands over features of the configured frontend; a vector (network or
            # supervector) of other features would be compared with profiles it does not match.
            raise RegistryError(f"registry {cfg.registry.path} was enrolled with another frontend than the one "
                                "configured (frontend.*); serve with the frontend it was made with",
                                reason="frontend_mismatch")
        self.registry_cfg = cfg.registry
        self.dev_calibrations = development_calibrations(self.registry)
        self.top_k = cfg.watch.top_k
        from devrecd.openset.matching import ConditionMatcher, ReferenceStore

        self.match_conditions = cfg.registry.match_conditions
        store = ReferenceStore.for_registry(self.registry.path)
        self.store = store if store.root.is_dir() else None
        self.matcher = ConditionMatcher(store, self.scorer.frontend, cfg.audio, device=device)
        # References brought to a noise: their vectors kept on disk (worker processes and restarts share
        # them), one cache per model that vectorises references (the main one, a channel model), by fingerprint.
        self._vectors: dict[str, Any] = {}
        # (channel key, noise key, model, profiles matched) -> the registry with references under it and
        # their SNRs; noise keys are as many as questioned conditions, so only the MATCHED_REGISTRIES most
        # recent are kept. Keyed by the model too: a channel model's vectors are not the main model's.
        self._matched: OrderedDict[tuple[Any, ...], tuple[Registry, dict[str, list[float]]]] = OrderedDict()
        # judge() is called by the pipeline's workers at once. This lock guards the caches of this judge
        # (those two dicts and the one below) for lookups and inserts only: a registry is matched outside it
        # (~0.2 s per reference for a new noise condition), one computation per key in flight (another
        # thread needing that key waits for its Future; threads needing other keys go on). The matcher
        # and the kept vectors are safe to use from several threads themselves.
        self._matching = threading.Lock()
        self._pending: dict[tuple[Any, ...], Future] = {}

    def _kept_vectors(self, model: Any) -> Any:
        """The on-disk cache of matched reference vectors of ``model`` (None without stored references)."""
        from devrecd.openset.matched_cache import MatchedVectors

        if self.store is None:
            return None
        fingerprint = model.describe().get("fingerprint") or ""
        with self._matching:
            if fingerprint not in self._vectors:
                self._vectors[fingerprint] = MatchedVectors(self.matcher.cache_dir, self.matcher.key, fingerprint)
            return self._vectors[fingerprint]

    def _matched_under(self, channel: Any, noise: Any, model: Any, profiles: list[list[str]],
                       as_is: Sequence[bool] | None = None) -> tuple[Registry, dict[str, list[float]]]:
        """The registry with its references under ``channel`` and ``noise`` (None, None: the registry
        itself) vectorised by ``model``, and per profile brought to a noise its references' measured
        SNRs; ``as_is`` (per profile of ``profiles``, the registry's names in order): True for those
        compared as they are, whose references are not brought to the noise (left as recorded: the
        caller puts their plain vectors in). Cached (the :data:`MATCHED_REGISTRIES` most recent).

        Thread-safe; ``self._matching`` is held only to look up and fill the cache, not while matching:
        one thread matches a missing key, others that need it wait for its result (or its exception)."""
        from devrecd.audio.noise import noise_key
        from devrecd.openset.matching import CLEAN, matched_registry

        if channel is None and noise is None:
            return self.registry, {}
        names = self.registry.names
        only = None if noise is None or not any(as_is or ()) else \
            frozenset(n for n, plain in zip(names, as_is) if not plain)
        mkey = (channel.key if channel is not None else CLEAN, noise_key(noise) if noise is not None else "",
                "" if model is self.scorer else model.fingerprint, tuple(sorted(only)) if only is not None else None)
        with self._matching:
            hit = self._matched.get(mkey)
            if hit is not None:
                self._matched.move_to_end(mkey)
                return hit
            pending, mine = self._pending.get(mkey), False
            if pending is None:
                pending, mine = Future(), True
                self._pending[mkey] = pending
        if not mine:
            return pending.result()  # matched by another thread meanwhile
        try:
            matched = matched_registry(self.registry, self.matcher, channel, model.recording_vector, noise,
                                       self._kept_vectors(model), only)
            snrs = ({n: [self.matcher.matched_snr(s, channel, noise) for s in shas]
                     for n, shas in zip(names, profiles) if only is None or n in only} if noise is not None else {})
        except BaseException as exc:
            with self._matching:
                del self._pending[mkey]
            pending.set_exception(exc)
            raise
        with self._matching:
            self._matched[mkey] = (matched, snrs)
            while len(self._matched) > MATCHED_REGISTRIES:
                self._matched.popitem(last=False)
            del self._pending[mkey]
        pending.set_result((matched, snrs))
        return matched, snrs

    def describe_decision(self) -> str:
        """One line for logs: the decision rule and the conditions with a calibration."""
        from devrecd.openset.calibration import Decision

        have = sorted(set(self.registry.calibrations) | set(self.dev_calibrations))
        return (f"{Decision.from_config(self.registry_cfg).describe(len(self.registry.profiles))}; "
                f"calibrated conditions: {', '.join(have) or 'none'}")

    def accumulator(self) -> Any:
        """A fresh accumulator of the scorer (``add(features_chunk)``; :meth:`judge` takes it once fed
        a recording's features, in order), or None where the scorer needs the features whole.
        With channel models, it feeds every model (the channel is known once the recording is decoded)."""
        return scorer_accumulator(self.scorer)

    def judge(self, features: Any, recording: dict[str, Any] | None = None) -> dict[str, Any]:
        """Verdict fields (device, score, log10_lr, candidate, open_set, top_k, windows_best, comparison,
        condition_status) of one recording; ``recording`` (its ``describe()``) carries its condition.
        ``features``: the recording's (n_windows, 128, 73) raw features, or an :meth:`accumulator`
        fed them chunk by chunk (the same verdict, without the features held whole)."""
        from devrecd.openset.conditions import snr_outside
        from devrecd.openset.matching import condition_report, resolve_comparison, resolve_noise_per_profile
        from devrecd.openset.scoring import calibration_for, calibration_keys, identify_vectors

        reg = self.registry
        condition = (recording or {}).get("condition")
        profiles = [[r.sha256 for r in reg.profiles[n].references] for n in reg.names]
        channel, under, refs, note = resolve_comparison(condition, self.store, profiles, self.match_conditions)
        # Matched to a channel: both sides vectorised with the scorer's model of it (its calibrations were
        # fitted with it); otherwise the main model, which the profiles were enrolled with.
        model = scorer_for_channel(self.scorer, channel)
        # Noise: only where the references can be brought to the questioned recording's channel (or none is needed).
        # (a note: the references could not be brought to the questioned channel or storage; it says why)
        can_match = self.match_conditions and self.store is not None and not note
        noise_note = ("" if can_match else note or ("condition matching is off (registry.match_conditions)"
                      if not self.match_conditions else "the registry keeps no reference audio"))
        noise, noise_fields, as_noisy = resolve_noise_per_profile(
            condition, self.matcher, profiles, channel, enabled=can_match, note=noise_note,
            duration=(recording or {}).get("duration"))
        duration = (recording or {}).get("duration")
        keys = calibration_keys(under, duration, noise.snr_db if noise is not None else None)
        cal, source, key = calibration_for(self.registry, keys, self.registry_cfg, self.dev_calibrations, condition)
        # A recording noisier than every recording the calibration was fitted on, compared with
        # references brought to its noise, is outside what the calibration validates, as a channel it
        # never saw is: noise-matched references make an unknown phone's noisy recording score like a
        # known one (measured: benchmarks/conditions.py), so no LR and no named device; the ranking
        # stays. Not matched (a phone as noisy as its references): the LR, with the statement.
        outside = snr_outside(condition, cal.conditions) if cal is not None else None
        if outside and noise is not None:  # noise-matched: outside validation (no LR, nothing named)
            cal, source = None, outside
        # Profiles whose own references are as noisy as the questioned recording: compared as they are,
        # under the calibration of the plain comparison. Per candidate needs both calibrations (scores of
        # two conditions are not comparable): else every profile is noise-matched, as before. Decided
        # before matching, so that the references of profiles compared as they are are not matched.
        plain_cal = None
        if any(as_noisy):
            plain_cal, plain_source, plain_key = calibration_for(self.registry, calibration_keys(under, duration),
                                                                 self.registry_cfg, self.dev_calibrations, condition)
        per_candidate = cal is not None and plain_cal is not None
        reg, matched_snrs = self._matched_under(channel, noise, model, profiles, as_noisy if per_candidate else None)
        # The references brought to the noise (per candidate, _matched_under leaves out the profiles
        # compared as they are; otherwise every profile was matched).
        snrs = [v for values in matched_snrs.values() for v in values]
        if snrs:
            noise_fields["matched_references_snr_db"] = [min(snrs), max(snrs)]
        if any(as_noisy) and not per_candidate:
            noise_fields.pop("profiles_as_noisy", None)
        plain = self._matched_under(channel, None, model, profiles)[0] if any(as_noisy) and per_candidate else None
        if callable(getattr(features, "result_for", None)):  # streamed into every model's accumulator
            query, windows = features.result_for(channel.name if model is not self.scorer else None)
        elif callable(getattr(features, "result", None)):  # an accumulator (streamed features)
            if model is not self.scorer:  # the main model's statistics only: never scored against channel-model profiles
                raise RegistryError(f"a {channel.name} comparison needs its channel model's statistics: feed "
                                    "judge.accumulator(), not the main model's", reason="channel_model")
            query, windows = features.result()
        else:
            query, windows = model.recording_vector(features), model.window_vectors(features)
        cals: Any = cal
        if plain is not None:  # some profiles compared as they are, under the calibration of the plain comparison
            from dataclasses import replace

            reg = replace(reg, profiles={n: plain.profiles[n] if as_noisy[i] else reg.profiles[n]
                                         for i, n in enumerate(reg.names)})
            cals = [plain_cal if as_noisy[i] else cal for i in range(len(reg.names))]
            source = [plain_source if as_noisy[i] else source for i in range(len(reg.names))]
        fields = identify_vectors(query, windows, reg, calibration=cals, k=self.top_k, calibration_source=source,
                                  score=model.score)
        if plain is not None:  # which key each candidate was judged under; the verdict's is the best one's
            if as_noisy[reg.names.index(fields["candidate"])]:
                key = plain_key
                # Compared as it is: ``noise_matched`` is the best candidate's, as `compare` says it for one
                # profile (the report reads it), and a recording outside the plain calibration's SNR range
                # keeps its LR with the statement, as an unmatched comparison does.
                noise_fields["noise_matched"] = False
                outside = snr_outside(condition, plain_cal.conditions)
            source = fields["open_set"]["calibration_source"]
            as_is = {n for i, n in enumerate(reg.names) if as_noisy[i]}
            noise_fields["compared_as_is"] = sorted(as_is)
            for entry in fields["top_k"]:
                entry["noise_matched"] = entry["device"] not in as_is
        fields["open_set"]["condition"] = key
        if model is not self.scorer:  # the channel model that vectorised both sides
            fields["open_set"]["channel_model"] = {"channel": channel.name, "fingerprint": model.fingerprint}
        report = condition_report(condition, under, refs, [key] if cal is not None else [],
                                  note if cal is not None else "; ".join(filter(None, [source, note])))
        report.pop("questioned")  # the record carries the recording's condition already
        report.update(noise_fields)
        if channel is not None and channel.storage:  # the references were stored as the questioned file is
            report["references_stored_as"] = channel.storage
        if outside:
            report["snr_status"], report["snr_statement"] = "outside", outside
        fields["comparison"] = report
        fields["condition_status"] = report["status"]
        fields["open_set"]["registry_sha256"] = self.registry.content_sha256  # the JSON the decision came from
        return fields
