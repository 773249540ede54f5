"""Closed-set training and fine-tuning of the device networks (``devrecd train`` / ``devrecd finetune``).

The loop is the paper's recipe (section V-E) by default: Adam, lr 1e-4 divided by 10 every 30
epochs, batch 64, 100 epochs, cross-entropy. Features come from :class:`devrecd.data.FeatureCache`
(the one frontend); the network sees them normalised with per-dimension statistics of the
training windows, which travel in the checkpoint.

Run directory::

    RUN_DIR/best.pt            the checkpoint with the best validation loss (the training loss
                               when the dataset has no validation split)
    RUN_DIR/last.pt            written atomically after every epoch, with optimizer, scheduler
                               and RNG state: the same command resumes from it after Ctrl-C/kill
    RUN_DIR/metrics.jsonl      one JSON line per epoch
    RUN_DIR/learning_curve.png

Determinism: batches are drawn from a generator seeded by (seed, epoch), augmentation from a
numpy generator seeded by (seed, epoch), dropout from torch's global generator whose state is
saved each epoch; so a run resumed after epoch k continues exactly as the uninterrupted run would
have (on the CPU).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import Config, TrainConfig
from devrecd.data import Dataset, FeatureCache, Item, parse_split_groups
from devrecd.errors import ArtifactError, ConfigError, DatasetError
from devrecd.fsutil import sha256_artifact
from devrecd.model.checkpoint import Checkpoint, load_checkpoint, load_raw, resolve_checkpoint_path, save_checkpoint

log = logging.getLogger("devrecd.train")

BEST, LAST = "best.pt", "last.pt"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
# [train] keys that do not change what a run learns: a run resumes across changes to them (and to
# the finetune_* and embedder_* keys, which reach a run as its epochs, batch size, lr, ...).
NOT_IN_RUN_KEY = ("epochs", "patience", "split", "cache_dir", "threads", "on_unusable")


def train_options(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """A run's options: the ``[train]`` section with the given (non-None) overrides, validated."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def finetune_options(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """Fine-tuning options: the ``finetune_*`` keys of ``[train]`` as epochs, batch size, constant lr
    (Table IX), then the given (non-None) overrides."""
    given = {k: v for k, v in overrides.items() if v is not None}
    # A constant rate is lr_gamma 1, not a step as long as the run: the step would tie the run key to
    # --epochs (a fine-tune could not be resumed to more epochs) and, once reached, lower the rate.
    return train_options(cfg, **{"epochs": cfg.finetune_epochs, "batch_size": cfg.finetune_batch_size,
                                 "lr": cfg.finetune_lr, "lr_gamma": 1.0, **given})


def embedder_options(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """Options of an open-set embedder (``devrecd train-embedder``): arch asp with AAM-softmax, no early
    stopping, the ``embedder_*`` keys of ``[train]`` as epochs, batch size, lr, lr step and window hop,
    then the given (non-None) overrides."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return train_options(cfg, **{"arch": "asp", "loss": "aam", "patience": 0, "epochs": cfg.embedder_epochs,
                                 "batch_size": cfg.embedder_batch_size, "lr": cfg.embedder_lr,
                                 "lr_step_epochs": cfg.embedder_lr_step_epochs,
                                 "hop_seconds": cfg.embedder_hop_seconds, **given})


def check_options(opts: TrainConfig) -> None:
    """What the ``[train]`` section's own validation cannot know: that this FFmpeg has the encoders of
    ``channel_augment`` (raises ConfigError naming each missing one, before any training starts)."""
    problems = _channel_problems(opts.channel_augment)
    if problems:
        raise ConfigError("train: " + "; ".join(problems))


def _channel_problems(names: Sequence[str]) -> list[str]:
    """Unknown channels, and channels whose encoder this FFmpeg lacks, named before any training starts."""
    from devrecd.audio.channel import CHANNELS
    from devrecd.audio.transmit import encoder_available

    out = []
    for name in names:
        ch = CHANNELS.get(name)
        if ch is None:
            out.append(f"channel_augment: unknown channel {name!r} (known: {', '.join(CHANNELS)})")
        elif ch.encoder and not encoder_available(ch.encoder):
            out.append(f"channel_augment: {name!r} needs the {ch.encoder} encoder, which the FFmpeg bundled with "
                       "PyAV does not have")
    return out


@dataclass
class SplitData:
    """One split's windows, normalised, as tensors; ``rec`` maps each window to its recording."""

    x: Any  # torch.FloatTensor (n, 128, 73)
    y: Any  # torch.LongTensor (n,)
    rec: np.ndarray  # (n,) index into ``items``
    items: list[Item]

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]


def open_dataset(path: str | Path, cfg: Config, split_groups: str | None = None) -> Dataset:
    """Load ``path`` with the ``[train]`` split ratios and seed, or the given group split."""
    from devrecd.data import load_dataset

    return load_dataset(path, ratios=cfg.train.split, seed=cfg.train.seed, split_by_group=parse_split_groups(split_groups))


def merge_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """Several datasets as one training set (e.g. real phones plus ``devrecd synth`` corpora).

    Each keeps its own split; with more than one, device names are prefixed with the dataset's
    folder name so that two corpora's ``phone1`` stay two devices.
    """
    import os

    from devrecd.data import listing_sha256

    if not datasets:
        raise DatasetError("no dataset given", reason="dataset_missing")
    if len(datasets) == 1:
        return datasets[0]
    names = [d.root.name for d in datasets]
    if len(set(names)) != len(names):
        raise DatasetError(f"datasets with the same folder name cannot be told apart: {', '.join(names)}",
                           reason="dataset_names")
    items = tuple(replace(it, device=f"{d.root.name}/{it.device}") for d in datasets for it in d.items)
    root = Path(os.path.commonpath([str(d.root) for d in datasets]))
    return Dataset(root=root, items=items, labels=tuple(sorted({it.device for it in items})),
                   manifest_sha256=listing_sha256(items, root), layout="merged")


def restrict_dataset(ds: Dataset, devices: Sequence[str], split: str | None = None,
                     splits: Sequence[str] | None = None) -> Dataset:
    """The recordings of ``devices`` only (of ``splits`` only, when given), all assigned to ``split``
    when given: e.g. a protocol's development phones as one training set."""
    from devrecd.data import listing_sha256

    keep = set(devices)
    items = tuple(replace(it, split=split or it.split) for it in ds.items
                  if it.device in keep and (splits is None or it.split in splits))
    return replace(ds, items=items, labels=tuple(sorted({it.device for it in items})),
                   manifest_sha256=listing_sha256(items, ds.root))


def check_training_data(ds: Dataset) -> None:
    """Refuse data that cannot train a classifier, before any features are computed."""
    if len(ds.labels) < 2:
        raise DatasetError(f"{ds.root}: one device ({ds.labels[0] if ds.labels else 'none'}); "
                           "a device classifier needs recordings of at least two devices", reason="dataset_one_device")
    missing = [d for d, c in ds.counts().items() if c["train"] == 0]
    if missing:
        raise DatasetError(f"{ds.root}: device(s) {', '.join(missing[:5])} have no training recordings in this split "
                           "(add recordings or change the split)", reason="dataset_split")


UNUSABLE_FILE = "unusable.json"


def split_features(ds: Dataset, split: str, cache: FeatureCache, hop_seconds: float,
                   labels: Sequence[str], *, on_unusable: str = "fail",
                   unusable: list[dict[str, str]] | None = None,
                   on_recording: Callable[[str], None] | None = None) -> tuple[list[np.ndarray], list[Item]]:
    """Raw (unnormalised) window features of every recording of ``split`` (``on_recording(path)``
    after each: progress). Every file is read before any training starts. With ``on_unusable="fail"`` the files that cannot be used are named in ONE
    DatasetError; with ``"skip"`` they are left out and appended to ``unusable`` (path, device,
    split, reason, detail)."""
    from devrecd.audio import AudioError

    items = ds.subset(split)
    unknown = sorted({it.device for it in items} - set(labels))
    if unknown:
        raise DatasetError(f"device(s) {', '.join(unknown[:5])} of the {split} split are not among the model's "
                           f"{len(labels)} labels", reason="dataset_labels")
    feats, kept, bad = [], [], []
    for it in items:
        try:
            feats.append(cache.features(it.path, hop_seconds)[0])
            kept.append(it)
        except AudioError as exc:
            bad.append(f"{it.path.name} ({exc.reason}: {exc.detail})")
            if unusable is not None:
                unusable.append({"path": str(it.path), "device": it.device, "split": split, "reason": exc.reason,
                                 "detail": exc.detail})
        if on_recording is not None:
            on_recording(str(it.path))
    if bad and on_unusable != "skip":
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} {split} recording(s) cannot be used: {'; '.join(bad[:3])}{more} "
                           "(train.on_unusable = \"skip\" leaves them out)", reason="dataset_unreadable")
    return feats, kept


def check_usable(ds: Dataset, train_items: Sequence[Item], unusable: Sequence[dict[str, str]]) -> None:
    """After unusable recordings were left out: every device must keep a training recording."""
    left = {it.device for it in train_items}
    empty = [d for d in ds.labels if d not in left]
    if empty:
        why = "; ".join(f"{Path(u['path']).name} ({u['reason']}: {u['detail']})" for u in unusable
                        if u["device"] in empty and u["split"] == "train")
        raise DatasetError(f"device(s) {', '.join(empty)} have no usable training recording left: {why}",
                           reason="dataset_unusable")


def to_split_data(feats: Sequence[np.ndarray], items: Sequence[Item], labels: Sequence[str],
                  mean: np.ndarray, std: np.ndarray) -> SplitData:
    """Normalised tensors of per-recording features."""
    import torch

    index = {d: i for i, d in enumerate(labels)}
    if not feats:
        return SplitData(torch.zeros(0, 128, len(mean)), torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64), [])
    x = np.concatenate([(f - mean) / std for f in feats]).astype(np.float32, copy=False)
    y = np.concatenate([np.full(len(f), index[it.device]) for f, it in zip(feats, items)])
    rec = np.concatenate([np.full(len(f), i) for i, f in enumerate(feats)]).astype(np.int64)
    return SplitData(torch.from_numpy(x), torch.as_tensor(y, dtype=torch.long), rec, list(items))


def normalisation_stats(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every frame of every training window (float64 sums: pre-Fbank
    spans decades). One implementation for the closed-set and the open-set trainers."""
    x = np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1, f.shape[-1]) for f in feats])
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), 1e-8).astype(np.float32)


class Augmenter:
    """Fresh training windows each epoch: a random crop offset, a random gain and light noise
    (``waveform``), and/or a transmission channel (codec or band limit, ``channels``, each recording
    with probability ``channel_p``), applied to the waveform and passed through the one frontend
    (so the features stay exact)."""

    def __init__(self, items: Sequence[Item], cfg: Config, hop_seconds: float, *, gain_db: float = 6.0,
                 noise_dbfs: tuple[float, float] = (-70.0, -50.0), device: str = "cpu", waveform: bool = True,
                 channels: Sequence[str] = (), channel_p: float = 0.5) -> None:
        from devrecd.audio import read_evidence
        from devrecd.audio.channel import get_channel

        self.cfg, self.hop, self.device = cfg, hop_seconds, device
        self.gain_db, self.noise_dbfs = gain_db, noise_dbfs
        self.waveform = waveform
        self.channels = [get_channel(n) for n in channels]
        self.channel_p = channel_p
        self.waves = [read_evidence(it.path, cfg.frontend.sample_rate, cfg.audio) for it in items]
        self._through: dict[tuple[int, str], np.ndarray] = {}  # a codec round trip is deterministic: once each

    def _channel_samples(self, i: int, rng: np.random.Generator) -> np.ndarray:
        rec = self.waves[i]
        if not self.channels or rng.random() >= self.channel_p:
            return rec.samples
        ch = self.channels[int(rng.integers(len(self.channels)))]
        key = (i, ch.name)
        if key not in self._through:
            from devrecd.audio.transmit import apply_channel

            self._through[key] = apply_channel(ch, rec.samples, rec.sample_rate)
        return self._through[key]

    def epoch_features(self, seed: int, epoch: int) -> list[np.ndarray]:
        """Per-recording (n, 128, 73) raw features for ``epoch`` (same seed and epoch, same features)."""
        from devrecd.features import extract
        from devrecd.pipeline.stages import clips_for, frontend_for, hop_samples

        rng = np.random.default_rng([seed, epoch, 0xA06])
        hop = hop_samples(self.hop, self.cfg.frontend.sample_rate)
        out = []
        for i, rec in enumerate(self.waves):
            samples = self._channel_samples(i, rng)
            if not self.waveform:
                out.append(extract(np.array(clips_for(replace(rec, samples=samples), self.cfg.frontend, self.hop),
                                            dtype=np.float32), frontend_for(self.cfg.frontend), device=self.device))
                continue
            room = len(samples) - self.cfg.frontend.clip_samples + 1
            offset = int(rng.integers(0, max(1, min(hop, room))))
            clips = np.array(clips_for(replace(rec, samples=samples[offset:]), self.cfg.frontend, self.hop),
                             dtype=np.float32)
            gains = 10.0 ** (rng.uniform(-self.gain_db, self.gain_db, (len(clips), 1)) / 20.0)
            noise = 10.0 ** (rng.uniform(*self.noise_dbfs, (len(clips), 1)) / 20.0)
            clips = clips * gains + noise * rng.standard_normal(clips.shape)
            out.append(extract(np.clip(clips, -1.0, 1.0).astype(np.float32), frontend_for(self.cfg.frontend),
                               device=self.device))
        return out


def _set_trainable(model: Any, trainable: str) -> list[Any]:
    """Freeze all but the part that fine-tuning trains; returns the parameters to optimise."""
    if trainable == "all":
        return list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    parts = [model.classifier] + ([model.mlp] if trainable == "mlp" else [])
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _train_mode(model: Any, trainable: str) -> None:
    """Frozen layers stay in eval mode while fine-tuning: their BatchNorm statistics must not drift."""
    model.train()
    if trainable != "all":
        model.eval()
        model.classifier.train()
        if trainable == "mlp":
            model.mlp.train()


def use_train_threads(cfg: Config) -> None:
    """torch intra-op threads from ``train.threads`` (0 = leave torch's default)."""
    if cfg.train.threads > 0:
        import torch

        torch.set_num_threads(cfg.train.threads)


def recalibrate_batchnorm(model: Any, x: Any, batch_size: int, device: str, max_windows: int = 2048) -> None:
    """Set every BatchNorm's running statistics to those of the current weights on training windows.

    The paper's BatchNorm keeps Keras' momentum (0.99, torch 0.01): on a small corpus (CCNU's 15
    phones x 3 references are ~12 batches an epoch) the running averages still remember the random
    initial weights after many epochs, and the network that is 100% right in training mode is
    ~50% right in eval mode on its own training windows (measured). So after each epoch the running
    statistics are recomputed ("precise BN"): a forward pass in training mode for BatchNorm only
    (dropout off, no gradients) over up to ``max_windows`` evenly spaced training windows, with a
    cumulative average over batches.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    subset = x[:: -(-len(x) // max_windows)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(subset), batch_size):
                model(subset[start:start + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _run_key(opts: TrainConfig, hparams: dict[str, Any], trainable: str, ds: Dataset, labels: Sequence[str],
             init_sha: str) -> dict[str, Any]:
    """What must be equal for last.pt to be resumed by this command (epochs and patience may change)."""
    keep = {k: v for k, v in asdict(opts).items()
            if k not in NOT_IN_RUN_KEY and not k.startswith(("finetune_", "embedder_"))}
    if opts.lr_gamma == 1.0:
        keep.pop("lr_step_epochs")  # a constant rate has no steps
    keep.update(hparams=hparams, trainable=trainable)
    key = {"options": keep, "dataset_sha256": ds.manifest_sha256, "labels": list(labels), "init": init_sha}
    return json.loads(json.dumps(key))  # plain lists and dicts, as they come back from last.pt


def train(ds: Dataset, out: str | Path, cfg: Config, opts: TrainConfig, *, init: str | Path | None = None,
          hparams: dict[str, Any] | None = None, device: str = "cpu",
          on_step: Callable[[int, int, float, float, float], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or, with ``init``, fine-tune) on ``ds`` into run directory ``out``; resumes from its last.pt.

    Fine-tuning keeps ``init``'s architecture, frontend and normalisation, replaces its classifier
    with one for ``ds``'s labels and trains ``opts.finetune_trainable`` (without ``init`` every layer
    learns). ``hparams``: architecture hyper-parameters of a new network (default: the architecture's).
    ``on_step(done, total, loss, acc, clips_per_s)`` is called after each batch and ``on_epoch(record)``
    after each epoch.
    """
    import torch

    from devrecd.model import build_model

    check_options(opts)
    out = Path(out)
    hparams = dict(hparams or {})
    trainable = "all"
    check_training_data(ds)
    base: Checkpoint | None = None
    init_sha = ""
    if init is not None:
        base = load_checkpoint(init)
        init_sha = sha256_artifact(resolve_checkpoint_path(init))
        base.check_compatible(frontend=cfg.frontend)  # fine-tune with the frontend it learned on
        opts, hparams, trainable = replace(opts, arch=base.arch), dict(base.hparams), opts.finetune_trainable
    labels = list(ds.labels)

    # A foreign last.pt is an error before any feature work.
    last_path = out / LAST
    resume: dict[str, Any] | None = None
    key = _run_key(opts, hparams, trainable, ds, labels, init_sha)
    if last_path.exists():
        resume = load_raw(last_path)
        if resume.get("run_key") != key:
            raise ArtifactError(f"{out} holds a run with another architecture, dataset or options "
                                f"(its last.pt: arch {resume.get('arch')!r}, {len(resume.get('labels', []))} labels); "
                                "use a new --out directory", reason="run_mismatch")
    probe = build_model(opts.arch, len(labels), **hparams)  # unknown arch / bad hyper-parameters fail now
    if opts.loss == "aam" and not callable(getattr(probe, "margin_logits", None)):
        raise ConfigError(f"loss 'aam' needs an architecture with an angular-margin head (asp), not {opts.arch!r}")

    cache = FeatureCache(Path(cfg.train.cache_dir), cfg.frontend, cfg.audio, device=device)
    unusable: list[dict[str, str]] = []
    policy = cfg.train.on_unusable
    train_feats, train_items = split_features(ds, "train", cache, opts.hop_seconds, labels, on_unusable=policy,
                                              unusable=unusable)
    val_feats, val_items = split_features(ds, "val", cache, opts.hop_seconds, labels, on_unusable=policy,
                                          unusable=unusable)
    check_usable(ds, train_items, unusable)
    for u in unusable:
        log.warning("recording left out of training", extra=u)
    out.mkdir(parents=True, exist_ok=True)
    from devrecd.fsutil import atomic_write

    atomic_write(out / UNUSABLE_FILE, json.dumps(unusable, indent=1, ensure_ascii=False))  # part of the run's report
    if base is not None:
        mean, std = base.norm_mean, base.norm_std  # the frozen layers learned on these
    else:
        mean, std = normalisation_stats(train_feats)
    train_data = to_split_data(train_feats, train_items, labels, mean, std)
    val_data = to_split_data(val_feats, val_items, labels, mean, std)
    if len(train_data) < 2:
        raise DatasetError(f"{ds.root}: only {len(train_data)} training window(s)", reason="dataset_too_small")
    augmenter = (Augmenter(train_items, cfg, opts.hop_seconds, device=device, waveform=opts.augment,
                           channels=opts.channel_augment, channel_p=opts.channel_augment_p)
                 if opts.augment or opts.channel_augment else None)

    use_train_threads(cfg)
    torch.manual_seed(opts.seed)
    model = build_model(opts.arch, len(labels), **hparams)
    if base is not None:
        state = {k: v for k, v in base.state_dict.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ArtifactError(f"{init}: weights do not fit architecture {opts.arch!r}", reason="checkpoint_arch")
    params = _set_trainable(model, trainable)
    model.to(device)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=opts.lr_step_epochs, gamma=opts.lr_gamma)

    split_info = {"train": [_rel(it, ds) for it in train_items], "val": [_rel(it, ds) for it in val_items],
                  "test": [_rel(it, ds) for it in ds.subset("test")], "hop_seconds": opts.hop_seconds}
    selection = "val_loss" if len(val_data) else "train_loss"
    start_epoch, best_score, best_epoch, bad_epochs = 0, math.inf, 0, 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch = int(resume["meta"]["epoch"])
        best_score, best_epoch, bad_epochs = float(resume["best_score"]), int(resume["best_epoch"]), int(resume["bad_epochs"])
        history = _read_history(out / METRICS_FILE, start_epoch)
        log.info("resuming", extra={"run": str(out), "epoch": start_epoch})
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(epoch: int, metrics: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            arch=opts.arch, hparams=dict(hparams), labels=labels, frontend=cfg.frontend, norm_mean=mean,
            norm_std=std, state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            dataset_sha256=ds.manifest_sha256, split=split_info,
            meta={"epoch": epoch, "metrics": metrics, "selection": selection,
                  "options": {**asdict(opts), "trainable": trainable},
                  "versions": _versions(), "init": str(init) if init else "", "init_sha256": init_sha,
                  "unusable": unusable})

    stopped_early = False
    epoch = start_epoch
    while epoch < opts.epochs:
        if opts.patience and bad_epochs >= opts.patience:
            stopped_early = True
            break
        epoch += 1
        t0 = time.perf_counter()
        if augmenter is not None:
            aug = to_split_data(augmenter.epoch_features(opts.seed, epoch), train_items, labels, mean, std)
            xs, ys = aug.x, aug.y
        else:
            xs, ys = train_data.x, train_data.y
        _train_mode(model, trainable)
        order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
        total_loss, correct, seen = 0.0, 0, 0
        t_train = time.perf_counter()
        for start in range(0, len(order), opts.batch_size):
            idx = order[start:start + opts.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm cannot train on one window
            x, y = xs[idx].to(device), ys[idx].to(device)
            logits = model.margin_logits(x, y) if opts.loss == "aam" else model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if on_step is not None:
                on_step(seen, len(order), total_loss / seen, correct / seen, seen / (time.perf_counter() - t_train))
        train_seconds = time.perf_counter() - t_train
        if trainable == "all":  # frozen layers keep the statistics they were trained with
            recalibrate_batchnorm(model, train_data.x, opts.batch_size, device)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": total_loss / max(seen, 1),
                                  "train_acc": correct / max(seen, 1), "clips_per_s": seen / max(train_seconds, 1e-9),
                                  "train_seconds": train_seconds}
        if len(val_data):
            record.update(_validate(model, val_data, device, opts.batch_size))
        record["seconds"] = time.perf_counter() - t0
        score = record["val_loss"] if len(val_data) else record["train_loss"]
        improved = score < best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
        else:
            bad_epochs += 1
        record["best_epoch"] = best_epoch
        history.append(record)
        ckpt = checkpoint(epoch, record)
        if improved:
            save_checkpoint(out / BEST, ckpt)
        # last.pt after best.pt: a kill in between leaves a last.pt that resumes into the same best.pt.
        save_checkpoint(last_path, ckpt, extra={
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "best_score": best_score, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "run_key": key})
        _write_history(out / METRICS_FILE, history)
        if on_epoch is not None:
            on_epoch(record)
    plot_learning_curve(history, out / CURVE_FILE)
    return TrainResult(out, best_epoch, best_score, epoch, stopped_early, history)



def _validate(model: Any, data: SplitData, device: str, batch: int) -> dict[str, float]:
    """Loss and window/recording accuracy on held-out windows (recording = mean log-probability)."""
    import torch

    model.eval()
    with torch.no_grad():
        lp = torch.cat([torch.log_softmax(model(data.x[s:s + batch].to(device)), dim=1).cpu()
                        for s in range(0, len(data), batch)])
    lp_np, y_np = lp.numpy(), data.y.numpy()
    rec_ok = [lp_np[data.rec == r].mean(0).argmax() == y_np[data.rec == r][0] for r in range(len(data.items))]
    return {"val_loss": float(torch.nn.functional.nll_loss(lp, data.y)),
            "val_acc": float((lp.argmax(1) == data.y).float().mean()), "val_rec_acc": float(np.mean(rec_ok))}


def _rel(it: Item, ds: Dataset) -> str:
    try:
        return it.path.relative_to(ds.root).as_posix()
    except ValueError:
        return it.path.as_posix()


def _versions() -> dict[str, str]:
    import torch

    from devrecd import __version__

    return {"devrecd": str(__version__), "torch": str(torch.__version__), "numpy": str(np.__version__)}


def _read_history(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """The metrics of epochs <= ``upto_epoch`` (a killed run may have logged one more)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    from devrecd.fsutil import atomic_write

    atomic_write(path, "".join(json.dumps(r) + "\n" for r in history), fsync=False)


def plot_learning_curve(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch (training and, where there is one, validation)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    if history and "val_loss" in history[0]:
        ax1.plot(epochs, [r["val_loss"] for r in history], label="validation")
        ax2.plot(epochs, [r["val_acc"] for r in history], label="validation (windows)")
        ax2.plot(epochs, [r["val_rec_acc"] for r in history], label="validation (recordings)")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
