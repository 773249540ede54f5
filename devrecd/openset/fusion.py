"""Training a fusion scorer: the network embedder's and the GMM supervector's scores combined.

Recipe (``devrecd train-fusion``): the development recordings are scored by each part as a case
would be (per device its first two recordings enrolled, the rest questioned against every
profile); logistic regression on those trials gives the weights (:func:`~.scorers.fit_fusion`, so
the fused score is a log-likelihood ratio on them), and the fused trials give the development
calibration (bounded log10 LR + the decision) that travels with the scorer, as ``train-gsv``'s does.

The weights say how far each part is trusted on devices like the development ones: score the
development recordings with parts that were NOT trained on those devices (e.g. held-out phones),
or the fusion learns to trust whichever part memorised them. ``benchmarks/openset.py`` measures
the fusion with both parts and the fusion trained inside leave-phones-out folds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.openset.calibration import Decision
from devrecd.openset.gsvtrain import calibrate_blocks, enrolment_split
from devrecd.openset.protocol import TrialMatrix, profile_vectors
from devrecd.openset.scorers import FusionScorer, fit_fusion


def development_part_trials(fusion: FusionScorer, feats: Sequence[np.ndarray], devices: Sequence[str],
                            order: Sequence[Any]) -> tuple[list[str], list[str], np.ndarray]:
    """Profiles, questioned devices and (questioned, profiles, parts) scores of the development trials."""
    if len(set(devices)) < 2:
        raise DatasetError("fusion needs development recordings of at least two devices", reason="fusion_data")
    refs, questioned = enrolment_split(devices, order)
    vecs = {i: fusion.recording_vector(feats[i]) for i in (*refs, *questioned)}
    ref_vecs: dict[str, list[np.ndarray]] = {}
    for i in refs:
        ref_vecs.setdefault(devices[i], []).append(vecs[i])
    names, prof = profile_vectors(ref_vecs)
    q = np.stack([vecs[i] for i in questioned])
    return names, [devices[i] for i in questioned], fusion.part_scores(q, prof)


def train_fusion(parts: Sequence[Any], feats: Sequence[np.ndarray], devices: Sequence[str], order: Sequence[Any],
                 *, decision: Decision | None = None) -> FusionScorer:
    """The recipe of the module docstring; ``feats[i]`` are development recording i's raw windows
    (the parts' shared frontend), ``order`` sorts each device's recordings (first two enrolled).
    The calibration is of the clean condition (the development recordings as they are)."""
    devices = list(devices)
    names, qdev, part_scores = development_part_trials(FusionScorer(parts), feats, devices, order)
    is_target = np.asarray(qdev)[:, None] == np.asarray(names)[None, :]
    weights, bias = fit_fusion(part_scores[is_target], part_scores[~is_target])
    fused = FusionScorer(parts, weights, bias)
    trials = TrialMatrix(names, qdev, part_scores @ weights + bias)
    cal = calibrate_blocks([trials], decision=decision, scorer={"kind": fused.kind, "fingerprint": fused.fingerprint},
                           basis=f"fusion weights and calibration on {len(names)} development devices "
                                 f"({int(is_target.sum())} target trials)", conditions={"channels": ["clean"]})
    fused.calibrations = {"clean": cal.to_dict()}
    return fused
