"""Classical baselines on the real CCNU_Mobile sample (segments 1-3 train, 4-5 test, 2 s windows)."""

from __future__ import annotations

import numpy as np
import pytest

from devrecd.baselines import GsvSvm, MfccSvm, make_baseline, mfcc_statistics, recording_accuracy
from devrecd.config import Config
from devrecd.data import CCNU_SPLIT, load_dataset
from devrecd.errors import DatasetError


@pytest.fixture(scope="module")
def ccnu_features(ccnu_dir, feature_cache):
    cfg = Config()
    cache = feature_cache(cfg)
    ds = load_dataset(ccnu_dir, split_by_group=CCNU_SPLIT)

    def feats(split):
        items = ds.subset(split)
        return [cache.features(it.path, 2.0)[0] for it in items], [it.device for it in items]

    return ds, feats("train"), feats("test")


def test_mfcc_statistics_are_mean_and_std_of_base_and_delta_dims():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 128, 73)).astype(np.float32)
    stats = mfcc_statistics(x)
    assert stats.shape == (3, 52)
    np.testing.assert_allclose(stats[:, :13], x[..., :13].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[:, 13:26], x[..., 13:26].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[:, 26:39], x[..., :13].std(axis=1), rtol=1e-5)
    x[..., 39:] += 100.0  # pre-Fbank is not an MFCC statistic
    np.testing.assert_allclose(mfcc_statistics(x), stats)


@pytest.mark.parametrize("name, min_windows, min_recordings", [("mfcc-svm", 0.80, 0.85), ("gsv-svm", 0.95, 1.0)])
def test_baselines_on_real_phones_reach_the_anchors(ccnu_features, name, min_windows, min_recordings):
    """Anchors on this split: MFCC+RBF SVM ~86% windows / 87% recordings, GSV+linear SVM 100% / 100%."""
    ds, (xtr, ytr), (xte, yte) = ccnu_features
    clf = make_baseline(name).fit(xtr, ytr)
    assert list(clf.classes_) == list(ds.labels)
    probas = [clf.predict_proba(x) for x in xte]
    assert all(p.shape == (len(x), 15) for p, x in zip(probas, xte))
    np.testing.assert_allclose(probas[0].sum(axis=1), 1.0, atol=1e-6)
    windows, recordings = recording_accuracy(probas, yte, clf.classes_)
    assert windows >= min_windows and recordings >= min_recordings, (windows, recordings)


def test_gsv_supervectors_move_with_the_data(ccnu_features):
    _, (xtr, ytr), _ = ccnu_features
    clf = GsvSvm(mixtures=8).fit(xtr[:12], ytr[:12])
    sv = clf.supervectors(xtr[0][:2])
    assert sv.shape == (2, 8 * 39)
    assert np.all(np.isfinite(sv)) and np.linalg.norm(sv[0] - sv[1]) > 0


def test_bad_training_data_is_an_error():
    x = [np.zeros((2, 128, 73), np.float32)] * 2
    with pytest.raises(DatasetError, match="two devices"):
        MfccSvm().fit(x, ["a", "a"])
    with pytest.raises(DatasetError, match="labels"):
        MfccSvm().fit(x, ["a"])
    with pytest.raises(DatasetError, match="unknown baseline"):
        make_baseline("ivector")
