"""Development trials under noise, compared as a verdict compares them (noise-matched references).

A questioned recording noisier than the references is compared with references brought to its
measured noise (:func:`devrecd.audio.noise.match_noise`, the rule of
:func:`devrecd.audio.noise.needs_matching`). Both sides then carry the same noise, and every phone
looks more like every other one: scores of different phones rise, and a calibration fitted on
clean trials names a phone for almost every noisy recording of a phone nobody enrolled (measured
with ``benchmarks/conditions.py``: white noise at 20 dB SNR, 0 of 30 never-enrolled recordings
rejected). The noise-matched calibrations (``clean/snr10``, ``clean/snr20``, ``clean/snr30``, each
also ``/short``) are fitted on trials made exactly that way:

* each questioned development recording gets :data:`DRAWS` noisy versions: white or babble
  (alternately, babble when talkers are given), at an SNR drawn uniformly in :data:`SNR_RANGE`;
  a ``/short`` condition cuts each of :data:`SHORT_DRAWS` such versions to every length of
  :data:`~devrecd.openset.gsvtrain.SHORT_CUTS`;
* the noise of each version is measured as a verdict measures it; a version the rule would not
  match (not noisier than the references, measured as a verdict measures them: in excerpts of a
  short version's length) is left out, as its verdict is a clean comparison;
* every reference of the fold is brought to that measured noise (quantised, as the verdict's
  matcher does), and the version is scored against the profiles of those matched references;
* the row goes to the SNR class of its MEASURED SNR (:func:`devrecd.openset.scoring.noise_level`),
  the class a verdict will look up.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from devrecd.audio.noise import (add_drawn_noise, excerpt_seconds, match_noise, measure_noise, measure_noise_as, needs_matching,
                                 quantised)
from devrecd.openset.protocol import TrialMatrix, trial_matrix

DRAWS = 6  # noisy versions of each questioned development recording, whole
SHORT_DRAWS = 6  # ... and for the short conditions (each cut to every length of SHORT_CUTS)
SNR_RANGE = (4.0, 36.0)  # dB: the SNRs the noise is added at (uniform); measured SNRs then fall into the classes


@dataclass
class DevAudio:
    """What the noise trials need of the development recordings: ``samples(i)`` (mono, at ``rate``,
    the frontend's rate), ``features(samples)`` (the frontend's raw windows) and babble ``talkers``
    (recordings of single talkers at ``rate``; none: white noise only)."""

    samples: Callable[[int], np.ndarray]
    features: Callable[[np.ndarray], np.ndarray]
    rate: int
    talkers: Sequence[np.ndarray] = field(default_factory=list)


@dataclass
class NoisyRow:
    """One noisy questioned version scored against the fold's noise-matched profiles."""

    level: int  # SNR class of its measured SNR
    snr_db: float  # measured SNR
    recording: int  # the development recording it was made from
    trials: TrialMatrix  # one row


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def noisy_version(x: np.ndarray, audio: DevAudio, recording: int, draw: int, seed: int) -> np.ndarray:
    """Draw ``draw`` of recording ``recording``: white or babble noise at an SNR from :data:`SNR_RANGE`."""
    rng = np.random.default_rng(_seed("noise", seed, recording, draw))
    snr = float(rng.uniform(*SNR_RANGE))
    return add_drawn_noise(x, audio.rate, snr, rng, talkers=audio.talkers if draw % 2 else ())


def noisy_rows(scorer, audio: DevAudio, devices: Sequence[str], refs: Sequence[int], questioned: Sequence[int],
               level_of: Callable[[float], int], *, cuts: Sequence[float | None] = (None,),
               draws: int = DRAWS, seed: int = 0) -> list[NoisyRow]:
    """Rows of noise-matched trials: every questioned recording (indices into ``devices``) in
    ``draws`` noisy versions (each cut to ``cuts``, None = whole), against profiles of the
    ``refs`` recordings brought to each version's measured noise; see the module docstring."""
    ref_audio = {r: audio.samples(r) for r in refs}
    ref_noise = {r: measure_noise(x, audio.rate) for r, x in ref_audio.items()}  # what match_noise adds to
    # What the matching rule compares a (cut) version with: references measured as it is (in excerpts of its length).
    ref_as = {cut: list(ref_noise.values()) if excerpt_seconds(cut) is None  # whole: the same profiles
              else [measure_noise_as(x, audio.rate, excerpt_seconds(cut)) for x in ref_audio.values()] for cut in cuts}
    rows: list[NoisyRow] = []
    for q in questioned:
        x = audio.samples(q)
        for draw in range(draws):
            noisy = noisy_version(x, audio, q, draw, seed)
            for cut in cuts:
                y = noisy if cut is None else noisy[: int(round(cut * audio.rate))]
                target = measure_noise(y, audio.rate)
                matched, _ = needs_matching(target, ref_as[cut])
                if not matched:
                    continue  # a verdict would compare it clean: not a noise-matched trial
                goal = quantised(target)
                profiles: dict[str, list[np.ndarray]] = {}
                for r, xr in ref_audio.items():
                    m = match_noise(xr, audio.rate, goal, seed=_seed("match", seed, r, q, draw, cut), own=ref_noise[r])
                    profiles.setdefault(devices[r], []).append(scorer.recording_vector(audio.features(m)))
                row = trial_matrix(scorer, profiles, [(devices[q], scorer.recording_vector(audio.features(y)))])
                rows.append(NoisyRow(level_of(target.snr_db), round(target.snr_db, 1), q, row))
    return rows


def stack_rows(rows: Sequence[NoisyRow]) -> TrialMatrix:
    """The rows of one fold (same profiles) as one trial matrix."""
    names = rows[0].trials.profiles
    if any(r.trials.profiles != names for r in rows):
        raise ValueError("noisy rows of one fold were scored against different profiles")
    return TrialMatrix(list(names), [r.trials.devices[0] for r in rows], np.concatenate([r.trials.scores for r in rows]))
