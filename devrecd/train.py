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

SNR range: every checkpoint's ``meta["validated_snr_db"]`` is [lowest, highest] measured SNR of the
training recordings (the condition a verdict states; the low end lowered to ``noise_augment_snr_db``'s
when noise augmentation is on; a fine-tune's widened to the range its init checkpoint records, or
its own with a note in the meta when the init records none). ``devrecd export`` copies it into the
contract; a closed-set verdict on a noisier recording names no device (docs/conditions.md, "Honesty
outside validation").
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import Config, TrainConfig
from devrecd.data import Dataset, FeatureCache
from devrecd.errors import ArtifactError, ConfigError, DatasetError
from devrecd.fsutil import sha256_artifact
from devrecd.model.checkpoint import Checkpoint, load_checkpoint, load_raw, resolve_checkpoint_path, save_checkpoint
from devrecd.model.training import recalibrate_batchnorm, set_trainable, train_mode, validate
from devrecd.train_data import (UNUSABLE_FILE, Augmenter, SplitData, check_training_data, check_usable,
                                normalisation_stats, split_features, split_listing, to_split_data,
                                training_snr_range, with_init_range)

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
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]


def use_train_threads(opts: TrainConfig) -> None:
    """torch intra-op threads from ``train.threads`` (0 = leave torch's default)."""
    if opts.threads > 0:
        import torch

        torch.set_num_threads(opts.threads)


@dataclass
class _Run:
    """What the steps of one run share: where it writes, what it learns from and with which options,
    and what it starts from (``base``: the checkpoint a fine-tune starts from, else None)."""

    out: Path
    ds: Dataset
    cfg: Config
    opts: TrainConfig
    labels: list[str]
    hparams: dict[str, Any]
    trainable: str  # what learns: all | softmax | mlp
    device: str
    init: str | Path | None = None
    base: Checkpoint | None = None
    init_sha: str = ""
    talkers: list[np.ndarray] = field(default_factory=list)  # babble of the noise augmentation (read before any features)

    def key(self) -> dict[str, Any]:
        """What must be equal for last.pt to be resumed by this command (epochs and patience may change)."""
        keep = {k: v for k, v in asdict(self.opts).items()
                if k not in NOT_IN_RUN_KEY and not k.startswith(("finetune_", "embedder_"))}
        if self.opts.lr_gamma == 1.0:
            keep.pop("lr_step_epochs")  # a constant rate has no steps
        if not self.opts.noise_augment_p:  # off: the key of a run made before the option existed
            keep.pop("noise_augment_p"), keep.pop("noise_augment_snr_db")
        if not self.opts.noise_augment_babble:  # white noise only: likewise
            keep.pop("noise_augment_babble")
        else:  # the folder, wherever the run is started from
            keep["noise_augment_babble"] = str(Path(self.opts.noise_augment_babble).expanduser().resolve())
        keep.update(hparams=self.hparams, trainable=self.trainable)
        key = {"options": keep, "dataset_sha256": self.ds.manifest_sha256, "labels": self.labels, "init": self.init_sha}
        return json.loads(json.dumps(key))  # plain lists and dicts, as they come back from last.pt


@dataclass
class _Data:
    """A run's windows, normalised with ``mean``/``std``, and the recordings left out as unusable."""

    train: SplitData
    val: SplitData
    mean: np.ndarray
    std: np.ndarray
    unusable: list[dict[str, str]]
    augmenter: Augmenter | None
    snr: dict[str, Any]  # the SNR range of the training recordings (train_data.training_snr_range)


@dataclass
class _Progress:
    """Where a run stands after ``epoch``: what last.pt keeps beside the weights, and the metrics so far."""

    epoch: int = 0
    best_score: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, record: dict[str, Any], score: float) -> bool:
        """Add an epoch's metrics; whether its ``score`` is the best so far."""
        improved = score < self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
        else:
            self.bad_epochs += 1
        record["best_epoch"] = self.best_epoch
        self.history.append(record)
        return improved


def train(ds: Dataset, out: str | Path, cfg: Config, opts: TrainConfig, *, init: str | Path | None = None,
          hparams: dict[str, Any] | None = None, device: str = "cpu",
          on_step: Callable[[int, int, float, float, float], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train (or, with ``init``, fine-tune) on ``ds`` into run directory ``out``; resumes from its last.pt.

    ``opts`` are every option of the run (``train_options`` and friends make them from ``[train]``,
    including where features are cached, torch's threads and what an unusable recording does);
    ``cfg`` gives the frontend and the audio settings. Fine-tuning keeps ``init``'s architecture,
    frontend and normalisation, replaces its classifier with one for ``ds``'s labels and trains
    ``opts.finetune_trainable`` (without ``init`` every layer learns). ``hparams``: architecture
    hyper-parameters of a new network (default: the architecture's). ``on_step(done, total, loss,
    acc, clips_per_s)`` is called after each batch and ``on_epoch(record)`` after each epoch.
    """
    check_options(opts)
    check_training_data(ds)
    run = _start(ds, Path(out), cfg, opts, init, dict(hparams or {}), device)
    resume = _foreign_run_refused(run)  # before any feature work
    if run.opts.noise_augment_p > 0:  # a wrong babble folder fails here, not after the features
        run.talkers = _babble_talkers(run.opts.noise_augment_babble, cfg)
    model = _build_model(run)
    data = _load_data(run)
    use_train_threads(run.opts)
    progress, stopped_early = _loop(run, model, data, resume, on_step, on_epoch)
    plot_learning_curve(progress.history, run.out / CURVE_FILE)
    return TrainResult(run.out, progress.best_epoch, progress.best_score, progress.epoch, stopped_early,
                       progress.history)


# --- the steps of a run -----------------------------------------------------------------------

def _start(ds: Dataset, out: Path, cfg: Config, opts: TrainConfig, init: str | Path | None,
           hparams: dict[str, Any], device: str) -> _Run:
    """The run: a new network, or a fine-tune of ``init`` with the frontend and architecture it learned."""
    run = _Run(out, ds, cfg, opts, list(ds.labels), hparams, "all", device, init)
    if init is None:
        return run
    run.base = load_checkpoint(init)
    run.init_sha = sha256_artifact(resolve_checkpoint_path(init))
    run.base.check_compatible(frontend=cfg.frontend)  # fine-tune with the frontend it learned on
    run.opts, run.hparams = replace(opts, arch=run.base.arch), dict(run.base.hparams)
    run.trainable = opts.finetune_trainable
    return run


def _foreign_run_refused(run: _Run) -> dict[str, Any] | None:
    """The run's last.pt to resume from (None: a new run); a last.pt of another run is an error."""
    if not (run.out / LAST).exists():
        return None
    resume = load_raw(run.out / LAST)
    if resume.get("run_key") != run.key():
        raise ArtifactError(f"{run.out} holds a run with another architecture, dataset or options "
                            f"(its last.pt: arch {resume.get('arch')!r}, {len(resume.get('labels', []))} labels); "
                            "use a new --out directory", reason="run_mismatch")
    return resume


def _build_model(run: _Run) -> Any:
    """The network, once: seeded, with a fine-tune's weights (all but its classifier). An unknown
    architecture, bad hyper-parameters or a loss the network cannot take fail here, before features."""
    import torch

    from devrecd.model import build_model

    torch.manual_seed(run.opts.seed)
    model = build_model(run.opts.arch, len(run.labels), **run.hparams)
    if run.opts.loss == "aam" and not callable(getattr(model, "margin_logits", None)):
        raise ConfigError(f"loss 'aam' needs an architecture with an angular-margin head (asp), not {run.opts.arch!r}")
    if run.base is not None:
        state = {k: v for k, v in run.base.state_dict.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ArtifactError(f"{run.init}: weights do not fit architecture {run.opts.arch!r}",
                                reason="checkpoint_arch")
    return model


def _load_data(run: _Run) -> _Data:
    """Every training and validation recording's features (unusable ones per ``opts.on_unusable``,
    listed in RUN/unusable.json), normalised; the augmenter when the options ask for one."""
    from devrecd.fsutil import atomic_write

    opts, ds = run.opts, run.ds
    cache = FeatureCache(Path(opts.cache_dir), run.cfg.frontend, run.cfg.audio, device=run.device, measure_snr=True)
    unusable: list[dict[str, str]] = []
    feats = {split: split_features(ds, split, cache, opts.hop_seconds, run.labels, on_unusable=opts.on_unusable,
                                   unusable=unusable) for split in ("train", "val")}
    check_usable(ds, feats["train"][1], unusable)
    # The SNR range the network learns (the contract's validated_snr_db once exported): measured on
    # every training recording as a verdict's condition measures it, lowered to the noise augmentation's.
    snr = training_snr_range(feats["train"][1], cache, opts.hop_seconds,
                             opts.noise_augment_snr_db if opts.noise_augment_p > 0 else None)
    if run.base is not None:  # a fine-tune: the range its init learned on too
        snr = with_init_range(snr, run.base.validated_snr_db)
        if "note" in snr:
            log.warning("fine-tune SNR range: " + snr["note"], extra={"init": str(run.init)})
    for u in unusable:
        log.warning("recording left out of training", extra=u)
    run.out.mkdir(parents=True, exist_ok=True)
    # The list is part of the run's report.
    atomic_write(run.out / UNUSABLE_FILE, json.dumps(unusable, indent=1, ensure_ascii=False))
    if run.base is not None:
        mean, std = run.base.norm_mean, run.base.norm_std  # the frozen layers learned on these
    else:
        mean, std = normalisation_stats(feats["train"][0])
    train_data, val_data = (to_split_data(*feats[split], run.labels, mean, std) for split in ("train", "val"))
    if len(train_data) < 2:
        raise DatasetError(f"{ds.root}: only {len(train_data)} training window(s)", reason="dataset_too_small")
    augmenter = (Augmenter(feats["train"][1], run.cfg, opts.hop_seconds, device=run.device, waveform=opts.augment,
                           channels=opts.channel_augment, channel_p=opts.channel_augment_p,
                           noise_p=opts.noise_augment_p, noise_snr_db=opts.noise_augment_snr_db,
                           talkers=run.talkers)
                 if opts.augment or opts.channel_augment or opts.noise_augment_p > 0 else None)
    return _Data(train_data, val_data, mean, std, unusable, augmenter, snr)


def _babble_talkers(folder: str, cfg: Config) -> list[np.ndarray]:
    """The talkers of ``train.noise_augment_babble`` (none when it is not set)."""
    if not folder:
        return []
    from devrecd.audio.talkers import read_talkers

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.noise_augment_babble: {path} is not a folder of single-talker recordings")
    try:
        return read_talkers(path, cfg.frontend.sample_rate, cfg.audio, cfg.watch,
                            skipped=lambda f, exc: log.warning("babble talker recording not used",
                                                               extra={"path": str(f), "error": str(exc)}))
    except ValueError as exc:
        raise ConfigError(f"train.noise_augment_babble: {exc}") from None


def _loop(run: _Run, model: Any, data: _Data, resume: dict[str, Any] | None,
          on_step: Callable[..., None] | None,
          on_epoch: Callable[[dict[str, Any]], None] | None) -> tuple[_Progress, bool]:
    """Epochs until ``opts.epochs`` (or early stopping), each checkpointed; (progress, stopped early)."""
    import torch

    opts = run.opts
    params = set_trainable(model, run.trainable)
    model.to(run.device)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=opts.lr_step_epochs, gamma=opts.lr_gamma)
    progress = _restore(run, resume, model, optimizer, scheduler)
    while progress.epoch < opts.epochs:
        if opts.patience and progress.bad_epochs >= opts.patience:
            return progress, True
        progress.epoch += 1
        record = _epoch(run, model, optimizer, data, progress.epoch, on_step)
        scheduler.step()
        improved = progress.record(record, record["val_loss"] if len(data.val) else record["train_loss"])
        _save(run, _checkpoint(run, model, data, record, progress.epoch), improved,
              {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, progress)
        if on_epoch is not None:
            on_epoch(record)
    return progress, False


def _restore(run: _Run, resume: dict[str, Any] | None, model: Any, optimizer: Any, scheduler: Any) -> _Progress:
    """The state of last.pt put back (weights, optimizer, scheduler, torch's RNG), or a fresh start."""
    import torch

    if resume is None:
        return _Progress()
    model.load_state_dict(resume["state_dict"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    torch.set_rng_state(resume["torch_rng"])
    epoch = int(resume["meta"]["epoch"])
    log.info("resuming", extra={"run": str(run.out), "epoch": epoch})
    return _Progress(epoch, float(resume["best_score"]), int(resume["best_epoch"]), int(resume["bad_epochs"]),
                     _read_history(run.out / METRICS_FILE, epoch))


def _epoch(run: _Run, model: Any, optimizer: Any, data: _Data, epoch: int,
           on_step: Callable[..., None] | None) -> dict[str, Any]:
    """One epoch of training (batches in a seeded order), BatchNorm recalibrated, validated: its record."""
    import torch

    opts = run.opts
    t0 = time.perf_counter()
    if data.augmenter is not None:
        aug = to_split_data(data.augmenter.epoch_features(opts.seed, epoch), data.train.items, run.labels,
                            data.mean, data.std)
        xs, ys = aug.x, aug.y
    else:
        xs, ys = data.train.x, data.train.y
    train_mode(model, run.trainable)
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
    total_loss, correct, seen = 0.0, 0, 0
    t_train = time.perf_counter()
    for start in range(0, len(order), opts.batch_size):
        idx = order[start:start + opts.batch_size]
        if len(idx) < 2:
            continue  # BatchNorm cannot train on one window
        x, y = xs[idx].to(run.device), ys[idx].to(run.device)
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
    if run.trainable == "all":  # frozen layers keep the statistics they were trained with
        recalibrate_batchnorm(model, data.train.x, opts.batch_size, run.device)
    record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                              "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                              "clips_per_s": seen / max(train_seconds, 1e-9), "train_seconds": train_seconds}
    if len(data.val):
        record.update(validate(model, data.val, run.device, opts.batch_size))
    record["seconds"] = time.perf_counter() - t0
    return record


def _checkpoint(run: _Run, model: Any, data: _Data, metrics: dict[str, Any], epoch: int) -> Checkpoint:
    """The self-describing checkpoint of ``epoch``: weights, labels, frontend, normalisation, split, options."""
    split = split_listing(run.ds, data.train.items, data.val.items, run.opts.hop_seconds)
    return Checkpoint(
        arch=run.opts.arch, hparams=dict(run.hparams), labels=run.labels, frontend=run.cfg.frontend,
        norm_mean=data.mean, norm_std=data.std,
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        dataset_sha256=run.ds.manifest_sha256, split=split,
        meta={"epoch": epoch, "metrics": metrics, "selection": "val_loss" if len(data.val) else "train_loss",
              "options": {**asdict(run.opts), "trainable": run.trainable},
              "versions": _versions(), "init": str(run.init) if run.init else "", "init_sha256": run.init_sha,
              "unusable": data.unusable, "validated_snr_db": data.snr["validated_snr_db"], "training_snr_db": data.snr})


def _save(run: _Run, ckpt: Checkpoint, improved: bool, states: dict[str, Any], progress: _Progress) -> None:
    """best.pt when the epoch improved, then last.pt (with ``states``: optimizer and scheduler, torch's
    RNG and the progress, what a resume needs), then the metrics."""
    import torch

    if improved:
        save_checkpoint(run.out / BEST, ckpt)
    # last.pt after best.pt: a kill in between leaves a last.pt that resumes into the same best.pt.
    save_checkpoint(run.out / LAST, ckpt, extra={
        **states, "torch_rng": torch.get_rng_state(), "best_score": progress.best_score,
        "best_epoch": progress.best_epoch, "bad_epochs": progress.bad_epochs, "run_key": run.key()})
    _write_history(run.out / METRICS_FILE, progress.history)


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
