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
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from devrecd import __version__
from devrecd.audio import AudioError, sha256_file, window_starts
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.forensic.lr import Calibration, assess, comparison_channel
from devrecd.pipeline.stages import hop_samples
from devrecd.provenance import utc_timestamp

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


class Comparer:
    """An open-set scorer applied to files: recording vectors (cached per run), reference sets, scores."""

    def __init__(self, scorer: Any, cfg: Config) -> None:
        from devrecd.openset.scorers import as_scorer

        self.scorer = as_scorer(scorer)
        self.cfg = cfg
        # One questioned recording is often compared with several devices: featurise it once. Keyed
        # by the file's identity and version, so a file that changes is read again.
        self._cache: dict[tuple, Vectors] = {}

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
        return ReferenceSet(device=device, files=files, profile=profile)

    @staticmethod
    def references_from_profile(profile: Any, registry_path: str) -> ReferenceSet:
        """A reference set from an enrolled registry profile (its stored vectors, no decoding)."""
        files = [{"path": r.path, "sha256": r.sha256, "duration": r.seconds, "windows": r.windows}
                 for r in profile.references]
        return ReferenceSet(device=profile.name, files=files, profile=profile.mean, source=f"registry {registry_path}")

    def score(self, path: str | os.PathLike, refs: ReferenceSet) -> Scored:
        """Score a questioned recording against a reference set (raises AudioError when it cannot be read)."""
        v = self.vectors(path)
        profile = np.atleast_2d(refs.profile)
        if profile.shape[1] != v.vector.shape[0]:
            raise ComparisonError(f"the reference profile of {refs.device!r} has {profile.shape[1]} dimensions, "
                                  f"this scorer's vectors {v.vector.shape[0]}: it was made with another scorer")
        per_window = self.scorer.score(v.windows, profile)[:, 0] if len(v.windows) else np.zeros(0)
        return Scored(recording=v.recording, score=float(self.scorer.score(v.vector, profile)[0, 0]),
                      window_starts=[round(float(t), 3) for t in v.starts],
                      window_scores=[round(float(s), 6) for s in per_window])


def calibration_summary(cal: Calibration | None) -> dict[str, Any] | None:
    """What a comparison record cites of its calibration."""
    if cal is None:
        return None
    return {"sha256": cal.sha256, "method": cal.method, "basis": cal.basis, "bounds": [cal.lower, cal.upper],
            "population": cal.population, "conditions": cal.conditions, "n_target": cal.metrics.get("n_target"),
            "n_nontarget": cal.metrics.get("n_nontarget")}


def calibration_of(calibration: Calibration | dict[str, Calibration] | None, recording: dict[str, Any]
                   ) -> Calibration | None:
    """The calibration of a questioned recording: the one given, or of its comparison condition."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    from devrecd.openset.scoring import calibration_key

    return calibration.get(calibration_key(comparison_channel(recording.get("condition") or {}),
                                           recording.get("duration")))


def compare(comparer: Comparer, questioned: Sequence[str | os.PathLike], refs: ReferenceSet,
            calibration: Calibration | dict[str, Calibration] | None) -> list[dict[str, Any]]:
    """One comparison record per questioned recording (a failed one says why, with its hash).
    ``calibration``: one for every recording, or one per comparison condition (``calibration_key``)."""
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
            from devrecd.pipeline.stages import failure_of

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
        cal = calibration_of(calibration, s.recording)
        record = {"outcome": "compared", **s.recording, "score": round(s.score, 6),
                  **assess(cal, s.score, s.recording, ident),
                  "window_starts": s.window_starts, "window_scores": s.window_scores, **common,
                  "calibration": calibration_summary(cal),
                  "seconds": round(time.perf_counter() - t0, 3), "compared_at": utc_timestamp()}
        out.append(record)
    return out
