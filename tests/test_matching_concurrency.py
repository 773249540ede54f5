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


def _spy_on_matching(judge) -> dict[str, float]:
    """{reference sha256: its measured SNR once brought to the noise}, filled as ``judge`` matches."""
    matched: dict[str, float] = {}
    noise_matched = judge.matcher.noise_matched

    def spy(sha, channel, noise):
        out = noise_matched(sha, channel, noise)
        matched[sha] = out[1]
        return out

    judge.matcher.noise_matched = spy
    return matched


def test_two_threads_judging_different_noise_conditions_give_one_threads_verdicts(ccnu_dir, tmp_path):
    """One judge, two threads, each meeting new noise conditions at the same time: the verdicts of one
    thread judging them in turn with a judge of its own (on its own copy of the registry, so that
    neither finds the other's kept vectors), field for field."""
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.openset.workflow import RegistryJudge, recording_features

    cfg = shipped_registry(ccnu_dir, tmp_path / "a", ENROLLED)
    shutil.copytree(tmp_path / "a" / "case", tmp_path / "b" / "case")
    other = cfg.with_overrides({"registry.path": str(tmp_path / "b" / "case" / "registry.json")})
    scorer = load_gsv(default_gsv_path())[0]
    files = [_noisy(ccnu_dir, tmp_path, "huawei_TAG_AL00", None, 3.0),  # its own profile compared as it is
             _noisy(ccnu_dir, tmp_path, "IPHONEX", 14.0), _noisy(ccnu_dir, tmp_path, "xiaomi2s", 20.0),
             _noisy(ccnu_dir, tmp_path, "vivo_Y11t", 17.0)]
    inputs = []
    for f in files:
        rec, feats = recording_features(scorer, f, cfg)
        inputs.append((feats, rec.describe()))
    alone = RegistryJudge(cfg)
    expected = [alone.judge(feats, desc) for feats, desc in inputs]
    assert sum(v["comparison"]["noise_matched"] or bool(v["comparison"].get("compared_as_is")) for v in expected) == 4
    assert expected[0]["comparison"]["compared_as_is"] == ["huawei_TAG_AL00"]

    shared, got = RegistryJudge(other), {}
    start = threading.Barrier(2)

    def work(idx: list[int]) -> None:
        start.wait()
        for i in idx:
            got[i] = shared.judge(*inputs[i])

    threads = [threading.Thread(target=work, args=(idx,)) for idx in ([0, 2], [1, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for v in [*got.values(), *expected]:
        assert v["open_set"].pop("registry").endswith("registry.json")  # the path of its copy
    assert [got[i] for i in range(len(inputs))] == expected


def test_a_missing_matched_registry_is_matched_outside_the_lock_once_per_key(ccnu_dir, tmp_path, monkeypatch):
    """While one thread matches the references to a noise condition, a thread needing another one is not
    held up, and a thread needing the same one waits for it instead of matching it again; a matching
    that fails fails for both and is not kept (tried again next time)."""
    import devrecd.audio.noise as noise_module
    from devrecd.openset import matching
    from devrecd.openset.workflow import RegistryJudge

    judge = RegistryJudge(shipped_registry(ccnu_dir, tmp_path, ["Apple_air1", "IPHONEX"]))
    started = {k: threading.Event() for k in "abc"}
    release = {k: threading.Event() for k in "abc"}
    calls: Counter[str] = Counter()

    def slow(registry, matcher, channel, vector, noise, vectors=None, only=None):
        calls[noise] += 1
        started[noise].set()
        assert release[noise].wait(30)
        if noise == "c":
            raise ArtifactError("reference damaged", reason="reference_damaged")
        return object()

    monkeypatch.setattr(matching, "matched_registry", slow)
    monkeypatch.setattr(noise_module, "noise_key", lambda n: n)  # the "noise" here is its key
    monkeypatch.setattr(judge.matcher, "matched_snr", lambda sha, channel, noise: 20.0)
    profiles = [[r.sha256 for r in judge.registry.profiles[n].references] for n in judge.registry.names]
    out: dict[str, object] = {}

    def run(name: str, noise: str) -> None:
        try:
            out[name] = judge._matched_under(None, noise, judge.scorer, profiles)
        except ArtifactError as exc:
            out[name] = exc

    first = threading.Thread(target=run, args=("a1", "a"))
    first.start()
    assert started["a"].wait(30)
    same, other = threading.Thread(target=run, args=("a2", "a")), threading.Thread(target=run, args=("b", "b"))
    same.start()
    other.start()
    assert started["b"].wait(30), "another noise condition waited for the one being matched"
    release["b"].set()
    other.join(30)
    assert not other.is_alive() and first.is_alive() and same.is_alive()
    release["a"].set()
    first.join(30)
    same.join(30)
    assert calls == {"a": 1, "b": 1}
    assert out["a1"][0] is out["a2"][0] and out["a1"][1] == out["a2"][1] == {n: [20.0] * 2 for n in judge.registry.names}
    assert judge._matched_under(None, "a", judge.scorer, profiles)[0] is out["a1"][0] and calls["a"] == 1  # kept
    failing = [threading.Thread(target=run, args=(f"c{i}", "c")) for i in range(2)]
    for t in failing:
        t.start()
    assert started["c"].wait(30)
    release["c"].set()
    for t in failing:
        t.join(30)
    assert isinstance(out["c0"], ArtifactError) and isinstance(out["c1"], ArtifactError) and calls["c"] == 1
    run("c2", "c")
    assert calls["c"] == 2 and not judge._pending


def test_references_of_profiles_compared_as_they_are_are_not_brought_to_the_noise(ccnu_dir, tmp_path):
    """The first 3 s of huawei_TAG_AL00_4: its own profile is compared with its references as they are,
    so they are never brought to the questioned noise (their matched vectors would not be used); the
    matched references' SNRs are those of the other profiles' references. The registry matched for
    that verdict is kept apart from one with every profile matched (the same noise, another set)."""
    from devrecd.audio.condition import noise_profile
    from devrecd.openset.matching import resolve_comparison
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.openset.workflow import RegistryJudge, recording_features

    cfg = shipped_registry(ccnu_dir, tmp_path, ENROLLED)
    judge = RegistryJudge(cfg)
    rec, feats = recording_features(load_gsv(default_gsv_path())[0], _noisy(ccnu_dir, tmp_path, "huawei_TAG_AL00", None, 3.0), cfg)
    matched = _spy_on_matching(judge)
    v = judge.judge(feats, rec.describe())
    comp = v["comparison"]
    assert comp["compared_as_is"] == ["huawei_TAG_AL00"] and comp["profiles_as_noisy"] == 1, comp
    reg = judge.registry
    own = {r.sha256 for r in reg.profiles["huawei_TAG_AL00"].references}
    others = {r.sha256 for n in reg.names if n != "huawei_TAG_AL00" for r in reg.profiles[n].references}
    assert set(matched) == others and not own & set(matched)
    assert comp["matched_references_snr_db"] == [min(matched.values()), max(matched.values())]
    assert judge.judge(feats, rec.describe()) == v  # judged again: the kept registry, the same verdict
    # Every profile matched to the same noise (per candidate off): another entry, with them matched.
    condition = rec.describe()["condition"]
    profiles = [[r.sha256 for r in reg.profiles[n].references] for n in reg.names]
    channel = resolve_comparison(condition, judge.store, profiles, True)[0]
    whole, snrs = judge._matched_under(channel, noise_profile(condition, judge.matcher.rate), judge.scorer, profiles)
    assert own <= set(matched) and "huawei_TAG_AL00" in snrs
    assert not np.array_equal(whole.profiles["huawei_TAG_AL00"].embeddings, reg.profiles["huawei_TAG_AL00"].embeddings)


def test_with_per_candidate_off_the_matched_references_snr_covers_every_profile(ccnu_dir, tmp_path, monkeypatch):
    """The first 3 s of huawei_TAG_AL00_4 again, but with no noise-matched calibration to judge under
    (its SNR made outside it): per candidate is off, so every profile, its own too, is brought to the
    noise, and ``matched_references_snr_db`` spans all the matched references, not the others' only."""
    from devrecd.openset import conditions
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.openset.workflow import RegistryJudge, recording_features

    cfg = shipped_registry(ccnu_dir, tmp_path, ENROLLED)
    judge = RegistryJudge(cfg)
    rec, feats = recording_features(load_gsv(default_gsv_path())[0], _noisy(ccnu_dir, tmp_path, "huawei_TAG_AL00", None, 3.0), cfg)
    matched = _spy_on_matching(judge)
    monkeypatch.setattr(conditions, "snr_outside", lambda condition, conditions: "outside (test)")
    v = judge.judge(feats, rec.describe())
    comp = v["comparison"]
    assert "compared_as_is" not in comp and "profiles_as_noisy" not in comp, comp
    own = {r.sha256 for r in judge.registry.profiles["huawei_TAG_AL00"].references}
    assert own <= set(matched) and len(matched) == 2 * len(ENROLLED)
    assert comp["matched_references_snr_db"] == [min(matched.values()), max(matched.values())]
    others = [v for s, v in matched.items() if s not in own]
    assert comp["matched_references_snr_db"] != [min(others), max(others)]  # its own lie outside the others' range here


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
    # Room for two: the first two read are kept, the third is decoded at each use (each new noise
    # condition reads every reference in turn: least-recently-used would evict each before its reuse).
    assert reads == {sha: 1 for sha in shas} and list(matcher._decoded) == shas[:2]
    for sha in shas:  # the next pass: only the one not kept is decoded again
        matcher._samples(sha, None)
    assert reads == {shas[0]: 1, shas[1]: 1, shas[2]: 2}
    assert matcher._samples(shas[0], None) is matcher._decoded[shas[0]]
    assert matcher._decoded_bytes == sum(a.nbytes for a in matcher._decoded.values()) <= matching.SAMPLES_BYTES
    # Brought to two noise conditions (its own noise measured too): not decoded again.
    x = np.asarray(first, dtype=np.float32)
    for snr in (12.0, 18.0):
        matcher.noise_matched(shas[0], None, measure_noise(add_noise(x, cfg.frontend.sample_rate, snr, seed=0),
                                                           cfg.frontend.sample_rate))
    assert reads[shas[0]] == 1
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
