"""Accuracy of networks and classical baselines on one corpus and split, all in one run.

Trains each ``--archs`` entry (``paper``, the ablation groups ``group1``..``group7`` of Tables VII
and VIII, ...) with one recipe and seed through the same code as ``devrecd train`` (optionally
fine-tuning from ``--init``, the paper's transfer recipe), fits each ``--baselines`` entry
(``mfcc-svm``, ``gsv-svm``) on the same train split, scores everything on the test split like
``devrecd evaluate`` and prints one table; for the ablation groups the paper's figures (CCNU_Mobile,
45 phones) are printed beside ours. Run directories and reports are kept under ``--out``; an
interrupted run resumes (finished networks are only re-scored).

    # the real-phone experiment (segments 1-3 train, 4-5 test), 4 s windows:
    DEVRECD_FRONTEND__CLIP_SECONDS=4 python benchmarks/accuracy.py ../shared/data/ccnu_mobile_sample \\
        --split-groups ccnu --out runs/ccnu --epochs 30 --hop-seconds 0.5
    # the ablation table:
    python benchmarks/accuracy.py ... --archs group1,group2,group3,group4,group5,group6,group7 --baselines ""
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from devrecd.config import load_config
from devrecd.evaluation import evaluate_baseline, evaluate_checkpoint, write_report
from devrecd.model.network import GROUPS
from devrecd.train import train, train_options
from devrecd.train_data import open_dataset

# Tables VII and VIII of the paper (accuracy, precision, recall, F1 in %, CCNU_Mobile, 45 phones).
PAPER = {
    "group1": (96.3, 96.4, 96.3, 96.3), "group2": (97.9, 98.0, 97.9, 97.9), "group3": (97.5, 97.5, 97.4, 97.4),
    "group4": (99.6, 99.6, 99.6, 99.6), "group5": (97.8, 97.8, 97.8, 97.7), "group6": (60.4, 62.5, 60.4, 59.5),
    "group7": (98.9, 98.8, 98.8, 98.8), "paper": (99.6, 99.6, 99.6, 99.6),
}
BLOCKS = ("ConvLSTM", "BiLSTM", "Transformer")


def describe(name: str) -> str:
    if name in GROUPS:
        return " + ".join(b for b, on in zip(BLOCKS, GROUPS[name]) if on)
    return "baseline" if name.endswith("-svm") else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split-groups", default=None, help="'ccnu' or e.g. 'train=1,2 test=3' (default: the dataset's split)")
    ap.add_argument("--archs", default="paper", help="comma-separated architectures to train")
    ap.add_argument("--baselines", default="mfcc-svm,gsv-svm", help="comma-separated baselines ('' for none)")
    ap.add_argument("--init", type=Path, default=None, help="fine-tune every network from this checkpoint (all layers)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hop-seconds", type=float, default=0.5, help="window hop over training recordings")
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = load_config(None)
    ds = open_dataset(args.dataset, cfg, args.split_groups)
    rows: list[tuple[str, dict, float, str]] = []
    for arch in filter(None, args.archs.split(",")):
        run = args.out / arch
        opts = train_options(cfg.train, arch=arch, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, hop_seconds=args.hop_seconds, seed=args.seed, patience=0,
                             augment=args.augment)
        t0 = time.perf_counter()
        result = train(ds, run, cfg, opts, init=args.init)
        wall = time.perf_counter() - t0
        report, recs = evaluate_checkpoint(run, ds, cfg)
        write_report(report, run / "report", recs)
        rows.append((arch, report, wall, f"{result.epochs_run} epochs, best {result.best_epoch}"))
        print(f"{arch}: {summary(report)} ({wall:.0f} s)", flush=True)
    for name in filter(None, args.baselines.split(",")):
        t0 = time.perf_counter()
        report, recs = evaluate_baseline(name, ds, cfg, seed=args.seed)
        wall = time.perf_counter() - t0
        write_report(report, args.out / name / "report", recs)
        rows.append((name, report, wall, "fit on the train split"))
        print(f"{name}: {summary(report)} ({wall:.0f} s)", flush=True)

    print(f"\n{args.dataset} ({ds.layout}), test split; frontend clip {cfg.frontend.clip_seconds:g} s, scoring hop "
          f"{cfg.audio.hop_seconds:g} s; networks: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"train hop {args.hop_seconds} s, seed {args.seed}{', augment' if args.augment else ''}"
          f"{f', fine-tuned from {args.init}' if args.init else ''}")
    print("| model | blocks | windows acc | windows P / R / F1 | recordings acc | time | paper acc / P / R / F1 (45 phones) |")
    print("|---|---|---|---|---|---|---|")
    for name, report, wall, note in rows:
        w, r = report["window"], report["recording"]
        paper = " / ".join(f"{v:.1f}" for v in PAPER[name]) if name in PAPER else ""
        print(f"| {name} | {describe(name)} | {pct(w['accuracy'])} | {pct(w['precision'])} / {pct(w['recall'])} / "
              f"{pct(w['f1'])} | {pct(r['accuracy'])} | {wall:.0f} s ({note}) | {paper} |")
    (args.out / "summary.json").write_text(json.dumps({n: {"window": rep["window"]["accuracy"], "recording": rep["recording"]["accuracy"],
                                                            "seconds": wall} for n, rep, wall, _ in rows}, indent=2))
    return 0


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary(report: dict) -> str:
    w, r = report["window"], report["recording"]
    return f"windows {pct(w['accuracy'])} (F1 {w['f1']:.3f}), recordings {pct(r['accuracy'])}"


if __name__ == "__main__":
    sys.exit(main())
