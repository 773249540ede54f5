"""Training a GSV scorer on development recordings, with calibrations that transfer to unseen phones.

Recipe (``devrecd train-gsv``, and what ``benchmarks/openset.py`` measures):

1. UBM (``mixtures`` components; 16 did best on the leave-phones-out protocol, 64 worst) on every
   frame of every development recording; NAP basis (``nap_dims``) from their supervectors and
   device labels. With an :class:`Augment`, both are trained on copies of every development
   recording beside it (through the channels of the channel table, and with noise added), each
   labelled with its device: what one phone's recordings look like through a codec or in a noisy
   room is then within-device variability, which NAP projects out (multi-condition training).
2. Development calibrations, cross-fitted: the devices are split into ``inner`` groups; for each,
   a scorer trained WITHOUT that group scores its devices (enrolled from their first two
   recordings, the rest questioned). The pooled trials are what an unseen phone looks like to a
   scorer; calibrating on the phones the UBM/NAP were trained on instead accepts far too many
   unknown phones (measured: 42% vs 90-96% called unknown, docs/openset.md). With ``repeats`` > 1
   (an option, measured in docs/openset.md) this is done for several partitions and the trials
   pooled, each trial (a questioned recording against a device) counted once: one partition of 15
   devices into 3 groups compares 30 of the 105 pairs of devices, three partitions (seeds 0-2) 67,
   so phones of one maker that one partition keeps apart are compared in another.
3. One calibration per comparison condition (``conditions``: ``clean`` and the channels of the
   channel table, each also ``/short``): the questioned recordings pass through the channel (and
   are cut short), the references through the same channel (condition matching, as a verdict
   does). The noise-matched conditions ``clean/snr10``, ``clean/snr20`` and ``clean/snr30`` (each
   also ``/short``) are made as :mod:`devrecd.openset.noisetrials` describes: noisy questioned
   versions, references brought to each one's measured noise, rows classed by measured SNR.
   Each is a :class:`~devrecd.openset.calibration.Calibration` (bounded log10 LR, the decision
   rule) and travels with the scorer; registries without a case calibration of that condition
   use it. A condition without one gets no named device ("inconclusive").
4. Channel models (``channel_models``, e.g. ``{"amrnb": ("amrnb",)}``): beside the main UBM/NAP, one
   per channel trained on the development recordings passed through the conditions named (the
   channel; ``clean`` adds the recordings as they are). Cross-fitted like the main one, each group's
   trials under that channel (``amrnb``, ``amrnb/short``) are scored with the group's channel model,
   so the channel's calibration is that of the model a verdict under it uses
   (:meth:`~devrecd.openset.gsv.GsvScorer.for_channel`). Every other condition, and the profiles,
   stay the main model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import FrontendConfig
from devrecd.openset.calibration import Calibration, CalibrationError, Decision, fit_calibration
from devrecd.openset.noisetrials import DRAWS, SHORT_DRAWS, DevAudio, noisy_rows, noisy_version, stack_rows
from devrecd.openset.protocol import TrialMatrix, phone_folds, trial_matrix
from devrecd.openset.scorers import GsvScorer
from devrecd.openset.scoring import noise_level, parse_calibration_key
from devrecd.supervector import RELEVANCE

N_REFERENCES = 2  # recordings of a device enrolled in the calibration trials; the rest are questioned
# Partitions of the development devices cross-fitted (step 2). 1 (the shipped recipe); 3, measured on
# held-out phones (docs/openset.md): the same Cllr on average, 17 more of 810 never-enrolled verdicts
# rejected and 91 fewer of 3,240 enrolled ones named (WAV 356 -> 352 of 360): an option, not the default.
REPEATS = 1
SHORT_CUTS = (2.0, 4.0)  # seconds: the questioned recordings of a "/short" calibration are cut to each of these


def enrolment_split(devices: Sequence[str], order: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Indices of the reference and questioned recordings: per device its first ``N_REFERENCES``
    recordings by ``order`` (e.g. segment), the rest questioned."""
    refs, questioned = [], []
    by_device: dict[str, list[int]] = {}
    for i in sorted(range(len(devices)), key=lambda i: (devices[i], order[i])):
        by_device.setdefault(devices[i], []).append(i)
    for d, idx in by_device.items():
        if len(idx) <= N_REFERENCES:
            raise DatasetError(f"device {d!r} has {len(idx)} recording(s); calibration needs more than "
                               f"{N_REFERENCES} per device", reason="calibration_data")
        refs += idx[:N_REFERENCES]
        questioned += idx[N_REFERENCES:]
    return refs, questioned


def calibrate_blocks(blocks: Sequence[TrialMatrix], *, decision: Decision | None = None, basis: str = "",
                     scorer: dict[str, Any] | None = None, conditions: dict[str, Any] | None = None,
                     recordings: Sequence[Sequence[Any]] | None = None) -> Calibration:
    """The calibration of pooled trial blocks (each row one questioned recording, or one cut of it,
    against every profile of its block): bounded log10 LR and the decision. ``recordings[b][r]``
    names the recording row r of block b was cut from (default: every row its own): the held-out
    folds keep a recording's rows together, in every block it appears in.

    A recording questioned in several partitions of the cross-fitting (``repeats``) meets some
    devices again: the k-th row of recording x against device d is ONE trial, counted where it is
    first met (the first partition's score) and not again. A copy scored by another partition's
    UBM is nearly the same trial; counted again, it would inflate the trial counts and with them the
    ELUB bounds (they grow with the counts) and every rate. What another partition adds is the
    pairs of devices the first never compared."""
    scores: list[float] = []
    labels: list[int] = []
    groups: list[str] = []
    rows: list[str] = []
    group_of: dict[Any, str] = {}  # recording -> its held-out group's name ("<first block>:<recording>")
    row_of: dict[tuple[Any, int], str] = {}  # (recording, k-th row of it in a block) -> its row's name, where first met
    seen: set[tuple[Any, int, str]] = set()  # (recording, k, device) trials counted
    for b, block in enumerate(blocks):
        n_rows = block.scores.shape[0]
        met: dict[Any, int] = {}
        for r in range(n_rows):
            if recordings is None:  # every row its own
                key, group, row = None, f"{b}:{r}", f"{b}:{r}"
            else:
                x = recordings[b][r]
                k = met[x] = met.get(x, -1) + 1
                key, group, row = (x, k), group_of.setdefault(x, f"{b}:{x}"), row_of.setdefault((x, k), f"{b}:{r}")
            for j, device in enumerate(block.profiles):
                if key is not None:
                    if (*key, device) in seen:
                        continue
                    seen.add((*key, device))
                scores.append(float(block.scores[r, j]))
                labels.append(int(block.devices[r] == device))
                groups.append(group)
                rows.append(row)
    return fit_calibration(np.asarray(scores), np.asarray(labels), np.asarray(groups),
                           rows=np.asarray(rows), decision=decision, basis=basis, scorer=scorer,
                           conditions=conditions, n_candidates=max(b.scores.shape[1] for b in blocks))


# features_under(i, condition) -> raw windows of development recording i through the condition's channel
# (and, for a "/short" condition, cut to ``seconds``); None for "clean" at full length.
FeaturesUnder = Callable[[int, str, "float | None"], np.ndarray]


@dataclass(frozen=True)
class Augment:
    """Copies of each development recording the UBM and NAP are trained on beside it: one through
    each of ``channels`` (names of the channel table) and ``noise_copies`` with noise added (white
    or babble at an SNR drawn in :data:`~devrecd.openset.noisetrials.SNR_RANGE`, drawn apart from
    the noisy calibration trials' versions). The default adds nothing."""

    channels: tuple[str, ...] = ()
    noise_copies: int = 0

    def describe(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "noise_copies": self.noise_copies}


NOISE_COPY_DRAW = 1000  # draws of the training copies start here: never one of a calibration trial's versions


def split_talkers(audio: DevAudio | None) -> tuple[DevAudio | None, DevAudio | None]:
    """(training copies' audio, calibration trials' audio): the babble talkers split in two disjoint
    halves (alternately). NAP trained to remove babble of the talkers the calibration trials are
    made with would make those trials look cleaner than a case's babble of other talkers: the
    calibration would be optimistic (measured: never-enrolled recordings under babble at 20 dB
    named 4 of 30 with one shared pool, against 1 of 30 before training copies)."""
    if audio is None or len(audio.talkers) < 2:
        return audio, audio
    return replace(audio, talkers=list(audio.talkers[0::2])), replace(audio, talkers=list(audio.talkers[1::2]))


class _TrainingSet:
    """The (features, device) pairs a scorer of a subset of the development recordings is trained
    on: each recording and its :class:`Augment` copies, each copy made once whatever the number
    of cross-fitting groups it is used in."""

    def __init__(self, feats: Sequence[np.ndarray], devices: Sequence[str], augment: Augment,
                 under: Callable[[int, str, "float | None"], np.ndarray], audio: DevAudio | None, seed: int) -> None:
        if augment.noise_copies and audio is None:
            raise DatasetError("training on noisy copies needs the development audio", reason="calibration_data")
        self.feats, self.devices, self.augment, self.under, self.audio, self.seed = feats, devices, augment, under, audio, seed
        self._copies: dict[tuple[int, str], np.ndarray] = {}

    def _copy(self, i: int, what: str) -> np.ndarray:
        if (i, what) not in self._copies:
            if what.startswith("noise"):
                audio = self.audio
                noisy = noisy_version(audio.samples(i), audio, i, NOISE_COPY_DRAW + int(what[5:]), self.seed)  # type: ignore[union-attr]
                self._copies[i, what] = audio.features(np.ascontiguousarray(noisy, dtype=np.float32))  # type: ignore[union-attr]
            else:
                self._copies[i, what] = self.under(i, what, None)
        return self._copies[i, what]

    def through(self, idx: Sequence[int], conditions: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
        """A channel model's training data: recordings ``idx`` through each of ``conditions``
        (``clean``: as they are), each labelled with its device."""
        feats = [self.feats[i] if c == "clean" else self._copy(i, c) for c in conditions for i in idx]
        return feats, [self.devices[i] for i in idx] * len(conditions)

    def of(self, idx: Sequence[int]) -> tuple[list[np.ndarray], list[str]]:
        copies = [*self.augment.channels, *(f"noise{c}" for c in range(self.augment.noise_copies))]
        feats = [self.feats[i] for i in idx] + [self._copy(i, what) for what in copies for i in idx]
        return feats, [self.devices[i] for i in idx] * (1 + len(copies))


@dataclass
class _Pooled:
    """One condition's trials over the cross-fitting groups: a block per group, the development
    recording each row was cut from, and (noise-matched conditions) each row's measured SNR."""

    blocks: list[TrialMatrix] = field(default_factory=list)
    sources: list[list[int]] = field(default_factory=list)
    snrs: list[float] = field(default_factory=list)


def train_gsv(feats: Sequence[np.ndarray], devices: Sequence[str], order: Sequence[Any], frontend: FrontendConfig,
              *, mixtures: int = 16, relevance: float = RELEVANCE, nap_dims: int = 16, decision: Decision | None = None,
              inner: int = 3, seed: int = 0, source: str = "", conditions: Sequence[str] = ("clean",),
              features_under: FeaturesUnder | None = None, audio: DevAudio | None = None,
              noise_draws: tuple[int, int] = (DRAWS, SHORT_DRAWS), augment: Augment = Augment(),
              channel_models: dict[str, tuple[str, ...]] | None = None, repeats: int = REPEATS,
              on_step: Callable[[str], None] | None = None) -> GsvScorer:
    """The recipe of the module docstring; ``feats[i]`` are recording i's raw windows (clean, whole).

    ``conditions``: comparison conditions to calibrate (``clean``, ``clean/short``, ``amrnb``,
    ``amrnb/short``, ``clean/snr20``, ...); channels need ``features_under``, the noise-matched
    ones (``/snrNN``) ``audio``, made from ``noise_draws`` (whole, short) noisy versions of each
    questioned recording. ``augment``: the copies the UBM and NAP are also trained on (channels
    need ``features_under``, noise copies ``audio``). ``channel_models``: channel -> the conditions
    its model's training copies go through (step 4 of the module docstring; needs ``features_under``).
    ``repeats``: partitions of the devices into ``inner`` groups (seeds ``seed``, ``seed + 1``, ...),
    each cross-fitted in turn and their trials pooled (step 2)."""
    step = on_step or (lambda _m: None)
    devices = list(devices)
    if len(set(devices)) < 2 * inner:
        raise DatasetError(f"{len(set(devices))} devices are too few for {inner} cross-fitting groups "
                           f"(need {2 * inner})", reason="calibration_data")
    noisy = [c for c in conditions if parse_calibration_key(c)[1] is not None]
    if any(c not in noisy and c != "clean" for c in conditions) and features_under is None:
        raise DatasetError("calibrating conditions other than clean needs the development audio", reason="calibration_data")
    if noisy and audio is None:
        raise DatasetError("calibrating noise-matched conditions needs the development audio", reason="calibration_data")
    channel_models = dict(channel_models or {})
    if (augment.channels or channel_models) and features_under is None:
        raise DatasetError("training on channel copies needs the development audio", reason="calibration_data")

    def under(i: int, channel: str, seconds: float | None) -> np.ndarray:
        return feats[i] if channel == "clean" and seconds is None else features_under(i, channel, seconds)  # type: ignore[misc]

    if max(noise_draws) > NOISE_COPY_DRAW:
        raise DatasetError(f"at most {NOISE_COPY_DRAW} noisy versions per recording (the training copies' draws "
                           "start there)", reason="calibration_data")
    train_audio, trial_audio = split_talkers(audio) if augment.noise_copies else (audio, audio)
    training = _TrainingSet(feats, devices, augment, under, train_audio, seed)
    if repeats < 1:
        raise DatasetError(f"repeats must be at least 1, not {repeats}", reason="calibration_data")
    pooled = {c: _Pooled() for c in conditions}
    for fold in phone_folds(devices, n_folds=inner, seeds=tuple(range(seed, seed + repeats))):
        train = [i for i, d in enumerate(devices) if d in fold.dev]
        held = [i for i, d in enumerate(devices) if d in fold.test]
        step(f"cross-fitting {fold.index + 1}/{inner}" + (f" of partition {fold.seed - seed + 1}/{repeats}" if repeats > 1 else "")
             + f": UBM on {len(fold.dev)} devices, trials on {len(fold.test)} under {len(conditions)} condition(s)")
        scorer = GsvScorer.train(*training.of(train), frontend, mixtures=mixtures, relevance=relevance,
                                 nap_dims=nap_dims, seed=seed)
        models = {c: GsvScorer.train(*training.through(train, on), frontend, mixtures=mixtures, relevance=relevance,
                                     nap_dims=nap_dims, seed=seed, trained_on=on) for c, on in channel_models.items()}
        refs, questioned = enrolment_split([devices[i] for i in held], [order[i] for i in held])
        refs, questioned = [held[r] for r in refs], [held[q] for q in questioned]
        for cond in conditions:
            if cond not in noisy:  # under a channel with a model of its own, scored with that model
                model = models.get(parse_calibration_key(cond)[0], scorer)
                _channel_trials(model, under, devices, refs, questioned, cond, pooled[cond])
        if noisy:
            _noisy_trials(scorer, trial_audio, devices, refs, questioned, {c: pooled[c] for c in noisy},  # type: ignore[arg-type]
                          noise_draws, seed)
    step(f"final UBM on all {len(set(devices))} devices")
    final = GsvScorer.train(*training.of(range(len(feats))), frontend, mixtures=mixtures, relevance=relevance,
                            nap_dims=nap_dims, seed=seed, source=source)
    if channel_models:
        step(f"final channel models ({', '.join(channel_models)}) on all {len(set(devices))} devices")
        final = final.with_channel_models({
            c: GsvScorer.train(*training.through(range(len(feats)), on), frontend, mixtures=mixtures,
                               relevance=relevance, nap_dims=nap_dims, seed=seed, trained_on=on)
            for c, on in channel_models.items()})
    population = {"description": f"cross-fitted over {len(set(devices))} development devices ({inner} groups"
                                 + (f", {repeats} partitions" if repeats > 1 else "") + "): "
                                 "each scored by a scorer trained without it",
                  "devices": sorted(set(devices)), "recordings": len(devices)}
    noise = ("white and babble" if audio.talkers else "white") if audio is not None else None
    for cond in conditions:
        cal = _calibrate(cond, pooled[cond], cond in noisy, noise, decision, final,
                         f"development, cross-fitted over {len(set(devices))} devices ({inner} groups"
                         + (f", {repeats} partitions" if repeats > 1 else "") + ")", step)
        if cal is not None:
            final.calibrations[cond] = {**cal.to_dict(), "population": population}
    return final


def _channel_trials(scorer: GsvScorer, under: Callable[[int, str, "float | None"], np.ndarray], devices: Sequence[str],
                    refs: Sequence[int], questioned: Sequence[int], cond: str, into: _Pooled) -> None:
    """One group's trials under a channel condition: references whole through the channel
    (condition matching), questioned recordings through it too (and cut short for ``/short``)."""
    channel, _, short = parse_calibration_key(cond)
    ref_vecs: dict[str, list[np.ndarray]] = {}
    for r in refs:
        ref_vecs.setdefault(devices[r], []).append(scorer.recording_vector(under(r, channel, None)))
    cuts = SHORT_CUTS if short else (None,)
    rows = [(devices[q], scorer.recording_vector(under(q, channel, cut))) for q in questioned for cut in cuts]
    into.blocks.append(trial_matrix(scorer, ref_vecs, rows))
    into.sources.append([q for q in questioned for _ in cuts])


def _noisy_trials(scorer: GsvScorer, audio: DevAudio, devices: Sequence[str], refs: Sequence[int],
                  questioned: Sequence[int], noisy: dict[str, _Pooled], draws: tuple[int, int], seed: int) -> None:
    """One group's noise-matched trials (:func:`~devrecd.openset.noisetrials.noisy_rows`), each row
    into the condition of its measured SNR class (and length)."""
    for short in sorted({parse_calibration_key(c)[2] for c in noisy}):
        rows = noisy_rows(scorer, audio, devices, refs, questioned, noise_level,
                          cuts=SHORT_CUTS if short else (None,), draws=draws[short], seed=seed)
        for cond, into in noisy.items():
            _, level, is_short = parse_calibration_key(cond)
            picked = [r for r in rows if r.level == level] if is_short == short else []
            if picked:
                into.blocks.append(stack_rows(picked))
                into.sources.append([r.recording for r in picked])
                into.snrs += [r.snr_db for r in picked]


def _calibrate(cond: str, pooled: _Pooled, noisy: bool, noise: str | None, decision: Decision | None,
               final: GsvScorer, basis: str, step: Callable[[str], None]) -> Calibration | None:
    """The calibration of one condition's pooled trials, or None (said) for a noise-matched SNR class
    without usable trials."""
    channel, _, short = parse_calibration_key(cond)
    described: dict[str, Any] = {"channels": [channel], "condition": cond,
                                 "questioned_seconds": list(SHORT_CUTS) if short else "whole"}
    if noisy:
        if not pooled.snrs:
            step(f"calibration {cond}: no noisy development trial measured in this SNR class: not calibrated")
            return None
        described.update(noise=noise, noise_matched=True, snr_db_min=min(pooled.snrs), snr_db_max=max(pooled.snrs),
                         snr_measured="on the noisy questioned development recordings (references matched to each)")
    identity: dict[str, Any] = {"kind": final.kind, "fingerprint": final.fingerprint}
    model = final.for_channel(channel)
    if model is not final:  # fitted on scores of the channel's own model (the one a verdict under it uses)
        identity["channel_model"] = {"channel": channel, "fingerprint": model.fingerprint, "trained_on": model.trained_on}
    try:
        cal = calibrate_blocks(pooled.blocks, recordings=pooled.sources, decision=decision, basis=basis,
                               scorer=identity, conditions=described)
    except CalibrationError as exc:
        if not noisy:
            raise
        step(f"calibration {cond}: {exc}: not calibrated")
        return None
    m = cal.metrics
    step(f"calibration {cond}: {m['n_target']} target / {m['n_nontarget']} non-target trials, EER {m['eer']:.2%}, "
         f"Cllr {m['cllr']:.3f} (min {m['cllr_min']:.3f}), log10 LR in [{cal.lower:g}, {cal.upper:g}], "
         f"open-set FAR {m.get('open_set_far', float('nan')):.1%}, FRR {m['frr']:.1%}")
    return cal
