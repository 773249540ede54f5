"""Configuration: the shipped config.toml equals the defaults; errors name section.key; precedence."""

from __future__ import annotations

import tomllib
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
        "[frontend]\nn_frames = 64\n": r"frontend: n_frames must be 128",
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
