"""Training, resuming, fine-tuning, evaluation and baselines on 3 real phones of the CCNU_Mobile sample.

Tiny on purpose (2 s windows, hop 2 s, a few epochs of a few batches): these tests check behaviour
(determinism, resume, self-describing checkpoints, reports, refusal of bad input), not accuracy;
the accuracy figures come from the documented commands in docs/model.md.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.config import load_config
from devrecd.data import load_dataset
from devrecd.errors import ArtifactError, DatasetError
from devrecd.evaluation import RecordingScores, classification_metrics, score_report
from devrecd.model.checkpoint import load_checkpoint, load_raw
from devrecd.train import train, train_options

SEGMENT_SPLIT = {1: "train", 2: "train", 3: "val", 4: "test", 5: "test"}
TINY = dict(epochs=2, batch_size=8, lr=1e-3, hop_seconds=2.0, patience=0)


def _manifest(ccnu_dir: Path, out: Path, devices: list[str] | None = None, first: int = 0) -> Path:
    """A manifest over 3 CCNU phones (absolute paths: nothing is copied)."""
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = devices or sorted({r["device"] for r in rows})[first:first + 3]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "device", "group", "split"])
        for r in rows:
            if r["device"] in names:
                seg = int(r["segment"])
                w.writerow([str((ccnu_dir / r["path"]).resolve()), r["device"], seg, SEGMENT_SPLIT[seg]])
    return out


@pytest.fixture(scope="module")
def env(ccnu_dir, tmp_path_factory):
    """A config whose feature cache is private to this module, and two 3-phone datasets."""
    tmp = tmp_path_factory.mktemp("train")
    config = tmp / "config.toml"
    config.write_text(f'[train]\ncache_dir = "{tmp / "cache"}"\nthreads = 1\n')
    return {"tmp": tmp, "config": config, "cfg": load_config(config, env={}),
            "ds": _manifest(ccnu_dir, tmp / "a" / "manifest.csv", first=0),
            "other": _manifest(ccnu_dir, tmp / "b" / "manifest.csv", first=3)}


@pytest.fixture(scope="module")
def run(env):
    """The reference run: 2 epochs, uninterrupted."""
    out = env["tmp"] / "run"
    train(load_dataset(env["ds"]), out, env["cfg"], train_options(env["cfg"].train, **TINY))
    return out


def test_run_dir_and_self_describing_checkpoint(run, env):
    ckpt = load_checkpoint(run)
    ds = load_dataset(env["ds"])
    assert ckpt.arch == "paper" and ckpt.labels == list(ds.labels) and len(ckpt.labels) == 3
    assert ckpt.frontend == env["cfg"].frontend
    assert ckpt.dataset_sha256 == ds.manifest_sha256
    assert len(ckpt.split["train"]) == 6 and len(ckpt.split["val"]) == 3 and len(ckpt.split["test"]) == 6
    assert ckpt.norm_mean.shape == (73,) and (ckpt.norm_std > 0).all()
    assert ckpt.meta["options"]["batch_size"] == 8 and ckpt.meta["selection"] == "val_loss"
    # The run's options are its one source: their feature cache (and threads) are the ones used and recorded.
    assert ckpt.meta["options"]["cache_dir"] == str(env["tmp"] / "cache") and any((env["tmp"] / "cache").iterdir())
    # the normalisation is the training windows' statistics: the pre-Fbank dims have tiny means, logE a negative one
    assert ckpt.norm_mean[12] < 0 and ckpt.norm_std[39:].max() > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "val_rec_acc", "clips_per_s", "lr"} <= set(lines[0])
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert "optimizer" in load_raw(run / "last.pt") and "optimizer" not in load_raw(run / "best.pt")
    # best.pt is the epoch with the lowest validation loss
    assert ckpt.meta["epoch"] == min(lines, key=lambda r: r["val_loss"])["epoch"]


def test_interrupted_run_resumes_to_the_same_weights(run, env):
    """Seeded and deterministic on the CPU: 1 epoch, then the same command with 2 epochs == 2 epochs straight."""
    out = env["tmp"] / "resumed"
    ds = load_dataset(env["ds"])
    first = train(ds, out, env["cfg"], train_options(env["cfg"].train, **{**TINY, "epochs": 1}))
    assert first.epochs_run == 1
    second = train(ds, out, env["cfg"], train_options(env["cfg"].train, **TINY))
    assert [r["epoch"] for r in second.history] == [1, 2]
    a, b = load_raw(run / "last.pt")["state_dict"], load_raw(out / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert second.history[-1]["train_loss"] == pytest.approx(
        json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"], abs=0)


def test_resuming_into_a_run_of_another_architecture_is_refused(run, env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with pytest.raises(ArtifactError, match="another architecture"):
        train(load_dataset(env["ds"]), out, env["cfg"], train_options(env["cfg"].train, **{**TINY, "arch": "group2"}))


def test_evaluate_writes_the_report(run, env, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(run), str(env["ds"]), "--out", str(tmp_path / "r"),
                                      "--config", str(env["config"])])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for level, n in (("window", None), ("recording", 6)):
        assert {"accuracy", "precision", "recall", "f1", "per_device"} <= set(report[level])
        assert 0.0 <= report[level]["accuracy"] <= 1.0
        assert sorted(report[level]["per_device"]) == report["labels"]
        if n is not None:
            assert report[level]["n"] == n
    conf = list(csv.reader(open(tmp_path / "r" / "confusion_recording.csv")))
    assert len(conf) == 4 and sum(int(v) for row in conf[1:] for v in row[1:]) == 6
    assert (tmp_path / "r" / "confusion_window.png").stat().st_size > 1000
    assert "recordings: accuracy" in result.output


def test_baseline_uses_the_same_report(env, tmp_path):
    result = CliRunner().invoke(app, ["baseline", "mfcc-svm", str(env["ds"]), "--out", str(tmp_path / "r"),
                                      "--config", str(env["config"])])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["source"]["name"] == "mfcc-svm" and report["recording"]["n"] == 6
    # three phones, 2 s windows: the MFCC-statistics SVM gets most windows right (anchor: 86% on 15 phones)
    assert report["window"]["accuracy"] >= 0.6


def test_finetune_softmax_trains_only_the_new_head(run, env):
    out = env["tmp"] / "ft"
    base = load_checkpoint(run)
    ds = load_dataset(env["other"])
    train(ds, out, env["cfg"], train_options(env["cfg"].train, **{**TINY, "epochs": 1, "finetune_trainable": "softmax"}), init=run)
    ft = load_checkpoint(out)
    assert ft.labels == list(ds.labels) and set(ft.labels).isdisjoint(base.labels)
    assert ft.state_dict["classifier.weight"].shape == (3, 128)
    np.testing.assert_array_equal(ft.norm_mean, base.norm_mean)
    for k, v in base.state_dict.items():
        if not k.startswith("classifier."):
            assert torch.equal(v, ft.state_dict[k]), k  # frozen, BatchNorm statistics included
    assert ft.meta["init"] == str(run)


def test_finetune_cli_refuses_a_checkpoint_of_another_frontend(run, env, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(env["config"].read_text() + "\n[frontend]\nclip_seconds = 1.0\n")
    for args in (["finetune", str(run), str(env["other"]), "--out", str(tmp_path / "ft")],
                 ["evaluate", str(run), str(env["ds"]), "--out", str(tmp_path / "r")]):
        result = CliRunner().invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 1
        assert "another frontend" in result.output and "clip_seconds" in result.output


def test_bad_datasets_fail_before_training(ccnu_dir, env, tmp_path):
    one = tmp_path / "one" / "manifest.csv"
    _manifest(ccnu_dir, one, devices=["Apple_air1"])
    result = CliRunner().invoke(app, ["train", str(one), "--out", str(tmp_path / "r1"), "--config", str(env["config"])])
    assert result.exit_code == 1 and "at least two devices" in result.output
    assert not (tmp_path / "r1").exists()

    # a device whose recordings are all in test: nothing to learn it from
    rows = list(csv.reader(open(env["ds"])))
    dev = rows[1][1]
    no_train = tmp_path / "nt" / "manifest.csv"
    no_train.parent.mkdir()
    with open(no_train, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [r[:3] + ["test" if r[1] == dev else r[3]] for r in rows[1:]])
    with pytest.raises(DatasetError, match="no training recordings"):
        train(load_dataset(no_train), tmp_path / "r2", env["cfg"], train_options(env["cfg"].train, **TINY))

    # train.on_unusable = "fail": an unreadable file is named, before any epoch
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "damaged.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with open(broken / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows(rows)
        w.writerow([str(broken / "damaged.wav"), dev, "9", "train"])
    strict = env["cfg"].with_overrides({"train.on_unusable": "fail"})
    with pytest.raises(DatasetError, match="damaged.wav.*train.on_unusable"):
        train(load_dataset(broken / "manifest.csv"), tmp_path / "r3", strict, train_options(strict.train, **TINY))
    assert not (tmp_path / "r3" / "last.pt").exists()


def test_unusable_recordings_are_left_out_and_listed_unless_a_device_is_left_with_none(ccnu_dir, env, tmp_path):
    """The default train.on_unusable = "skip": a near-silent reference recording (as real corpora have)
    and a damaged one are excluded and listed with their reasons; a device with none left fails the run."""
    import soundfile as sf

    rows = list(csv.reader(open(env["ds"])))
    devs = sorted({r[1] for r in rows[1:]})
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, (10 ** (-95 / 20) * np.random.default_rng(0).standard_normal(4 * 32000)).astype(np.float32),
             32000, subtype="FLOAT")  # -95 dBFS: below audio.silence_dbfs
    (tmp_path / "damaged.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows(rows)
        w.writerow([str(quiet), devs[0], "9", "train"])
        w.writerow([str(tmp_path / "damaged.wav"), devs[1], "9", "val"])
    out = tmp_path / "run"
    train(load_dataset(manifest), out, env["cfg"], train_options(env["cfg"].train, **{**TINY, "epochs": 1}))
    listed = json.loads((out / "unusable.json").read_text())
    assert {(Path(u["path"]).name, u["reason"]) for u in listed} == {("quiet.wav", "silent"), ("damaged.wav", "corrupt")}
    assert "audio.silence_dbfs" in next(u["detail"] for u in listed if u["reason"] == "silent")
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt.meta["unusable"] == listed and str(quiet) not in json.dumps(ckpt.split)
    # Every training recording of one device unusable: refused, naming the device and the threshold's key.
    only_quiet = tmp_path / "q.csv"
    with open(only_quiet, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([rows[0]] + [r for r in rows[1:] if not (r[1] == devs[0] and r[3] == "train")])
        w.writerow([str(quiet), devs[0], "9", "train"])
    with pytest.raises(DatasetError, match=f"{devs[0]}.*no usable training recording.*audio.silence_dbfs"):
        train(load_dataset(only_quiet), tmp_path / "r4", env["cfg"], train_options(env["cfg"].train, **TINY))


def test_metrics_are_the_papers_macro_averages():
    labels = ["a", "b", "c"]
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 1/2, b 2/3, c 1; recall a 1/2, b 1, c 1/2
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_recording_verdict_is_the_mean_window_log_probability():
    """Two windows weakly for 'a', one window certain of 'b': log-probability averaging picks 'b',
    a majority vote of windows would pick 'a'."""
    lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.01, 0.99]]))
    report = score_report([RecordingScores("x.wav", "b", lp)], ["a", "b"])
    assert report["recording"]["accuracy"] == 1.0
    assert report["window"]["accuracy"] == pytest.approx(1 / 3)


def test_batchnorm_statistics_are_those_of_the_trained_weights(run, env):
    """After each epoch BatchNorm's running statistics are recomputed on the training windows, so
    eval mode normalises with the statistics of the weights it is used with (Keras' momentum 0.99
    alone still remembers the random initial weights after a short run on a small corpus)."""
    from devrecd.data import FeatureCache
    from devrecd.model.training import recalibrate_batchnorm
    from devrecd.train_data import split_features, to_split_data

    ckpt = load_checkpoint(run)
    model = ckpt.build()
    model.load_state_dict(ckpt.state_dict)
    model.train()
    x = torch.randn(12, 128, 73)
    seen: list[torch.Tensor] = []
    hook = model.frame.bn1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    recalibrate_batchnorm(model, x, batch_size=len(x), device="cpu")  # one batch: exact statistics
    hook.remove()
    assert len(seen) == 1 and model.training and model.frame.bn1.momentum == 0.01  # mode and momentum restored
    pre = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)  # (channels, values)
    torch.testing.assert_close(model.frame.bn1.running_mean, pre.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.frame.bn1.running_var, pre.var(1, unbiased=True), rtol=1e-3, atol=1e-5)

    # The saved run: its statistics are exactly those recomputed from its weights on its training windows.
    ds = load_dataset(env["ds"])
    cfg = env["cfg"]
    feats, items = split_features(ds, "train", FeatureCache(Path(cfg.train.cache_dir), ckpt.frontend, cfg.audio),
                                  TINY["hop_seconds"], ckpt.labels)
    data = to_split_data(feats, items, ckpt.labels, ckpt.norm_mean, ckpt.norm_std)
    model.load_state_dict(ckpt.state_dict)
    recalibrate_batchnorm(model, data.x, TINY["batch_size"], "cpu")
    for name in ("frame.bn1.running_mean", "frame.bn1.running_var", "frame.bn2.running_var"):
        torch.testing.assert_close(model.state_dict()[name], ckpt.state_dict[name])


def test_finetune_defaults_come_from_the_train_section():
    from devrecd.errors import ConfigError
    from devrecd.train import finetune_options

    opts = finetune_options(load_config(None, env={}).train)
    assert (opts.epochs, opts.batch_size, opts.lr, opts.lr_gamma, opts.finetune_trainable) == \
        (300, 32, 1e-5, 1.0, "softmax")  # the paper's Table IX, constant lr
    cfg = load_config(None, env={}, overrides={"train.finetune_epochs": 7, "train.finetune_lr": 3e-4})
    opts = finetune_options(cfg.train, batch_size=None, finetune_trainable="mlp")
    assert (opts.epochs, opts.lr, opts.lr_gamma, opts.finetune_trainable) == (7, 3e-4, 1.0, "mlp")
    assert finetune_options(cfg.train, epochs=4).epochs == 4
    with pytest.raises(ConfigError, match="finetune_trainable must be one of"):
        load_config(None, env={}, overrides={"train.finetune_trainable": "head"})
    with pytest.raises(ConfigError, match="loss must be one of"):
        finetune_options(cfg.train, loss="triplet")


def test_embedder_defaults_come_from_the_train_section():
    from devrecd.train import embedder_options

    opts = embedder_options(load_config(None, env={}).train)
    assert (opts.arch, opts.loss, opts.patience) == ("asp", "aam", 0)
    assert (opts.epochs, opts.batch_size, opts.lr, opts.lr_step_epochs, opts.hop_seconds) == (30, 32, 1e-3, 20, 0.5)
    cfg = load_config(None, env={}, overrides={"train.embedder_epochs": 7, "train.embedder_lr": 3e-4,
                                               "train.embedder_hop_seconds": 1.0})
    opts = embedder_options(cfg.train, batch_size=16, epochs=None)
    assert (opts.epochs, opts.batch_size, opts.lr, opts.hop_seconds) == (7, 16, 3e-4, 1.0)


def test_train_embedder_cli_takes_unset_options_from_the_config(env, tmp_path, monkeypatch):
    import devrecd.train as train_module

    seen = {}

    def fake_train(ds, out, cfg, opts, **kw):  # the options are what this test is about, not the training
        seen["opts"] = opts
        return train_module.TrainResult(Path(out), 1, 0.0, 1, False, [])

    monkeypatch.setattr(train_module, "train", fake_train)
    config = tmp_path / "c.toml"
    config.write_text(env["config"].read_text() + "embedder_epochs = 3\nembedder_lr = 5e-4\nlr_gamma = 0.5\n")
    result = CliRunner().invoke(app, ["train-embedder", str(env["ds"]), "--out", str(tmp_path / "run"),
                                      "--batch-size", "16", "--config", str(config)])
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert (opts.epochs, opts.batch_size, opts.lr, opts.lr_gamma, opts.hop_seconds) == (3, 16, 5e-4, 0.5, 0.5)
    result = CliRunner().invoke(app, ["train-embedder", "--help"])
    assert "divided by 10" not in result.output and "lr_gamma" in result.output


def test_a_finetune_resumes_to_more_epochs_at_its_constant_rate(run, env, tmp_path):
    from devrecd.train import finetune_options

    out = tmp_path / "ft"
    ds = load_dataset(env["other"])
    tiny = {k: v for k, v in TINY.items() if k != "epochs"}
    first = train(ds, out, env["cfg"], finetune_options(env["cfg"].train, epochs=1, **tiny), init=run)
    assert first.epochs_run == 1
    second = train(ds, out, env["cfg"], finetune_options(env["cfg"].train, epochs=2, **tiny), init=run)
    assert [r["epoch"] for r in second.history] == [1, 2]
    assert [r["lr"] for r in second.history] == [TINY["lr"], TINY["lr"]]


def test_a_wrong_babble_folder_fails_before_any_feature_is_computed(env, tmp_path):
    """train.noise_augment_babble is read right after the run is opened: a folder that is not there
    (or holds fewer than two talkers) stops the run before any feature work or run file."""
    from devrecd.errors import ConfigError

    cache = tmp_path / "cache"
    cfg = env["cfg"].with_overrides({"train.cache_dir": str(cache), "train.noise_augment_p": 0.5,
                                     "train.noise_augment_babble": str(tmp_path / "no-talkers-here")})
    with pytest.raises(ConfigError, match="noise_augment_babble.*not a folder"):
        train(load_dataset(env["ds"]), tmp_path / "r", cfg, train_options(cfg.train, **TINY))
    assert not cache.exists() and not (tmp_path / "r" / "unusable.json").exists()
