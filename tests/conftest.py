"""Shared fixtures: where ``../shared`` lives, real recordings, and thread-leak checks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    return Path(os.environ.get("DEVRECD_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (or $DEVRECD_SHARED); tests that need it skip with a reason when absent."""
    path = _shared()
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path} (set DEVRECD_SHARED); CI provides it")
    return path


@pytest.fixture(scope="session")
def ccnu_dir(shared_dir: Path) -> Path:
    """The real 15-phone CCNU_Mobile sample."""
    path = shared_dir / "data" / "ccnu_mobile_sample"
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"CCNU_Mobile sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def librispeech_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "librispeech"
    if not path.is_dir():
        pytest.skip(f"LibriSpeech not found at {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def _no_tqdm_monitor():
    """tqdm's monitor is one thread for the whole process, started by the first progress bar and
    never stopped (it only tunes bar refresh): off in tests, so that the leak check below sees
    only threads that the code under test owns."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.monitor_interval = 0


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves a thread running (as watchdog's own suite does). Daemon threads count
    too: every pipeline, watcher and live thread is one, and a daemon thread left running is a leak
    all the same (it only stops being one at interpreter exit). Threads get 5 s to finish."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    deadline = time.monotonic() + 5
    for t in leaked:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    """The session's one feature cache folder. :class:`devrecd.data.FeatureCache` entries are keyed by
    frontend, audio settings and hop, so every fixture that needs features of the CCNU sample (and
    every training run a fixture makes, as its ``train.cache_dir``) shares it: each recording's
    features are computed once per setting."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def feature_cache(feature_cache_dir: Path):
    """``feature_cache(cfg)``: the :class:`devrecd.data.FeatureCache` of ``cfg``'s frontend and audio
    settings over the session's one cache folder."""
    from devrecd.data import FeatureCache

    def cache(cfg) -> FeatureCache:
        return FeatureCache(feature_cache_dir, cfg.frontend, cfg.audio)

    return cache


# ---- export + backends: ONE real checkpoint and ONE export per session, shared -------------
# Exporting the unrolled ConvLSTM takes seconds to a minute, so every test file that needs a served
# model (export, backends, daemon, identify) reuses these. The checkpoint is written by the model
# package's own save_checkpoint after one real training step on CCNU features.

class ExportedModel(os.PathLike):
    """The session's export. Path-like (the ONNX file, for ``Path(x)``/``str(x)``) and unpackable as
    ``onnx, contract, checkpoint = exported_model``."""

    def __init__(self, onnx: Path, contract: Path, checkpoint: Path, output: str = "") -> None:
        self.onnx, self.contract, self.checkpoint = onnx, contract, checkpoint
        self.output = output  # what `devrecd export` printed

    def __fspath__(self) -> str:
        return str(self.onnx)

    def __str__(self) -> str:
        return str(self.onnx)

    def __iter__(self):
        return iter((self.onnx, self.contract, self.checkpoint))


def _ccnu_rows(ccnu_dir: Path, segments: set[int]) -> list[dict]:
    import csv

    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["segment"]) in segments]


@pytest.fixture(scope="session")
def trained_checkpoint(ccnu_dir: Path, feature_cache, tmp_path_factory) -> Path:
    """RUN_DIR/best.pt: the paper network after one Adam step on CCNU segment-1 features (15 devices)."""
    import numpy as np
    import torch

    from devrecd.config import load_config
    from devrecd.model import build_model
    from devrecd.model.checkpoint import Checkpoint, save_checkpoint
    from devrecd.train_data import normalisation_stats

    cfg = load_config(None, env={})
    cache = feature_cache(cfg)
    rows = _ccnu_rows(ccnu_dir, {1})
    labels = sorted({r["device"] for r in rows})
    feats, ys = [], []
    for r in rows:
        f, _ = cache.features(ccnu_dir / r["path"], 4.0)
        feats.append(f)
        ys += [labels.index(r["device"])] * len(f)
    x = np.concatenate(feats)
    mean, std = normalisation_stats(feats)  # as training computes them
    torch.manual_seed(0)
    net = build_model("paper", len(labels))
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy((x - mean) / std)), torch.tensor(ys))
    opt.zero_grad()
    loss.backward()
    opt.step()
    net.eval()
    run = tmp_path_factory.mktemp("run")
    ckpt = Checkpoint(arch="paper", hparams={}, labels=labels, frontend=cfg.frontend, norm_mean=mean, norm_std=std,
                      state_dict=net.state_dict(), dataset_sha256="0" * 64, split={"train": [r["path"] for r in rows]},
                      meta={"epoch": 1, "loss": loss.item(), "note": "one step, for tests"})
    save_checkpoint(run / "best.pt", ckpt)
    return run


@pytest.fixture(scope="session")
def exported_model(trained_checkpoint: Path, ccnu_dir: Path, tmp_path_factory) -> ExportedModel:
    """``devrecd export`` (the real CLI) of the session checkpoint, parity-checked on CCNU segment-4 audio."""
    from typer.testing import CliRunner

    from devrecd.cli import app

    out = tmp_path_factory.mktemp("export") / "paper.onnx"
    audio = [str(ccnu_dir / r["path"]) for r in _ccnu_rows(ccnu_dir, {4})]
    args = ["export", str(trained_checkpoint), "--out", str(out)]
    for a in audio:
        args += ["--parity-audio", a]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"devrecd export failed: {result.output}"
    return ExportedModel(out, out.with_suffix(".json"), trained_checkpoint / "best.pt", result.output)


@pytest.fixture(scope="session")
def asp_embedder_checkpoint(ccnu_dir: Path, feature_cache_dir: Path, tmp_path_factory) -> Path:
    """RUN_DIR (with best.pt): a small ``asp`` embedder (open set) trained 8 epochs with the AAM loss
    through the one training loop on CCNU segments 1-2 of 8 of the 15 phones (hop 1 s), so segments
    3-5 and 7 phones are never seen in training."""
    from devrecd.config import load_config
    from devrecd.data import load_dataset
    from devrecd.train import train, train_options
    from devrecd.train_data import restrict_dataset

    cfg = load_config(None, env={}, overrides={"audio.hop_seconds": 1.0, "train.threads": 2,
                                               "train.cache_dir": str(feature_cache_dir)})
    ds = load_dataset(ccnu_dir, split_by_group={"train": ("1", "2"), "test": ("3", "4", "5")},
                      split_file=tmp_path_factory.mktemp("asp-split") / "split.json")
    phones = sorted(ds.labels)[:8]
    opts = train_options(cfg.train, arch="asp", loss="aam", epochs=8, batch_size=32, lr=1e-3, lr_step_epochs=8,
                         patience=0, seed=0, hop_seconds=1.0)
    run = tmp_path_factory.mktemp("asp")
    train(restrict_dataset(ds, phones, splits=("train",)), run, cfg, opts,
          hparams={"hidden": 32, "attention": 16, "emb_dim": 32})
    return run
