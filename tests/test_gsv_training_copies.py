"""train-gsv's training copies (:class:`devrecd.openset.gsvtrain.Augment`): every cross-fitted UBM/NAP
is trained on its own devices' recordings and copies only, each copy labelled with its recording's
device and made once; the result is reproducible. Synthetic features: no audio, no encoder."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import DEV_PHONES, synthetic_dev_features

PHONES = DEV_PHONES


def test_training_set_aligns_labels_with_copies_and_makes_each_copy_once():
    from devrecd.openset.gsvtrain import Augment, _TrainingSet

    feats, devices, _ = synthetic_dev_features()
    calls = []

    def under(i, channel, seconds):
        calls.append((i, channel, seconds))
        return feats[i] + 1000.0 * (1 + list(PHONES).index(devices[i]))  # a copy carries its own device's tag

    ts = _TrainingSet(feats, devices, Augment(channels=("tel", "amrnb")), under, None, 0)
    idx = [0, 5, 9, 23]
    got, labels = ts.of(idx)
    assert len(got) == len(labels) == 3 * len(idx)
    for x, label in zip(got, labels):
        i = next(i for i in idx if np.array_equal(x, feats[i]) or np.array_equal(x, under(i, "tel", None)))
        assert devices[i] == label
    calls.clear()
    ts.of(idx)
    ts.of([0, 5])
    assert calls == []  # cached: each copy made once, whatever the number of groups it is used in
    with pytest.raises(Exception, match="noisy copies needs the development audio"):
        _TrainingSet(feats, devices, Augment(noise_copies=1), under, None, 0)


def test_each_cross_fitted_scorer_is_trained_on_its_own_devices_and_their_copies_only(monkeypatch):
    from devrecd.features import FrontendConfig
    from devrecd.openset import gsvtrain
    from devrecd.openset.gsvtrain import Augment, train_gsv

    feats, devices, order = synthetic_dev_features()
    tag = {id(x): i for i, x in enumerate(feats)}
    copies, keep = {}, []  # kept: an id is never reused for another array while the test runs

    def under(i, channel, seconds):
        y = feats[i] + np.float32(0.5) if seconds is None else (feats[i] + np.float32(0.5))[:1]
        copies[id(y)] = i
        keep.append(y)
        return y

    seen = []
    real = gsvtrain.GsvScorer.train

    def spy(fs, labels, frontend, **kw):
        src = [tag.get(id(x), copies.get(id(x))) for x in fs]
        assert None not in src, "a training array that is neither a recording nor one of its copies"
        assert [devices[i] for i in src] == list(labels)  # every copy labelled with its own recording's device
        seen.append(sorted(set(labels)))
        return real(fs, labels, frontend, **kw)

    monkeypatch.setattr(gsvtrain.GsvScorer, "train", staticmethod(spy))
    kw = dict(mixtures=2, nap_dims=1, inner=3, seed=0, conditions=["clean", "tel"], features_under=under,
              augment=Augment(channels=("tel",)))
    a = train_gsv(feats, devices, order, FrontendConfig(), **kw)
    *folds, final = seen
    assert len(folds) == 3 * gsvtrain.REPEATS and final == sorted(PHONES)
    for p in range(gsvtrain.REPEATS):  # each partition holds every phone out once
        held = [sorted(set(PHONES) - set(f)) for f in folds[3 * p : 3 * p + 3]]
        assert all(len(h) == 2 for h in held) and sorted(sum(held, [])) == sorted(PHONES)
    b = train_gsv(feats, devices, order, FrontendConfig(), **kw)
    assert a.fingerprint == b.fingerprint and a.calibrations.keys() == b.calibrations.keys()


def test_training_copies_and_calibration_trials_take_disjoint_babble_talkers():
    """Babble in the training copies and in the noise-matched calibration trials comes from two
    disjoint halves of the talkers, so the calibration meets babble the NAP was not trained on."""
    from devrecd.openset.gsvtrain import split_talkers
    from devrecd.openset.noisetrials import DevAudio

    talkers = [np.full(10, float(k)) for k in range(7)]
    audio = DevAudio(samples=lambda i: np.zeros(10), features=lambda x: x, rate=8000, talkers=talkers)
    train, trials = split_talkers(audio)
    a = {float(t[0]) for t in train.talkers}
    b = {float(t[0]) for t in trials.talkers}
    assert a and b and not (a & b) and a | b == set(range(7))
    white = DevAudio(samples=audio.samples, features=audio.features, rate=8000)
    assert split_talkers(white) == (white, white) and split_talkers(None) == (None, None)


def test_repeated_partitions_pair_more_devices_and_keep_a_recordings_trials_in_one_fold(monkeypatch):
    """``repeats``: the cross-fitting is done on several partitions of the devices and the trials
    pooled. Non-target trials then pair devices that one partition keeps in different groups (phones
    of one maker among them), each trial is counted once (not once per partition: the counts set the
    ELUB bounds), and every row of a recording, in every partition it is questioned in, is in ONE
    held-out fold (else its own trials would calibrate it)."""
    from devrecd.features import FrontendConfig
    from devrecd.openset import gsvtrain
    from devrecd.openset.gsvtrain import train_gsv

    feats, devices, order = synthetic_dev_features()
    captured = []
    real = gsvtrain.fit_calibration

    def spy(scores, labels, groups, **kw):
        captured.append((np.asarray(labels), np.asarray(groups), kw["rows"]))
        return real(scores, labels, groups, **kw)

    real_blocks = gsvtrain.calibrate_blocks
    pairs = []

    def spy_blocks(blocks, **kw):
        pairs.append({frozenset((d, p)) for b in blocks for d in b.devices for p in b.profiles if d != p})
        return real_blocks(blocks, **kw)

    monkeypatch.setattr(gsvtrain, "fit_calibration", spy)
    monkeypatch.setattr(gsvtrain, "calibrate_blocks", spy_blocks)
    seen_pairs = {}
    for repeats in (1, 3):
        captured.clear()
        train_gsv(feats, devices, order, FrontendConfig(), mixtures=2, nap_dims=1, inner=3, seed=0,
                  conditions=["clean"], repeats=repeats)
        (labels, groups, rows), = captured
        # A group name is "<first block>:<recording>": one per recording, whatever block it is in.
        recording = np.array([g.split(":")[1] for g in groups])
        for r in np.unique(recording):
            assert len(set(groups[recording == r])) == 1
        seen_pairs[repeats] = (int(np.sum(labels == 0)), len(np.unique(recording)), len(np.unique(rows)),
                               int(np.sum(labels == 1)))
    (non1, rec1, rows1, tar1), (non3, rec3, rows3, tar3) = seen_pairs[1], seen_pairs[3]
    assert rec3 == rec1 and rows3 == rows1  # the same questioned recordings and rows ...
    assert tar3 == tar1  # ... each against its own device once (met again in every partition: one trial)
    assert non1 < non3 < 3 * non1  # the devices another partition adds, each pair counted once
    assert len(pairs[1]) > len(pairs[0]) and pairs[0] < pairs[1]  # device pairs one partition never compares
    with pytest.raises(Exception, match="repeats must be at least 1"):
        train_gsv(feats, devices, order, FrontendConfig(), mixtures=2, nap_dims=1, inner=3, repeats=0)


def test_a_trial_met_again_in_another_partition_is_not_counted_again():
    """The same blocks twice (a partition met again, the same trials scored again) calibrate exactly
    as the blocks once: the copies add no trial, so they neither widen the ELUB bounds nor change any rate."""
    from devrecd.openset.gsvtrain import calibrate_blocks
    from devrecd.openset.protocol import TrialMatrix

    rng = np.random.default_rng(0)
    blocks, recordings, rid = [], [], 0
    for b in range(3):
        profiles = [f"d{b}{j}" for j in range(4)]
        devices = [d for d in profiles for _ in range(3) for _cut in range(2)]  # 3 recordings x 2 cuts
        recs = [rid + i // 2 for i in range(len(devices))]
        rid += len(devices) // 2
        scores = rng.normal(0.2, 0.2, (len(devices), 4)) + 0.6 * (np.array(devices)[:, None] == np.array(profiles))
        blocks.append(TrialMatrix(profiles=profiles, devices=devices, scores=scores))
        recordings.append(recs)
    once = calibrate_blocks(blocks, recordings=recordings)
    again = [TrialMatrix(b.profiles, b.devices, b.scores + rng.normal(0, 1e-3, b.scores.shape)) for b in blocks]
    twice = calibrate_blocks(blocks + again, recordings=recordings + recordings)
    assert (twice.slope, twice.offset, twice.lower, twice.upper) == (once.slope, once.offset, once.lower, once.upper)
    assert twice.metrics["n_target"] == once.metrics["n_target"] == 72  # 3 blocks x 4 devices x 3 recordings x 2 cuts
    assert twice.metrics["n_nontarget"] == once.metrics["n_nontarget"] == 216
    assert twice.open_set_log10_lrs == once.open_set_log10_lrs
