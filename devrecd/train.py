"""Training and fine-tuning (the paper's section V-E and Table IX), resumable and deterministic on the CPU.

``train(dataset, run_dir, cfg)``: features through the ONE frontend (cached by
:class:`devrecd.data.FeatureCache`), per-dimension normalisation statistics from the training
windows, Adam with a step learning-rate schedule, cross-entropy, validation every epoch, the best
checkpoint kept (``best.pt``), early stopping, and ``last.pt`` written atomically after every epoch
with the optimizer, scheduler and RNG states, so that running the same command again after Ctrl-C
or ``kill`` continues where the run stopped and ends with the same weights as an uninterrupted run.

``finetune(checkpoint, dataset, run_dir, cfg, trainable=...)``: the paper's transfer recipe: a new
classifier for the new label set, only the chosen layers trained (softmax, MLP+softmax, or all).

Run folder: ``best.pt``, ``last.pt``, ``metrics.jsonl`` (one JSON object per epoch) and
``curve.png`` (the learning curve). The library does not print: progress goes to callbacks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from devrecd.config import Config
from devrecd.errors import ArtifactError, DatasetError
from devrecd.features import SLICE_FBANK, SLICE_LOGE, FrontendConfig
from devrecd.model.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("devrecd.train")

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"
TRAINABLE = ("softmax", "mlp", "all")


# --- data ----------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """Raw (un-normalised) window features of one split, kept per recording."""

    feats: list[np.ndarray]  # each (windows, 128, 73) float32
    labels: list[int]  # index into the label list, one per recording
    paths: list[str]

    @property
    def windows(self) -> int:
        return sum(len(f) for f in self.feats)


def parse_split_groups(text: str | None) -> dict[str, list[str]] | None:
    """``"train=1,2,3 test=4,5"`` -> ``{"train": ["1","2","3"], "test": ["4","5"]}`` (None stays None)."""
    if not text:
        return None
    out: dict[str, list[str]] = {}
    for part in text.replace(";", " ").split():
        name, sep, groups = part.partition("=")
        if not sep or not groups:
            raise DatasetError(f"--split-groups: expected SPLIT=G1,G2,... items, got {part!r}", reason="dataset_split")
        out[name.strip()] = [g.strip() for g in groups.split(",") if g.strip()]
    return out


def load_split_dataset(path: str | os.PathLike, cfg: Config, *, split_groups: Mapping[str, Sequence[str]] | None = None):
    """:func:`devrecd.data.load_dataset` with the ``[train]`` split settings, checked for training."""
    from devrecd.data import load_dataset

    ds = load_dataset(path, ratios=cfg.train.split, seed=cfg.train.seed, split_by_group=split_groups)
    check_trainable(ds)
    return ds


def check_trainable(ds: Any) -> None:
    """Raise :class:`DatasetError` unless every device has training recordings and there are >= 2 devices."""
    if len(ds.labels) < 2:
        raise DatasetError(f"{ds.root}: {len(ds.labels)} device(s) found ({', '.join(ds.labels) or 'none'}); "
                           "telling devices apart needs at least two", reason="dataset_one_device")
    counts = ds.counts()
    missing = [d for d in ds.labels if counts[d]["train"] == 0]
    if missing:
        raise DatasetError(f"{ds.root}: device(s) {', '.join(missing[:5])} have no training recordings "
                           "(too few recordings for the split)", reason="dataset_split")


def split_features(ds: Any, split: str, cache: Any, hop_seconds: float, labels: Sequence[str]) -> SplitData:
    """Features of every recording of ``split``; every unreadable file is named in ONE error, up front."""
    from devrecd.audio import AudioError

    index = {lab: i for i, lab in enumerate(labels)}
    out = SplitData([], [], [])
    bad: list[str] = []
    for item in ds.subset(split):
        if item.device not in index:
            raise DatasetError(f"{item.path}: device {item.device!r} is not among the model's labels",
                               reason="dataset_labels")
        try:
            feats, _ = cache.features(item.path, hop_seconds)
        except AudioError as exc:
            bad.append(f"{item.path.name} ({exc.reason}: {exc})")
            continue
        if len(feats) == 0:
            bad.append(f"{item.path.name} (no complete window)")
            continue
        out.feats.append(feats)
        out.labels.append(index[item.device])
        out.paths.append(str(item.path))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} {split} recording(s) cannot be used: {'; '.join(bad[:3])}{more}",
                           reason="dataset_unreadable")
    return out


def feature_cache(cfg: Config, frontend: FrontendConfig, device: str) -> Any:
    """The shared on-disk feature cache for ``frontend``."""
    from devrecd.data import FeatureCache

    return FeatureCache(Path(cfg.train.cache_dir).expanduser(), frontend, cfg.audio, device=device)


def apply_gain(raw: Any, gain_db: Any) -> Any:
    """Features of the same windows recorded ``gain_db`` louder, computed exactly in feature space.

    A gain g scales the waveform, so energies scale by g^2: logE moves by 2 ln g and the pre-Fbank
    energies are multiplied by g^2. MFCC c1..c12 and all deltas are unchanged (the orthonormal DCT
    sends a constant log offset to c0 alone, which is dropped). Exact except where log_floor clamps.
    """
    import torch

    g2 = torch.pow(10.0, gain_db / 10.0).to(raw.dtype)  # (B,) power gain
    out = raw.clone()
    out[..., SLICE_LOGE] += torch.log(g2)[:, None, None]
    out[..., SLICE_FBANK] *= g2[:, None, None]
    return out


# --- results ---------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished (or early-stopped) run produced."""

    run_dir: Path
    best_epoch: int
    best: dict  # the metrics record of the best epoch
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0  # epochs already done when this call started


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    batch_size: int
    lr: float
    lr_step_epochs: int
    lr_gamma: float
    patience: int
    seed: int
    gain_db: float = 0.0
    windows_per_recording: int = 0


# --- public entry points ------------------------------------------------------------------------

def train(dataset: str | os.PathLike, run_dir: str | os.PathLike, cfg: Config, *,
          split_groups: Mapping[str, Sequence[str]] | None = None, hparams: dict | None = None,
          resume: bool = True, on_step: Callable[..., None] | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.train.arch`` on ``dataset`` into ``run_dir`` (resuming a compatible run found there)."""
    import torch

    from devrecd.model import build_model
    from devrecd.openset.training import normalisation_stats
    from devrecd.pipeline import resolve_device

    tc = cfg.train
    _set_threads(tc.threads)
    device = resolve_device(tc.device)
    hparams = dict(hparams or {})
    # Cheap checks first (architecture, run folder), then the dataset, then the features.
    torch.manual_seed(tc.seed)
    build_model(tc.arch, 2, **hparams)  # unknown arch / bad hparams fail here, before any feature work
    ds = load_split_dataset(dataset, cfg, split_groups=split_groups)
    labels = list(ds.labels)
    run = Path(run_dir)
    prior = _prior_run(run, resume)
    if prior is not None:
        _check_same_run(prior, arch=tc.arch, hparams=hparams, labels=labels, frontend=cfg.frontend,
                        dataset_sha256=ds.manifest_sha256)
    cache = feature_cache(cfg, cfg.frontend, device)
    data_train = split_features(ds, "train", cache, tc.hop_seconds, labels)
    data_val = split_features(ds, "val", cache, tc.hop_seconds, labels)
    mean, std = normalisation_stats(data_train.feats)
    torch.manual_seed(tc.seed)
    model = build_model(tc.arch, len(labels), **hparams)
    template = Checkpoint(arch=tc.arch, hparams=hparams, labels=labels, frontend=cfg.frontend, norm_mean=mean,
                          norm_std=std, state_dict={}, dataset_sha256=ds.manifest_sha256, split=_split_lists(ds),
                          meta={"train_config": asdict(tc), "dataset": str(ds.root), "layout": ds.layout})
    opts = FitOptions(tc.epochs, tc.batch_size, tc.lr, tc.lr_step_epochs, tc.lr_gamma, tc.patience, tc.seed,
                      tc.gain_db, tc.windows_per_recording)
    return _fit(model, list(model.parameters()), None, template, data_train, data_val, opts, run, device,
                prior, on_step, on_epoch)


def finetune(checkpoint: str | os.PathLike, dataset: str | os.PathLike, run_dir: str | os.PathLike, cfg: Config, *,
             trainable: str = "mlp", split_groups: Mapping[str, Sequence[str]] | None = None,
             epochs: int | None = None, resume: bool = True, on_step: Callable[..., None] | None = None,
             on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune a trained checkpoint on a new label set (the paper's Table IX recipe).

    The classifier (softmax layer) is replaced for the new labels; ``trainable`` says what learns:
    ``softmax`` (the new classifier only), ``mlp`` (Dense(128) + classifier) or ``all``. Frozen
    layers stay in eval mode (their BatchNorm statistics do not drift). The source checkpoint's
    frontend and normalisation are kept: the pre-trained layers expect exactly that input.
    """
    import torch
    from torch import nn

    from devrecd.audio import sha256_file
    from devrecd.model.checkpoint import checkpoint_file
    from devrecd.pipeline import resolve_device

    if trainable not in TRAINABLE:
        raise ArtifactError(f"--trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}", reason="bad_trainable")
    tc = cfg.train
    _set_threads(tc.threads)
    device = resolve_device(tc.device)
    source = load_checkpoint(checkpoint)
    model = source.build()
    if not isinstance(getattr(model, "classifier", None), nn.Linear) or not isinstance(getattr(model, "mlp", None), nn.Module):
        raise ArtifactError(f"architecture {source.arch!r} has no classifier/mlp layers to fine-tune", reason="checkpoint_arch")
    ds = load_split_dataset(dataset, cfg, split_groups=split_groups)
    labels = list(ds.labels)
    run = Path(run_dir)
    prior = _prior_run(run, resume)
    if prior is not None:
        _check_same_run(prior, arch=source.arch, hparams=source.hparams, labels=labels, frontend=source.frontend,
                        dataset_sha256=ds.manifest_sha256)
    cache = feature_cache(cfg, source.frontend, device)
    data_train = split_features(ds, "train", cache, tc.hop_seconds, labels)
    data_val = split_features(ds, "val", cache, tc.hop_seconds, labels)
    torch.manual_seed(tc.seed)
    model.classifier = nn.Linear(model.classifier.in_features, len(labels))
    modules = {"softmax": [model.classifier], "mlp": [model.mlp, model.classifier], "all": [model]}[trainable]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    src_file = checkpoint_file(checkpoint)
    template = Checkpoint(arch=source.arch, hparams=dict(source.hparams), labels=labels, frontend=source.frontend,
                          norm_mean=source.norm_mean, norm_std=source.norm_std, state_dict={},
                          dataset_sha256=ds.manifest_sha256, split=_split_lists(ds),
                          meta={"train_config": asdict(tc), "dataset": str(ds.root), "layout": ds.layout,
                                "finetuned_from": {"path": str(src_file.resolve()), "sha256": sha256_file(src_file),
                                                   "labels": source.labels, "trainable": trainable}})
    opts = FitOptions(epochs or tc.finetune_epochs, tc.finetune_batch_size, tc.finetune_lr, tc.lr_step_epochs,
                      tc.lr_gamma, tc.patience, tc.seed, tc.gain_db, tc.windows_per_recording)
    return _fit(model, params, None if trainable == "all" else modules, template, data_train, data_val, opts, run,
                device, prior, on_step, on_epoch)


# --- the loop ------------------------------------------------------------------------------------

def _fit(model: Any, params: list, train_modules: list | None, template: Checkpoint, data_train: SplitData,
         data_val: SplitData, opts: FitOptions, run: Path, device: str, prior: Checkpoint | None,
         on_step: Callable[..., None] | None, on_epoch: Callable[[dict], None] | None) -> TrainResult:
    import torch
    from torch.nn import functional as F

    run.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, opts.lr_step_epochs), gamma=opts.lr_gamma)
    gen = torch.Generator().manual_seed(opts.seed)  # shuffling, window sampling, gains
    mean = torch.as_tensor(template.norm_mean, device=device)
    std = torch.as_tensor(template.norm_std, device=device)
    x_train = torch.as_tensor(np.concatenate(data_train.feats))  # raw features, normalised per batch
    y_train = torch.as_tensor(np.repeat(data_train.labels, [len(f) for f in data_train.feats]))
    rec_of = np.repeat(np.arange(len(data_train.feats)), [len(f) for f in data_train.feats])
    starts = np.concatenate([[0], np.cumsum([len(f) for f in data_train.feats])])
    has_val = data_val.windows > 0
    if not has_val:
        log.warning("no validation recordings: the best checkpoint is chosen by training loss")

    history: list[dict] = []
    start_epoch, best_key, best_epoch, bad_epochs = 0, None, 0, 0
    if prior is not None:
        model.load_state_dict(prior.state_dict)
        state = prior.resume or {}
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_epoch, bad_epochs = state["epoch"], state["best_epoch"], state["bad_epochs"]
        best_key = tuple(state["best_key"]) if state.get("best_key") is not None else None
        history = _read_history(run, start_epoch)
        if state.get("finished"):
            return _result(run, history, best_epoch, start_epoch, state.get("stopped_early", False), start_epoch)
        log.info("resuming run", extra={"run": str(run), "epoch": start_epoch})
    else:
        (run / METRICS_FILE).unlink(missing_ok=True)

    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch + 1, opts.epochs + 1):
        t0 = time.perf_counter()
        model.train() if train_modules is None else _train_only(model, train_modules)
        order = _epoch_order(gen, rec_of, starts, opts.windows_per_recording)
        n_total, loss_sum, correct = len(order), 0.0, 0
        done = 0
        for i in range(0, n_total, opts.batch_size):
            idx = order[i:i + opts.batch_size]
            if len(idx) < 2 and n_total >= 2:
                continue  # BatchNorm cannot train on one window
            raw = x_train[idx]
            if opts.gain_db > 0:
                raw = apply_gain(raw, (torch.rand(len(idx), generator=gen) * 2 - 1) * opts.gain_db)
            x = (raw.to(device) - mean) / std
            y = y_train[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            done += len(idx)
            if on_step is not None:
                on_step(epoch=epoch, done=done, total=n_total, loss=loss_sum / done, acc=correct / done,
                        clips_per_s=done / max(1e-9, time.perf_counter() - t0))
        train_seconds = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(1, done), "train_acc": correct / max(1, done),
                  "train_windows": done, "train_seconds": round(train_seconds, 3),
                  "clips_per_s": round(done / max(1e-9, train_seconds), 2)}
        if has_val:
            record.update(_validate(model, data_val, mean, std, device, opts.batch_size))
        record["seconds"] = round(time.perf_counter() - t0, 3)
        key = (record["val_acc"], -record["val_loss"]) if has_val else (record["train_acc"], -record["train_loss"])
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch, bad_epochs = key, epoch, 0
        else:
            bad_epochs += 1
        record["best"] = improved
        history.append(record)
        with open(run / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        stopped_early = opts.patience > 0 and bad_epochs >= opts.patience
        finished = stopped_early or epoch == opts.epochs
        meta = {**template.meta, "epoch": epoch, "metrics": record, "seed": opts.seed, "versions": _versions(),
                "device": device, "fit": asdict(opts)}
        ckpt = Checkpoint(**{**vars(template), "state_dict": model.state_dict(), "meta": meta, "resume": None})
        if improved:
            save_checkpoint(run / BEST, ckpt)
        ckpt.resume = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                       "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                       "best_key": list(best_key) if best_key is not None else None,
                       "finished": finished, "stopped_early": stopped_early}
        save_checkpoint(run / LAST, ckpt)  # after best.pt: a kill in between loses nothing
        _plot_curve(run / CURVE_FILE, history)
        if on_epoch is not None:
            on_epoch(record)
        if stopped_early:
            log.info("early stop", extra={"epoch": epoch, "best_epoch": best_epoch, "patience": opts.patience})
            break
    return _result(run, history, best_epoch, epoch, stopped_early, start_epoch)


def _validate(model: Any, data: SplitData, mean: Any, std: Any, device: str, batch: int) -> dict:
    """Window loss/accuracy and recording accuracy (mean window log-probabilities) on ``data``."""
    import torch
    from torch.nn import functional as F

    model.eval()
    logp = predict_log_probs(model, data.feats, mean, std, device, batch)
    y = np.repeat(data.labels, [len(f) for f in data.feats])
    all_lp = np.concatenate(logp)
    loss = float(F.nll_loss(torch.from_numpy(all_lp), torch.from_numpy(y)).item())
    rec_ok = [int(lp.mean(0).argmax() == lab) for lp, lab in zip(logp, data.labels)]
    return {"val_loss": loss, "val_acc": float((all_lp.argmax(1) == y).mean()),
            "val_recording_acc": float(np.mean(rec_ok)), "val_windows": int(len(y))}


def predict_log_probs(model: Any, feats: Sequence[np.ndarray], mean: Any, std: Any, device: str,
                      batch: int = 64) -> list[np.ndarray]:
    """Per recording, (windows, N) log-probabilities of raw ``feats`` under an eval-mode ``model``."""
    import torch

    mean = torch.as_tensor(mean, device=device)
    std = torch.as_tensor(std, device=device)
    flat = np.concatenate(feats)
    out = []
    with torch.inference_mode():
        for i in range(0, len(flat), batch):
            x = (torch.as_tensor(flat[i:i + batch], device=device) - mean) / std
            out.append(torch.log_softmax(model(x).float(), dim=1).cpu().numpy())
    lp = np.concatenate(out)
    bounds = np.cumsum([len(f) for f in feats])[:-1]
    return np.split(lp, bounds)


def _epoch_order(gen: Any, rec_of: np.ndarray, starts: np.ndarray, per_recording: int) -> Any:
    """Shuffled window indices for one epoch; with ``per_recording`` a fresh random subset of each recording."""
    import torch

    if per_recording <= 0:
        return torch.randperm(len(rec_of), generator=gen)
    chosen = []
    for r in range(len(starts) - 1):
        n = int(starts[r + 1] - starts[r])
        pick = torch.randperm(n, generator=gen)[:per_recording]
        chosen.append(pick + int(starts[r]))
    idx = torch.cat(chosen)
    return idx[torch.randperm(len(idx), generator=gen)]


def _train_only(model: Any, modules: list) -> None:
    model.eval()  # frozen layers: no BatchNorm statistic updates, no dropout
    for m in modules:
        m.train()


# --- run folder ----------------------------------------------------------------------------------

def _prior_run(run: Path, resume: bool) -> Checkpoint | None:
    last = run / LAST
    if not last.exists():
        return None
    if not resume:
        raise ArtifactError(f"{run} already holds a run; resume it, or choose another --out", reason="run_exists")
    prior = load_checkpoint(last)
    if not prior.resume:
        raise ArtifactError(f"{last} has no resume state", reason="checkpoint_corrupt")
    return prior


def _check_same_run(prior: Checkpoint, *, arch: str, hparams: dict, labels: list[str], frontend: FrontendConfig,
                    dataset_sha256: str) -> None:
    """A run folder is resumed only by the same experiment; anything else is refused before work starts."""
    prior.check_compatible(arch=arch, frontend=frontend)
    if prior.hparams != json.loads(json.dumps(hparams)):
        raise ArtifactError(f"the run in this folder used hyper-parameters {prior.hparams}, not {hparams}",
                            reason="run_mismatch")
    if prior.labels != labels or prior.dataset_sha256 != dataset_sha256:
        raise ArtifactError("the run in this folder was trained on another dataset or split; choose another --out",
                            reason="run_mismatch")


def _read_history(run: Path, upto: int) -> list[dict]:
    """metrics.jsonl up to epoch ``upto`` (a kill can leave records of an epoch whose last.pt was not written)."""
    path = run / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["epoch"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def _result(run: Path, history: list[dict], best_epoch: int, epochs_run: int, stopped_early: bool,
            resumed_from: int) -> TrainResult:
    best = next((r for r in history if r["epoch"] == best_epoch), {})
    return TrainResult(run, best_epoch, best, epochs_run, stopped_early, history, resumed_from)


def _split_lists(ds: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path, split in ds.split_map().items():
        out.setdefault(split, []).append(path)
    return out


def _plot_curve(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch (train and, when present, validation)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax2.plot(epochs, [r["train_acc"] for r in history], label="train")
    if history and "val_loss" in history[0]:
        ax1.plot(epochs, [r["val_loss"] for r in history], label="validation")
        ax2.plot(epochs, [r["val_acc"] for r in history], label="validation (windows)")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _set_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _versions() -> dict[str, str]:
    import torch

    from devrecd import __version__

    return {"devrecd": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


__all__ = ["FitOptions", "SplitData", "TrainResult", "apply_gain", "check_trainable", "feature_cache", "finetune",
           "load_split_dataset", "parse_split_groups", "predict_log_probs", "split_features", "train"]
