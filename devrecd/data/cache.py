"""Feature cache: features computed once per (file content, frontend, windowing) and reused.

Key = sha256 of the file's bytes + the frontend fingerprint + the window hop + the audio settings
that change the decoded samples (channel mix, resampler quality). Entries live at
``<root>/<key16>/<sha256[:2]>/<sha256>.npy``; beside it ``<sha256>.snr.json``, the recording's
measured SNR (its verdict condition's ``snr_db``, what training records as the network's SNR range),
measured only for a cache that measures SNRs (``measure_snr``: training's, from the recording
decoded for its features) or when asked (:meth:`FeatureCache.snr_db`), so that evaluation and
feature extraction do not pay for the condition measurement. Every write goes to a temporary file in the same
folder and is renamed into place (``os.replace`` is atomic on POSIX), so a concurrent reader sees
a complete entry or none. The cache holds nothing that cannot be recomputed: delete it any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from devrecd.audio import Recording, read_evidence, sha256_file
from devrecd.config import AudioConfig
from devrecd.features import FEATURE_DIM, FrontendConfig, extract
from devrecd.fsutil import atomic_write
from devrecd.stages import clips_for, frontend_for

log = logging.getLogger("devrecd.data.cache")


class FeatureCache:
    """Disk cache of (n_windows, 128, 73) float32 features of whole recordings."""

    def __init__(self, root: Path, frontend: FrontendConfig, audio: AudioConfig, *, device: str = "cpu",
                 measure_snr: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.measure_snr = measure_snr  # a features miss also caches the recording's SNR (training's range)
        self.frontend = frontend
        self.audio = audio
        self.device = device
        self.hits = 0
        self.misses = 0
        # path -> (size, mtime_ns, sha256): hashing is skipped for files that have not changed.
        self._hashes: dict[str, tuple[int, int, str]] = {}

    def key(self, hop_seconds: float) -> str:
        """Hex digest naming every setting that changes the features (not the file)."""
        parts = {
            "frontend": self.frontend.fingerprint(),
            "hop_seconds": round(float(hop_seconds), 9),
            "mix": self.audio.mix,
            "resample_quality": self.audio.resample_quality,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def entry(self, sha256: str, hop_seconds: float) -> Path:
        """Where the features of content ``sha256`` live."""
        return self.root / self.key(hop_seconds)[:16] / sha256[:2] / f"{sha256}.npy"

    def snr_entry(self, sha256: str, hop_seconds: float) -> Path:
        """Where the measured SNR of content ``sha256`` lives (beside its features)."""
        return self.entry(sha256, hop_seconds).with_suffix(".snr.json")

    def _sha256(self, path: Path) -> str:
        """:func:`~devrecd.audio.sha256_file`, remembered while the file's size and mtime stay the same."""
        st = os.stat(path)
        known = self._hashes.get(str(path))
        if known and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        digest = sha256_file(path)
        self._hashes[str(path)] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def features(self, path: Path, hop_seconds: float) -> tuple[np.ndarray, str]:
        """(n_windows, 128, 73) float32 features of the recording at ``path`` and its sha256.

        Raises the :class:`~devrecd.audio.AudioError` of a file that cannot be decoded.
        """
        path = Path(path)
        try:
            digest = self._sha256(path)
        except OSError:
            digest = ""  # read_evidence below raises the typed error for a missing/unreadable file
        if digest:
            cached = self._load(self.entry(digest, hop_seconds))
            if cached is not None:
                self.hits += 1
                return cached, digest
        rec = read_evidence(path, self.frontend.sample_rate, self.audio)
        clips = clips_for(rec, self.frontend, hop_seconds)
        feats = extract(clips, frontend_for(self.frontend), device=self.device)
        self.misses += 1
        # The hash of the bytes actually decoded names the entry (the file may have changed since).
        self._store(self.entry(rec.sha256, hop_seconds), feats)
        if self.measure_snr:  # from the samples just decoded: :meth:`snr_db` need not decode them again
            self._store_snr(self.snr_entry(rec.sha256, hop_seconds), rec)
        return feats, rec.sha256

    def snr_db(self, path: Path, hop_seconds: float) -> float:
        """The measured SNR (dB) of the recording at ``path``: its condition's ``snr_db``
        (:attr:`devrecd.audio.decode.Recording.condition`, the measurement every verdict states),
        cached beside its features (decoded again only where the features were cached without it).

        Raises the :class:`~devrecd.audio.AudioError` of a file that cannot be decoded.
        """
        path = Path(path)
        try:
            digest = self._sha256(path)
        except OSError:
            digest = ""
        if digest:
            cached = _load_snr(self.snr_entry(digest, hop_seconds))
            if cached is not None:
                return cached
        rec = read_evidence(path, self.frontend.sample_rate, self.audio)
        return self._store_snr(self.snr_entry(rec.sha256, hop_seconds), rec)

    def _store_snr(self, entry: Path, rec: Recording) -> float:
        """Measure a decoded recording's SNR (its condition's) and cache it at ``entry``."""
        snr = float(rec.condition.snr_db)
        try:
            atomic_write(entry, json.dumps({"snr_db": snr}), fsync=False)
        except OSError as exc:
            log.warning("feature cache not writable", extra={"entry": str(entry), "error": str(exc)})
        return snr

    def _load(self, entry: Path) -> np.ndarray | None:
        try:
            arr = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Not a partial write (writes are atomic) but e.g. disk damage: recompute and replace.
            log.warning("feature cache entry unreadable; recomputing", extra={"entry": str(entry), "error": str(exc)})
            return None
        if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[1:] != (self.frontend.n_frames, FEATURE_DIM):
            log.warning("feature cache entry has the wrong shape; recomputing", extra={"entry": str(entry)})
            return None
        return arr

    def _store(self, entry: Path, feats: np.ndarray) -> None:
        try:
            # no fsync: a cache entry lost in a crash is only recomputed
            atomic_write(entry, lambda fh: np.save(fh, np.ascontiguousarray(feats, dtype=np.float32), allow_pickle=False),
                         fsync=False)
        except OSError as exc:
            # A cache that cannot be written only costs time: the features are still returned.
            log.warning("feature cache not writable", extra={"entry": str(entry), "error": str(exc)})


def _load_snr(entry: Path) -> float | None:
    """A cached SNR, or None (absent, or unreadable: measured again)."""
    try:
        value = json.loads(entry.read_text())["snr_db"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("feature cache SNR entry unreadable; measuring again", extra={"entry": str(entry), "error": str(exc)})
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
