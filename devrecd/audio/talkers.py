"""Single-talker recordings for babble noise (LibriSpeech-style folders), read once at the frontend rate.

Babble is the noise of a room full of other talkers. Its talkers must not be the talkers of the
recordings it is mixed into or measured on: callers pass folders of other talkers (the benchmarks'
questioned babble uses LibriSpeech test-other, training and calibration use train-clean-100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from devrecd.audio.decode import read_evidence
from devrecd.audio.errors import AudioError
from devrecd.audio.files import RecordingNames, scan_files
from devrecd.audio.settings import AudioConfig

MAX_TALKERS = 40  # at most this many talkers' recordings are read (each cut to TALKER_SECONDS)
TALKER_SECONDS = 30.0


def read_talkers(folder: Path, rate: int, audio: AudioConfig, names: RecordingNames, *,
                 skipped: Callable[[Path, AudioError], None] | None = None) -> list[np.ndarray]:
    """One recording per talker under ``folder`` (LibriSpeech: the file name's first field before
    '-' is the speaker), the talker's first usable one, cut to :data:`TALKER_SECONDS`, at ``rate``.
    Unusable files (too short, silent, unreadable) are passed over and reported to ``skipped``.
    float32 as decoded: 40 talkers of 30 s at 32 kHz hold 154 MB.
    ValueError when fewer than two talkers are usable: babble needs at least two."""
    talkers: dict[str, np.ndarray] = {}
    for f in scan_files([folder], names):
        talker = f.name.split("-")[0]
        if talker in talkers:
            continue
        try:
            x = read_evidence(f, rate, audio).samples
        except AudioError as exc:
            if skipped is not None:
                skipped(f, exc)
            continue
        talkers[talker] = np.array(x[: int(TALKER_SECONDS * rate)], dtype=np.float32)  # as decoded (add_noise widens)
        if len(talkers) == MAX_TALKERS:
            break
    if len(talkers) < 2:
        raise ValueError(f"{folder}: babble needs recordings of at least 2 talkers, found {len(talkers)}")
    return list(talkers.values())


__all__ = ["read_talkers", "MAX_TALKERS", "TALKER_SECONDS"]
