"""The closed-set verdict outside the SNR range its network was trained on: the range measured at
training time, carried by the checkpoint and the contract, and every closed-set verdict held to it.

Rule (devrecd.pipeline.verdict.closed_set_snr): a questioned recording whose measured SNR lies below
the model's validated range names no device (``inconclusive``, the network's class as ``candidate``,
a statement); a model that records no range (exported before ranges were) is served as before, saying
so. The end-to-end tests train a tiny network on 3 real CCNU phones, export it with the real CLI and
judge a real recording with and without white noise at 10 dB SNR through ``identify``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.config import load_config
from devrecd.contract import Contract, input_spec, output_spec
from devrecd.errors import ArtifactError, ConfigError
from devrecd.features import FrontendConfig
from devrecd.pipeline.verdict import ModelValidation, closed_set_comparison, model_validation, with_comparison

PHONES = ("IPHONEX", "huawei_p20", "xiaomi2s")  # training SNRs 22.7-37.0 dB (segments 1-2)
SEGMENT_SPLIT = {1: "train", 2: "train", 3: "val", 4: "test", 5: "test"}
# The paper network, narrowed: what is tested is the SNR range's path, not accuracy (and the export is quicker).
TINY_NET = {"conv_filters": [8, 8], "lstm_units": 16, "encoder_blocks": 1, "heads": 2, "head_size": 8, "mlp_units": 16}
RANGE = ModelValidation(("clean",), (22.7, 41.7), "contract")
JUDGED = {"outcome": "judged", "device": "IPHONEX", "score": 0.97,
          "top_k": [{"device": "IPHONEX", "score": 0.97}, {"device": "xiaomi2s", "score": 0.02}]}


# --- the rule ----------------------------------------------------------------------------------------

def test_below_the_range_names_no_device_and_says_why() -> None:
    out = with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": 10.4}}, None, RANGE)
    assert out["device"] == "inconclusive" and out["candidate"] == "IPHONEX"
    assert out["score"] == 0.97 and out["top_k"] == JUDGED["top_k"]  # the candidates stay listed
    assert out["condition_status"] == "unvalidated"
    rep = out["comparison"]
    assert rep["status"] == "unvalidated" and rep["snr_status"] == "outside"
    assert rep["validated_snr_db"] == [22.7, 41.7] and rep["snr_range_source"] == "contract"
    assert rep["snr_statement"] == ("SNR 10.4 dB below the SNR range the model was trained and validated on "
                                    "(22.7 to 41.7 dB, its contract): outside validation, no device is named")
    assert rep["statement"] == rep["snr_statement"]  # the codec is validated: the SNR is why


def test_inside_or_above_the_range_is_unchanged() -> None:
    for snr in (22.7, 30.0, 41.7, 55.0):  # the low end itself is inside; cleaner than any trained on is not outside
        out = with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": snr}}, None, RANGE)
        assert out["device"] == "IPHONEX" and "candidate" not in out, snr
        assert out["condition_status"] == "validated" and out["comparison"]["snr_status"] == "inside", snr
        assert "snr_statement" not in out["comparison"] and "statement" not in out["comparison"]
    # No margin below the low end (the open set's rule, devrecd.openset.conditions.SNR_MARGIN_DB).
    assert with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": 22.6}}, None, RANGE)["device"] == "inconclusive"


def test_a_model_without_a_recorded_range_is_served_and_says_so() -> None:
    legacy = ModelValidation(("clean",))
    out = with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": 10.4}}, None, legacy)
    assert out["device"] == "IPHONEX" and "candidate" not in out and out["condition_status"] == "validated"
    rep = out["comparison"]
    assert rep["snr_status"] == "not_recorded" and rep["validated_snr_db"] is None
    assert rep["snr_statement"].startswith("the model records no SNR range it was trained on")
    assert "(10.4 dB)" in rep["snr_statement"] and "backend.validated_snr_db" in rep["snr_statement"]


def test_codec_and_snr_both_outside() -> None:
    rep = closed_set_comparison({"channel": "amrnb", "snr_db": 12.0}, RANGE)
    assert rep["condition_status"] == "unvalidated"
    assert "comparison condition 'amrnb'" in rep["comparison"]["statement"]  # the codec's statement stays first
    assert rep["comparison"]["snr_status"] == "outside" and "SNR 12.0 dB" in rep["comparison"]["snr_statement"]
    unmeasured = closed_set_comparison({"channel": ""}, RANGE)["comparison"]
    assert unmeasured["snr_status"] == "unmeasured" and unmeasured["status"] == "validated"


def test_the_closed_set_answer_beside_an_open_set_verdict_is_held_to_the_same_rules() -> None:
    """A registry served with a model: the registry's verdict in front (its own condition rules), the
    network's under ``closed_set``, held to the model's codec and SNR rules as a closed-set verdict is:
    outside, it names no device there either (its class as ``candidate``) and says why."""
    open_set = {"device": "phone 3", "score": 0.81, "top_k": [{"device": "phone 3", "score": 0.81}],
                "open_set": {"accepted": True}, "condition_status": "validated", "comparison": {"status": "validated"}}
    for condition, why in (({"channel": "", "snr_db": 10.4}, "snr_statement"),
                           ({"channel": "amrnb", "snr_db": 30.0}, "statement")):
        out = with_comparison(JUDGED, {"condition": condition}, open_set, RANGE)
        alone = with_comparison(JUDGED, {"condition": condition}, None, RANGE)
        assert out["device"] == "phone 3" and out["condition_status"] == "validated"  # the registry's, untouched
        assert out["comparison"] == {"status": "validated"} and "candidate" not in out
        cs = out["closed_set"]
        assert cs == {k: alone[k] for k in ("device", "candidate", "score", "top_k", "condition_status", "comparison")}
        assert cs["device"] == "inconclusive" and cs["candidate"] == "IPHONEX" and cs["score"] == 0.97
        assert cs["condition_status"] == "unvalidated" and cs["comparison"]["statement"] and why in cs["comparison"]
    inside = with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": 30.0}}, open_set, RANGE)["closed_set"]
    assert inside["device"] == "IPHONEX" and "candidate" not in inside and inside["condition_status"] == "validated"
    assert inside["comparison"]["snr_status"] == "inside"


def test_the_configured_range_overrides_the_models() -> None:
    cfg = load_config(None, env={})
    onnx = {"name": "onnxruntime", "contract_sha256": "c" * 64, "validated_snr_db": [22.7, 41.7]}
    torch = {"name": "torch", "contract_sha256": "", "validated_snr_db": [22.7, 41.7]}
    assert model_validation(cfg.backend, onnx) == RANGE
    assert model_validation(cfg.backend, torch).snr_source == "checkpoint"
    assert model_validation(cfg.backend, {"name": "onnxruntime", "validated_snr_db": None}).snr_db is None
    lab = cfg.with_overrides({"backend.validated_snr_db": [8.0, 45.0]})
    v = model_validation(lab.backend, onnx)
    assert v.snr_db == (8.0, 45.0) and v.snr_source == "backend.validated_snr_db"
    out = with_comparison(JUDGED, {"condition": {"channel": "", "snr_db": 10.4}}, None, v)
    assert out["device"] == "IPHONEX" and out["comparison"]["snr_range_source"] == "backend.validated_snr_db"


@pytest.mark.parametrize("bad, why", [([30.0], "two SNRs"), ([40.0, 20.0], "low <= high"),
                                      ([float("inf"), 30.0], "finite"), (["a", "b"], "expected float")])
def test_a_bad_configured_range_is_refused(bad, why) -> None:
    with pytest.raises(ConfigError, match=f"backend.validated_snr_db.*{why}"):
        load_config(None, env={}, overrides={"backend.validated_snr_db": bad})
    assert load_config(None, env={}).backend.validated_snr_db == ()  # unset: the contract's


def test_the_running_live_verdict_names_no_device_while_a_window_was_outside() -> None:
    from devrecd.live import RunningVerdict

    rv = RunningVerdict(("a", "b"), 2)
    assert rv.add(np.array([0.9, 0.1])).validated
    assert not rv.add(np.array([0.8, 0.2]), validated=False).validated
    assert not rv.add(np.array([0.9, 0.1])).validated  # the outside window is still pooled
    assert rv.add(np.array([0.9, 0.1])).validated  # ... and now it is not


# --- the contract ------------------------------------------------------------------------------------

def _contract(**kw) -> Contract:
    frontend = FrontendConfig()
    return Contract(name="m", onnx_file="m.onnx", onnx_sha256="0" * 64, onnx_bytes=1, input=input_spec(),
                    output=output_spec(2), labels=("a", "b"), frontend=frontend,
                    frontend_fingerprint=frontend.fingerprint(), precision="fp32", opset=18, arch="paper",
                    checkpoint_sha256="1" * 64, **kw)


def test_contract_round_trip_with_and_without_the_range(tmp_path: Path) -> None:
    with_range = _contract(validated_snr_db=(22.7, 37.0))
    path = with_range.save(tmp_path / "m.json")
    doc = json.loads(path.read_text())
    assert doc["validated_snr_db"] == [22.7, 37.0]
    assert Contract.load(path) == with_range and Contract.load(path).validated_snr_db == (22.7, 37.0)
    # A contract exported before the field existed loads (without it, or with null): no range recorded.
    del doc["validated_snr_db"]
    assert Contract.from_dict(doc).validated_snr_db is None
    assert Contract.from_dict({**doc, "validated_snr_db": None}).validated_snr_db is None
    assert Contract.from_dict(doc) == _contract()
    assert Contract.from_dict({**doc, "validated_snr_db": [5, 40]}).validated_snr_db == (5.0, 40.0)


@pytest.mark.parametrize("bad, why", [([37.0, 22.7], "low <= high"), ([22.7], r"\[low, high\]"),
                                      (["22.7", 37.0], r"\[low, high\]"), ([float("nan"), 37.0], "finite"),
                                      ([True, 37.0], r"\[low, high\]"), (22.7, r"\[low, high\]")])
def test_contract_refuses_a_bad_range(bad, why) -> None:
    doc = _contract().to_dict()
    with pytest.raises(ArtifactError, match=f"validated_snr_db.*{why}") as exc:
        Contract.from_dict({**doc, "validated_snr_db": bad}, source="m.json")
    assert exc.value.reason == "contract_invalid" and str(exc.value).startswith("m.json: ")
    with pytest.raises(ArtifactError, match="validated_snr_db"):
        _contract(validated_snr_db=(37.0, 22.7)).validate()


# --- training records the range, export carries it, identify is held to it ----------------------------

def _manifest(ccnu_dir: Path, out: Path) -> Path:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["device"] in PHONES]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "device", "group", "split"])
        for r in rows:
            seg = int(r["segment"])
            w.writerow([str((ccnu_dir / r["path"]).resolve()), r["device"], seg, SEGMENT_SPLIT[seg]])
    return out


@pytest.fixture(scope="module")
def tiny(ccnu_dir: Path, feature_cache_dir: Path, tmp_path_factory) -> dict:
    """A tiny network (``TINY_NET``) trained 1 epoch on 3 phones' segments 1-2 through the one training
    loop, and its export by the real ``devrecd export``."""
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.data import load_dataset
    from devrecd.train import train, train_options

    tmp = tmp_path_factory.mktemp("snr")
    cfg = load_config(None, env={}, overrides={"train.cache_dir": str(feature_cache_dir), "train.threads": 1})
    ds = load_dataset(_manifest(ccnu_dir, tmp / "data" / "manifest.csv"))
    run = tmp / "run"
    train(ds, run, cfg, train_options(cfg.train, epochs=1, batch_size=8, lr=1e-3, hop_seconds=2.0, patience=0),
          hparams=TINY_NET)
    onnx = tmp / "export" / "tiny.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(onnx),
                                      "--parity-audio", str(ccnu_dir / "IPHONEX_4.wav")])
    assert result.exit_code == 0, result.output
    return {"cfg": cfg, "ds": ds, "run": run, "onnx": onnx, "output": result.output, "tmp": tmp}


def _measured(paths) -> list[float]:
    """The SNR each verdict's condition states for these recordings, measured here independently."""
    from devrecd.audio import read_evidence

    return [read_evidence(p, 32000).condition.snr_db for p in paths]


def test_training_records_the_range_and_export_puts_it_in_the_contract(tiny) -> None:
    from devrecd.model.checkpoint import load_checkpoint

    train_paths = [it.path for it in tiny["ds"].subset("train")]
    snrs = _measured(train_paths)
    want = [min(snrs), max(snrs)]
    assert len(train_paths) == 6 and want == [22.7, 37.0]  # IPHONEX_1 ... xiaomi2s_1 (measured on the sample)
    ckpt = load_checkpoint(tiny["run"])
    assert ckpt.meta["validated_snr_db"] == want and ckpt.validated_snr_db == tuple(want)
    assert ckpt.meta["training_snr_db"]["measured"] == want and ckpt.meta["training_snr_db"]["recordings"] == 6
    assert ckpt.meta["training_snr_db"]["noise_augment_snr_db"] is None  # noise augmentation off
    contract = Contract.load(tiny["onnx"].with_suffix(".json"))
    assert contract.validated_snr_db == tuple(want)
    assert ("  validated SNR range: 22.7 to 37.0 dB (the training recordings' measured SNR range): noisier "
            "recordings are judged inconclusive") in tiny["output"]


def test_the_range_is_cached_beside_the_features_and_lowered_by_noise_augmentation(tiny, feature_cache) -> None:
    from devrecd.audio import sha256_file
    from devrecd.train_data import training_snr_range

    cache = feature_cache(tiny["cfg"])
    items = tiny["ds"].subset("train")
    entries = [cache.snr_entry(sha256_file(it.path), 2.0) for it in items]
    assert all(e.is_file() for e in entries)  # written while training read the features
    assert [json.loads(e.read_text())["snr_db"] for e in entries] == _measured([it.path for it in items])
    entries[0].unlink()  # features cached before SNRs were: measured again, and cached
    assert cache.snr_db(items[0].path, 2.0) == _measured([items[0].path])[0] and entries[0].is_file()
    # Noise augmentation trains on noisier copies: its low end lowers the range, never raises it.
    assert training_snr_range(items, cache, 2.0, (5.0, 35.0))["validated_snr_db"] == [5.0, 37.0]
    assert training_snr_range(items, cache, 2.0, (30.0, 35.0))["validated_snr_db"] == [22.7, 37.0]


def test_the_torch_backend_serves_the_checkpoints_range(tiny) -> None:
    from devrecd.backends.torch_backend import TorchBackend

    backend = TorchBackend(tiny["run"])
    try:
        info = backend.describe()
    finally:
        backend.close()
    assert info["validated_snr_db"] == [22.7, 37.0]
    assert model_validation(tiny["cfg"].backend, info).snr_source == "checkpoint"


def _init(tiny, name: str, validated_snr_db) -> Path:
    """The tiny network's checkpoint as an init of a fine-tune, recording ``validated_snr_db`` (None: a
    checkpoint trained before ranges were recorded, no ``validated_snr_db`` nor ``training_snr_db``)."""
    from dataclasses import replace

    from devrecd.model.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny["run"])
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("validated_snr_db", "training_snr_db")}
    if validated_snr_db is not None:
        meta["validated_snr_db"] = validated_snr_db
    path = tiny["tmp"] / f"{name}.pt"
    save_checkpoint(path, replace(ckpt, meta=meta))
    return path


def _finetune(tiny, init: Path, name: str) -> Path:
    """One epoch of ``devrecd finetune``'s loop from ``init`` on the same 3 phones (new head only)."""
    from devrecd.train import finetune_options, train

    run = tiny["tmp"] / name
    train(tiny["ds"], run, tiny["cfg"],
          finetune_options(tiny["cfg"].train, epochs=1, batch_size=8, hop_seconds=2.0, patience=0), init=init)
    return run


def test_a_finetune_records_the_union_of_its_own_and_its_inits_range(tiny) -> None:
    """The init records 10.0-30.0 dB, the fine-tune's own recordings measure 22.7-37.0 dB: the network
    has seen both, so it records 10.0-37.0 dB (not its own recordings' range alone)."""
    from devrecd.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(_finetune(tiny, _init(tiny, "init_10_30", [10.0, 30.0]), "ft_union"))
    assert ckpt.meta["init"] and ckpt.validated_snr_db == (10.0, 37.0)
    assert ckpt.meta["validated_snr_db"] == [10.0, 37.0]
    snr = ckpt.meta["training_snr_db"]
    assert snr["measured"] == [22.7, 37.0] and snr["init_validated_snr_db"] == [10.0, 30.0] and "note" not in snr
    # An init whose range lies inside the fine-tune's own: the own range.
    inner = load_checkpoint(_finetune(tiny, _init(tiny, "init_25_30", [25.0, 30.0]), "ft_inner"))
    assert inner.validated_snr_db == (22.7, 37.0)


def test_a_finetune_of_a_checkpoint_without_a_range_records_its_own_and_says_so(tiny, caplog) -> None:
    from devrecd.model.checkpoint import load_checkpoint

    with caplog.at_level("WARNING", logger="devrecd.train"):
        ckpt = load_checkpoint(_finetune(tiny, _init(tiny, "init_legacy", None), "ft_legacy"))
    assert ckpt.validated_snr_db == (22.7, 37.0)
    snr = ckpt.meta["training_snr_db"]
    assert snr["init_validated_snr_db"] is None and snr["note"].startswith("the init checkpoint records no SNR range")
    assert any(r.getMessage() == "fine-tune SNR range: " + snr["note"] for r in caplog.records)


def _export_output(run: Path, out: Path, ccnu_dir: Path) -> str:
    """What the real ``devrecd export`` prints for ``run``."""
    from typer.testing import CliRunner

    from devrecd.cli import app

    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out),
                                      "--parity-audio", str(ccnu_dir / "IPHONEX_4.wav")])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_says_where_each_end_of_the_range_comes_from(tiny, ccnu_dir: Path) -> None:
    """Noise augmentation (5-35 dB) lowers the low end of recordings measured 22.7-37.0 dB: the export
    says the low end is the augmentation's, not the recordings'. Likewise a fine-tune's init's end."""
    from devrecd.train import train, train_options

    run = tiny["tmp"] / "run_noise"
    train(tiny["ds"], run, tiny["cfg"],
          train_options(tiny["cfg"].train, epochs=1, batch_size=8, lr=1e-3, hop_seconds=2.0, patience=0,
                        noise_augment_p=1.0, noise_augment_snr_db=(5.0, 35.0)), hparams=TINY_NET)
    out = _export_output(run, tiny["tmp"] / "export_noise" / "noise.onnx", ccnu_dir)
    assert ("  validated SNR range: 5.0 to 37.0 dB (low end: the noise augmentation's low end, "
            "train.noise_augment_snr_db; high end: the training recordings' measured SNR; the training "
            "recordings measured 22.7 to 37.0 dB): noisier recordings are judged inconclusive") in out
    assert "the training recordings')" not in out

    finetuned = _finetune(tiny, _init(tiny, "init_10_45", [10.0, 45.0]), "ft_wider")
    out = _export_output(finetuned, tiny["tmp"] / "export_ft" / "ft.onnx", ccnu_dir)
    assert ("  validated SNR range: 10.0 to 45.0 dB (low end: the init checkpoint's recorded range; high end: "
            "the init checkpoint's recorded range; the training recordings measured 22.7 to 37.0 dB)") in out


def test_the_range_origin_in_words() -> None:
    from devrecd.train_data import snr_range_origin

    own = {"validated_snr_db": [22.7, 37.0], "measured": [22.7, 37.0], "noise_augment_snr_db": None}
    assert snr_range_origin((22.7, 37.0), own) == "the training recordings' measured SNR range"
    # The augmentation's low end above the recordings' sets nothing: the recordings' end is named.
    assert snr_range_origin((22.7, 37.0), {**own, "noise_augment_snr_db": [30.0, 35.0]}) == (
        "the training recordings' measured SNR range")
    legacy_init = {**own, "init_validated_snr_db": None, "note": "..."}
    assert snr_range_origin((22.7, 37.0), legacy_init) == (
        "the training recordings' measured SNR range; the init checkpoint records no range")
    union = {**own, "validated_snr_db": [10.0, 37.0], "init_validated_snr_db": [10.0, 30.0]}
    assert snr_range_origin((10.0, 37.0), union).startswith(
        "low end: the init checkpoint's recorded range; high end: the training recordings' measured SNR;")
    assert snr_range_origin((22.7, 37.0), None) == "" and snr_range_origin((22.7, 37.0), {}) == ""
    assert snr_range_origin((3.0, 37.0), own) == ""  # a range the meta does not account for: not guessed


def _noisy(src: Path, out: Path, snr_db: float) -> Path:
    from devrecd.audio.noise import add_noise

    x, rate = sf.read(src, dtype="float32")
    sf.write(out, np.clip(add_noise(x, rate, snr_db, seed=0), -1.0, 1.0), rate, subtype="PCM_16")
    return out


def test_identify_names_no_device_for_a_noisy_recording_and_says_why(tiny, ccnu_dir: Path) -> None:
    """IPHONEX_4 (held out, 28.7 dB) as recorded, and with white noise at 10 dB SNR, judged by
    ``identify`` with the exported network trained on 22.7-37.0 dB recordings."""
    from devrecd.pipeline.identify import identify_files

    clean = ccnu_dir / "IPHONEX_4.wav"
    noisy = _noisy(clean, tiny["tmp"] / "IPHONEX_4_white10.wav", 10.0)
    cleaner = ccnu_dir / "xiaomi2s_5.wav"  # 41.7 dB: above the range, not outside it
    cfg = load_config(None, env={}, overrides={"backend.model": str(tiny["onnx"]), "backend.kind": "onnxruntime",
                                               "backend.threads": 1})
    labels = Contract.load(tiny["onnx"].with_suffix(".json")).labels
    rec_clean, rec_noisy, rec_cleaner = identify_files(cfg, [clean, noisy, cleaner])
    for r in (rec_clean, rec_cleaner):
        assert r["outcome"] == "judged" and r["device"] in labels and "candidate" not in r
        assert r["condition_status"] == "validated" and r["comparison"]["snr_status"] == "inside"
        assert r["comparison"]["validated_snr_db"] == [22.7, 37.0] and "snr_statement" not in r["comparison"]
    snr = rec_noisy["condition"]["snr_db"]
    assert 9.5 < snr < 11.5  # measured: white noise added at 10 dB
    assert rec_noisy["outcome"] == "judged" and rec_noisy["device"] == "inconclusive"
    assert rec_noisy["candidate"] == rec_noisy["top_k"][0]["device"] and rec_noisy["candidate"] in labels
    assert rec_noisy["condition_status"] == "unvalidated"
    rep = rec_noisy["comparison"]
    assert rep["snr_status"] == "outside" and rep["snr_range_source"] == "contract"
    assert rep["snr_statement"].startswith(f"SNR {snr:.1f} dB below the SNR range the model was trained and "
                                           "validated on (22.7 to 37.0 dB, its contract)")

    # A lab that validated the model down to 8 dB says so: the same recording is named.
    lab = cfg.with_overrides({"backend.validated_snr_db": [8.0, 40.0]})
    (named,) = identify_files(lab, [noisy])
    assert named["device"] == rec_noisy["candidate"] and named["condition_status"] == "validated"
    assert named["comparison"]["snr_range_source"] == "backend.validated_snr_db"


def test_a_contract_exported_before_ranges_is_served_and_says_its_range_is_not_recorded(tiny, ccnu_dir: Path) -> None:
    """The same export with its contract as an older devrecd wrote it (no ``validated_snr_db``): not
    refused, not treated as validated in silence."""
    from devrecd.pipeline.identify import identify_files

    old = tiny["tmp"] / "old"
    old.mkdir(exist_ok=True)
    for f in tiny["onnx"].parent.iterdir():
        shutil.copy2(f, old / f.name)
    doc = json.loads((old / "tiny.json").read_text())
    del doc["validated_snr_db"]
    (old / "tiny.json").write_text(json.dumps(doc, indent=2))
    noisy = _noisy(ccnu_dir / "IPHONEX_4.wav", tiny["tmp"] / "IPHONEX_4_white10_old.wav", 10.0)
    cfg = load_config(None, env={}, overrides={"backend.model": str(old / "tiny.onnx"), "backend.kind": "onnxruntime",
                                               "backend.threads": 1})
    (r,) = identify_files(cfg, [noisy])
    assert r["outcome"] == "judged" and r["device"] == r["top_k"][0]["device"] and "candidate" not in r
    assert r["comparison"]["snr_status"] == "not_recorded" and r["comparison"]["validated_snr_db"] is None
    assert f"({r['condition']['snr_db']:.1f} dB)" in r["comparison"]["snr_statement"]


def test_live_windows_below_the_range_name_no_device(ccnu_dir: Path) -> None:
    """``listen``'s closed-set windows go through the same rule: the windows of a real recording as
    recorded are named, those of the same recording with white noise at 10 dB are not, nor is the
    running verdict that pools one of them."""
    from devrecd.live import LiveSource
    from devrecd.metrics import Metrics
    from devrecd.pipeline.batcher import Batcher

    x, rate = sf.read(ccnu_dir / "IPHONEX_4.wav", dtype="float32")
    from devrecd.audio.noise import add_noise

    audio = np.concatenate([x, np.clip(add_noise(x, rate, 10.0, seed=0), -1, 1).astype(np.float32)])
    cfg = load_config(None, env={}, overrides={"live.hop_seconds": 1.0, "audio.hop_seconds": 1.0,
                                               "batcher.max_wait_ms": 5.0, "live.smoothing": 2})
    batcher = Batcher(lambda f: np.tile(np.float32([[0.9, 0.1]]), (len(f), 1)), max_batch=8, max_wait_s=0.005,
                      queue_size=4)
    source = LiveSource(cfg, batcher, labels=("a", "b"), metrics=Metrics(),
                        backend_info={"name": "fixed", "contract_sha256": "c" * 64, "validated_snr_db": [15.0, 45.0]})
    records: list[dict] = []
    stop = threading.Event()
    infer = threading.Thread(target=batcher.run, args=(stop, lambda u: None, lambda u, e: None), daemon=True)
    infer.start()
    source.start(records.append, feed_rate=rate)
    try:
        for i in range(0, len(audio), 1024):
            block = audio[i:i + 1024].reshape(-1, 1)
            source.capture.callback(block, len(block), None, None)
        end = time.monotonic() + 60
        while time.monotonic() < end and (source.ring.available() or source.in_flight()):
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        source.stop()
        stop.set()
        infer.join(timeout=10)
    judged = [r for r in records if r["outcome"] == "judged"]
    clip = cfg.frontend.clip_seconds
    clean = [r for r in judged if r["start"] + clip <= len(x) / rate]
    noisy = [r for r in judged if r["start"] >= len(x) / rate]
    assert len(clean) >= 4 and len(noisy) >= 4, [r["start"] for r in judged]
    for r in clean:
        assert r["device"] == "a" and r["comparison"]["snr_status"] == "inside", (r["start"], r["condition"]["snr_db"])
    for r in noisy:
        assert r["device"] == "inconclusive" and r["candidate"] == "a", (r["start"], r["condition"]["snr_db"])
        assert r["comparison"]["snr_status"] == "outside" and r["condition"]["snr_db"] < 15.0
        assert r["running"]["device"] == "inconclusive" and r["running"]["candidate"] == "a"
    assert clean[-1]["running"]["device"] == "a"
    assert not math.isnan(noisy[0]["condition"]["snr_db"])
