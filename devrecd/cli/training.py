"""``devrecd train``, ``evaluate``, ``finetune`` and ``baseline``: the model's life cycle."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from devrecd.cli.app import (ConfigOption, SplitName, SplitGroupsOption, TorchDeviceOption, choice, command,
                             load_cli_config, option_values, progress)


class Arch(str, enum.Enum):
    """Network architectures (devrecd.model.ARCHITECTURES; listed here so that --help needs no torch)."""

    paper = "paper"
    group1 = "group1"
    group2 = "group2"
    group3 = "group3"
    group4 = "group4"
    group5 = "group5"
    group6 = "group6"
    group7 = "group7"
    asp = "asp"


class Trainable(str, enum.Enum):
    softmax = "softmax"
    mlp = "mlp"
    all = "all"


class Baseline(str, enum.Enum):
    mfcc_svm = "mfcc-svm"
    gsv_svm = "gsv-svm"


def _progress(desc: str):
    """tqdm callbacks for the trainer: a bar per epoch with loss, accuracy and clips/s."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None, "epoch": 0}

    def on_step(done: int, total: int, loss: float, acc: float, rate: float) -> None:
        if state["bar"] is None:
            state["epoch"] += 1
            state["bar"] = tqdm(total=total, unit="clip", desc=f"{desc} epoch {state['epoch']}",
                                dynamic_ncols=True, leave=False)
        bar = state["bar"]
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", clips_s=f"{rate:.1f}")

    def on_epoch(rec: dict[str, Any]) -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        state["epoch"] = rec["epoch"]
        val = (f" val_loss {rec['val_loss']:.4f} val_acc {rec['val_acc']:.3f} val_rec_acc {rec['val_rec_acc']:.3f}"
               if "val_loss" in rec else "")
        typer.echo(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f} acc {rec['train_acc']:.3f}{val} "
                   f"lr {rec['lr']:.2e} {rec['clips_per_s']:.1f} clips/s {rec['seconds']:.0f} s (best {rec['best_epoch']})")

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return on_step, on_epoch, close


def _run(ds_path: Path, out: Path, cfg: Any, opts: Any, split_groups: Optional[str],
         init: Optional[Path] = None) -> None:
    from devrecd.stages import resolve_device
    from devrecd.train import train
    from devrecd.train_data import open_dataset

    ds = open_dataset(ds_path, cfg, split_groups)
    on_step, on_epoch, close = _progress("finetune" if init else "train")
    try:
        result = train(ds, out, cfg, opts, init=init, device=resolve_device(cfg.backend.device), on_step=on_step,
                       on_epoch=on_epoch)
    finally:
        close()
    how = "stopped early" if result.stopped_early else "done"
    typer.echo(f"{how} after {result.epochs_run} epochs; best epoch {result.best_epoch} -> {out / 'best.pt'}")


@command()
def train(
    dataset: Path = typer.Argument(..., exists=True, help="Dataset: device folders, manifest CSV, or CCNU-style folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (best.pt, last.pt, metrics.jsonl, learning_curve.png). "
                             "Run the same command again to resume."),
    arch: Optional[Arch] = typer.Option(None, "--arch", case_sensitive=False, help="Architecture (train.arch)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="train.epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="train.batch_size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="train.lr (divided by 1/lr_gamma every lr_step_epochs)."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop over training recordings (train.hop_seconds)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="train.seed"),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="Early stopping after N epochs without improvement; 0 = off."),
    augment: bool = typer.Option(False, "--augment", help="Random crop offset, gain (+-6 dB) and light noise each epoch."),
    split_groups: Optional[str] = SplitGroupsOption,
    torch_device: Optional[str] = TorchDeviceOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train a device classifier on DATASET (defaults: the paper's recipe, config section train)."""
    from devrecd.train import train_options

    cfg = load_cli_config(config, {"backend.device": torch_device})
    with option_values():
        opts = train_options(cfg.train, arch=choice(arch), epochs=epochs, batch_size=batch_size, lr=lr,
                             hop_seconds=hop_seconds, seed=seed, patience=patience, augment=augment or None)
    _run(dataset, out, cfg, opts, split_groups)


@command()
def finetune(
    checkpoint: Path = typer.Argument(..., exists=True, help="Pre-trained run directory or .pt file."),
    dataset: Path = typer.Argument(..., exists=True, help="Dataset of the new devices."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory of the fine-tuned model (resumable)."),
    trainable: Optional[Trainable] = typer.Option(None, "--trainable", case_sensitive=False,
                                                  help="softmax (new head only) | mlp (Dense(128)+head) | all "
                                                       "(train.finetune_trainable)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="train.finetune_epochs (Table IX: 300)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="train.finetune_batch_size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Constant learning rate (train.finetune_lr)."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="train.hop_seconds"),
    seed: Optional[int] = typer.Option(None, "--seed", help="train.seed"),
    patience: Optional[int] = typer.Option(None, "--patience", min=0, help="train.patience; 0 = off."),
    augment: bool = typer.Option(False, "--augment", help="As for train."),
    split_groups: Optional[str] = SplitGroupsOption,
    torch_device: Optional[str] = TorchDeviceOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Transfer a trained network to new devices: a new classifier head for DATASET's labels (Table IX)."""
    from devrecd.train import finetune_options

    cfg = load_cli_config(config, {"backend.device": torch_device})
    with option_values():
        opts = finetune_options(cfg.train, epochs=epochs, batch_size=batch_size, lr=lr,
                                finetune_trainable=choice(trainable), hop_seconds=hop_seconds, seed=seed,
                                patience=patience, augment=augment or None)
    _run(dataset, out, cfg, opts, split_groups, init=checkpoint)


@command()
def evaluate(
    checkpoint: Path = typer.Argument(..., exists=True, help="Run directory (its best.pt) or a .pt checkpoint."),
    dataset: Path = typer.Argument(..., exists=True),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.json, per_device.csv, confusion matrices."),
    split: SplitName = typer.Option(SplitName.test, "--split", case_sensitive=False, help="Split to score."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop (default audio.hop_seconds, as served)."),
    split_groups: Optional[str] = SplitGroupsOption,
    torch_device: Optional[str] = TorchDeviceOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Accuracy and macro precision/recall/F1 per window and per recording, confusion matrices."""
    from devrecd.evaluation import evaluate_checkpoint, summary_line, write_report
    from devrecd.stages import resolve_device
    from devrecd.train_data import open_dataset

    cfg = load_cli_config(config, {"backend.device": torch_device})
    ds = open_dataset(dataset, cfg, split_groups)
    with progress(len(ds.subset(split.value)), "evaluate", unit="recording") as bar:
        rep, recs = evaluate_checkpoint(checkpoint, ds, cfg, split=split.value, hop_seconds=hop_seconds,
                                        device=resolve_device(cfg.backend.device), on_recording=lambda _: bar.update(1))
    path = write_report(rep, out, recs)
    typer.echo(summary_line(rep))
    typer.echo(f"report -> {path}")


@command()
def baseline(
    name: Baseline = typer.Argument(..., case_sensitive=False, help="Which baseline."),
    dataset: Path = typer.Argument(..., exists=True),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (same format as evaluate)."),
    split: SplitName = typer.Option(SplitName.test, "--split", case_sensitive=False, help="Split to score (fitted on train)."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop (default audio.hop_seconds)."),
    split_groups: Optional[str] = SplitGroupsOption,
    seed: Optional[int] = typer.Option(None, "--seed", help="train.seed"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Fit a classical baseline (Table V) on the train split and report it like evaluate."""
    from devrecd.evaluation import evaluate_baseline, summary_line, write_report
    from devrecd.train_data import open_dataset

    cfg = load_cli_config(config)
    ds = open_dataset(dataset, cfg, split_groups)
    rep, recs = evaluate_baseline(name.value, ds, cfg, split=split.value, hop_seconds=hop_seconds,
                                  seed=cfg.train.seed if seed is None else seed)
    path = write_report(rep, out, recs)
    typer.echo(summary_line(rep))
    typer.echo(f"report -> {path}")


@command("train-embedder")
def train_embedder(
    datasets: List[Path] = typer.Argument(..., exists=True, help="Datasets of known devices (real folders, "
                                                                 "`devrecd synth` corpora); several are merged."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (resumable, like train)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="train.embedder_epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="train.embedder_batch_size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="train.embedder_lr (multiplied by train.lr_gamma every "
                                                          "--lr-step-epochs)."),
    lr_step_epochs: Optional[int] = typer.Option(None, "--lr-step-epochs", min=1, help="train.embedder_lr_step_epochs"),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop over training recordings "
                                                                            "(train.embedder_hop_seconds)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="train.seed"),
    augment: bool = typer.Option(False, "--augment", help="As for train."),
    split_groups: Optional[str] = SplitGroupsOption,
    torch_device: Optional[str] = TorchDeviceOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train an open-set embedder (arch asp, AAM-softmax) for `devrecd enroll --model RUN`."""
    from devrecd.stages import resolve_device
    from devrecd.train import embedder_options, train
    from devrecd.train_data import merge_datasets, open_dataset

    cfg = load_cli_config(config, {"backend.device": torch_device})
    with option_values():
        opts = embedder_options(cfg.train, epochs=epochs, batch_size=batch_size, lr=lr, lr_step_epochs=lr_step_epochs,
                                hop_seconds=hop_seconds, seed=seed, augment=augment or None)
    ds = merge_datasets([open_dataset(p, cfg, split_groups) for p in datasets])
    typer.echo(f"{len(ds.items)} recordings of {len(ds.labels)} devices")
    on_step, on_epoch, close = _progress("train-embedder")
    try:
        result = train(ds, out, cfg, opts, device=resolve_device(cfg.backend.device), on_step=on_step, on_epoch=on_epoch)
    finally:
        close()
    typer.echo(f"done after {result.epochs_run} epochs; best epoch {result.best_epoch} -> {out / 'best.pt'}")
