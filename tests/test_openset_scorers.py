"""Open-set scorers (GSV, embedder, fusion), the leave-phones-out protocol, and the GSV scorer through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devrecd.config import Config
from devrecd.errors import ArtifactError, DatasetError
from devrecd.openset.gsv import GsvScorer, fit_nap
from devrecd.openset.protocol import (TrialMatrix, open_set_outcomes, phone_folds, profile_vectors, s_norm,
                                      trial_figures)
from devrecd.openset.scorers import FusionScorer, fit_fusion, load_gsv, save_gsv
from devrecd.openset.vectors import unit
from devrecd.supervector import Ubm


@pytest.fixture(scope="module")
def ccnu(ccnu_dir, feature_cache):
    """Raw windows (hop 2 s) of segments of 6 real phones."""
    from devrecd.data import load_dataset

    cfg = Config()
    cache = feature_cache(cfg)
    ds = load_dataset(ccnu_dir)
    phones = sorted(ds.labels)[:6]
    items = [it for it in ds.items if it.device in phones]
    return [(it, cache.features(it.path, 2.0)[0]) for it in items], cfg


@pytest.fixture(scope="module")
def small_gsv(ccnu):
    items, cfg = ccnu
    return GsvScorer.train([f for _, f in items], [it.device for it, _ in items], cfg.frontend, mixtures=8,
                           nap_dims=4)


# --- supervectors -----------------------------------------------------------------------------

def test_ubm_posteriors_match_sklearn_and_arrays_round_trip(ccnu) -> None:
    from sklearn.mixture import GaussianMixture

    items, _ = ccnu
    feats = [f for _, f in items[:6]]
    ubm = Ubm.fit(feats, mixtures=4, seed=1)
    x = ubm.frames(feats[0])
    gmm = GaussianMixture(4, covariance_type="diag")
    gmm.weights_, gmm.means_, gmm.covariances_ = ubm.weights, ubm.means, ubm.variances
    gmm.precisions_cholesky_ = 1.0 / np.sqrt(ubm.variances)
    np.testing.assert_allclose(ubm.posteriors(x), gmm.predict_proba(x), atol=1e-8)
    back = Ubm.from_arrays(ubm.to_arrays())
    assert back.fingerprint() == ubm.fingerprint()
    np.testing.assert_allclose(back.supervector(feats[1]), ubm.supervector(feats[1]))
    bad = ubm.to_arrays()
    bad["variances"] = bad["variances"][:, :5]
    with pytest.raises(DatasetError):
        Ubm.from_arrays(bad)
    with pytest.raises(DatasetError):
        Ubm.fit([feats[0][:1, :10]], mixtures=64)  # too few frames


def test_supervector_is_zero_without_frames_evidence_and_grows_with_relevance(ccnu) -> None:
    items, _ = ccnu
    ubm = Ubm.fit([f for _, f in items[:6]], mixtures=4)
    f = items[7][1]
    small, large = ubm.supervector(f, relevance=1e6), ubm.supervector(f, relevance=1.0)
    assert np.linalg.norm(small) < 0.01 * np.linalg.norm(large)  # MAP stays at the UBM with a huge prior


# --- scorers ----------------------------------------------------------------------------------

def test_nap_removes_within_device_directions(ccnu) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 12))
    labels = [str(i // 5) for i in range(30)]
    basis = fit_nap(x, labels, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-10)
    centred = np.concatenate([x[i:i + 5] - x[i:i + 5].mean(0) for i in range(0, 30, 5)])
    before = np.linalg.norm(centred) ** 2
    after = np.linalg.norm(centred - centred @ basis @ basis.T) ** 2
    assert after < before * 0.8  # the top directions carry well over their share (3/12) of the variance
    with pytest.raises(DatasetError):
        fit_nap(x[:4], labels[:4], 3)  # one device, 3 centred rows: rank 3 -> not enough for 3 + more
        fit_nap(x[:2], labels[:2], 3)


def test_gsv_scorer_separates_real_phones_and_round_trips(ccnu, small_gsv, tmp_path: Path) -> None:
    items, _ = ccnu
    refs: dict[str, list[np.ndarray]] = {}
    questioned = []
    for it, f in items:
        v = small_gsv.recording_vector(f)
        assert v.shape == (small_gsv.ubm.dim,) and np.isclose(np.linalg.norm(v), 1.0)
        (refs.setdefault(it.device, []).append(v) if it.group in ("1", "2") else questioned.append((it.device, v)))
    names, prof = profile_vectors(refs)
    s = small_gsv.score(np.stack([v for _, v in questioned]), prof)
    right = [names[j] == d for j, (d, _) in zip(s.argmax(axis=1), questioned)]
    assert np.mean(right) >= 0.9  # seen phones, 8 mixtures: nearly all named
    path = tmp_path / "gsv.npz"
    small_gsv.calibrations = {"clean": {"slope": 2.0}}
    save_gsv(path, small_gsv, extra={"note": "test"})
    back, meta = load_gsv(path)
    assert back.fingerprint == small_gsv.fingerprint and meta["note"] == "test"
    assert back.calibrations == {"clean": {"slope": 2.0}}
    small_gsv.calibrations = {}
    np.testing.assert_allclose(back.recording_vector(items[0][1]), small_gsv.recording_vector(items[0][1]))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArtifactError):
        load_gsv(path)


def test_fusion_score_is_weighted_sum_of_part_cosines(ccnu, small_gsv) -> None:
    items, cfg = ccnu
    other = GsvScorer(small_gsv.ubm, cfg.frontend, relevance=4.0)
    fusion = FusionScorer([small_gsv, other], weights=[2.0, -1.0], bias=0.5)
    q = np.stack([fusion.recording_vector(f) for _, f in items[:3]])
    p = np.stack([fusion.recording_vector(f) for _, f in items[3:5]])
    d = small_gsv.ubm.dim
    expect = 2.0 * (unit(q[:, :d]) @ unit(p[:, :d]).T) - (unit(q[:, d:]) @ unit(p[:, d:]).T) + 0.5
    np.testing.assert_allclose(fusion.score(q, p), expect)
    rng = np.random.default_rng(0)
    tar = np.c_[rng.normal(2, 1, 200), rng.normal(0, 1, 200)]  # only the first part informs
    non = np.c_[rng.normal(0, 1, 800), rng.normal(0, 1, 800)]
    w, b = fit_fusion(tar, non)
    assert w[0] > 1.0 and abs(w[1]) < 0.3
    # sklearn's LogisticRegression(C=1e6, class_weight="balanced") on these trials, to its tolerance
    np.testing.assert_allclose(w, [2.1533, -0.0632], atol=5e-4)
    assert b == pytest.approx(-2.1333, abs=5e-4)


def test_train_gsv_cross_fits_one_calibration_per_condition(ccnu) -> None:
    from devrecd.audio.channel import get_channel
    from devrecd.audio.transmit import apply_channel
    from devrecd.openset.calibration import Calibration, Decision
    from devrecd.openset.gsvtrain import Augment, train_gsv
    from devrecd.stages import features_for_file

    items, cfg = ccnu
    args = ([f for _, f in items], [it.device for it, _ in items], [it.group for it, _ in items], cfg.frontend)
    tel = get_channel("tel")

    def under(i, channel, seconds):  # the development audio through a channel, cut short
        def transform(x, rate):
            x = apply_channel(tel, x, rate) if channel == "tel" else x
            return x if seconds is None else x[: int(seconds * rate)]
        return features_for_file(items[i][0].path, cfg, transform=transform)[1]

    gsv = train_gsv(*args, mixtures=8, nap_dims=2, inner=3, conditions=("clean", "clean/short", "tel"),
                    features_under=under, augment=Augment(channels=("tel",)))
    # The UBM and NAP are trained on every recording and its copy through the channel, labelled alike.
    copies = [under(i, "tel", None) for i in range(len(items))]
    assert gsv.fingerprint == GsvScorer.train(args[0] + copies, args[1] * 2, cfg.frontend, mixtures=8,
                                              nap_dims=2).fingerprint
    cals = {k: Calibration.from_dict(v) for k, v in gsv.calibrations.items()}
    assert sorted(cals) == ["clean", "clean/short", "tel"]
    # 6 phones in 3 groups of 2: each phone's 3 questioned segments against the 2 profiles of its group;
    # short: each questioned recording cut to 2 s and to 4 s.
    assert (cals["clean"].metrics["n_target"], cals["clean"].metrics["n_nontarget"]) == (18, 18)
    assert cals["clean/short"].metrics["n_target"] == 36 and cals["tel"].metrics["n_target"] == 18
    for key, cal in cals.items():
        # Bayes at the defaults among the 2 profiles of a cross-fitting group: LR >= 2 * 2 - 1
        assert cal.decision["rule"] == "bayes" and cal.log10_threshold == pytest.approx(np.log10(3), abs=1e-4)
        assert cal.decision["n_candidates"] == 2 and cal.lower <= 0 <= cal.upper
        assert cal.conditions["condition"] == key and cal.basis.startswith("development, cross-fitted")
        assert cal.scorer["fingerprint"] == gsv.fingerprint
    far = train_gsv(*args, mixtures=8, nap_dims=2, inner=3, decision=Decision(rule="far", far=0.05))
    cal = Calibration.from_dict(far.calibrations["clean"])
    assert cal.decision["rule"] == "far" and cal.metrics["open_set_far"] <= 0.05 + 1e-9
    assert far.fingerprint == GsvScorer.train(args[0], args[1], cfg.frontend, mixtures=8, nap_dims=2).fingerprint
    with pytest.raises(DatasetError):
        train_gsv(*args, mixtures=8, inner=4)  # 6 devices cannot make 4 groups of 2
    with pytest.raises(DatasetError, match="development audio"):
        train_gsv(*args, mixtures=8, conditions=("amrnb",))


# --- protocol ---------------------------------------------------------------------------------

def test_phone_folds_leave_every_phone_out_once_per_seed() -> None:
    phones = [f"p{i}" for i in range(15)]
    folds = phone_folds(phones, n_folds=3, seeds=(0, 1))
    assert len(folds) == 6
    for seed in (0, 1):
        tests = [p for f in folds if f.seed == seed for p in f.test]
        assert sorted(tests) == sorted(phones)
    for f in folds:
        assert not set(f.dev) & set(f.test) and len(f.dev) + len(f.test) == 15
    assert [f.test for f in folds if f.seed == 0] != [f.test for f in folds if f.seed == 1]
    with pytest.raises(DatasetError):
        phone_folds(phones[:5], n_folds=3)


def test_open_set_outcomes_leave_each_profile_out() -> None:
    # rows: a, a, b, c (c is never enrolled); columns: a, b.
    tm = TrialMatrix(["a", "b"], ["a", "a", "b", "c"],
                     np.array([[0.9, 0.2], [0.4, 0.5], [0.1, 0.8], [0.3, 0.7]]))
    o = open_set_outcomes(tm, threshold=0.6).to_dict()
    # b left out: the a-rows are named a? row0 yes (0.9 accepted), row1 yes (0.4 rejected);
    # a left out: b-row named b (0.8 accepted). Unknown: a-rows vs {b}: 0.2 and 0.5 rejected;
    # b-row vs {a}: 0.1 rejected.
    assert o["rank1"] == {"k": 3, "n": 3, "rate": 1.0}
    assert o["named_accepted"]["k"] == 2 and o["named_accepted"]["n"] == 3
    assert o["unknown_rejected"] == {"k": 3, "n": 3, "rate": 1.0}
    assert list(tm.open_set) == [0.2, 0.5, 0.1, 0.7]
    fig = trial_figures(tm.target, tm.nontarget)
    assert fig["n_target"] == 3 and fig["n_nontarget"] == 5


def test_s_norm_formula_and_exclusions() -> None:
    tm = TrialMatrix(["a"], ["a"], np.array([[1.0]]))
    qc, pc = np.array([[0.0, 2.0, 100.0]]), np.array([[1.0, 3.0, 100.0]])
    excl = np.array([[False, False, True]])
    out = s_norm(tm, qc, pc, excl, excl).scores[0, 0]
    assert out == pytest.approx(0.5 * ((1.0 - 1.0) / 1.0 + (1.0 - 2.0) / 1.0), rel=1e-6)


# --- the shipped scorer through the registry and the CLI ---------------------------------------

def test_shipped_gsv_enrols_calibrates_and_judges_unseen_phones(ccnu_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.openset.scorers import default_gsv_path
    from devrecd.openset.workflow import RegistryJudge
    from devrecd.stages import features_for_file

    shipped, meta = load_gsv(default_gsv_path())
    # Development calibrations of every condition of the channel table the bundled FFmpeg encodes, and /short.
    assert {"clean", "clean/short", "amrnb", "amrnb/short", "aac64", "opus32", "tel"} <= set(shipped.calibrations)
    rows = [r.split(",") for r in (ccnu_dir / "manifest.csv").read_text().splitlines()[1:]]
    by_phone: dict[str, dict[str, Path]] = {}
    for path, device, seg in rows:
        by_phone.setdefault(device.strip('"'), {})[seg] = ccnu_dir / path.strip('"')
    phones = sorted(by_phone)[:3]
    reg = tmp_path / "case" / "registry.json"
    run = CliRunner().invoke
    for p in phones[:2]:
        res = run(app, ["enroll", "--registry", str(reg), "--profile", p, str(by_phone[p]["1"]), str(by_phone[p]["2"])])
        assert res.exit_code == 0, res.output
    stored = json.loads(reg.read_text())
    assert stored["embedder"]["kind"] == "gsv" and "amrnb" in stored["embedder"]["dev_calibrations"]
    res = run(app, ["enroll", "--registry", str(reg), "--profile", "x", "--scorer", "embedder", str(by_phone[p]["3"])])
    assert res.exit_code == 2 and "was enrolled with scorer 'gsv', not 'embedder'" in res.output  # usage error
    cfg = Config().with_overrides({"registry.path": str(reg)})
    judge = RegistryJudge(cfg)
    verdicts = {}
    for p in phones:
        _, feats = features_for_file(by_phone[p]["4"], cfg)
        verdicts[p] = judge.judge(feats)
    assert verdicts[phones[0]]["candidate"] == phones[0] and verdicts[phones[1]]["candidate"] == phones[1]
    assert verdicts[phones[0]]["open_set"]["scorer"] == "gsv" and verdicts[phones[0]]["log10_lr"] is not None
    assert verdicts[phones[0]]["open_set"]["calibration_source"].startswith("scorer's development calibration")
    for v in verdicts.values():  # the verdict and its LR agree
        assert (v["device"] == v["candidate"]) == (v["log10_lr"] >= v["open_set"]["log10_threshold"])
    assert len(verdicts[phones[0]]["windows_best"]) == len(features_for_file(by_phone[phones[0]]["4"], cfg)[1])
    # calibrate on held-out segments of the enrolled phones and the never-enrolled one
    held = tmp_path / "held"
    held.mkdir()
    lines = ["path,device,segment"]
    for p in phones:
        for seg in ("3", "4", "5"):
            lines.append(f'"{by_phone[p][seg]}","{p}",{seg}')
    (held / "manifest.csv").write_text("\n".join(lines) + "\n")
    res = run(app, ["calibrate", str(held), "--registry", str(reg), "--split-groups", "test=3,5"])
    assert res.exit_code == 0, res.output
    assert "4 target / 8 non-target trials" in res.output
    _, feats = features_for_file(by_phone[phones[0]]["4"], cfg)
    after = RegistryJudge(cfg).judge(feats)
    assert after["open_set"]["calibration_source"].startswith("case calibration")
    assert "regularised toward" in after["open_set"]["calibration_basis"]
    # 4 case target trials cannot move the development map far: the enrolled phone stays named.
    assert after["device"] == verdicts[phones[0]]["device"] == phones[0]


def test_train_embedder_cli_merges_datasets_and_resumes(ccnu_dir: Path, tmp_path: Path) -> None:
    """The AAM trainer through the one training loop: two datasets merged, resumed to more epochs."""
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.model.checkpoint import load_checkpoint
    from devrecd.openset.embedder import Embedder

    rows = [r.split(",") for r in (ccnu_dir / "manifest.csv").read_text().splitlines()[1:]]
    phones = sorted({d.strip('"') for _, d, _ in rows})[:4]
    for name, pair in (("corpusA", phones[:2]), ("corpusB", phones[2:])):
        (tmp_path / name).mkdir()
        lines = ["path,device,segment"] + [f'"{ccnu_dir / p.strip(chr(34))}",{d},{s}' for p, d, s in rows
                                           if d.strip('"') in pair and s in ("1", "2", "3")]
        (tmp_path / name / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    env = {"DEVRECD_TRAIN__CACHE_DIR": str(tmp_path / "cache"), "DEVRECD_TRAIN__THREADS": "1"}
    args = ["train-embedder", str(tmp_path / "corpusA"), str(tmp_path / "corpusB"), "--out", str(run),
            "--hop-seconds", "2.0", "--split-groups", "train=1,2 val=3", "--batch-size", "8"]
    res = CliRunner().invoke(app, [*args, "--epochs", "1"], env=env)
    assert res.exit_code == 0, res.output
    assert "12 recordings of 4 devices" in res.output
    res = CliRunner().invoke(app, [*args, "--epochs", "2"], env=env)  # resumes from last.pt
    assert res.exit_code == 0, res.output
    assert "done after 2 epochs" in res.output
    ckpt = load_checkpoint(run)
    assert ckpt.arch == "asp" and ckpt.meta["options"]["loss"] == "aam"
    assert sorted(ckpt.labels) == sorted(f"corpus{'A' if p in phones[:2] else 'B'}/{p}" for p in phones)
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert Embedder.load(run).dim == 128


def test_a_scorer_file_other_than_the_registrys_is_a_usage_error(ccnu_dir: Path, small_gsv, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.openset.scorers import default_gsv_path

    other = tmp_path / "other-gsv.npz"
    save_gsv(other, small_gsv)
    shipped = tmp_path / "shipped-copy.npz"
    shipped.write_bytes(default_gsv_path().read_bytes())
    a, b = sorted(ccnu_dir.rglob("*.wav"))[:2]
    reg = tmp_path / "registry.json"
    run = CliRunner().invoke
    res = run(app, ["enroll", "--registry", str(reg), "--profile", "p1", str(a)])
    assert res.exit_code == 0, res.output
    for cmd in (["enroll", "--registry", str(reg), "--profile", "p1", str(b)],
                ["compare", str(b), "--registry", str(reg), "--reference-device", "p1"]):
        res = run(app, [*cmd, "--gsv", str(other)])
        assert res.exit_code == 2, res.output
        assert f"registry {reg} was made with 'gsv' scorer" in res.output and "--gsv" in res.output
        res = run(app, [*cmd, "--gsv", str(shipped)])  # the very scorer the registry was made with
        assert res.exit_code == 0, res.output


def test_shipped_gsv_calls_of_never_enrolled_phones_are_not_named_and_decisions_follow_the_lr(
        ccnu_dir: Path, tmp_path: Path) -> None:
    """Calls (AMR-NB files) judged with the shipped scorer against WAV references of 10 enrolled
    phones: the references are matched to the call and the scorer's AMR-NB development calibration
    decides (Bayes, 10 candidates: LR >= 19), vectorised with the scorer's AMR-NB channel model. A
    call of a phone that is not enrolled is not named (every one was, 0/60 rejected, when a WAV
    calibration decided calls); the enrolled phones' calls rank their phone first and are named or
    not but never as another phone; and every verdict agrees with its LR."""
    from devrecd.audio.channel import get_channel
    from devrecd.audio.transmit import encode_file
    from devrecd.openset.registry import open_registry
    from devrecd.openset.scorers import default_gsv_path
    from devrecd.openset.workflow import enrol_files
    from devrecd.pipeline.identify import identify_files
    import soundfile as sf

    phones = sorted({p.name.rsplit("_", 1)[0] for p in ccnu_dir.glob("*_1.wav")})
    enrolled, strangers = phones[:10], phones[10:]
    cfg = Config().with_overrides({"registry.path": str(tmp_path / "registry.json")})
    reg = open_registry(cfg.registry.path, create=True)
    scorer = load_gsv(default_gsv_path())[0]
    for p in enrolled:
        enrol_files(reg, scorer, p, [ccnu_dir / f"{p}_1.wav", ccnu_dir / f"{p}_2.wav"], cfg)
    reg.save()
    calls = {}
    for p in [*enrolled[:3], *strangers]:
        x, rate = sf.read(ccnu_dir / f"{p}_4.wav", dtype="float32")
        calls[p] = tmp_path / f"{p}.amr"
        calls[p].write_bytes(encode_file(x, rate, get_channel("amrnb")))
    records = {Path(r["path"]).stem: r for r in identify_files(cfg, list(calls.values()))}
    for p, r in records.items():
        assert r["open_set"]["condition"] == "amrnb" and r["comparison"]["references"] == "matched"
        assert r["open_set"]["channel_model"]["channel"] == "amrnb"
        assert r["condition_status"] == "validated" and r["log10_lr"] is not None
        named = r["device"] not in ("unknown device", "inconclusive")
        assert named == (r["open_set"]["decidable"] and r["log10_lr"] >= r["open_set"]["log10_threshold"])
    assert all(records[p]["device"] not in enrolled for p in strangers), {p: records[p]["log10_lr"] for p in strangers}
    assert sum(records[p]["candidate"] == p for p in enrolled[:3]) >= 2
    # Never another phone: named, rejected, or inconclusive.
    assert all(records[p]["device"] in (p, "unknown device", "inconclusive") for p in enrolled[:3])


def test_streamed_gsv_verdict_equals_the_whole_array_verdict(ccnu_dir: Path, tmp_path: Path) -> None:
    """The shipped scorer's accumulator (supervector statistics summed chunk by chunk, window vectors
    per chunk) gives the verdict of the recording's features held whole, for chunks of 1, 3 and many
    windows, and the open-set-only pipeline (which streams) gives it too."""
    from devrecd.openset.registry import open_registry
    from devrecd.openset.scorers import default_gsv_path
    from devrecd.openset.workflow import RegistryJudge, enrol_files, recording_features
    from devrecd.pipeline.identify import identify_files

    phones = sorted({p.name.rsplit("_", 1)[0] for p in ccnu_dir.glob("*_1.wav")})[:4]
    cfg = Config().with_overrides({"registry.path": str(tmp_path / "registry.json")})
    reg = open_registry(cfg.registry.path, create=True)
    scorer = load_gsv(default_gsv_path())[0]
    for p in phones:
        enrol_files(reg, scorer, p, [ccnu_dir / f"{p}_1.wav"], cfg)
    reg.save()
    judge = RegistryJudge(cfg, adopt_frontend=True)
    questioned = [ccnu_dir / f"{phones[0]}_4.wav", ccnu_dir / f"{phones[2]}_5.wav"]
    records = {r["path"]: r for r in identify_files(cfg, questioned)}

    def same(a: dict, b: dict) -> None:
        assert (a["device"], a["candidate"], a["log10_lr"], a["windows_best"]) == \
            (b["device"], b["candidate"], b["log10_lr"], b["windows_best"])
        assert [t["device"] for t in a["top_k"]] == [t["device"] for t in b["top_k"]]
        np.testing.assert_allclose([t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], rtol=1e-9)

    for path in questioned:
        rec, feats = recording_features(scorer, path, cfg)
        whole = judge.judge(feats, rec.describe())
        assert len(feats) > 3 and len(whole["windows_best"]) == len(feats)
        query = scorer.recording_vector(feats)
        for size in (1, 3, len(feats) // 2 + 1):
            acc = judge.accumulator()
            for i in range(0, len(feats), size):
                acc.add(feats[i:i + size])
            vector, windows = acc.result()
            np.testing.assert_allclose(vector, query, rtol=0, atol=1e-12)
            np.testing.assert_allclose(np.concatenate(windows), scorer.window_vectors(feats), rtol=0, atol=1e-12)
            same(judge.judge(acc, rec.describe()), whole)
        same(records[str(path)], whole)
    with pytest.raises(DatasetError):
        judge.accumulator().result()  # no windows: no supervector


def test_embedder_and_fusion_accumulators_equal_the_whole_array_vectors(ccnu_dir: Path) -> None:
    """The embedder scorer's accumulator (unit window embeddings summed; the network sees the batches
    it sees on the whole array) and the fusion's (parts' chunks of different sizes fused) give the
    vectors and window vectors of the features held whole, for chunks of 1, 3 and many windows."""
    from devrecd.openset.embedder import EMBED_BATCH
    from devrecd.openset.scorers import EmbedderScorer, default_gsv_path
    from devrecd.openset.workflow import recording_features

    gsv = load_gsv(default_gsv_path())[0]
    weights = np.random.default_rng(0).standard_normal((73, 16)).astype(np.float32)

    class Network:  # a stand-in network: batches of at most EMBED_BATCH windows, as the real ones
        frontend, dim, batches = gsv.frontend, 16, []

        def describe(self) -> dict:
            return {"fingerprint": "stand-in", "dim": self.dim, "source": ""}

        def embed_features(self, feats: np.ndarray) -> np.ndarray:
            batches = [np.asarray(feats[i:i + EMBED_BATCH], np.float32) for i in range(0, len(feats), EMBED_BATCH)]
            self.batches.extend(map(len, batches))
            return np.concatenate([b.mean(axis=1) @ weights for b in batches])

    net = Network()
    cfg = Config()
    _, one = recording_features(gsv, ccnu_dir / sorted(p.name for p in ccnu_dir.glob("*_1.wav"))[0], cfg)
    feats = np.concatenate([one] * (EMBED_BATCH // len(one) + 2))  # more than one network batch
    for scorer in (EmbedderScorer(net), FusionScorer([EmbedderScorer(net), gsv])):
        query, windows = scorer.recording_vector(feats), scorer.window_vectors(feats)
        whole_batches = [len(feats[i:i + EMBED_BATCH]) for i in range(0, len(feats), EMBED_BATCH)]
        for size in (1, 3, len(feats) // 2 + 1):
            net.batches.clear()
            acc = scorer.accumulator()
            for i in range(0, len(feats), size):
                acc.add(feats[i:i + size])
            vector, chunks = acc.result()
            assert net.batches == whole_batches
            np.testing.assert_allclose(vector, query, rtol=0, atol=1e-12)
            assert sum(map(len, chunks)) == len(feats)
            np.testing.assert_allclose(np.concatenate(chunks), windows, rtol=0, atol=1e-12)
    with pytest.raises(DatasetError):
        EmbedderScorer(net).accumulator().result()


def test_torch_gsv_accumulator_equals_the_numpy_scorer(ccnu_dir: Path) -> None:
    """The GPU path's accumulator (statistics summed as tensors), here with torch on the CPU."""
    torch = pytest.importorskip("torch")
    from devrecd.openset.scorers import default_gsv_path
    from devrecd.openset.workflow import recording_features
    from devrecd.supervector_torch import TorchGsvScorer

    gsv = load_gsv(default_gsv_path())[0]
    _, feats = recording_features(gsv, sorted(ccnu_dir.glob("*_4.wav"))[0], Config())
    acc = TorchGsvScorer(gsv, "cpu").accumulator()
    for i in range(0, len(feats), 3):
        acc.add(torch.as_tensor(feats[i:i + 3]))
    vector, windows = acc.result()
    np.testing.assert_allclose(vector, gsv.recording_vector(feats), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(windows), gsv.window_vectors(feats), rtol=0, atol=1e-12)
