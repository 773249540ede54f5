"""Source comparison: was each questioned recording made with the reference device?

A comparison uses one open-set scorer (:mod:`devrecd.openset.scorers`: the network embedder, the
GMM supervector or their fusion) exactly as the registry does: a recording's vector is
``scorer.recording_vector`` of its raw windows (:func:`~devrecd.openset.workflow.recording_features`,
the scorer's own frontend), the reference model is the unit-length mean of the reference
recordings' vectors (a registry profile), the score is ``scorer.score`` and the per-window
timeline ``scorer.score`` of ``scorer.window_vectors``. So a comparison scores what
``devrecd calibrate`` scored for its trials, and a :class:`~devrecd.openset.calibration.Calibration`
fitted there (or the scorer's development calibration) of the questioned recording's condition
applies (to that scorer only: its ``describe()`` fingerprint). Without one the score is reported
and no LR is given.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from devrecd import __version__
from devrecd.audio import AudioError, sha256_file, window_starts
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.forensic.lr import Calibration, assess, comparison_channel
from devrecd.provenance import utc_timestamp
from devrecd.stages import failure_of, hop_samples

if TYPE_CHECKING:
    from devrecd.openset.scoring import Layers

NOISE_PROFILES = 16  # Comparer: reference profiles under a noise condition kept in memory
RECORDING_FIELDS = ("path", "sha256", "size", "duration", "sample_rate", "native_rate", "channels", "codec",
                    "container", "decoder", "resampled", "condition")


class ComparisonError(DevrecdError):
    """A comparison that cannot be made as asked (no references, a reference that cannot be read)."""

    reason = "comparison"


@dataclass
class ReferenceSet:
    """The reference recordings of one device and their profile vector (the registry's rule)."""

    device: str
    files: list[dict[str, Any]]  # path, sha256, duration, ... of every reference
    profile: np.ndarray  # (dim,) unit-length mean of the references' recording vectors
    source: str = "files"  # "files" or "registry <path>"
    # The references' audio by sha256 (devrecd.openset.matching.ReferenceStore): what noise matching
    # brings to a questioned recording's noise; None when it is not at hand (a registry that kept none).
    store: Any = None


@dataclass(frozen=True)
class Vectors:
    """What a comparison needs of one recording under one scorer (not its audio)."""

    recording: dict[str, Any]  # Recording.describe() fields of RECORDING_FIELDS
    vector: np.ndarray  # (dim,) scorer.recording_vector
    windows: np.ndarray  # (n_windows, dim) scorer.window_vectors
    starts: np.ndarray  # (n_windows,) window start times in seconds


@dataclass
class Scored:
    """One questioned recording scored against a reference set."""

    recording: dict[str, Any]
    score: float
    window_starts: list[float] = field(default_factory=list)
    window_scores: list[float] = field(default_factory=list)
    comparison: dict[str, Any] = field(default_factory=dict)  # noise matching: resolve_noise's fields


class Comparer:
    """An open-set scorer applied to files: recording vectors (cached per run), reference sets, scores."""

    def __init__(self, scorer: Any, cfg: Config) -> None:
        from devrecd.openset.scorers import as_scorer

        self.scorer = as_scorer(scorer)
        self.cfg = cfg
        # One questioned recording is often compared with several devices: featurise it once. Keyed
        # by the file's identity and version, so a file that changes is read again.
        self._cache: dict[tuple, Vectors] = {}
        # Noise matching (registry.match_conditions): a matcher per reference store, and the profile
        # vectors of reference sets brought to a noise condition, the NOISE_PROFILES most recent.
        self.match_noise = cfg.registry.match_conditions
        self._matchers: dict[str, Any] = {}
        self._noisy: OrderedDict[tuple, tuple[np.ndarray, list[float]]] = OrderedDict()
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _matcher(self, store: Any) -> Any:
        from devrecd.openset.matching import ConditionMatcher

        key = str(store.root)
        if key not in self._matchers:
            self._matchers[key] = ConditionMatcher(store, self.scorer.frontend, self.cfg.audio,
                                                   device=getattr(getattr(self.scorer, "embedder", None), "device", "cpu"))
        return self._matchers[key]

    def _profile_under_noise(self, recording: dict[str, Any], refs: ReferenceSet) -> tuple[np.ndarray, dict[str, Any]]:
        """The reference profile to score a questioned recording against, brought to its measured
        noise when it is noisier than the references (:func:`devrecd.openset.matching.resolve_noise`,
        the registry judge's rule), and the comparison fields that say so."""
        from devrecd.audio.noise import noise_key
        from devrecd.openset.matching import resolve_noise, storage_channel
        from devrecd.openset.registry import DeviceProfile

        condition = recording.get("condition")
        shas = [f["sha256"] for f in refs.files]
        store = refs.store
        kept = store is not None and all(store.has(s) for s in shas)
        note = ("" if kept and self.match_noise else "condition matching is off (registry.match_conditions)"
                if not self.match_noise else "the references' audio is not at hand (a registry that kept none)")
        matcher = self._matcher(store) if store is not None else None
        if matcher is None:
            from devrecd.audio.condition import noise_profile

            target = noise_profile(condition, self.scorer.frontend.sample_rate) if condition else None
            fields: dict[str, Any] = {"noise_matched": False, "noise_note": note}
            if target is not None:
                fields["questioned_snr_db"] = round(target.snr_db, 1)
            return refs.profile, fields
        # A quiet 16-bit file: the references stored as it is (its storage channel), as the verdict does.
        storage = storage_channel(condition) if kept and self.match_noise else None
        noise, fields = resolve_noise(condition, matcher, [shas], storage, enabled=kept and self.match_noise, note=note,
                                      duration=recording.get("duration"))
        if noise is None and storage is None:
            return refs.profile, fields
        key = (str(store.root), tuple(shas), storage.key if storage is not None else "",
               noise_key(noise) if noise is not None else "")
        if key not in self._noisy:
            vecs = [self.scorer.recording_vector(matcher.reference_features(s, storage, noise)) for s in shas]
            self._noisy[key] = (DeviceProfile(name=refs.device, embeddings=np.stack(vecs)).mean,
                                [matcher.matched_snr(s, storage, noise) for s in shas] if noise is not None else [])
            while len(self._noisy) > NOISE_PROFILES:
                self._noisy.popitem(last=False)
        profile, snrs = self._noisy[key]
        if snrs:
            fields["matched_references_snr_db"] = [min(snrs), max(snrs)]
        if storage is not None:
            fields["references_stored_as"] = storage.storage
        return profile, fields

    def describe(self) -> dict[str, Any]:
        """The scorer's identity (what a calibration is bound to)."""
        return self.scorer.describe()

    def vectors(self, path: str | os.PathLike) -> Vectors:
        """Decode one file and compute its vectors (raises AudioError when it cannot be read)."""
        from devrecd.openset.workflow import recording_features

        try:
            st = os.stat(path)
            key: tuple | None = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            key = None  # read_evidence says why it cannot be read
        if key is not None and key in self._cache:
            return self._cache[key]
        rec, feats = recording_features(self.scorer, path, self.cfg)
        fe = self.scorer.frontend
        hop = hop_samples(self.cfg.audio.hop_seconds, fe.sample_rate)
        desc = rec.describe()
        out = Vectors(recording={k: desc[k] for k in RECORDING_FIELDS if k in desc},
                      vector=self.scorer.recording_vector(feats), windows=self.scorer.window_vectors(feats),
                      starts=window_starts(len(rec.samples), fe.clip_samples, hop) / fe.sample_rate)
        if key is not None:
            self._cache[key] = out
        return out

    def references(self, device: str, paths: Sequence[str | os.PathLike]) -> ReferenceSet:
        """Read reference recordings and model them as a registry profile would."""
        from devrecd.openset.registry import DeviceProfile

        if not paths:
            raise ComparisonError(f"no reference recordings for {device!r}")
        files, vecs = [], []
        for p in paths:
            try:
                v = self.vectors(p)
            except AudioError as exc:
                raise ComparisonError(f"reference {p} cannot be used: {exc.reason}: {exc.detail}",
                                      reason=exc.reason) from None
            files.append({**v.recording, "windows": int(v.windows.shape[0])})
            vecs.append(v.vector)
        profile = DeviceProfile(name=device, embeddings=np.stack(vecs)).mean  # the registry's rule
        store = None
        if self.match_noise:  # the references' audio, by hash, for the life of this comparer: noise matching
            from devrecd.openset.matching import ReferenceStore

            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="devrecd-refs-")
            store = ReferenceStore(self._tmp.name)
            for p, f in zip(paths, files):
                store.put(p, sha256=f["sha256"])  # refused if the file changed since it was read
        return ReferenceSet(device=device, files=files, profile=profile, store=store)

    @staticmethod
    def references_from_profile(profile: Any, registry_path: str) -> ReferenceSet:
        """A reference set from an enrolled registry profile (its stored vectors, no decoding; the
        references' audio from the registry's store when it kept it)."""
        from devrecd.openset.matching import ReferenceStore

        files = [{"path": r.path, "sha256": r.sha256, "duration": r.seconds, "windows": r.windows}
                 for r in profile.references]
        store = ReferenceStore.for_registry(registry_path)
        return ReferenceSet(device=profile.name, files=files, profile=profile.mean, source=f"registry {registry_path}",
                            store=store if store.root.is_dir() else None)

    def score(self, path: str | os.PathLike, refs: ReferenceSet) -> Scored:
        """Score a questioned recording against a reference set (raises AudioError when it cannot be read)."""
        v = self.vectors(path)
        matched, comparison = self._profile_under_noise(v.recording, refs)
        profile = np.atleast_2d(matched)
        if profile.shape[1] != v.vector.shape[0]:
            raise ComparisonError(f"the reference profile of {refs.device!r} has {profile.shape[1]} dimensions, "
                                  f"this scorer's vectors {v.vector.shape[0]}: it was made with another scorer")
        per_window = self.scorer.score(v.windows, profile)[:, 0] if len(v.windows) else np.zeros(0)
        return Scored(recording=v.recording, score=float(self.scorer.score(v.vector, profile)[0, 0]),
                      window_starts=[round(float(t), 3) for t in v.starts],
                      window_scores=[round(float(s), 6) for s in per_window], comparison=comparison)


def calibration_summary(cal: Calibration | None) -> dict[str, Any] | None:
    """What a comparison record cites of its calibration."""
    if cal is None:
        return None
    return {"sha256": cal.sha256, "method": cal.method, "basis": cal.basis, "bounds": [cal.lower, cal.upper],
            "population": cal.population, "conditions": cal.conditions, "n_target": cal.metrics.get("n_target"),
            "n_nontarget": cal.metrics.get("n_nontarget")}


def calibration_of(calibration: Calibration | Layers | dict[str, Calibration] | None, recording: dict[str, Any],
                   comparison: dict[str, Any] | None = None) -> Calibration | None:
    """The calibration of a questioned recording: the one given, or of the condition it is compared
    under, from ``calibration``'s layers (``[(calibrations by condition, source), ...]``: the
    registry's case ones, then the scorer's development ones; or one dict), chosen as a verdict
    chooses (:func:`~devrecd.openset.scoring.pick_calibration`; ``comparison``:
    :func:`~devrecd.openset.matching.resolve_noise`'s fields: references brought to its noise, the
    noise-matched calibration of its SNR class is a candidate first).
    ``compare`` brings the references to the questioned recording's noise, not to its channel:
    a recording that went through a channel is compared mismatched, under no calibration (the channel
    ones were fitted with the references matched), and gets no LR."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    from devrecd.openset.matching import CLEAN
    from devrecd.openset.scoring import calibration_keys, pick_calibration

    if comparison_channel(recording.get("condition") or {}) != CLEAN:
        return None
    layers = [(calibration, "")] if isinstance(calibration, dict) else list(calibration)
    snr = (comparison or {}).get("questioned_snr_db") if (comparison or {}).get("noise_matched") else None
    keys = calibration_keys(CLEAN, recording.get("duration"), snr)
    return pick_calibration(layers, keys, recording.get("condition"))[0]


def compare(comparer: Comparer, questioned: Sequence[str | os.PathLike], refs: ReferenceSet,
            calibration: Calibration | Layers | dict[str, Calibration] | None) -> list[dict[str, Any]]:
    """One comparison record per questioned recording (a failed one says why, with its hash).
    ``calibration``: one for every recording, or per comparison condition (:func:`calibration_of`)."""
    from devrecd.forensic.lr import HD, HP

    ident = comparer.describe()
    common = {"reference_device": refs.device, "references": refs.files, "reference_source": refs.source,
              "scorer": ident, "hp": HP, "hd": HD, "software_version": __version__}
    out = []
    for q in questioned:
        t0 = time.perf_counter()
        try:
            s = comparer.score(q, refs)
        except ComparisonError:
            raise
        except (AudioError, DevrecdError) as exc:  # this file cannot be compared (unreadable, no windows)
            failure = failure_of(exc)
            sha = failure.sha256
            if sha is None:
                try:
                    sha = sha256_file(q)
                except OSError:
                    sha = None
            out.append({"outcome": "failed", "path": str(q), "sha256": sha, "reason": failure.reason,
                        "detail": failure.detail, **common, "calibration": None, "compared_at": utc_timestamp()})
            continue
        cal = calibration_of(calibration, s.recording, s.comparison)
        record = {"outcome": "compared", **s.recording, "score": round(s.score, 6),
                  **assess(cal, s.score, {**s.recording, "comparison": s.comparison}, ident),
                  "window_starts": s.window_starts, "window_scores": s.window_scores, "comparison": s.comparison, **common,
                  "calibration": calibration_summary(cal),
                  "seconds": round(time.perf_counter() - t0, 3), "compared_at": utc_timestamp()}
        out.append(record)
    return out
