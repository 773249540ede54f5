"""Recording vectors of references brought to a questioned recording's noise, kept on disk.

A verdict under noise compares the questioned recording with references brought to its noise
(:meth:`~devrecd.openset.matching.ConditionMatcher.noise_matched`: shaped noise added, features,
the scorer's vector): ~60 ms of CPU per reference, for each quantised noise condition met. A
daemon met every condition anew at each start, and each of its worker processes met it again
(measured on 200 CCNU recordings with 4 phones enrolled: 23 registries built, 55 of the 70 ms of
CPU per file). The matching is deterministic (the seed is the reference's hash and the noise key),
so its result is kept: one small file per (reference, channel, noise key, frontend and hop, scorer
fingerprint), the vector (a few KB, not the features) and the measured SNR, written atomically
beside the references' other cached conditions. Shared by the worker processes and kept across
restarts; at most :data:`MAX_FILES` per channel (the oldest are removed), and nothing is written
where the registry's folder is read-only (the vectors are then computed as before).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np

from devrecd.fsutil import atomic_write

log = logging.getLogger("devrecd.openset")

VERSION = 1  # of the noise matching (match_noise, the features of a matched reference): a change needs a new one
MAX_FILES = 20000  # per channel folder: ~3 KB each for the shipped GSV scorer


class MatchedVectors:
    """The on-disk cache of matched reference vectors under ``root`` (the matcher's cache folder)."""

    def __init__(self, root: str | os.PathLike, matcher_key: str, scorer_fingerprint: str) -> None:
        self.root = Path(root)
        self.suffix = f"{matcher_key}.{str(scorer_fingerprint)[:16]}.v{VERSION}.npz"
        self._writable = True

    def path(self, sha256: str, channel: str, noise_key: str) -> Path:
        return self.root / channel / "noise" / f"{sha256}.{noise_key}.{self.suffix}"

    def get(self, sha256: str, channel: str, noise_key: str) -> tuple[np.ndarray, float] | None:
        """(vector, measured SNR dB), or None when not kept (or unreadable: computed again)."""
        p = self.path(sha256, channel, noise_key)
        try:
            with np.load(p, allow_pickle=False) as z:
                return z["vector"], float(z["snr_db"])
        except (OSError, ValueError, KeyError):
            return None

    def put(self, sha256: str, channel: str, noise_key: str, vector: np.ndarray, snr_db: float) -> None:
        if not self._writable:
            return
        p = self.path(sha256, channel, noise_key)
        buf = io.BytesIO()
        np.savez(buf, vector=np.asarray(vector), snr_db=np.float64(snr_db))
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, buf.getvalue())
            self._prune(p.parent)
        except OSError as exc:  # a read-only registry: computed each time, as before
            self._writable = False
            log.info("matched reference vectors are not kept on disk", extra={"folder": str(p.parent), "error": str(exc)})

    def _prune(self, folder: Path) -> None:
        names = os.listdir(folder)
        if len(names) <= MAX_FILES:
            return
        def age(q: Path) -> int:
            try:
                return q.stat().st_mtime_ns
            except OSError:  # removed meanwhile (another worker process pruning)
                return 0

        for q in sorted((folder / n for n in names), key=age)[: len(names) - MAX_FILES]:
            q.unlink(missing_ok=True)
