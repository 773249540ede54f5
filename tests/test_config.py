"""Configuration: the shipped config.toml equals the defaults; errors name section.key; precedence."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from devrecd.config import Config, config_to_toml_dict, load_config
from devrecd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_shipped_config_lists_every_key_with_its_default():
    shipped = tomllib.loads((REPO / "config.toml").read_text())
    defaults = {s: {k: _plain(v) for k, v in keys.items()} for s, keys in config_to_toml_dict(Config()).items()}
    assert shipped == defaults
    assert load_config(REPO / "config.toml", env={}) == Config()


def test_unknown_section_and_key_and_wrong_type_name_the_key(tmp_path):
    cases = {
        "[nosuch]\nx = 1\n": r"unknown config section \[nosuch\]",
        "[batcher]\nmax_bacth = 3\n": r"unknown config key batcher\.max_bacth",
        "[batcher]\nmax_batch = \"big\"\n": r"batcher\.max_batch: expected int, got str",
        "[metrics]\nenabled = 1\n": r"metrics\.enabled: expected bool",
        "[watch]\nextensions = \".wav\"\n": r"watch\.extensions: expected a list of str",
        "[train]\nsplit = [0.5, 0.5]\n": r"train\.split: expected a list of 3 values",
        "[frontend]\nn_frames = 64\n": r"frontend\.n_frames must be 128 \(the network's time axis\), got 64",
        "not toml ==": r"not valid TOML",
    }
    for text, message in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, env={})


def test_int_is_accepted_for_float_but_bool_is_not_int(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[batcher]\nmax_wait_ms = 10\n")
    assert load_config(path, env={}).batcher.max_wait_ms == 10.0
    path.write_text("[batcher]\nmax_batch = true\n")
    with pytest.raises(ConfigError, match="batcher.max_batch"):
        load_config(path, env={})


def test_precedence_defaults_file_env_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[batcher]\nmax_batch = 8\nmax_wait_ms = 5.0\n[log]\nlevel = \"DEBUG\"\n")
    env = {"DEVRECD_BATCHER__MAX_BATCH": "16", "DEVRECD_WATCH__DIRS": '["/a", "/b"]',
           "DEVRECD_LOG__FORMAT": "json", "UNRELATED": "x"}
    cfg = load_config(path, env=env, overrides={"batcher.max_wait_ms": 1.5})
    assert cfg.batcher.max_batch == 16  # env beats file
    assert cfg.batcher.max_wait_ms == 1.5  # flag beats file
    assert cfg.log.level == "DEBUG"  # file beats default
    assert cfg.log.format == "json"  # bare string from env
    assert cfg.watch.dirs == ("/a", "/b")
    assert cfg.metrics.port == 9464  # default
    with pytest.raises(ConfigError, match="unknown config key batcher.nope"):
        load_config(None, env={"DEVRECD_BATCHER__NOPE": "1"})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.batcher.max_batch = 3  # type: ignore[misc]


# Values that used to load and then crashed later or were silently ignored.
BAD_VALUES = {
    "log.level": ("LOUD", r"log\.level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
    "log.format": ("xml", r"log\.format must be one of text, json, got 'xml'"),
    "watch.polling": ("sometimes", r"watch\.polling must be one of auto, always, never"),
    "audio.mix": ("foo", r"audio\.mix must be one of mean, first"),
    "metrics.port": (99999, r"metrics\.port must be in \[0, 65535\], got 99999"),
    "watch.workers": (-3, r"watch\.workers must be >= 1, got -3"),
    "watch.top_k": (0, r"watch\.top_k must be >= 1, got 0"),
    "audio.resample_quality": ("best", r"audio\.resample_quality must be one of QQ, LQ, MQ, HQ, VHQ"),
    "backend.kind": ("cuda", r"backend\.kind must be one of auto, onnxruntime, tensorrt, torch"),
    "backend.device": ("gpu", r"backend\.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    "train.split": ([0.5, 0.5, 0.5], r"train\.split: the three fractions must add up to 1"),
    "watch.extensions": ([".wav", "mp3"], r"watch\.extensions\[1\] must be an extension starting with '\.'"),
    "registry.target_far": (0.0, r"registry\.target_far must be in \(0, 1\)"),
    "watch.state_dir": ("  ", r"watch\.state_dir must be a non-empty string"),
    "audio.hop_seconds": (float("inf"), r"audio\.hop_seconds must be a finite number, got inf"),
    "live.hop_seconds": (float("nan"), r"live\.hop_seconds must be a finite number, got nan"),
    "frontend.clip_seconds": (float("inf"), r"frontend\.clip_seconds must be a finite number, got inf"),
    "frontend.log_floor": (0.0, r"frontend\.log_floor must be > 0, got 0\.0"),
    "frontend.n_fft": (2049, r"frontend\.n_fft must be even \(or 0 for automatic\), got 2049"),
    "frontend.sample_rate": (0, r"frontend\.sample_rate must be > 0, got 0"),
    "frontend.window": ("hann2", r"frontend\.window must be one of hamming, hann, got 'hann2'"),
    "frontend.level": ("loud", r"frontend\.level must be one of clip, none, got 'loud'"),
    "frontend.preemphasis": (1.0, r"frontend\.preemphasis must be in \[0, 1\), got 1\.0"),
    # runaway settings: a hop that cuts a recording into billions of windows, more threads than can start
    "audio.hop_seconds#tiny": (1e-9, r"audio\.hop_seconds = 1e-09 cuts a recording of audio\.max_seconds = 14400 s into "
                                r"1\.44e\+13 windows, over audio\.max_windows = 100000"),
    "watch.workers#runaway": (100000, r"watch\.workers must be <= \d+ on this machine .* got 100000"),
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_values_are_refused_at_load_naming_key_and_source(tmp_path, key):
    value, message = BAD_VALUES[key]
    key = key.split("#")[0]  # (#: a second value of the same key)
    section, name = key.split(".")
    literal = repr(value).replace("'", '"')
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{name} = {literal}\n")
    with pytest.raises(ConfigError, match=message + r".*\(from file .*c\.toml\)"):
        load_config(path, env={})
    env_name = f"DEVRECD_{section.upper()}__{name.upper()}"
    with pytest.raises(ConfigError, match=message + rf".*\(from environment {env_name}\)"):
        load_config(None, env={env_name: literal})
    with pytest.raises(ConfigError, match=message + r".*\(from command line\)"):
        load_config(None, env={}, overrides={key: value})


def test_a_bad_frontend_in_a_config_file_is_refused_at_load_in_the_config_style(tmp_path):
    """[frontend] is checked by the configuration's one mechanism: ``frontend.key must ..., got ...``
    and where the value came from, when the file is loaded."""
    path = tmp_path / "config.toml"
    path.write_text("[frontend]\nsample_rate = 16000\nwindow = \"blackman\"\n")
    with pytest.raises(ConfigError, match=r"^frontend\.window must be one of hamming, hann, got 'blackman' "
                                          r"\(from file .*config\.toml\)$"):
        load_config(path, env={})
    path.write_text("[frontend]\nclip_seconds = 0.01\n")  # between keys: a relation, still the same style
    with pytest.raises(ConfigError, match=r"^frontend\.clip_seconds is too short for 128 frames .*\(from file "):
        load_config(path, env={})


def test_a_bad_frontend_from_an_artifact_names_the_artifact(tmp_path):
    """The same check where a frontend comes from an artifact: the artifact is named, not a key's source."""
    from devrecd.contract import CLASSIFIER, SCHEMA, Contract, _check_header
    from devrecd.errors import ArtifactError
    from devrecd.features import FrontendConfig

    with pytest.raises(ConfigError, match=r"^frontend\.preemphasis must be in \[0, 1\), got 1\.5$"):
        FrontendConfig.from_dict({"preemphasis": 1.5})
    header = {"schema": SCHEMA, "kind": CLASSIFIER, "frontend": {"sample_rate": -1}}
    header.update({f: None for f in Contract.__dataclass_fields__ if f not in header})
    with pytest.raises(ArtifactError, match=r"^m\.json: bad frontend: frontend\.sample_rate must be > 0, got -1$"):
        _check_header(header, Contract, CLASSIFIER, "m.json")


def test_a_checkpoint_with_a_bad_frontend_is_an_artifact_error_naming_it(tmp_path):
    torch = pytest.importorskip("torch")
    import numpy as np

    from devrecd.errors import ArtifactError
    from devrecd.features import FEATURE_DIM, FrontendConfig
    from devrecd.model.checkpoint import Checkpoint, load_checkpoint

    blob = Checkpoint(arch="paper", hparams={}, labels=["a", "b"], frontend=FrontendConfig(),
                      norm_mean=np.zeros(FEATURE_DIM, np.float32), norm_std=np.ones(FEATURE_DIM, np.float32),
                      state_dict={}).to_dict()
    blob["frontend"]["window"] = "blackman"
    path = tmp_path / "m.pt"
    torch.save(blob, path)
    with pytest.raises(ArtifactError, match=r"m\.pt: bad frontend: frontend\.window must be one of hamming, hann, "
                                            r"got 'blackman'$"):
        load_checkpoint(path)


def test_a_gsv_scorer_file_with_a_bad_frontend_is_an_artifact_error_naming_it(tmp_path):
    """As a checkpoint's: the GSV scorer file is named, the frontend's problem in the config style."""
    import json

    import numpy as np

    from devrecd.errors import ArtifactError
    from devrecd.features import FrontendConfig
    from devrecd.openset.scorers import GsvScorer, load_gsv, save_gsv

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, 128, 73)).astype(np.float32) + k % 4 for k in range(8)]
    save_gsv(tmp_path / "g.npz", GsvScorer.train(feats, list("abcdabcd"), FrontendConfig(), mixtures=2, nap_dims=1))
    with np.load(tmp_path / "g.npz") as npz:
        arrays = dict(npz)
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["scorer"]["frontend"]["window"] = "blackman"
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ArtifactError, match=r"bad\.npz: GSV scorer: bad frontend: frontend\.window must be one of "
                                            r"hamming, hann, got 'blackman'$") as e:
        load_gsv(tmp_path / "bad.npz")
    assert e.value.reason == "scorer_format"


def test_a_section_made_in_code_is_checked_too():
    from devrecd.config import MetricsConfig, WatchConfig

    with pytest.raises(ConfigError, match=r"metrics\.port must be in \[0, 65535\]"):
        MetricsConfig(port=70000)
    watch = WatchConfig()
    with pytest.raises(ConfigError, match=r"watch\.queue_size must be >= 1"):
        replace(watch, queue_size=0)
    assert replace(watch, queue_size=1).queue_size == 1


def test_each_layer_wins_over_the_one_below_for_the_same_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[watch]\ntop_k = 2\n")
    env = {"DEVRECD_WATCH__TOP_K": "3"}
    assert load_config(None, env={}).watch.top_k == 5
    assert load_config(path, env={}).watch.top_k == 2
    assert load_config(path, env=env).watch.top_k == 3
    assert load_config(path, env=env, overrides={"watch.top_k": 4}).watch.top_k == 4
    # a bad value in a lower layer is refused even when a higher layer would replace it
    path.write_text("[watch]\ntop_k = 0\n")
    with pytest.raises(ConfigError, match=r"watch\.top_k.*from file"):
        load_config(path, env=env, overrides={"watch.top_k": 4})


def test_non_finite_frontend_values_are_config_errors_naming_the_key():
    for key in ("clip_seconds", "log_floor"):
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=rf"frontend\.{key} must be a finite number, got {value}"):
                load_config(None, env={f"DEVRECD_FRONTEND__{key.upper()}": value})
    assert load_config(None, env={"DEVRECD_FRONTEND__N_FFT": "2050"}).frontend.fft_size == 2050


def test_environment_value_of_a_string_field_is_taken_as_written():
    env = {"DEVRECD_LIVE__DEVICE": "1", "DEVRECD_REPORT__CASE_ID": "2024", "DEVRECD_REPORT__EXAMINER": '"A. Smith"',
           "DEVRECD_WATCH__TOP_K": "3"}
    cfg = load_config(None, env=env)
    assert cfg.live.device == "1"
    assert cfg.report.case_id == "2024"
    assert cfg.report.examiner == "A. Smith"  # a TOML string literal still reads as its text
    assert cfg.watch.top_k == 3  # other fields are still parsed as TOML
    with pytest.raises(ConfigError, match=r"watch\.top_k: expected int"):
        load_config(None, env={"DEVRECD_WATCH__TOP_K": "three"})


def test_a_hop_shorter_than_a_frame_hop_is_refused_naming_both_sections(tmp_path):
    """Between sections: no clip hop below the frontend's frame hop (clip_seconds / 128), however
    short the recordings admitted."""
    path = tmp_path / "c.toml"
    path.write_text("[audio]\nmax_seconds = 8.0\nmin_seconds = 1.0\nhop_seconds = 0.001\n")
    with pytest.raises(ConfigError, match=r"audio\.hop_seconds must be >= the frontend's frame hop \(0\.015625 s: "
                                          r"frontend\.clip_seconds / 128\), got 0\.001 \(from file .*c\.toml\)"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"frame hop.*\(from command line\)"):
        load_config(None, env={}).with_overrides({"audio.max_seconds": 8.0, "audio.min_seconds": 1.0,
                                                 "audio.hop_seconds": 0.001})
    assert load_config(None, env={}, overrides={"audio.max_seconds": 8.0, "audio.min_seconds": 1.0,
                                               "audio.hop_seconds": 1 / 64}).audio.hop_seconds == 1 / 64
