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
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np

from devrecd.audio.channel import CLEAN, Channel, ChannelError
from devrecd.audio.transmit import apply_channel
from devrecd.audio.condition import condition_channel, noise_profile
from devrecd.audio.noise import MATCH_MARGIN_DB, NoiseProfile, excerpt_seconds, needs_matching
from devrecd.audio.windows import cut_windows
from devrecd.config import AudioConfig
from devrecd.errors import ArtifactError
from devrecd.features import FrontendConfig, extract
from devrecd.fsutil import atomic_write
from devrecd.openset.vectors import unit
from devrecd.stages import frontend_for, hop_samples

log = logging.getLogger("devrecd.openset")

# score(questioned (n, 128, 73) features, per profile: list of reference (m, 128, 73) features) -> (profiles,) scores
ScoreFunction = Callable[[np.ndarray, Sequence[Sequence[np.ndarray]]], np.ndarray]


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
        from devrecd.audio.evidence import read_file_bytes

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


PROFILES = 4096  # reference noise profiles a matcher keeps in memory (per channel, storage level and excerpt length)
SAMPLES_BYTES = 64 << 20  # decoded reference samples a matcher keeps in memory (bytes; ~50 references of 10 s at 32 kHz)


class ConditionMatcher:
    """Reference features under a channel (and a questioned recording's noise), for every profile of
    a registry, cached.

    Features under a channel alone are cached per (reference sha256, channel, frontend) in memory and
    on disk (not those stored at a questioned recording's level: as many as the levels met; their
    recording vectors are kept, :func:`matched_profile_embeddings`); under a noise condition too (:func:`devrecd.audio.noise.match_noise`, after the channel)
    per (sha256, channel, quantised noise key) in memory only, the ``noise_cache`` most recent
    (noise conditions are as many as questioned recordings: never unbounded, never on disk; only
    their recording vectors are kept on disk, bounded: :mod:`devrecd.openset.matched_cache`). The
    references' own noise profiles (after the channel; whole, or in excerpts of a short questioned
    recording's length) are cached in memory (the :data:`PROFILES` most recent) and on disk.

    The references' decoded samples (before any channel) are kept in memory, the first ones read up
    to :data:`SAMPLES_BYTES` bytes (:meth:`_decoded_samples`): each new noise condition needs every
    reference again, and verifying (SHA-256) and decoding it each time was ~11% of the CPU of a
    noisy backlog. Each is
    verified when first read; what is kept is what was verified (read-only arrays).

    Safe to use from several threads at once (a daemon's workers share one judge): the in-memory
    caches are read and updated under one lock, never held while computing; two threads that miss
    the same entry both compute it (the same result: everything here is deterministic).
    """

    def __init__(self, store: ReferenceStore, frontend: FrontendConfig, audio: AudioConfig | None = None, *,
                 hop_seconds: float | None = None, device: str = "cpu", cache_dir: str | os.PathLike | None = None,
                 noise_cache: int = 32) -> None:
        self.store, self.frontend, self.audio = store, frontend, audio or AudioConfig()
        self.hop = self.audio.hop_seconds if hop_seconds is None else hop_seconds
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else store.root / "conditions"
        self._memory: dict[tuple[str, str], np.ndarray] = {}
        self._noisy: OrderedDict[tuple[str, str, str], tuple[np.ndarray, float]] = OrderedDict()
        self._noise_cache = max(0, int(noise_cache))
        self._snrs: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._profiles: OrderedDict[tuple[str, str], NoiseProfile] = OrderedDict()  # the PROFILES most recent
        self._decoded: dict[str, np.ndarray] = {}  # sha256 -> samples, the first read up to SAMPLES_BYTES
        self._decoded_bytes = 0
        self._lock = threading.Lock()  # the caches above: held for lookups and inserts only
        self._key = hashlib.sha256(f"{frontend.fingerprint()}|{self.hop}".encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        """What the cached features depend on besides the reference and condition: frontend and hop."""
        return self._key

    @property
    def rate(self) -> int:
        """The rate references are decoded at and noise is measured at (the frontend's)."""
        return self.frontend.sample_rate

    def reference_features(self, sha256: str, channel: Channel | None, noise: NoiseProfile | None = None) -> np.ndarray:
        """(windows, 128, 73) features of one stored reference passed through ``channel`` (None: as is)
        and, with ``noise``, brought to that noise after it (:meth:`noise_matched`)."""
        if noise is not None:
            return self.noise_matched(sha256, channel, noise)[0]
        if channel is not None and channel.stored_level_dbfs is not None:
            # Stored at a questioned recording's level: as many copies as levels met, so not kept
            # (their recording vectors are: matched_profile_embeddings).
            return self._features(self._samples(sha256, channel))
        name = channel.key if channel is not None else CLEAN
        key = (sha256, name)
        with self._lock:
            feats = self._memory.get(key)
        if feats is not None:
            return feats
        cached = self.cache_dir / name / f"{sha256}.{self._key}.npy"
        feats = None
        if cached.is_file():
            try:
                feats = np.load(cached, allow_pickle=False)
            except (OSError, ValueError):
                feats = None  # a torn cache file is recomputed
        if feats is None:
            feats = self._features(self._samples(sha256, channel))
            import io

            buf = io.BytesIO()
            np.save(buf, feats)
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, buf.getvalue())
        with self._lock:
            self._memory[key] = feats
        return feats

    def noise_matched(self, sha256: str, channel: Channel | None, noise: NoiseProfile) -> tuple[np.ndarray, float]:
        """(features, measured SNR dB) of one reference through ``channel`` and then brought to
        ``noise`` quantised (:func:`~devrecd.audio.noise.quantised`: the same key, the same noise;
        the seed is the reference's hash and the key, so the result is reproducible)."""
        from devrecd.audio.noise import match_noise, measure_noise, noise_key, quantised

        key = (sha256, channel.key if channel is not None else CLEAN, noise_key(noise))
        with self._lock:
            hit = self._noisy.get(key)
            if hit is not None:
                self._noisy.move_to_end(key)
                return hit
        samples = self._samples(sha256, channel)
        seed = int(hashlib.sha256("|".join(key).encode()).hexdigest()[:15], 16)
        own = self.reference_noise(sha256, channel)  # cached: not measured again
        matched = match_noise(samples, self.rate, quantised(noise), seed=seed, own=own)
        out = (self._features(matched), round(measure_noise(matched, self.rate).snr_db, 1))
        with self._lock:
            self._snrs[key] = out[1]  # a float per key: kept longer than the features
            while len(self._snrs) > 64 * max(1, self._noise_cache):
                self._snrs.popitem(last=False)
            if self._noise_cache:
                self._noisy[key] = out
                while len(self._noisy) > self._noise_cache:
                    self._noisy.popitem(last=False)
        return out

    def matched_snr(self, sha256: str, channel: Channel | None, noise: NoiseProfile) -> float:
        """The measured SNR of one reference brought to ``noise`` (:meth:`noise_matched`'s second value)."""
        from devrecd.audio.noise import noise_key

        key = (sha256, channel.key if channel is not None else CLEAN, noise_key(noise))
        with self._lock:
            snr = self._snrs.get(key)
        return snr if snr is not None else self.noise_matched(sha256, channel, noise)[1]

    def remember_snr(self, sha256: str, channel: Channel | None, noise: NoiseProfile, snr_db: float) -> None:
        """The measured SNR of a matched reference known from elsewhere (a kept vector's)."""
        from devrecd.audio.noise import noise_key

        with self._lock:
            self._snrs[(sha256, channel.key if channel is not None else CLEAN, noise_key(noise))] = snr_db

    def reference_noise(self, sha256: str, channel: Channel | None, seconds: float | None = None) -> NoiseProfile:
        """The noise profile of one stored reference through ``channel``, measured whole or, for a
        questioned recording of ``seconds`` (:func:`~devrecd.audio.noise.excerpt_seconds`), in
        excerpts of that length (:func:`~devrecd.audio.noise.measure_noise_as`); cached in memory and on disk."""
        import json

        from devrecd.audio.noise import measure_noise_as

        name = channel.key if channel is not None else CLEAN
        key = (sha256, name if seconds is None else f"{name}/{seconds:g}s")
        with self._lock:
            hit = self._profiles.get(key)
            if hit is not None:
                self._profiles.move_to_end(key)
                return hit
        cached = self.cache_dir / name / f"{sha256}.noise-{self.rate}{'' if seconds is None else f'-{seconds:g}s'}.json"
        prof = None
        if cached.is_file():
            try:
                prof = NoiseProfile.from_json(json.loads(cached.read_text()), self.rate)
            except (OSError, ValueError, KeyError, TypeError):
                prof = None  # a torn cache file is measured again
        if prof is None:
            prof = measure_noise_as(self._samples(sha256, channel), self.rate, seconds)
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, json.dumps({**prof.to_json(), "noise_bands_db": list(prof.bands_db),
                                             "speech_dbfs": prof.speech_dbfs, "noise_dbfs": prof.noise_dbfs}).encode())
        with self._lock:
            self._profiles[key] = prof
            while len(self._profiles) > PROFILES:
                self._profiles.popitem(last=False)
        return prof

    def _samples(self, sha256: str, channel: Channel | None) -> np.ndarray:
        """A stored reference decoded (verified) at the frontend's rate, through ``channel``."""
        samples = self._decoded_samples(sha256)
        return samples if channel is None else apply_channel(channel, samples, self.rate)

    def _decoded_samples(self, sha256: str) -> np.ndarray:
        """A stored reference decoded at the frontend's rate, verified when first read, then kept
        (read-only) while the references kept fit in :data:`SAMPLES_BYTES`: the first ones read stay,
        later ones are decoded at each use. Not least-recently-used: a new noise condition reads every
        reference of the registry in the same order, and a cache smaller than that pass would evict
        each one before its next use (a registry of 15 phones with two 11 s references is 34 MiB)."""
        from devrecd.audio.decode import read_evidence

        with self._lock:
            samples = self._decoded.get(sha256)
            if samples is not None:
                return samples
        path = self.store.path(sha256)
        self.store.read(sha256)  # verify before use
        rec = read_evidence(path, self.frontend.sample_rate, self.audio)
        if rec.sha256 != sha256:
            raise ArtifactError(f"{path}: changed while being read", reason="reference_damaged")
        samples = rec.samples if rec.samples.base is None else rec.samples.copy()  # kept: its own memory only
        samples.flags.writeable = False  # shared by every later use: nothing may change it in place
        with self._lock:
            # Not when another thread decoded it meanwhile, nor past the bound.
            if sha256 not in self._decoded and self._decoded_bytes + samples.nbytes <= SAMPLES_BYTES:
                self._decoded[sha256] = samples
                self._decoded_bytes += samples.nbytes
        return samples

    def _features(self, samples: np.ndarray) -> np.ndarray:
        clips = cut_windows(samples, self.frontend.clip_samples, hop_samples(self.hop, self.frontend.sample_rate))
        return extract(clips, frontend_for(self.frontend), device=self.device)

    def profile_references(self, profiles: Sequence[Sequence[str]], channel: Channel | None,
                           noise: NoiseProfile | None = None) -> list[list[np.ndarray]]:
        """For each profile (a list of reference sha256), its references' features under ``channel`` (and ``noise``)."""
        return [[self.reference_features(sha, channel, noise) for sha in shas] for shas in profiles]


def questioned_channel(condition: dict[str, Any] | None) -> Channel | None:
    """The channel to bring references to for a questioned recording of this condition (None: compare as is)."""
    if not condition:
        return None
    return condition_channel(condition)


def storage_channel(condition: dict[str, Any] | None) -> Channel | None:
    """The storage a broadband questioned recording asks its references to be brought to (a quiet
    16-bit file: :data:`~devrecd.audio.channel.PCM16_STORAGE` at its level), else None."""
    try:
        channel = questioned_channel(condition)
    except ValueError:
        return None
    return channel if channel is not None and channel.is_storage else None


def matched_scores(questioned: np.ndarray, profiles: Sequence[Sequence[str]], channel: Channel | None,
                   matcher: ConditionMatcher, scorer: ScoreFunction, noise: NoiseProfile | None = None) -> np.ndarray:
    """Scores of questioned features against every profile, its references brought to ``channel``
    (and then to ``noise``, the questioned recording's: :func:`resolve_noise`)."""
    return np.asarray(scorer(questioned, matcher.profile_references(profiles, channel, noise)), dtype=np.float64)


def embedding_scorer(embed: Callable[[np.ndarray], np.ndarray]) -> ScoreFunction:
    """The registry's scoring rule with an embedding function (features -> window embeddings):
    cosine of the questioned recording embedding with each profile's mean reference embedding."""
    from devrecd.openset.registry import recording_embedding

    def score(questioned: np.ndarray, refs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        q = recording_embedding(embed(questioned))
        means = np.stack([unit(np.stack([recording_embedding(embed(r)) for r in rs]).mean(axis=0))
                          for rs in refs])
        return means @ q

    return score


def matched_profile_embeddings(registry: Any, matcher: ConditionMatcher, channel: Channel | None,
                               recording_vector: Callable[[np.ndarray], np.ndarray],
                               noise: NoiseProfile | None = None, vectors: Any = None,
                               only: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Per profile, (n_refs, D) recording vectors of its references under ``channel`` and ``noise``
    (``recording_vector``: a scorer's features -> vector, :mod:`devrecd.openset.scorers`); ``vectors``
    (:class:`~devrecd.openset.matched_cache.MatchedVectors`): those under noise kept on disk.
    ``only``: those profiles alone (the others are compared as they are: matching them is wasted)."""
    from devrecd.audio.noise import noise_key

    name, nkey = (channel.key if channel is not None else CLEAN), (noise_key(noise) if noise is not None else "")
    # Copies whose features are not kept (under a noise, or stored at a questioned level) keep their vectors.
    keep = vectors is not None and (noise is not None or (channel is not None and channel.stored_level_dbfs is not None))

    def vector(sha: str) -> np.ndarray:
        if not keep:
            return recording_vector(matcher.reference_features(sha, channel, noise))
        kept = vectors.get(sha, name, nkey)
        if kept is not None:
            if noise is not None:
                matcher.remember_snr(sha, channel, noise, kept[1])
            return kept[0]
        if noise is None:
            v, snr = recording_vector(matcher.reference_features(sha, channel)), float("nan")
        else:
            feats, snr = matcher.noise_matched(sha, channel, noise)
            v = recording_vector(feats)
        vectors.put(sha, name, nkey, v, snr)
        return v

    return {p: np.stack([vector(r.sha256) for r in registry.profiles[p].references]).astype(np.float32)
            for p in registry.names if only is None or p in only}


def matched_registry(registry: Any, matcher: ConditionMatcher, channel: Channel | None,
                     recording_vector: Callable[[np.ndarray], np.ndarray], noise: NoiseProfile | None = None,
                     vectors: Any = None, only: Collection[str] | None = None) -> Any:
    """A copy of ``registry`` whose profiles hold their references' vectors under ``channel`` (None:
    as recorded) and, with ``noise``, brought to that noise after the channel; with ``only``, those
    profiles alone (the others as they are in ``registry``)."""
    from dataclasses import replace

    emb = matched_profile_embeddings(registry, matcher, channel, recording_vector, noise, vectors, only)
    return replace(registry, profiles={n: replace(p, embeddings=emb[n]) if n in emb else p
                                       for n, p in registry.profiles.items()})


def condition_report(condition: dict[str, Any] | None, compared_under: str, references: str,
                     validated: Sequence[str], note: str = "") -> dict[str, Any]:
    """What a verdict says about conditions.

    ``compared_under``: the channel name both sides were compared under (``clean`` for broadband
    recordings compared as they are, ``mismatched:<channel>`` when references could not be matched);
    ``references``: ``matched`` | ``as_is`` | ``unmatched``; ``validated``: the comparison
    conditions the calibration was measured under (channel names, or calibration keys
    ``<channel>[/snrNN][/short]``: the channel is what a comparison is made under). ``status`` is
    ``validated`` only when the comparison condition is one of them; otherwise ``unvalidated`` and
    no LR may be reported.
    """
    ok = compared_under in {v.partition("/")[0] for v in validated}
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
    why = _cannot_match(channel, store, profiles, enabled)
    if why and channel.is_storage:  # a broadband recording: compared as it is, as before storages were matched
        return None, CLEAN, "as_is", f"references not stored as the questioned file is: {why}"
    if why:
        return None, f"mismatched:{channel.name}", "unmatched", why
    return channel, channel.name, "matched", ""


def _cannot_match(channel: Channel, store: ReferenceStore | None, profiles: Sequence[Sequence[str]],
                  enabled: bool) -> str:
    """Why references cannot be brought to ``channel`` here ("" when they can)."""
    if not enabled:
        return "condition matching is off (registry.match_conditions)"
    if store is None:
        return "the registry keeps no reference audio"
    missing = [s for shas in profiles for s in shas if not store.has(s)]
    if missing:
        return f"{len(missing)} reference(s) not in {store.root}: enrol them again to keep their audio"
    from devrecd.audio.transmit import encoder_available

    if channel.encoder and not encoder_available(channel.encoder):
        return f"the {channel.encoder} encoder is not in the FFmpeg bundled with PyAV"
    return ""


NOISE_MARGIN_DB = MATCH_MARGIN_DB  # noise matching when the questioned noise spectrum lies this far above a reference's (mean over bands)


def resolve_noise(condition: dict[str, Any] | None, matcher: ConditionMatcher, profiles: Sequence[Sequence[str]],
                  channel: Channel | None, *, enabled: bool, note: str = "", duration: float | None = None,
                  margin_db: float = NOISE_MARGIN_DB) -> tuple[NoiseProfile | None, dict[str, Any]]:
    """Decide whether references are brought to the questioned recording's noise: ``(target noise
    profile or None, comparison fields)``; :func:`resolve_noise_per_profile` without its third value."""
    target, fields, _ = resolve_noise_per_profile(condition, matcher, profiles, channel, enabled=enabled, note=note,
                                                  duration=duration, margin_db=margin_db)
    return target, fields


def resolve_noise_per_profile(condition: dict[str, Any] | None, matcher: ConditionMatcher,
                              profiles: Sequence[Sequence[str]], channel: Channel | None, *, enabled: bool,
                              note: str = "", duration: float | None = None, margin_db: float = NOISE_MARGIN_DB
                              ) -> tuple[NoiseProfile | None, dict[str, Any], list[bool]]:
    """Decide whether references are brought to the questioned recording's noise: ``(target noise
    profile or None, comparison fields, per profile: compared as it is)``.

    The target is the questioned recording's measured noise (its condition's ``noise_bands_db``),
    compared with each reference's own after ``channel`` (:func:`~devrecd.audio.noise.noise_excess_db`,
    dB above it, mean over the bands). When the MEDIAN over the references of that excess is above
    ``margin_db`` (the questioned recording is noisier than the references typically are), every
    reference is brought to it (``match_noise``: nothing is added where a reference is as noisy).
    The median, not the cleanest reference: phones' own noise floors differ by 10 dB and more (a
    device trait), and against the cleanest of 30 CCNU references every clean questioned recording
    would count as noisier (30/30; median over the references: 1.1 dB median, 3.7 dB at most).
    3 dB: a doubling of the noise power; white noise at 30 dB SNR is 4.9-7 dB above
    (``benchmarks/noise.py`` prints the clean figures). ``enabled`` False (matching off, references not
    kept or not matched to the channel): nothing is matched and ``note`` says why. A short questioned
    recording (the seconds its condition was measured on, ``measured_seconds``, else ``duration``) is
    held against references measured in excerpts of that length
    (:func:`~devrecd.audio.noise.measure_noise_as`: the same estimator, the same bias).

    Once matched, a profile whose OWN references are as noisy as the questioned recording (the median
    of its references' excess not above ``margin_db``, the rule :mod:`devrecd.forensic.compare`
    applies to one profile) is compared as it is: bringing its references to the questioned noise
    would add next to nothing (``match_noise`` adds nothing where a reference is as noisy), yet the
    comparison would be judged under a noise-matched calibration, whose trials had noise added and
    whose same-device scores sit higher (measured: the first 3 s of the two CCNU phones with their
    own high noise floor, 24 dB SNR, were rejected by their own phone under ``clean/snr20/short``,
    docs/conditions.md). The third value says which profiles (True: compared as is; all False
    when nothing is matched).

    Fields: ``noise_matched``, ``questioned_snr_db``, ``references_snr_db`` ([lowest, highest] of
    the references as they are, after the channel), ``noise_excess_db``, when matched
    ``profiles_as_noisy`` (how many profiles are compared as they are) and
    ``matched_references_snr_db`` (filled in by the caller from :meth:`ConditionMatcher.noise_matched`).
    """
    none = [False] * len(profiles)
    try:
        target = noise_profile(condition, matcher.rate) if condition else None
    except (KeyError, TypeError, ValueError) as exc:
        return None, {"noise_matched": False, "noise_note": f"the questioned noise profile cannot be read: {exc}"}, none
    if target is None:
        fields: dict[str, Any] = {"noise_matched": False}
        if condition and condition.get("snr_db") is not None:
            fields["questioned_snr_db"] = condition["snr_db"]
        if condition and condition.get("noise_bands_db") is None:
            fields["noise_note"] = "the recording's condition has no noise measurement"
        return None, fields, none
    fields = {"noise_matched": False, "questioned_snr_db": round(target.snr_db, 1)}
    if not enabled:
        if note:
            fields["noise_note"] = note
        return None, fields, none
    # A short questioned recording against references measured as it is: in excerpts of the length its
    # noise was measured on (the condition's measured_seconds: a live window's; else ``duration``).
    seconds = excerpt_seconds(condition.get("measured_seconds") or duration)
    per_profile = [[matcher.reference_noise(s, channel, seconds) for s in shas] for shas in profiles]
    refs = [r for rs in per_profile for r in rs]
    if not refs:
        return None, fields, none
    if seconds is not None:
        fields["references_noise_measured_in"] = f"{seconds:g} s excerpts"
    matched, excess = needs_matching(target, refs, margin_db)
    fields["references_snr_db"] = [round(min(r.snr_db for r in refs), 1), round(max(r.snr_db for r in refs), 1)]
    fields["noise_excess_db"] = round(excess, 1)
    if not matched:
        return None, fields, none
    as_noisy = [bool(rs) and not needs_matching(target, rs, margin_db)[0] for rs in per_profile]
    if all(as_noisy):  # noisier than the references typically are, yet as noisy as each profile's own
        fields["noise_note"] = "every profile's own references are as noisy as the questioned recording"
        return None, fields, none
    fields["noise_matched"], fields["profiles_as_noisy"] = True, sum(as_noisy)
    return target, fields, as_noisy


__all__ = [
    "NOISE_MARGIN_DB", "resolve_noise", "resolve_noise_per_profile",
    "CLEAN", "ChannelError", "ConditionMatcher", "ReferenceStore", "ScoreFunction", "condition_report",
    "embedding_scorer", "matched_profile_embeddings", "matched_registry", "matched_scores", "questioned_channel",
    "storage_channel",
    "resolve_comparison", "validated_conditions",
]
