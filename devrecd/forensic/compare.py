"""Source comparison: was each questioned recording made with the reference device?

A comparison needs a *scorer* (:class:`SourceScorer`: any object that turns reference recordings
into a reference model and scores a questioned recording against it; higher = more alike) and,
for a likelihood ratio, an :class:`~devrecd.forensic.lr.LRCalibration` fitted on that same
scorer's scores of development trials. Without one the score is reported and no LR is given.

:class:`EmbeddingScorer` is the open-set embedder's cosine scorer, the same score ``devrecd
calibrate`` computes for its trials (recording embedding against the unit-length mean of the
references' embeddings). Other scorers (a GMM supervector, a fusion) plug in by implementing
:class:`SourceScorer`; their calibration must then come from their own scores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from devrecd import __version__
from devrecd.audio import AudioError, sha256_file, window_starts
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.forensic.lr import LRCalibration, assess

RECORDING_FIELDS = ("path", "sha256", "size", "duration", "sample_rate", "native_rate", "channels", "codec",
                    "container", "decoder", "resampled", "bitrate", "bandwidth")


class ComparisonError(DevrecdError):
    """A comparison that cannot be made as asked (no references, a reference that cannot be read)."""

    reason = "comparison"


@dataclass
class ReferenceSet:
    """The reference recordings of one device and the scorer's model of them."""

    device: str
    files: list[dict[str, Any]]  # path, sha256, duration, ... of every reference
    model: Any  # scorer-specific (e.g. a unit-length mean embedding)
    source: str = "files"  # "files" or "registry <path>"


@dataclass
class Scored:
    """One questioned recording scored against a reference set."""

    recording: dict[str, Any]  # Recording.describe() fields
    score: float
    window_starts: list[float] = field(default_factory=list)
    window_scores: list[float] = field(default_factory=list)


class SourceScorer(Protocol):
    """What a comparison needs of a scorer."""

    def describe(self) -> dict[str, Any]:
        """Identity: ``kind``, ``fingerprint`` (what a calibration is bound to), anything else worth citing."""
        ...

    def references(self, device: str, paths: Sequence[str | os.PathLike]) -> ReferenceSet:
        """Read and model reference recordings (raises on a reference that cannot be read)."""
        ...

    def score(self, path: str | os.PathLike, refs: ReferenceSet) -> Scored:
        """Score a questioned recording (raises AudioError when it cannot be read)."""
        ...


def _recording_fields(rec: Any) -> dict[str, Any]:
    d = rec.describe()
    return {k: d[k] for k in RECORDING_FIELDS if k in d}


class EmbeddingScorer:
    """Cosine score of the open-set embedder (:class:`devrecd.openset.embedder.Embedder`)."""

    kind = "embedder"  # the same identity as devrecd.openset.scorers.EmbedderScorer

    def __init__(self, embedder: Any, cfg: Config) -> None:
        self.embedder = embedder
        self.cfg = cfg
        # One questioned recording is often compared with several devices: embed it once. Keyed by
        # the file's identity and version, so a file that changes is embedded again.
        self._cache: dict[tuple, tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}

    @staticmethod
    def identity(embedder: Any) -> dict[str, Any]:
        """The scorer identity of an embedder (also what ``devrecd calibrate`` records)."""
        return {"kind": EmbeddingScorer.kind, **embedder.describe()}

    def describe(self) -> dict[str, Any]:
        return self.identity(self.embedder)

    def _embed(self, path: str | os.PathLike) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """(recording description, window embeddings, window start times) of one file."""
        try:
            st = os.stat(path)
            key: tuple | None = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            key = None  # read_evidence says why it cannot be read
        if key is not None and key in self._cache:
            return self._cache[key]
        rec, windows = self.embedder.embed_file(path, self.cfg)
        fe = self.embedder.frontend
        hop = max(1, int(round(self.cfg.audio.hop_seconds * fe.sample_rate)))
        starts = window_starts(len(rec.samples), fe.clip_samples, hop) / fe.sample_rate
        out = (_recording_fields(rec), windows, starts)  # the description, not the audio
        if key is not None:
            self._cache[key] = out
        return out

    def references(self, device: str, paths: Sequence[str | os.PathLike]) -> ReferenceSet:
        from devrecd.openset.registry import l2_normalise, recording_embedding

        if not paths:
            raise ComparisonError(f"no reference recordings for {device!r}")
        files, embs = [], []
        for p in paths:
            try:
                rec, windows, _ = self._embed(p)
            except AudioError as exc:
                raise ComparisonError(f"reference {p} cannot be used: {exc.reason}: {exc.detail}",
                                      reason=exc.reason) from None
            files.append({**rec, "windows": int(windows.shape[0])})
            embs.append(recording_embedding(windows))
        # The same model as a registry profile: unit-length mean of the references' embeddings.
        return ReferenceSet(device=device, files=files, model=l2_normalise(np.mean(embs, axis=0)))

    def references_from_profile(self, profile: Any, registry_path: str) -> ReferenceSet:
        """A reference set from an enrolled registry profile (its stored embeddings, no decoding)."""
        files = [{"path": r.path, "sha256": r.sha256, "duration": r.seconds, "windows": r.windows}
                 for r in profile.references]
        return ReferenceSet(device=profile.name, files=files, model=profile.mean, source=f"registry {registry_path}")

    def score(self, path: str | os.PathLike, refs: ReferenceSet) -> Scored:
        from devrecd.openset.registry import l2_normalise, recording_embedding

        rec, windows, starts = self._embed(path)
        model = np.asarray(refs.model, dtype=np.float64)
        per_window = l2_normalise(windows) @ model
        return Scored(recording=rec, score=float(recording_embedding(windows) @ model),
                      window_starts=[round(float(t), 3) for t in starts],
                      window_scores=[round(float(v), 6) for v in per_window])


def compare(scorer: SourceScorer, questioned: Sequence[str | os.PathLike], refs: ReferenceSet,
            calibration: LRCalibration | None) -> list[dict[str, Any]]:
    """One comparison record per questioned recording (a failed one says why, with its hash)."""
    from devrecd.forensic.lr import HD, HP

    ident = scorer.describe()
    cal_summary = None
    if calibration is not None:
        cal_summary = {"sha256": calibration.sha256, "method": calibration.method,
                       "bounds": [calibration.lower, calibration.upper], "population": calibration.population,
                       "conditions": calibration.conditions, "n_target": calibration.metrics.get("n_target"),
                       "n_nontarget": calibration.metrics.get("n_nontarget")}
    common = {"reference_device": refs.device, "references": refs.files, "reference_source": refs.source,
              "scorer": ident, "calibration": cal_summary, "hp": HP, "hd": HD, "software_version": __version__}
    out = []
    for q in questioned:
        t0 = time.perf_counter()
        try:
            s = scorer.score(q, refs)
        except AudioError as exc:
            try:
                sha = sha256_file(q)
            except OSError:
                sha = None
            out.append({"outcome": "failed", "path": str(q), "sha256": sha, "reason": exc.reason,
                        "detail": exc.detail, **common, "compared_at": _now()})
            continue
        record = {"outcome": "compared", **s.recording, "score": round(s.score, 6),
                  **assess(calibration, s.score, s.recording, ident),
                  "window_starts": s.window_starts, "window_scores": s.window_scores, **common,
                  "seconds": round(time.perf_counter() - t0, 3), "compared_at": _now()}
        out.append(record)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
