"""Training a GSV scorer on development recordings, with a calibration that transfers to unseen phones.

Recipe (``devrecd train-gsv``, and what ``benchmarks/openset.py`` measures):

1. UBM (``mixtures`` components; 16 did best on the leave-phones-out protocol, 64 worst) on every frame of every development recording; NAP basis
   (``nap_dims``) from their supervectors and device labels.
2. Development calibration, cross-fitted: the devices are split into ``inner`` groups; for each,
   a scorer trained WITHOUT that group scores its devices (enrolled from their first two
   recordings, the rest questioned). The pooled trials are what an unseen phone looks like to a
   scorer; calibrating on the phones the UBM/NAP were trained on instead gives a threshold that
   accepts far too many unknown phones (measured: 42% vs 90-96% called unknown, docs/openset.md).
3. The LLR map and the open-set threshold from those trials travel with the scorer and are used
   by registries that have no calibration of their own. Threshold rules: ``far`` = the lowest
   score whose open-set false-acceptance rate on the impostor recordings is at most ``far`` (as
   ``devrecd calibrate``); ``llr0`` = the score whose calibrated LLR is 0 (accept when the
   evidence favours "same device"), estimated from every trial rather than the few impostors'
   tail.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import FrontendConfig
from devrecd.openset.calibration import Calibration, calibrate
from devrecd.openset.protocol import TrialMatrix, phone_folds, trial_matrix
from devrecd.openset.scorers import GsvScorer
from devrecd.supervector import RELEVANCE

N_REFERENCES = 2  # recordings of a device enrolled in the calibration trials; the rest are questioned
THRESHOLD_RULES = ("far", "llr0")


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


def check_threshold_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise DatasetError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {rule!r}",
                           reason="calibration_rule")


def calibrate_trials(blocks: Sequence[TrialMatrix], *, far: float, threshold_rule: str) -> Calibration:
    """The development calibration of pooled trial blocks: LLR map, and the open-set threshold by
    ``threshold_rule`` (``far``: the open-set FAR quantile of the impostors; ``llr0``: LLR = 0)."""
    check_threshold_rule(threshold_rule)
    cat = lambda name: np.concatenate([getattr(b, name) for b in blocks])  # noqa: E731
    cal = calibrate(cat("target"), cat("nontarget"), open_set_nontarget=cat("open_set"), target_far=far)
    if threshold_rule == "llr0":
        thr = -cal.offset / cal.slope
        cal = replace(cal, threshold=float(thr), threshold_basis="llr0",
                      far=float(np.mean(cat("open_set") >= thr)), frr=float(np.mean(cat("target") < thr)))
    return cal


def train_gsv(feats: Sequence[np.ndarray], devices: Sequence[str], order: Sequence[Any], frontend: FrontendConfig,
              *, mixtures: int = 16, relevance: float = RELEVANCE, nap_dims: int = 16, far: float = 0.05,
              inner: int = 3, seed: int = 0, source: str = "", threshold_rule: str = "far",
              on_step: Callable[[str], None] | None = None) -> GsvScorer:
    """The recipe of the module docstring; ``feats[i]`` are recording i's raw windows."""
    check_threshold_rule(threshold_rule)
    step = on_step or (lambda _m: None)
    devices = list(devices)
    if len(set(devices)) < 2 * inner:
        raise DatasetError(f"{len(set(devices))} devices are too few for {inner} cross-fitting groups "
                           f"(need {2 * inner})", reason="calibration_data")
    blocks: list[TrialMatrix] = []
    for fold in phone_folds(devices, n_folds=inner, seeds=(seed,)):
        train = [i for i, d in enumerate(devices) if d in fold.dev]
        held = [i for i, d in enumerate(devices) if d in fold.test]
        step(f"cross-fitting {fold.index + 1}/{inner}: UBM on {len(fold.dev)} devices, trials on {len(fold.test)}")
        scorer = GsvScorer.train([feats[i] for i in train], [devices[i] for i in train], frontend,
                                 mixtures=mixtures, relevance=relevance, nap_dims=nap_dims, seed=seed)
        refs, questioned = enrolment_split([devices[i] for i in held], [order[i] for i in held])
        vec = {i: scorer.recording_vector(feats[held[i]]) for i in range(len(held))}
        ref_vecs: dict[str, list[np.ndarray]] = {}
        for i in refs:
            ref_vecs.setdefault(devices[held[i]], []).append(vec[i])
        blocks.append(trial_matrix(scorer, ref_vecs, [(devices[held[i]], vec[i]) for i in questioned]))
    cal = calibrate_trials(blocks, far=far, threshold_rule=threshold_rule)
    step(f"final UBM on all {len(set(devices))} devices")
    final = GsvScorer.train(feats, devices, frontend, mixtures=mixtures, relevance=relevance, nap_dims=nap_dims,
                            seed=seed, source=source)
    final.calibration = {**cal.to_dict(), "basis": f"cross-fitted over {len(set(devices))} development devices "
                                                    f"({inner} groups)"}
    return final
