"""Metrics and reports for any classifier of windows: the networks and the classical baselines.

A recording's score vector is the mean of its windows' log-probabilities (a product of window
likelihoods, i.e. independent windows). Both levels are reported: ``window`` (every window
judged alone) and ``recording``; each with accuracy and macro precision / recall / F1 (the
paper's metrics) and a per-device table.

Report directory::

    report.json                 {"window": {...}, "recording": {...}, "labels": [...], "source": {...}}
    per_device.csv              device, level, precision, recall, f1, support
    confusion_window.csv/.png   rows = true device, columns = predicted device
    confusion_recording.csv/.png
    predictions.csv             one row per recording: path, true, predicted, score, windows, window accuracy
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.fsutil import atomic_write

EPS = 1e-12  # probabilities -> log without -inf (SVM probabilities can be exactly 0)


@dataclass
class RecordingScores:
    """One recording's window log-probabilities over ``labels``."""

    path: str
    device: str  # the true label
    log_probs: np.ndarray  # (n_windows, n_labels)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 over the devices present in ``y_true``, per-device table, confusion."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    present = sorted(set(y_true.tolist()))
    # Macro over the devices under test: a model label with no test recording would add a 0/0.
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    conf = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "precision": float(np.mean(p)) if present else 0.0,
        "recall": float(np.mean(r)) if present else 0.0,
        "f1": float(np.mean(f)) if present else 0.0,
        "n": int(len(y_true)),
        "per_device": {labels[c]: {"precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
                       for c, pi, ri, fi, si in zip(present, p, r, f, s)},
        "confusion": conf.tolist(),
    }


def score_report(recordings: Sequence[RecordingScores], labels: Sequence[str]) -> dict[str, Any]:
    """Window- and recording-level metrics for scored recordings."""
    if not recordings:
        raise DatasetError("nothing to evaluate: the split has no recordings", reason="dataset_empty_split")
    index = {d: i for i, d in enumerate(labels)}
    unknown = sorted({r.device for r in recordings} - set(index))
    if unknown:
        raise DatasetError(f"device(s) {', '.join(unknown[:5])} are not among the classifier's labels "
                           f"({', '.join(labels[:5])}...)", reason="dataset_labels")
    yw_true = np.concatenate([np.full(len(r.log_probs), index[r.device]) for r in recordings])
    yw_pred = np.concatenate([r.log_probs.argmax(axis=1) for r in recordings])
    yr_true = [index[r.device] for r in recordings]
    yr_pred = [int(r.log_probs.mean(axis=0).argmax()) for r in recordings]
    return {"window": classification_metrics(yw_true, yw_pred, labels),
            "recording": classification_metrics(yr_true, yr_pred, labels),
            "labels": list(labels)}


def score_recordings(items: Sequence[Any], features: Callable[[Any], np.ndarray],
                     predict_log_proba: Callable[[np.ndarray], np.ndarray]) -> list[RecordingScores]:
    """Apply a window classifier to each item's features (``items`` have ``.path`` and ``.device``)."""
    out = []
    for it in items:
        lp = np.asarray(predict_log_proba(features(it)), dtype=np.float64)
        out.append(RecordingScores(str(it.path), it.device, lp))
    return out


def network_log_proba(ckpt: Any, *, device: str = "cpu", batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """Window classifier of a checkpoint: raw (n, 128, 73) features -> (n, labels) log-probabilities."""
    import torch

    model = ckpt.build().to(device)

    def predict(feats: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(feats), batch):
                x = torch.from_numpy(np.ascontiguousarray(ckpt.normalise(feats[start:start + batch]), dtype=np.float32))
                out.append(torch.log_softmax(model(x.to(device)), dim=1).cpu().numpy())
        return np.concatenate(out)

    return predict


def proba_to_log(predict_proba: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A ``predict_proba`` (e.g. scikit-learn's) as log-probabilities."""
    return lambda feats: np.log(np.maximum(predict_proba(feats), EPS))


def write_report(report: dict[str, Any], out_dir: str | Path, recordings: Sequence[RecordingScores] = ()) -> Path:
    """Write report.json, per_device.csv, confusion CSV/PNG per level and predictions.csv; returns report.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = report["labels"]
    with open(out / "per_device.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["device", "level", "precision", "recall", "f1", "support"])
        for level in ("window", "recording"):
            for dev, m in report[level]["per_device"].items():
                w.writerow([dev, level, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]])
    for level in ("window", "recording"):
        conf = np.asarray(report[level]["confusion"])
        with open(out / f"confusion_{level}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["true \\ predicted", *labels])
            for lab, row in zip(labels, conf):
                w.writerow([lab, *row.tolist()])
        plot_confusion(conf, labels, out / f"confusion_{level}.png",
                       f"{level}s: accuracy {report[level]['accuracy']:.1%}, macro F1 {report[level]['f1']:.3f}")
    if recordings:
        with open(out / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "true", "predicted", "mean_log_prob", "windows", "window_accuracy"])
            for r in recordings:
                mean = r.log_probs.mean(axis=0)
                truth = labels.index(r.device)
                w.writerow([r.path, r.device, labels[int(mean.argmax())], f"{mean.max():.4f}", len(r.log_probs),
                            f"{np.mean(r.log_probs.argmax(axis=1) == truth):.4f}"])
    return atomic_write(out / "report.json", json.dumps(report, indent=1), fsync=False)


def plot_confusion(conf: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(labels)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            if conf[i, j]:
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_line(report: dict[str, Any]) -> str:
    """One line for the CLI: both levels' accuracy and macro F1."""
    w, r = report["window"], report["recording"]
    return (f"windows: accuracy {w['accuracy']:.2%} ({w['n']}), F1 {w['f1']:.3f} | "
            f"recordings: accuracy {r['accuracy']:.2%} ({r['n']}), F1 {r['f1']:.3f}")


def evaluate_checkpoint(checkpoint: str | Path, ds: Any, cfg: Any, *, split: str = "test",
                        hop_seconds: float | None = None, device: str = "cpu",
                        on_recording: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[RecordingScores]]:
    """Score a checkpoint (run directory or .pt) on one split of ``ds``; returns (report, recordings).
    ``on_recording(path)`` is called as each recording's features are ready (progress)."""
    from devrecd.data import FeatureCache
    from devrecd.model.checkpoint import load_checkpoint
    from devrecd.train import use_train_threads
    from devrecd.train_data import split_features

    ckpt = load_checkpoint(checkpoint)
    ckpt.check_compatible(frontend=cfg.frontend)
    use_train_threads(cfg.train)
    hop = cfg.audio.hop_seconds if hop_seconds is None else hop_seconds
    cache = FeatureCache(Path(cfg.train.cache_dir), ckpt.frontend, cfg.audio, device=device)
    # every file checked before scoring
    feats, items = split_features(ds, split, cache, hop, ckpt.labels, on_recording=on_recording)
    if not items:
        raise DatasetError(f"{ds.root}: the {split} split has no recordings", reason="dataset_empty_split")
    by_path = {str(it.path): f for it, f in zip(items, feats)}
    recs = score_recordings(items, lambda it: by_path[str(it.path)], network_log_proba(ckpt, device=device))
    report = score_report(recs, ckpt.labels)
    report["source"] = {"kind": "network", "arch": ckpt.arch, "checkpoint": str(checkpoint),
                        "epoch": ckpt.meta.get("epoch"), "dataset": str(ds.root), "split": split,
                        "hop_seconds": hop, "dataset_sha256": ds.manifest_sha256}
    return report, recs


def evaluate_baseline(name: str, ds: Any, cfg: Any, *, split: str = "test", hop_seconds: float | None = None,
                      train_hop_seconds: float | None = None, seed: int = 0) -> tuple[dict[str, Any], list[RecordingScores]]:
    """Fit a classical baseline on the train split and score it on ``split`` (same features, same report)."""
    from devrecd.baselines import make_baseline
    from devrecd.data import FeatureCache
    from devrecd.train_data import check_training_data, split_features

    check_training_data(ds)
    clf = make_baseline(name, seed=seed)
    hop = cfg.audio.hop_seconds if hop_seconds is None else hop_seconds
    cache = FeatureCache(Path(cfg.train.cache_dir), cfg.frontend, cfg.audio)
    train_feats, train_items = split_features(ds, "train", cache, hop if train_hop_seconds is None else train_hop_seconds,
                                              ds.labels)
    feats, items = split_features(ds, split, cache, hop, ds.labels)
    if not items:
        raise DatasetError(f"{ds.root}: the {split} split has no recordings", reason="dataset_empty_split")
    clf.fit(train_feats, [it.device for it in train_items])
    labels = [str(c) for c in clf.classes_]
    by_path = {str(it.path): f for it, f in zip(items, feats)}
    recs = score_recordings(items, lambda it: by_path[str(it.path)], proba_to_log(clf.predict_proba))
    report = score_report(recs, labels)
    report["source"] = {"kind": "baseline", "name": name, "dataset": str(ds.root), "split": split,
                        "hop_seconds": hop, "dataset_sha256": ds.manifest_sha256}
    return report, recs
