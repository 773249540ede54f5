"""GSV channel models (:attr:`devrecd.openset.gsv.GsvScorer.channel_models`): a UBM/NAP per channel,
cross-fitted and calibrated with its own model, served for comparisons under that channel only; a
scorer file without them loads and scores exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devrecd.config import Config
from devrecd.errors import ArtifactError
from devrecd.openset.scorers import default_gsv_path, load_gsv, save_gsv
from tests.helpers import DEV_PHONES, synthetic_dev_features

PHONES = DEV_PHONES
# The shipped file's main model (the file without channel models, format 1: what registries enrolled
# before the AMR-NB channel model was shipped were made with) and the shipped file as a whole.
SHIPPED = "f53a8aa944a5fa24c90144d1402e900c33bb310367ea905a1b93e5ffe5782588"
SHIPPED_WITH_AMRNB = "ef10b1c579210005f2c7388d627f56362779ce3d46a754528ab2306f41ab9af0"
SHIPPED_AMRNB_MODEL = "ebe50381d623"


def test_channel_models_are_cross_fitted_calibrate_their_channel_and_leave_the_main_model_alone(monkeypatch, tmp_path):
    from devrecd.features import FrontendConfig
    from devrecd.openset import gsvtrain
    from devrecd.openset.gsvtrain import train_gsv

    feats, devices, order = synthetic_dev_features()
    copies: dict[int, int] = {}
    keep = []

    def under(i, channel, seconds):  # a deterministic "channel": the same copy every time it is asked for
        y = (feats[i] * np.float32(0.5) + np.float32(1.0))[: None if seconds is None else 1]
        copies[id(y)] = i
        keep.append(y)
        return y

    kw = dict(mixtures=2, nap_dims=1, inner=3, seed=0, conditions=["clean", "tel", "tel/short"], features_under=under)
    base = train_gsv(feats, devices, order, FrontendConfig(), **kw)
    used, trained = [], []
    real_trials, real_train = gsvtrain._channel_trials, gsvtrain.GsvScorer.train

    def trials_spy(scorer, under_, devices_, refs, questioned, cond, into):
        used.append((cond, list(scorer.trained_on)))
        return real_trials(scorer, under_, devices_, refs, questioned, cond, into)

    def train_spy(fs, labels, frontend, **k):
        if k.get("trained_on"):  # a channel model: copies of its own devices' recordings only
            assert all(id(x) in copies for x in fs) and [devices[copies[id(x)]] for x in fs] == list(labels)
            trained.append(sorted(set(labels)))
        return real_train(fs, labels, frontend, **k)

    monkeypatch.setattr(gsvtrain, "_channel_trials", trials_spy)
    monkeypatch.setattr(gsvtrain.GsvScorer, "train", staticmethod(train_spy))
    gsv = train_gsv(feats, devices, order, FrontendConfig(), channel_models={"tel": ("tel",)}, **kw)
    # every group's tel trials were scored by that group's tel model, its clean trials by the main model
    assert used == [("clean", []), ("tel", ["tel"]), ("tel/short", ["tel"])] * 3
    *folds, final = trained
    assert len(folds) == 3 and all(len(f) == 4 for f in folds) and final == sorted(PHONES)
    # the main model and its calibrations are those of the scorer trained without channel models
    assert gsv.with_channel_models({}).fingerprint == base.fingerprint != gsv.fingerprint
    strip = lambda c: {k: v for k, v in c.items() if k not in ("scorer", "fitted_at")}  # noqa: E731
    assert strip(gsv.calibrations["clean"]) == strip(base.calibrations["clean"])
    model = gsv.for_channel("tel")
    assert model is gsv.channel_models["tel"] and model.trained_on == ["tel"] and gsv.for_channel("amrnb") is gsv
    for key in ("tel", "tel/short"):
        assert gsv.calibrations[key]["scorer"]["channel_model"] == {"channel": "tel", "fingerprint": model.fingerprint,
                                                                     "trained_on": ["tel"]}
        assert gsv.calibrations[key]["scorer"]["fingerprint"] == gsv.fingerprint
        assert strip(gsv.calibrations[key]) != strip(base.calibrations[key])
    assert "channel_model" not in gsv.calibrations["clean"]["scorer"]
    # the file: format 2, the same scorer back; damaged channel arrays are refused
    path = tmp_path / "gsv.npz"
    save_gsv(path, gsv)
    back, meta = load_gsv(path)
    assert meta["format"] == "devrecd-gsv/2" and back.fingerprint == gsv.fingerprint
    assert back.for_channel("tel").fingerprint == model.fingerprint and back.calibrations == gsv.calibrations
    x = feats[3]
    np.testing.assert_array_equal(back.for_channel("tel").recording_vector(x), model.recording_vector(x))
    arrays = {k: v.copy() for k, v in gsv.arrays().items()}
    arrays["channel.tel.nap"] = arrays["channel.tel.nap"] + 1e-3
    with pytest.raises(ArtifactError, match="channel model 'tel'"):
        type(gsv).from_arrays(arrays, gsv.describe())


def test_a_scorer_file_without_channel_models_loads_and_scores_as_before(ccnu_dir: Path, tmp_path: Path) -> None:
    """The shipped file carries an AMR-NB channel model (format 2); its main model is the file shipped
    before it. Without the channel model it is that file (format 1): the same fingerprint, no channel
    model, a plain accumulator, and the scores the code before channel models gave (computed with it:
    0.92587..., -0.32629...); the shipped file scores WAV recordings with exactly those."""
    from devrecd.openset.gsv import ChannelAccumulators
    from devrecd.openset.scorers import scorer_accumulator, scorer_for_channel
    from devrecd.openset.workflow import recording_features

    shipped, meta = load_gsv(default_gsv_path())
    assert meta["format"] == "devrecd-gsv/2" and shipped.fingerprint == SHIPPED_WITH_AMRNB
    assert {n: m.fingerprint[:12] for n, m in shipped.channel_models.items()} == {"amrnb": SHIPPED_AMRNB_MODEL}
    assert shipped.channel_models["amrnb"].trained_on == ["clean", "amrnb"]
    assert scorer_for_channel(shipped, "amrnb") is shipped.channel_models["amrnb"]
    save_gsv(tmp_path / "format1.npz", shipped.with_channel_models({}))
    scorer, meta = load_gsv(tmp_path / "format1.npz")
    assert meta["format"] == "devrecd-gsv/1" and scorer.fingerprint == SHIPPED and scorer.channel_models == {}
    assert "channel_models" not in scorer.describe() and scorer_for_channel(scorer, "amrnb") is scorer
    assert not isinstance(scorer_accumulator(scorer), ChannelAccumulators)
    cfg = Config()
    v = {n: scorer.recording_vector(recording_features(scorer, ccnu_dir / f"{n}.wav", cfg)[1])
         for n in ("Apple_air1_1", "Apple_air1_4", "Honor9 STF-ALOO_1")}
    assert float(scorer.score(v["Apple_air1_4"], v["Apple_air1_1"])[0, 0]) == pytest.approx(0.9258727799441394, abs=1e-12)
    assert float(scorer.score(v["Apple_air1_4"], v["Honor9 STF-ALOO_1"])[0, 0]) == pytest.approx(-0.3262928875344395, abs=1e-12)
    for n, vec in v.items():  # the shipped file's main model: the same vectors
        np.testing.assert_array_equal(shipped.recording_vector(recording_features(shipped, ccnu_dir / f"{n}.wav", cfg)[1]), vec)
    save_gsv(tmp_path / "again.npz", scorer)
    again, meta2 = load_gsv(tmp_path / "again.npz")
    assert meta2["format"] == "devrecd-gsv/1" and again.fingerprint == SHIPPED


@pytest.fixture(scope="module")
def amr_scorer(ccnu_dir, feature_cache):
    """A GSV scorer trained on 6 real phones with an AMR-NB channel model (the recordings through the
    real AMR-NB encoder), calibrated clean and under amrnb, and the same scorer without it."""
    from devrecd.audio.channel import get_channel
    from devrecd.audio.transmit import apply_channel
    from devrecd.data import load_dataset
    from devrecd.openset.gsvtrain import train_gsv
    from devrecd.stages import features_for_file

    cfg = Config()
    cache = feature_cache(cfg)
    ds = load_dataset(ccnu_dir)
    phones = sorted(ds.labels)[:6]
    items = [it for it in ds.items if it.device in phones]
    amr = get_channel("amrnb")
    coded: dict[int, np.ndarray] = {}

    def under(i, channel, seconds):
        assert channel == "amrnb" and seconds is None
        if i not in coded:
            coded[i] = features_for_file(items[i].path, cfg, transform=lambda x, rate: apply_channel(amr, x, rate))[1]
        return coded[i]

    args = ([cache.features(it.path, cfg.audio.hop_seconds)[0] for it in items], [it.device for it in items],
            [(str(it.group), it.path.name) for it in items], cfg.frontend)
    gsv = train_gsv(*args, mixtures=8, nap_dims=2, inner=3, conditions=("clean", "amrnb"), features_under=under,
                    channel_models={"amrnb": ("amrnb",)})
    plain = gsv.with_channel_models({})
    plain.calibrations = {k: {**v, "scorer": {"kind": "gsv", "fingerprint": plain.fingerprint}}
                          for k, v in gsv.calibrations.items()}
    return gsv, plain, phones


def _registry(path: Path, scorer, phones, ccnu_dir: Path):
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import enrol_files

    cfg = Config().with_overrides({"registry.path": str(path / "registry.json")})
    reg = open_registry(cfg.registry.path, create=True)
    for p in phones:
        enrol_files(reg, scorer, p, [ccnu_dir / f"{p}_1.wav", ccnu_dir / f"{p}_2.wav"], cfg)
    reg.save()
    return cfg, reg


def test_an_amr_call_is_judged_with_the_amrnb_model_and_a_wav_as_before(amr_scorer, ccnu_dir: Path, tmp_path: Path) -> None:
    from devrecd.audio.channel import get_channel
    from devrecd.audio.transmit import encode_file
    from devrecd.openset.registry import DeviceProfile
    from devrecd.openset.workflow import RegistryJudge, calibration_trials_under, recording_features
    import soundfile as sf

    gsv, plain, phones = amr_scorer
    enrolled = phones[:3]
    cfg, reg = _registry(tmp_path / "ch", gsv, enrolled, ccnu_dir)
    model = gsv.channel_models["amrnb"]
    # enrolment is the main model's: the profiles hold main-model vectors
    ref = ccnu_dir / f"{enrolled[0]}_1.wav"
    np.testing.assert_allclose(reg.profiles[enrolled[0]].embeddings[0],
                               gsv.recording_vector(recording_features(gsv, ref, cfg)[1]), atol=1e-6)
    assert gsv.calibrations["amrnb"]["scorer"]["channel_model"]["fingerprint"] == model.fingerprint
    x, rate = sf.read(ccnu_dir / f"{enrolled[0]}_4.wav", dtype="float32")
    call = tmp_path / "call.amr"
    call.write_bytes(encode_file(x, rate, get_channel("amrnb")))
    judge = RegistryJudge(cfg)
    rec, feats = recording_features(gsv, call, cfg)
    v = judge.judge(feats, rec.describe())
    assert v["comparison"]["compared_under"] == "amrnb" and v["comparison"]["references"] == "matched"
    assert v["open_set"]["channel_model"] == {"channel": "amrnb", "fingerprint": model.fingerprint}
    assert v["open_set"]["condition"] == "amrnb" and v["condition_status"] == "validated" and v["log10_lr"] is not None
    # both sides vectorised with the amrnb model: the references matched to the call, the call itself
    amr = get_channel("amrnb")
    q = model.recording_vector(feats)
    prof = {n: DeviceProfile(name=n, embeddings=np.stack(
        [model.recording_vector(judge.matcher.reference_features(r.sha256, amr)) for r in p.references]
    ).astype(np.float32)).mean for n, p in reg.profiles.items()}
    for row in v["top_k"]:
        assert row["score"] == pytest.approx(float(model.score(q, prof[row["device"]])[0, 0]), abs=1e-5)
    assert v["candidate"] == enrolled[0]
    # references brought to a noise are kept on disk per model: the amrnb model's vectors never stand in for the main one's
    kept_main, kept_amr = judge._kept_vectors(judge.scorer), judge._kept_vectors(model)
    assert kept_main is not None and kept_amr is not None
    assert kept_main.path("a" * 64, "amrnb", "n1") != kept_amr.path("a" * 64, "amrnb", "n1")
    assert kept_amr.suffix.split(".")[1] == model.fingerprint[:16] and judge._kept_vectors(model) is kept_amr
    # a case calibration's trials under amrnb (devrecd calibrate --condition amrnb) are scored the same way
    held = ccnu_dir / f"{enrolled[1]}_3.wav"
    trials = calibration_trials_under(reg, gsv, [(str(held), enrolled[1])], cfg, ["amrnb"])["amrnb"]
    h = model.recording_vector(recording_features(gsv, held, cfg, channel=amr)[1])
    np.testing.assert_allclose(trials.scores[0], [float(model.score(h, prof[n])[0, 0]) for n in trials.profiles],
                               atol=1e-5)
    # streamed: the accumulator feeds every model and gives the same verdict
    acc = judge.accumulator()
    for i in range(0, len(feats), 2):
        acc.add(feats[i:i + 2])
    s = judge.judge(acc, rec.describe())
    assert (s["device"], s["log10_lr"], s["open_set"]["channel_model"]) == (v["device"], v["log10_lr"], v["open_set"]["channel_model"])
    # a WAV: the main model, the verdict of the same scorer without channel models
    cfg_p, _ = _registry(tmp_path / "plain", plain, enrolled, ccnu_dir)
    wav = ccnu_dir / f"{enrolled[1]}_4.wav"
    rec_w, feats_w = recording_features(gsv, wav, cfg)
    w = judge.judge(feats_w, rec_w.describe())
    wp = RegistryJudge(cfg_p).judge(feats_w, rec_w.describe())
    assert "channel_model" not in w["open_set"] and w["open_set"]["condition"] == "clean"
    assert (w["device"], w["log10_lr"], [(t["device"], t["score"]) for t in w["top_k"]]) == \
        (wp["device"], wp["log10_lr"], [(t["device"], t["score"]) for t in wp["top_k"]])


def test_torch_served_scorer_serves_its_channel_models_too(amr_scorer, ccnu_dir: Path) -> None:
    """The torch GSV scorer (the GPU path; computed here on the CPU) hands out its channel models
    on its own device, and its accumulator feeds them: the numpy channel models' vectors."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from devrecd.openset.scorers import scorer_accumulator, scorer_for_channel
    from devrecd.openset.workflow import recording_features
    from devrecd.supervector_torch import TorchGsvScorer

    gsv, _, phones = amr_scorer
    served = TorchGsvScorer(gsv, "cpu")
    feats = recording_features(gsv, ccnu_dir / f"{phones[0]}_4.wav", Config())[1]
    model = scorer_for_channel(served, "amrnb")
    assert isinstance(model, TorchGsvScorer) and model.fingerprint == gsv.channel_models["amrnb"].fingerprint
    assert scorer_for_channel(served, "aac64") is served and served.describe()["fingerprint"] == gsv.fingerprint
    want = gsv.channel_models["amrnb"].recording_vector(feats)
    np.testing.assert_allclose(model.recording_vector(feats), want, rtol=0, atol=1e-12)
    acc = scorer_accumulator(served)
    for i in range(0, len(feats), 2):
        acc.add(feats[i:i + 2])
    np.testing.assert_allclose(acc.result_for("amrnb")[0], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(acc.result()[0], gsv.recording_vector(feats), rtol=0, atol=1e-12)


def test_train_gsv_warns_of_channel_models_not_validated_on_held_out_phones(capsys) -> None:
    """The shipped scorer's AMR-NB model (clean + amrnb copies) was measured on held-out phones; any
    other channel model is trained with a warning that says so."""
    from devrecd.cli.openset import VALIDATED_CHANNEL_MODELS, _channel_models_option

    assert VALIDATED_CHANNEL_MODELS == {n: tuple(m.trained_on) for n, m in load_gsv(default_gsv_path())[0].channel_models.items()}
    assert _channel_models_option("amrnb=clean+amrnb", True) == {"amrnb": ("clean", "amrnb")}
    assert capsys.readouterr().err == ""
    assert _channel_models_option("tel=clean+tel,amrnb=clean+amrnb", True)["tel"] == ("clean", "tel")
    err = capsys.readouterr().err
    assert "tel=clean+tel not validated on held-out phones" in err and "amrnb=clean+amrnb, which the shipped" in err
