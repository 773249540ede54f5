"""The device simulator: the chain's physics, determinism, the corpus it writes, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from devrecd.data import load_dataset
from devrecd.errors import DatasetError
from devrecd.synth import SynthSettings, Variation, generate, make_devices, render, sample_model, sample_unit
from devrecd.synth.chain import agc, quantise, response_sos

RATE = 32000


@pytest.fixture(scope="module")
def speech_dir(librispeech_dir: Path, tmp_path_factory) -> Path:
    """Eight real LibriSpeech speakers (links, no copies)."""
    out = tmp_path_factory.mktemp("speech")
    for f in sorted((librispeech_dir / "librispeech_train-clean-100").glob("*.flac"))[:8]:
        (out / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="module")
def speech_clip(speech_dir: Path) -> np.ndarray:
    import soxr

    x, sr = sf.read(sorted(speech_dir.iterdir())[0], dtype="float32")
    return soxr.resample(x, sr, RATE)[: 4 * RATE]


def _band_db(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    return 10 * np.log10(spec[(f >= lo) & (f < hi)].mean() + 1e-30)


def test_chain_stages_do_what_phones_do():
    rng = np.random.default_rng(0)
    chain = sample_model(rng, 0)
    # Microphone/port: the high-pass removes rumble far below its corner.
    from scipy.signal import sosfreqz

    _, h = sosfreqz(response_sos(chain, RATE), worN=[chain.highpass_hz / 8, 1000.0], fs=RATE)
    assert 20 * np.log10(abs(h[0]) / abs(h[1])) < -5.0
    # AGC: a quiet and a loud input end up much closer in level than they started (40 dB apart).
    t = np.arange(2 * RATE) / RATE
    tone = np.sin(2 * np.pi * 440 * t)
    from dataclasses import replace

    fixed = replace(chain, agc_target_dbfs=-20.0, agc_max_gain_db=20.0, comp_threshold_dbfs=-10.0, comp_ratio=4.0)
    quiet, loud = agc(0.005 * tone, fixed, RATE), agc(0.5 * tone, fixed, RATE)
    spread = 20 * np.log10(np.std(loud[RATE:]) / np.std(quiet[RATE:]))
    assert spread < 25.0  # +20 dB for the quiet one, about -11 dB for the loud one
    assert abs(20 * np.log10(np.std(loud[RATE:])) + 20.0) < 1.0  # settles at the target
    # Quantiser: 14 bits leaves only 2^14 levels.
    q = quantise(0.3 * tone, 14, "none", rng)
    assert len(np.unique(q)) <= 2**14 and np.allclose(q, 0.3 * tone, atol=2.0**-13)


def test_narrowband_amr_device_has_nothing_above_4_khz(speech_clip):
    chain = sample_model(np.random.default_rng(0), 0)
    from dataclasses import replace

    amr = replace(chain, codec="amr_nb", adc_rate=8000, codec_rate=8000, bitrate=12200)
    wide = replace(chain, codec="pcm", adc_rate=48000, codec_rate=0, bitrate=0, lowpass_hz=15000.0)
    y_amr = render(speech_clip, RATE, amr, np.random.default_rng(1))
    y_wide = render(speech_clip, RATE, wide, np.random.default_rng(1))
    assert y_amr.dtype == np.float32 and len(y_amr) == len(speech_clip)
    assert _band_db(y_amr, 5000, 15000) < _band_db(y_amr, 300, 3400) - 50
    assert _band_db(y_wide, 5000, 15000) > _band_db(y_amr, 5000, 15000) + 30


def test_units_of_one_model_are_closer_than_different_models(speech_clip):
    """Average spectra: unit 2 of a model is nearer unit 1 than another model is (same speech)."""
    model_a = sample_model(np.random.default_rng(11), 0, spread=2.0)
    unit_a2 = sample_unit(model_a, np.random.default_rng(12), unit=2)
    model_b = sample_model(np.random.default_rng(13), 1, spread=2.0)
    quiet = Variation(gain_db=0, noise_db=0, response_jitter=0, resonance_gain_db=0)

    def spectrum(chain):
        y = render(speech_clip, RATE, chain, np.random.default_rng(5), quiet)
        f, p = __import__("scipy.signal", fromlist=["welch"]).welch(y, RATE, nperseg=1024)
        return 10 * np.log10(p[(f > 100) & (f < 7000)] + 1e-20)

    a1, a2, b = spectrum(model_a), spectrum(unit_a2), spectrum(model_b)
    assert unit_a2.name != model_a.name and unit_a2.codec == model_a.codec
    assert np.mean(np.abs(a1 - a2)) < 0.5 * np.mean(np.abs(a1 - b))


def _digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_corpus_is_deterministic_loads_and_keeps_speakers_apart(speech_dir, tmp_path):
    settings = SynthSettings(devices=3, recordings_per_device=4, seed=5, recording_seconds=2.5, speakers_per_recording=2,
                             same_model_fraction=0.5)
    generate(speech_dir, tmp_path / "a", settings, jobs=1)
    generate(speech_dir, tmp_path / "b", settings, jobs=2)  # processes: same bytes
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 3 * 4 + 2
    assert {k: v for k, v in a.items() if k != "devices.json"} == {k: v for k, v in b.items() if k != "devices.json"}
    generate(speech_dir, tmp_path / "c", SynthSettings(**{**settings.__dict__, "seed": 6}), jobs=1)
    c = _digests(tmp_path / "c")
    assert not set(a.values()) & set(c.values())

    ds = load_dataset(tmp_path / "a")
    desc = json.loads((tmp_path / "a" / "devices.json").read_text())
    assert ds.layout == "manifest"
    assert ds.labels == tuple(d["name"] for d in desc["devices"]) == ("m00_u1", "m00_u2", "m01_u1")
    assert desc["recordings_sha256"] == {k: v for k, v in a.items() if k.endswith(".wav")}
    for device, counts in ds.counts().items():
        assert counts == {"train": 2, "val": 1, "test": 1}, device
    pools = {s: set(v) for s, v in desc["speakers_per_split"].items()}
    assert pools["train"] and pools["val"] and pools["test"]
    assert not (pools["train"] & pools["test"] or pools["train"] & pools["val"] or pools["val"] & pools["test"])
    info = sf.info(ds.items[0].path)
    assert (info.samplerate, info.subtype, info.frames) == (32000, "PCM_16", 80000)
    # Same model, different unit: one design, small tolerances.
    units = {d["name"]: d for d in desc["devices"]}
    assert units["m00_u1"]["codec"] == units["m00_u2"]["codec"]
    assert units["m00_u1"]["resonances"] != units["m00_u2"]["resonances"]


def test_devices_are_reproducible_and_diverse():
    devs = make_devices(SynthSettings(devices=20, recordings_per_device=1, seed=1))
    assert devs == make_devices(SynthSettings(devices=20, recordings_per_device=1, seed=1))
    assert len({d.name for d in devs}) == 20
    assert sum(d.unit == 2 for d in devs) == 3  # 0.3 of 20 devices in same-model pairs
    assert len({d.codec for d in devs}) >= 3 and len({d.adc_rate for d in devs}) >= 2


def test_bad_input_names_the_problem(speech_dir, tmp_path):
    settings = SynthSettings(devices=2, recordings_per_device=3, recording_seconds=2.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no audio files"):
        generate(empty, tmp_path / "o1", settings)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in sorted(speech_dir.iterdir())[:3]:
        (bad / f.name).symlink_to(f.resolve())
    (bad / "19-198-0001.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DatasetError, match=r"19-198-0001\.wav"):
        generate(bad, tmp_path / "o2", settings)
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted(speech_dir.iterdir())[:2]:
        (two / f.name).symlink_to(f.resolve())
    with pytest.raises(DatasetError, match="2 speaker.*need at least 3"):
        generate(two, tmp_path / "o3", settings)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        generate(speech_dir, busy, settings)
    assert (busy / "x").read_text() == "keep me"


def test_cli_synth_writes_a_corpus_and_reports_bad_input(speech_dir, tmp_path):
    from devrecd.cli import app

    runner = CliRunner()
    out = tmp_path / "corpus"
    res = runner.invoke(app, ["synth", "--speech", str(speech_dir), "--devices", "2", "--recordings-per-device", "3",
                              "--out", str(out), "--seed", "1", "--recording-seconds", "2"])
    assert res.exit_code == 0, res.output
    assert "2 devices x 3 recordings" in res.output
    assert len(load_dataset(out).items) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["synth", "--speech", str(empty), "--devices", "2", "--recordings-per-device", "3",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "error: speech folder" in res.output and "Traceback" not in res.output


def test_parallel_session_plays_the_same_speech_to_every_device(tmp_path):
    from devrecd.synth.corpus import group_of, plan

    speakers = {str(i): [tmp_path / f"{i}-1-0.flac"] for i in range(20)}
    settings = SynthSettings(devices=4, recordings_per_device=5, seed=2, speakers_per_recording=2)
    devices, jobs = plan(settings, speakers, tmp_path)
    by_clip: dict[int, set] = {}
    for job in jobs:
        by_clip.setdefault(job.clip, set()).add((job.speakers, job.split, group_of(job)))
    assert len(jobs) == 20 and all(len(v) == 1 for v in by_clip.values())  # one session: same speech, same side
    split_of = {s for v in by_clip.values() for _, s, _ in v}
    assert split_of == {"train", "val", "test"}
    speakers_by_split = {}
    for job in jobs:
        speakers_by_split.setdefault(job.split, set()).update(job.speakers)
    assert not speakers_by_split["train"] & (speakers_by_split["val"] | speakers_by_split["test"])
    # Independent recordings: each device hears other speakers for the same clip index.
    _, apart = plan(SynthSettings(**{**settings.__dict__, "parallel": False}), speakers, tmp_path)
    assert len({j.speakers for j in apart if j.clip == 0}) > 1


def test_synth_config_section_is_checked():
    from devrecd.config import load_config
    from devrecd.errors import ConfigError

    cfg = load_config(env={}, overrides={"synth.spread": 1.0, "synth.parallel": False}).synth
    settings = SynthSettings.from_config(cfg, devices=4, recordings_per_device=3, seed=9)
    assert (settings.spread, settings.parallel, settings.devices, settings.seed) == (1.0, False, 4, 9)
    with pytest.raises(ConfigError, match="synth.speakers_per_recording must be >= 1"):
        load_config(env={}, overrides={"synth.speakers_per_recording": 0})


def test_session_equaliser_shapes_the_played_speech_alike_and_keeps_it_aligned():
    """The session EQ (issue 28): its gain where asked, flat when empty, no delay (clip k stays aligned)."""
    from dataclasses import replace

    from devrecd.synth.chain import session_eq_fir

    assert session_eq_fir(Variation(session_eq=()), RATE) is None
    eq = session_eq_fir(Variation(session_eq=((1000.0, 0.0), (3000.0, 0.0), (4500.0, 10.0), (6000.0, 10.0))), RATE)
    h = np.abs(np.fft.rfft(eq, 1 << 14))
    f = np.fft.rfftfreq(1 << 14, 1 / RATE)
    gain = lambda lo, hi: 20 * np.log10(h[(f >= lo) & (f < hi)].mean())  # noqa: E731
    assert abs(gain(400, 2500)) < 0.5 and abs(gain(4600, 5900) - 10.0) < 0.5
    assert int(np.argmax(np.abs(eq))) == len(eq) // 2  # linear phase: render shifts it back by len // 2
    # The default curve (measured on the real CCNU phones) is applied and the output keeps its length.
    chain = replace(sample_model(np.random.default_rng(3), 0), codec="pcm", adc_rate=RATE)
    x = np.random.default_rng(0).standard_normal(2 * RATE) * 0.05
    flat = render(x, RATE, chain, np.random.default_rng(1), Variation(session_eq=()))
    shaped = render(x, RATE, chain, np.random.default_rng(1))
    assert len(shaped) == len(flat) == len(x)
    assert _band_db(shaped, 4500, 6000) - _band_db(shaped, 500, 800) > _band_db(flat, 4500, 6000) - _band_db(flat, 500, 800) + 10


def test_model_parameters_do_not_pile_up_on_their_bounds():
    """A wide spread draws inside the bounds (it used to clip a third of the draws onto them)."""
    chains = [sample_model(np.random.default_rng(i), i, spread=2.5) for i in range(60)]
    freqs = [f for c in chains for f, _, _ in c.resonances]
    gains = [g for c in chains for _, g, _ in c.resonances]
    assert all(300.0 < f < 15000.0 for f in freqs) and all(-15.0 < g < 15.0 for g in gains)
    assert all(30.0 < c.highpass_hz < 600.0 and -12.0 < c.shelf_db < 12.0 for c in chains)
