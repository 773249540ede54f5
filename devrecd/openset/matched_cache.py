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

The folder is listed (to count and prune it) at its first write and then only when a count of this
process's writes since says it may exceed the bound, or after more than :data:`RECOUNT_EVERY` writes
(to see other processes' writes): listing it at every write was ~11% of a noisy backlog's CPU. A folder over
the bound is pruned to :data:`RECOUNT_EVERY` files below it, so that a full folder is not listed at
every write either. One process writing keeps the folder within :data:`MAX_FILES`; several writing
into one folder, within :data:`RECOUNT_EVERY` more per other process until their next listing.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import numpy as np

from devrecd.fsutil import atomic_write

log = logging.getLogger("devrecd.openset")

VERSION = 1  # of the noise matching (match_noise, the features of a matched reference): a change needs a new one
MAX_FILES = 20000  # per channel folder: ~3 KB each for the shipped GSV scorer
RECOUNT_EVERY = 256  # writes by this process after which a folder is listed again (other processes write too)


class MatchedVectors:
    """The on-disk cache of matched reference vectors under ``root`` (the matcher's cache folder);
    safe to use from several threads at once."""

    def __init__(self, root: str | os.PathLike, matcher_key: str, scorer_fingerprint: str) -> None:
        self.root = Path(root)
        self.suffix = f"{matcher_key}.{str(scorer_fingerprint)[:16]}.v{VERSION}.npz"
        self._writable = True
        # Per folder: (files it may hold, this process's writes since it was last listed).
        self._counts: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()

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
            if self._may_exceed(p.parent):
                self._prune(p.parent)
        except OSError as exc:  # a read-only registry: computed each time, as before
            self._writable = False
            log.info("matched reference vectors are not kept on disk", extra={"folder": str(p.parent), "error": str(exc)})

    def _may_exceed(self, folder: Path) -> bool:
        """Count one write into ``folder``: whether it must be listed (and pruned where over the bound)."""
        with self._lock:
            files, writes = self._counts.get(folder, (MAX_FILES + 1, 0))  # not listed yet: list it
            files, writes = files + 1, writes + 1  # a new file (a rewritten one counts too: listed sooner)
            self._counts[folder] = (files, writes)
            return files > MAX_FILES or writes > RECOUNT_EVERY

    def _prune(self, folder: Path) -> None:
        names = os.listdir(folder)
        keep = len(names) if len(names) <= MAX_FILES else max(0, MAX_FILES - RECOUNT_EVERY)
        with self._lock:
            self._counts[folder] = (keep, 0)
        if keep == len(names):
            return
        def age(q: Path) -> int:
            try:
                return q.stat().st_mtime_ns
            except OSError:  # removed meanwhile (another worker process pruning)
                return 0

        for q in sorted((folder / n for n in names), key=age)[: len(names) - keep]:
            q.unlink(missing_ok=True)
