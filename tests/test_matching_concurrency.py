"""Condition matching from several threads at once, and what it keeps to do less work: one judge shared
by the daemon's workers matches a new noise condition outside its lock, skips the references of
profiles compared as they are, keeps decoded references within a byte bound and lists the kept
vectors' folder only when it may be over its bound."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.config import Config
from devrecd.errors import ArtifactError

from tests.helpers import shipped_registry

# Two of them with a high noise floor of their own: the first 3 s of huawei_TAG_AL00_4 is compared
# with its own references as they are (test_matching.py), the other profiles noise-matched.
ENROLLED = ["huwei_honor8(1)", "huawei_TAG_AL00", "xiaomi2s", "vivo_Y11t"]


def _noisy(ccnu_dir: Path, tmp_path: Path, phone: str, snr_db: float | None, seconds: float | None = None) -> Path:
    """A questioned recording: segment 4 of ``phone`` (its first ``seconds``) with white noise at ``snr_db``."""
    x, rate = sf.read(ccnu_dir / f"{phone}_4.wav", dtype="float32")
    x = x[: int(seconds * rate)] if seconds else x
    if snr_db is not None:
        rng = np.random.default_rng(int(snr_db))
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.sqrt(np.mean(x ** 2)) / 10 ** (snr_db / 20)
    out = tmp_path / f"{phone}-{snr_db}-{seconds}.wav"
    sf.write(out, np.clip(x, -1, 1), rate, subtype="PCM_16")
    return out


def test_decoded_references_are_kept_within_their_byte_bound_and_verified_when_first_read(ccnu_dir, tmp_path, monkeypatch):
    from devrecd.audio import decode
    from devrecd.audio.noise import add_noise, measure_noise
    from devrecd.openset import matching
    from devrecd.openset.matching import ConditionMatcher, ReferenceStore

    cfg = Config()
    store = ReferenceStore(tmp_path / "refs")
    shas = [store.put(ccnu_dir / f"{p}_1.wav") for p in ("Apple_air1", "IPHONEX", "xiaomi8se")]
    reads: Counter[str] = Counter()
    read_evidence = decode.read_evidence

    def counted(path, *args, **kwargs):
        reads[Path(path).name] += 1
        return read_evidence(path, *args, **kwargs)

    monkeypatch.setattr(decode, "read_evidence", counted)
    matcher = ConditionMatcher(store, cfg.frontend, cfg.audio)
    first = matcher._samples(shas[0], None)
    assert not first.flags.writeable  # shared by every later use
    monkeypatch.setattr(matching, "SAMPLES_BYTES", int(first.nbytes * 2.5))  # room for two
    for sha in shas:
        matcher._samples(sha, None)
    # Room for two: the least recently used (the first) is dropped; the others are kept.
    assert reads == {sha: 1 for sha in shas} and list(matcher._decoded) == shas[1:]
    assert matcher._samples(shas[2], None) is matcher._decoded[shas[2]] and reads[shas[2]] == 1
    assert matcher._decoded_bytes == sum(a.nbytes for a in matcher._decoded.values()) <= matching.SAMPLES_BYTES
    matcher._samples(shas[0], None)
    assert reads[shas[0]] == 2 and list(matcher._decoded) == [shas[2], shas[0]]
    # Brought to two noise conditions (its own noise measured too): not decoded again.
    x = np.asarray(first, dtype=np.float32)
    for snr in (12.0, 18.0):
        matcher.noise_matched(shas[0], None, measure_noise(add_noise(x, cfg.frontend.sample_rate, snr, seed=0),
                                                           cfg.frontend.sample_rate))
    assert reads[shas[0]] == 2
    monkeypatch.setattr(matching, "SAMPLES_BYTES", first.nbytes - 1)  # larger than the bound: not kept
    fresh = ConditionMatcher(store, cfg.frontend, cfg.audio)
    fresh._samples(shas[2], None)
    assert not fresh._decoded and fresh._decoded_bytes == 0
    # A reference damaged in the store is refused when first read, as before.
    p = store.path(shas[1])
    os.chmod(p, 0o644)
    p.write_bytes(p.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        ConditionMatcher(store, cfg.frontend, cfg.audio)._samples(shas[1], None)


def test_kept_vectors_are_pruned_to_their_bound_without_listing_the_folder_at_every_write(tmp_path, monkeypatch):
    from devrecd.openset import matched_cache as M

    monkeypatch.setattr(M, "MAX_FILES", 6)
    monkeypatch.setattr(M, "RECOUNT_EVERY", 3)
    listed: list[Path] = []
    listdir = os.listdir

    def counted(path):
        listed.append(Path(path))
        return listdir(path)

    monkeypatch.setattr(M.os, "listdir", counted)
    kept = M.MatchedVectors(tmp_path, "key", "fingerprint")
    folder = kept.path("0" * 64, "clean", "n").parent
    for i in range(30):
        kept.put(f"{i:064x}", "clean", f"n{i}", np.full(3, i, np.float32), 20.0)
        assert len(listdir(folder)) <= M.MAX_FILES
    assert len(listed) <= 30 // (M.RECOUNT_EVERY + 1) + 1  # listed at the first write, then every 4th (was: every write)
    assert kept.get(f"{29:064x}", "clean", "n29")[0][0] == 29 and kept.get(f"{0:064x}", "clean", "n0") is None
    # Another process writing into the same folder: within RECOUNT_EVERY more until its next listing.
    other = M.MatchedVectors(tmp_path, "key", "fingerprint")
    for i in range(30, 60):
        (kept if i % 2 else other).put(f"{i:064x}", "clean", f"n{i}", np.zeros(3, np.float32), 20.0)
        assert len(listdir(folder)) <= M.MAX_FILES + M.RECOUNT_EVERY
