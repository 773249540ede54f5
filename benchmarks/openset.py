"""Open-set benchmark (issue 9): enrol devices the embedder never saw, and reject devices nobody enrolled.

Real phones (``../shared/data/ccnu_mobile_sample``, segments 1-3 = references, 4-5 = questioned):

1. Train the embedder on 10 of the 15 phones (segments 1-3 only); 5 phones are held out of training.
2. Enrol ALL 15 phones from segments 1-3 (no retraining).
3. Calibrate on the references only (leave one segment out: profiles from two segments, trials
   from the third), so the questioned segments 4-5 never touch the threshold.
4. Questioned segments 4-5: rank-1 accuracy against all 15 profiles (seen vs never-seen phones),
   and, phone by phone, a registry WITHOUT that phone: is its recording called "unknown device"
   at the calibrated threshold, and are the enrolled phones still identified and accepted?
5. Baseline in the same run: closed-set classifiers retrained on the same references, same split
   (the same network and loop trained on all 15 phones, and the MFCC-SVM / GSV-SVM baselines).

With ``--synth DIR`` (a ``devrecd synth`` corpus) the same protocol runs on simulated devices: half
of them join the embedder's training, the other half are never seen in training.

Run:  nice python benchmarks/openset.py [--epochs 40] [--synth /tmp/sim]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devrecd.baselines import make_baseline, recording_accuracy
from devrecd.config import load_config
from devrecd.data import CCNU_SPLIT, FeatureCache, load_dataset
from devrecd.openset.calibration import calibrate, cllr, eer, min_dcf
from devrecd.openset.registry import Reference, Registry, recording_embedding
from devrecd.openset.scoring import UNKNOWN, identify_with_registry, score_matrix
from devrecd.openset.training import train_embedder
from devrecd.openset.workflow import Trials

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Rec:
    path: str
    device: str
    group: str
    split: str
    feats: np.ndarray  # (windows, 128, 73)
    sha256: str


def load(path: Path, cache: FeatureCache, hop: float, split_by_group=None) -> list[Rec]:
    ds = load_dataset(path, split_by_group=split_by_group)
    out = []
    for it in ds.items:
        feats, sha = cache.features(it.path, hop)
        out.append(Rec(str(it.path), it.device, it.group, it.split, feats, sha))
    return out


def build_registry(embedder, refs: list[Rec], emb_cache: dict[str, np.ndarray], where: Path) -> Registry:
    reg = Registry(path=where / "registry.json")
    by_device: dict[str, list[Rec]] = {}
    for r in refs:
        by_device.setdefault(r.device, []).append(r)
    for dev, rs in sorted(by_device.items()):
        reg.enroll(dev, embedder.describe(), [(Reference(r.sha256, r.path, len(r.feats), 0.0, ""), emb_cache[r.path])
                                               for r in rs])
    return reg


def evaluate(name: str, seen_devices: set[str], train: list[Rec], test: list[Rec], embedder, far: float,
             where: Path) -> dict:
    """Steps 2-4 of the module docstring for one corpus."""
    emb = {r.path: embedder.embed_features(r.feats) for r in train + test}
    # 3. calibration on the references: leave one group out.
    groups = sorted({r.group for r in train})
    folds = []
    for g in groups:
        reg = build_registry(embedder, [r for r in train if r.group != g], emb, where)
        held = [r for r in train if r.group == g and r.device in reg.profiles]
        names, s = score_matrix(np.stack([recording_embedding(emb[r.path]) for r in held]), reg)
        folds.append(Trials(names, [r.path for r in held], [r.device for r in held], s))
    cal = calibrate(*(np.concatenate([getattr(f, a) for f in folds])
                      for a in ("target_scores", "nontarget_scores")),
                    open_set_nontarget=np.concatenate([f.open_set_scores for f in folds]), target_far=far)
    # The same fit with the threshold chosen on single non-target trials (the naive basis), for comparison.
    naive = calibrate(*(np.concatenate([getattr(f, a) for f in folds]) for a in ("target_scores", "nontarget_scores")),
                      target_far=far)
    full = build_registry(embedder, train, emb, where)
    full.set_calibration(cal, {})
    # 4a. every questioned recording against all enrolled devices.
    verdicts = [(r, identify_with_registry(emb[r.path], full, threshold=cal.threshold)) for r in test]

    def rate(pred, rows) -> float:
        rows = list(rows)
        return float(np.mean([pred(r, v) for r, v in rows])) if rows else float("nan")

    rank1 = lambda r, v: v["candidate"] == r.device  # noqa: E731
    accepted_right = lambda r, v: v["device"] == r.device  # noqa: E731
    names, s = score_matrix(np.stack([recording_embedding(emb[r.path]) for r in test]), full)
    is_t = np.array([[r.device == n for n in names] for r in test])
    res = {
        "corpus": name,
        "devices_enrolled": len(full.names), "devices_seen_in_training": len(seen_devices),
        "questioned_recordings": len(test),
        "rank1_seen": rate(rank1, [(r, v) for r, v in verdicts if r.device in seen_devices]),
        "rank1_unseen": rate(rank1, [(r, v) for r, v in verdicts if r.device not in seen_devices]),
        "rank1_all": rate(rank1, verdicts),
        "accepted_correct_all": rate(accepted_right, verdicts),
        "calibration": {k: round(v, 4) if isinstance(v, float) else v for k, v in cal.to_dict().items()},
        "test_trials": {"eer": eer(s[is_t], s[~is_t]), "min_dcf": min_dcf(s[is_t], s[~is_t]),
                        "cllr": cllr(cal.llr(s[is_t]), cal.llr(s[~is_t])), "n_target": int(is_t.sum()),
                        "n_nontarget": int((~is_t).sum())},
    }
    # 4b. open set: each never-seen device in turn is NOT enrolled.
    for basis, thr in (("", cal.threshold), ("pairwise_threshold_", naive.threshold)):
        unknown_ok, known_ok = [], []
        for dev in sorted({r.device for r in test} - seen_devices):
            reg = build_registry(embedder, [r for r in train if r.device != dev], emb, where)
            for r in test:
                v = identify_with_registry(emb[r.path], reg, threshold=thr)
                (unknown_ok if r.device == dev else known_ok).append(
                    v["device"] == UNKNOWN if r.device == dev else v["device"] == r.device)
        res[basis + "threshold"] = thr
        res[basis + "unenrolled_called_unknown"] = float(np.mean(unknown_ok)) if unknown_ok else float("nan")
        res[basis + "enrolled_accepted_correct_when_one_left_out"] = float(np.mean(known_ok)) if known_ok else float("nan")
    res["unenrolled_trials"] = len(unknown_ok)
    return res


def closed_set(train: list[Rec], test: list[Rec], args, frontend) -> dict:
    """Baselines retrained on the same references: the same network closed-set on all devices, and SVMs."""
    out = {}
    t0 = time.perf_counter()
    net = train_embedder([r.feats for r in train], [r.device for r in train], frontend=frontend, arch=args.arch,
                         epochs=args.epochs, seed=args.seed)
    import torch

    with torch.no_grad():
        probas = [torch.softmax(net.model(torch.as_tensor((r.feats - net.norm_mean) / net.norm_std)), dim=1).numpy()
                  for r in test]
    win, rec = recording_accuracy(probas, [r.device for r in test], net.labels)
    out[f"{args.arch}-closed-set"] = {"window_accuracy": win, "recording_accuracy": rec,
                                      "train_seconds": round(time.perf_counter() - t0, 1)}
    for name in ("mfcc-svm", "gsv-svm"):
        t0 = time.perf_counter()
        model = make_baseline(name, seed=args.seed).fit([r.feats for r in train], [r.device for r in train])
        win, rec = recording_accuracy([model.predict_proba(r.feats) for r in test], [r.device for r in test],
                                      model.classes_)
        out[name] = {"window_accuracy": win, "recording_accuracy": rec,
                     "train_seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ccnu", type=Path, default=REPO.parent / "shared/data/ccnu_mobile_sample")
    ap.add_argument("--synth", type=Path, default=None, help="a devrecd synth corpus for the simulated-device run")
    ap.add_argument("--arch", default="asp")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--hop", type=float, default=0.5, help="window hop (s) for training, enrolment and test")
    ap.add_argument("--far", type=float, default=0.05, help="target false-acceptance rate of the threshold")
    ap.add_argument("--held-out", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_config()
    cache = FeatureCache(Path(cfg.train.cache_dir), cfg.frontend, cfg.audio)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    recs = load(args.ccnu, cache, args.hop, split_by_group=CCNU_SPLIT)
    train_all = [r for r in recs if r.split == "train"]
    test_all = [r for r in recs if r.split == "test"]
    phones = sorted({r.device for r in recs})
    held = set(phones[:: max(1, len(phones) // args.held_out)][: args.held_out])
    seen = set(phones) - held
    print(f"real phones: {len(phones)}; held out of training: {sorted(held)}", flush=True)

    sim_train, sim_seen, sim_recs = [], set(), []
    if args.synth:
        sim_recs = load(args.synth, cache, args.hop)
        sims = sorted({r.device for r in sim_recs})
        sim_seen = set(sims[::2])  # half the simulated devices join training, half are never seen
        sim_train = [r for r in sim_recs if r.device in sim_seen and r.split in ("train", "val")]
        print(f"simulated devices: {len(sims)}; {len(sim_seen)} in training", flush=True)

    t0 = time.perf_counter()
    train_set = [r for r in train_all if r.device in seen] + sim_train
    embedder = train_embedder([r.feats for r in train_set], [r.device for r in train_set], frontend=cfg.frontend,
                              arch=args.arch, epochs=args.epochs, seed=args.seed,
                              on_epoch=lambda e, l, a: print(f"  epoch {e}: loss {l:.3f} acc {a:.3f}", flush=True)
                              if e % 10 == 0 or e == 1 else None)
    report["embedder"] = {"arch": args.arch, "train_windows": int(sum(len(r.feats) for r in train_set)),
                          "train_seconds": round(time.perf_counter() - t0, 1), "devices": len(embedder.labels)}
    with tempfile.TemporaryDirectory() as tmp:
        report["real"] = evaluate("ccnu", seen, train_all, test_all, embedder, args.far, Path(tmp))
        if args.synth:
            # Simulated devices never seen in training: references = train split, questioned = test split.
            unseen = [r for r in sim_recs if r.device not in sim_seen]
            report["simulated_unseen"] = evaluate("synth", set(), [r for r in unseen if r.split == "train"],
                                                  [r for r in unseen if r.split == "test"], embedder, args.far,
                                                  Path(tmp))
    report["closed_set_baselines_same_split"] = closed_set(train_all, test_all, args, cfg.frontend)
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
