"""Condition matching: compare like with like.

A questioned recording that went through a call or a messaging app (AMR-NB, Opus, AAC, a
telephone band...) is compared with clean references only after the references have been passed
through the same channel (:mod:`devrecd.audio.channel`), as forensic practice requires. Mismatch
destroys the device's traces; matching keeps most of them.

* :class:`ReferenceStore`: the references' audio, content-addressed (``<sha256>``, read-only copies,
  SHA-256 verified on every read) in ``<registry stem>.refs/`` next to the registry, so that
  references can be brought to any condition later.
* :class:`ConditionMatcher`: features of every enrolled reference under a channel, cached per
  (reference sha256, channel, frontend) in memory and on disk.
* Scoring stays the scorer's business: :func:`matched_scores` takes any
  ``score(questioned_features, references_per_profile) -> scores`` function, so the embedding
  scorer and a supervector or fused scorer all work under matched conditions;
  :func:`embedding_scorer` is the registry's own (cosine of the questioned recording's embedding
  with the mean of the references' recording embeddings).
* :func:`condition_report`: which condition the comparison was made under, whether the
  calibration was measured under it, and so whether a likelihood ratio may be reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.audio.channel import Channel, ChannelError
from devrecd.audio.transmit import apply_channel
from devrecd.audio.condition import condition_channel
from devrecd.config import AudioConfig
from devrecd.errors import ArtifactError
from devrecd.features import FrontendConfig
from devrecd.fsutil import atomic_write

log = logging.getLogger("devrecd.openset")

CLEAN = "clean"  # the comparison condition of broadband recordings compared as they are
# score(questioned (n, 128, 73) features, per profile: list of reference (m, 128, 73) features) -> (profiles,) scores
Scorer = Callable[[np.ndarray, Sequence[Sequence[np.ndarray]]], np.ndarray]


class ReferenceStore:
    """Reference recordings by content: ``root/<sha256>``, read-only, verified when read."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def for_registry(cls, registry_path: str | os.PathLike) -> ReferenceStore:
        """The store next to a registry JSON file: ``<stem>.refs/``."""
        p = Path(registry_path)
        return cls(p.with_name(f"{p.stem}.refs"))

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArtifactError(f"not a sha256: {sha256!r}", reason="reference_store")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: str | os.PathLike, sha256: str | None = None) -> str:
        """Copy ``source`` (opened read-only) into the store; returns its sha256.

        ``sha256``: the hash the caller recorded for the file; a file whose content no longer
        matches it is refused (it changed since it was judged or enrolled).
        """
        from devrecd.audio.decode import read_file_bytes

        data = read_file_bytes(source, 1 << 40)
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise ArtifactError(f"{source}: its content (sha256 {digest[:12]}) is not the enrolled reference "
                                f"{sha256[:12]}; the file changed", reason="reference_changed")
        dest = self.path(digest)
        if not dest.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, data)
            os.chmod(dest, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # a copy of evidence: read-only
        return digest

    def read(self, sha256: str) -> bytes:
        """The stored bytes, verified against their name."""
        p = self.path(sha256)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"reference {sha256[:12]} is not in {self.root} ({exc.strerror or exc}); "
                                "enrol it again to match conditions", reason="reference_missing") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactError(f"{p}: content does not match its sha256 (the store is damaged)",
                                reason="reference_damaged")
        return data


class ConditionMatcher:
    """Reference features under a channel, for every profile of a registry, cached."""

    def __init__(self, store: ReferenceStore, frontend: FrontendConfig, audio: AudioConfig | None = None, *,
                 hop_seconds: float | None = None, device: str = "cpu", cache_dir: str | os.PathLike | None = None) -> None:
        self.store, self.frontend, self.audio = store, frontend, audio or AudioConfig()
        self.hop = self.audio.hop_seconds if hop_seconds is None else hop_seconds
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else store.root / "conditions"
        self._memory: dict[tuple[str, str], np.ndarray] = {}
        self._key = hashlib.sha256(f"{frontend.fingerprint()}|{self.hop}".encode()).hexdigest()[:12]

    def reference_features(self, sha256: str, channel: Channel | None) -> np.ndarray:
        """(windows, 128, 73) features of one stored reference passed through ``channel`` (None: as is)."""
        name = channel.name if channel is not None else CLEAN
        key = (sha256, name)
        if key in self._memory:
            return self._memory[key]
        cached = self.cache_dir / name / f"{sha256}.{self._key}.npy"
        feats = None
        if cached.is_file():
            try:
                feats = np.load(cached, allow_pickle=False)
            except (OSError, ValueError):
                feats = None  # a torn cache file is recomputed
        if feats is None:
            feats = self._compute(sha256, channel)
            import io

            buf = io.BytesIO()
            np.save(buf, feats)
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, buf.getvalue())
        self._memory[key] = feats
        return feats

    def _compute(self, sha256: str, channel: Channel | None) -> np.ndarray:
        from dataclasses import replace

        from devrecd.audio.decode import read_evidence
        from devrecd.features import extract
        from devrecd.pipeline.stages import clips_for, frontend_for

        path = self.store.path(sha256)
        self.store.read(sha256)  # verify before use
        rec = read_evidence(path, self.frontend.sample_rate, self.audio)
        if rec.sha256 != sha256:
            raise ArtifactError(f"{path}: changed while being read", reason="reference_damaged")
        if channel is not None:
            rec = replace(rec, samples=apply_channel(channel, rec.samples, rec.sample_rate))
        return extract(clips_for(rec, self.frontend, self.hop), frontend_for(self.frontend), device=self.device)

    def profile_references(self, profiles: Sequence[Sequence[str]], channel: Channel | None) -> list[list[np.ndarray]]:
        """For each profile (a list of reference sha256), its references' features under ``channel``."""
        return [[self.reference_features(sha, channel) for sha in shas] for shas in profiles]


def questioned_channel(condition: dict[str, Any] | None) -> Channel | None:
    """The channel to bring references to for a questioned recording of this condition (None: compare as is)."""
    if not condition:
        return None
    return condition_channel(condition)


def matched_scores(questioned: np.ndarray, profiles: Sequence[Sequence[str]], channel: Channel | None,
                   matcher: ConditionMatcher, scorer: Scorer) -> np.ndarray:
    """Scores of questioned features against every profile, its references brought to ``channel``."""
    return np.asarray(scorer(questioned, matcher.profile_references(profiles, channel)), dtype=np.float64)


def embedding_scorer(embed: Callable[[np.ndarray], np.ndarray]) -> Scorer:
    """The registry's scoring rule with an embedding function (features -> window embeddings):
    cosine of the questioned recording embedding with each profile's mean reference embedding."""
    from devrecd.openset.registry import l2_normalise, recording_embedding

    def score(questioned: np.ndarray, refs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        q = recording_embedding(embed(questioned))
        means = np.stack([l2_normalise(np.stack([recording_embedding(embed(r)) for r in rs]).mean(axis=0))
                          for rs in refs])
        return means @ q

    return score


def matched_profile_embeddings(registry: Any, matcher: ConditionMatcher, channel: Channel,
                               recording_vector: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Per profile, (n_refs, D) recording vectors of its references under ``channel``
    (``recording_vector``: a scorer's features -> vector, :mod:`devrecd.openset.scorers`)."""
    out = {}
    for name in registry.names:
        shas = [r.sha256 for r in registry.profiles[name].references]
        out[name] = np.stack([recording_vector(matcher.reference_features(s, channel)) for s in shas]).astype(np.float32)
    return out


def matched_registry(registry: Any, matcher: ConditionMatcher, channel: Channel,
                     recording_vector: Callable[[np.ndarray], np.ndarray]) -> Any:
    """A copy of ``registry`` whose profiles hold their references' vectors under ``channel``."""
    from dataclasses import replace

    emb = matched_profile_embeddings(registry, matcher, channel, recording_vector)
    return replace(registry, profiles={n: replace(p, embeddings=emb[n]) for n, p in registry.profiles.items()})


def condition_report(condition: dict[str, Any] | None, compared_under: str, references: str,
                     validated: Sequence[str], note: str = "") -> dict[str, Any]:
    """What a verdict says about conditions.

    ``compared_under``: the channel name both sides were compared under (``clean`` for broadband
    recordings compared as they are, ``mismatched:<channel>`` when references could not be matched);
    ``references``: ``matched`` | ``as_is`` | ``unmatched``; ``validated``: the comparison
    conditions the calibration was measured under. ``status`` is ``validated`` only when the
    comparison condition is one of them; otherwise ``unvalidated`` and no LR may be reported.
    """
    ok = compared_under in set(validated)
    if not validated:
        note = "; ".join(filter(None, ["the registry has no calibration", note]))
    out = {
        "questioned": condition,
        "compared_under": compared_under,
        "references": references,
        "validated_conditions": sorted(set(validated)),
        "status": "validated" if ok else "unvalidated",
    }
    if not ok:
        out["statement"] = (
            f"the comparison condition {compared_under!r} is not one the model and calibration were validated "
            f"under ({', '.join(sorted(set(validated))) or 'none'}): the verdict is outside validation and no "
            "likelihood ratio is reported" + (f" ({note})" if note else ""))
    elif note:
        out["note"] = note
    return out


def closed_set_comparison(condition: dict[str, Any] | None, validated: Sequence[str]) -> dict[str, Any]:
    """Verdict fields for a closed-set verdict: the condition it was judged under, and whether the
    model was validated under it (``backend.validated_conditions``). The training data is not at hand
    when serving, so nothing is matched: a questioned codec outside validation is said to be so."""
    try:
        channel = questioned_channel(condition)
        under = channel.name if channel is not None else CLEAN
    except ValueError:
        under = "unknown"
    rep = condition_report(condition, under, "training data (not matched: not at hand when serving)", validated)
    rep.pop("questioned")
    return {"comparison": rep, "condition_status": rep["status"]}


def validated_conditions(calibration_info: dict[str, Any] | None) -> list[str]:
    """The comparison conditions a registry's calibration was measured under (``clean`` when it does not say)."""
    if not calibration_info:
        return []
    conds = calibration_info.get("conditions")
    return list(conds) if conds else [CLEAN]


def resolve_comparison(condition: dict[str, Any] | None, store: ReferenceStore | None, profiles: Sequence[Sequence[str]],
                       enabled: bool) -> tuple[Channel | None, str, str, str]:
    """Decide how a questioned recording is compared: (channel or None, compared_under, references, note)."""
    try:
        channel = questioned_channel(condition)
    except ValueError as exc:
        return None, "mismatched:unknown", "unmatched", str(exc)
    if channel is None:
        return None, CLEAN, "as_is", ""
    if not enabled:
        return None, f"mismatched:{channel.name}", "unmatched", "condition matching is off (registry.match_conditions)"
    if store is None:
        return None, f"mismatched:{channel.name}", "unmatched", "the registry keeps no reference audio"
    missing = [s for shas in profiles for s in shas if not store.has(s)]
    if missing:
        return (None, f"mismatched:{channel.name}", "unmatched",
                f"{len(missing)} reference(s) not in {store.root}: enrol them again to keep their audio")
    from devrecd.audio.transmit import encoder_available

    if channel.encoder and not encoder_available(channel.encoder):
        return (None, f"mismatched:{channel.name}", "unmatched",
                f"the {channel.encoder} encoder is not in the FFmpeg bundled with PyAV")
    return channel, channel.name, "matched", ""


__all__ = [
    "CLEAN", "ChannelError", "closed_set_comparison", "ConditionMatcher", "ReferenceStore", "Scorer", "condition_report",
    "embedding_scorer", "matched_profile_embeddings", "matched_registry", "matched_scores", "questioned_channel",
    "resolve_comparison", "validated_conditions",
]
