"""Dataset loading (three layouts), splits without leakage, and the feature cache, on real speech."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.config import AudioConfig, Config
from devrecd.data import CCNU_SPLIT, FeatureCache, load_dataset
from devrecd.errors import DatasetError
from devrecd.features import FrontendConfig
from devrecd.stages import features_for_file

DEVICES = ("Honor9 STF-ALOO", "IPHONE6(2)", "xiaomi 8se")  # CCNU-style names: spaces and parentheses


@pytest.fixture(scope="module")
def speech(librispeech_dir: Path) -> list[np.ndarray]:
    """15 distinct 3 s pieces of real speech at 16 kHz."""
    files = sorted(librispeech_dir.glob("*/*/*.flac"))[:15]
    return [sf.read(f, dtype="float32")[0][: 3 * 16000] for f in files]


def _write(path: Path, x: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, 16000, subtype="PCM_16")
    return path


def make_layout(kind: str, root: Path, speech: list[np.ndarray]) -> Path:
    """3 devices x 5 recordings in the given layout; returns what to pass to load_dataset."""
    pieces = iter(speech)
    if kind == "folders":
        for d in DEVICES:
            for k in range(5):
                _write(root / d / f"session{k % 2}" / f"take {k}.wav", next(pieces))  # nested folders
        return root
    if kind == "ccnu":
        for d in DEVICES:
            for k in range(1, 6):
                _write(root / f"{d}_{k}.wav", next(pieces))
        return root
    rows = []
    for d in DEVICES:
        for k in range(5):
            rel = f"audio/{d.replace(' ', '_')}-{k}.wav"
            _write(root / rel, next(pieces))
            rows.append({"path": rel, "device": d, "group": f"g{k // 2}"})  # groups of 2, 2 and 1
    manifest = root / "list.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "device", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.mark.parametrize("kind", ["folders", "manifest", "ccnu"])
def test_no_recording_straddles_train_and_test(kind, tmp_path, speech):
    path = make_layout(kind, tmp_path / "data", speech)
    ds = load_dataset(path, seed=3)
    assert ds.layout == kind
    assert ds.labels == tuple(sorted(DEVICES))
    assert len(ds.items) == 15
    for device, counts in ds.counts().items():  # stratified: every device on every side
        assert counts["train"] >= 2 and counts["val"] >= 1 and counts["test"] >= 1, (device, counts)
    # Cut every recording into its windows exactly as training does, and label each window.
    cache = FeatureCache(tmp_path / "cache", FrontendConfig(), AudioConfig())
    windows = []  # (recording sha256, group, split) per window
    for it in ds.items:
        feats, digest = cache.features(it.path, hop_seconds=0.5)
        assert feats.shape[0] >= 2
        windows += [(digest, (it.device, it.group), it.split)] * len(feats)
    sides: dict[object, set[str]] = {}
    for digest, group, split in windows:
        sides.setdefault(digest, set()).add(split)
        sides.setdefault(group, set()).add(split)
    straddling = {k: v for k, v in sides.items() if len(v) > 1}
    assert not straddling
    train = {d for d, _, s in windows if s == "train"}
    test = {d for d, _, s in windows if s == "test"}
    assert train and test and not train & test


def test_ccnu_layout_groups_by_segment_and_split_is_persisted(tmp_path, speech):
    root = make_layout("ccnu", tmp_path / "flat", speech)
    ds = load_dataset(root)
    assert {it.group for it in ds.items} == {"1", "2", "3", "4", "5"}
    assert ds.items[0].device == "Honor9 STF-ALOO"
    # One seeded order of group names for all devices: each segment on one side for every device.
    side = {}
    for it in ds.items:
        assert side.setdefault(it.group, it.split) == it.split
    split_file = root / ".devrecd-split.json"
    stored = json.loads(split_file.read_text())
    assert len(stored["splits"]) == 1
    # Reused: a second load gives the same split even though the file is the only record of it.
    key = next(iter(stored["splits"]))
    first = next(iter(stored["splits"][key]["assignment"]))
    flipped = "val" if stored["splits"][key]["assignment"][first] != "val" else "train"
    stored["splits"][key]["assignment"][first] = flipped
    split_file.write_text(json.dumps(stored))
    again = load_dataset(root)
    assert again.split_map()[first] == flipped
    assert again.manifest_sha256 != ds.manifest_sha256
    # The dataset changed since the split was made: a clear error, not a silent new split.
    _write(root / "new phone_1.wav", speech[0])
    with pytest.raises(DatasetError, match="changed since its split"):
        load_dataset(root)


def test_split_by_group_and_split_column_are_obeyed(tmp_path, speech):
    root = make_layout("ccnu", tmp_path / "flat", speech)
    ds = load_dataset(root, split_by_group=CCNU_SPLIT)
    assert {(it.group, it.split) for it in ds.items} == {("1", "train"), ("2", "train"), ("3", "train"),
                                                         ("4", "test"), ("5", "test")}
    assert not (root / ".devrecd-split.json").exists()  # nothing to persist: derived from the data
    with pytest.raises(DatasetError, match="group"):
        load_dataset(root, split_by_group={"train": [1, 2], "test": [4, 5]})

    manifest = tmp_path / "m.csv"
    rows = [(f"flat/{it.path.name}", it.device, "test" if it.group == "2" else "train") for it in ds.items]
    manifest.write_text("path,device,split\n" + "".join(f'"{p}","{d}",{s}\n' for p, d, s in rows))
    exact = load_dataset(manifest)
    assert exact.layout == "manifest"
    assert sorted(exact.split_map().items()) == sorted((p, s) for p, _, s in rows)
    assert len(exact.subset("val")) == 0


def test_real_ccnu_manifest_segment_is_the_group(ccnu_dir, tmp_path):
    ds = load_dataset(ccnu_dir, split_by_group=CCNU_SPLIT)
    assert ds.layout == "manifest" and len(ds.labels) == 15
    assert len(ds.subset("train")) == 45 and len(ds.subset("test")) == 30
    assert {it.group for it in ds.subset("test")} == {"4", "5"}
    ratio = load_dataset(ccnu_dir, split_file=tmp_path / "split.json", ratios=(0.6, 0.2, 0.2), seed=1)
    per_group = {}
    for it in ratio.items:
        per_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in per_group.values())  # each segment on one side for all 15 phones
    assert sorted(len(ratio.subset(s)) for s in ("train", "val", "test")) == [15, 15, 45]


def test_bad_datasets_are_clear_errors(tmp_path, speech):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no audio"):
        load_dataset(tmp_path / "empty")
    flat = tmp_path / "flat"
    _write(flat / "phone_1.wav", speech[0])
    _write(flat / "phone_2.wav", speech[1])
    with pytest.raises(DatasetError, match="'phone' has 2 recording group"):
        load_dataset(flat, split_file=tmp_path / "s.json")
    _write(flat / "no-segment.wav", speech[2])
    with pytest.raises(DatasetError, match="<device>_<segment>"):
        load_dataset(flat)
    mixed = tmp_path / "mixed"
    _write(mixed / "a_1.wav", speech[0])
    _write(mixed / "dev" / "x.wav", speech[1])
    with pytest.raises(DatasetError, match="mixes audio files"):
        load_dataset(mixed)
    m = tmp_path / "m.csv"
    m.write_text("file,device\nx.wav,a\n")
    with pytest.raises(DatasetError, match="needs columns path,device"):
        load_dataset(m)
    m.write_text("path,device\nmissing.wav,a\n")
    with pytest.raises(DatasetError, match="do not exist: missing.wav"):
        load_dataset(m)
    m.write_text("path,device,split\nflat/phone_1.wav,a,training\n")
    with pytest.raises(DatasetError, match="'training' is not one of"):
        load_dataset(m)
    m.write_text("path,device\nflat/phone_1.wav,a\n")
    with pytest.raises(DatasetError, match="sum to 1"):
        load_dataset(m, ratios=(0.5, 0.5, 0.5))


def test_feature_cache_reuses_matches_and_survives_deletion_and_damage(tmp_path, speech):
    wav = _write(tmp_path / "rec.wav", np.concatenate(speech[:2]))  # 6 s
    cfg = Config()
    cache = FeatureCache(tmp_path / "cache", cfg.frontend, cfg.audio)
    feats, digest = cache.features(wav, 2.0)
    rec, direct = features_for_file(wav, cfg, hop_seconds=2.0)
    assert digest == rec.sha256
    np.testing.assert_array_equal(feats, direct)  # the cache stores exactly what the pipeline computes
    again, _ = cache.features(wav, 2.0)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(again, feats)
    # Another hop or another frontend is another entry, never a wrong hit.
    assert cache.features(wav, 1.0)[0].shape[0] > feats.shape[0]
    other = FeatureCache(tmp_path / "cache", FrontendConfig(clip_seconds=1.0), cfg.audio)
    assert other.features(wav, 2.0)[0].shape[0] == 4 and other.misses == 1  # starts 0, 2, 4 and the tail at 5
    # A damaged entry is recomputed; a deleted cache is rebuilt.
    entry = cache.entry(digest, 2.0)
    entry.write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(cache.features(wav, 2.0)[0], feats)
    import shutil

    shutil.rmtree(tmp_path / "cache")
    np.testing.assert_array_equal(cache.features(wav, 2.0)[0], feats)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_feature_cache_concurrent_writers_and_readers(tmp_path, speech):
    wav = _write(tmp_path / "rec.wav", np.concatenate(speech[2:5]))
    cfg = Config()
    results, errors = [], []

    def work() -> None:
        try:  # each thread its own cache object: a process of its own would see the same files
            c = FeatureCache(tmp_path / "cache", cfg.frontend, cfg.audio)
            for _ in range(3):
                results.append(c.features(wav, 1.0)[0])
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_dataset_folder_takes_recordings_by_the_watchers_rule(tmp_path, speech):
    """Which files are recordings is audio/files.py's one rule (watch.extensions and
    watch.ignore_patterns): hidden, lock, partial and non-audio files of a dataset are left out."""
    import shutil

    root = make_layout("folders", tmp_path / "data", speech)
    src = next(root.rglob("*.wav"))
    junk = (".hidden.wav", "~lock.wav", "copy.wav.part", "notes.txt")
    for name in junk:
        shutil.copy(src, src.parent / name)
    ds = load_dataset(root, seed=3)
    assert len(ds.items) == 15 and not {it.path.name for it in ds.items} & set(junk)
