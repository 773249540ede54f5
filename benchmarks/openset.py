"""Open-set benchmark on phones no trained part has seen (leave-phones-out, :mod:`devrecd.openset.protocol`).

Real phones (``../shared/data/ccnu_mobile_sample``: 15 phones x 5 segments of different speech):

* Folds: per seed, the 15 phones are shuffled into ``--folds`` test groups; each fold trains on
  the other phones (development) and is measured on its test phones. Every phone is unseen in one
  fold per seed.
* Trained on the development phones only: the GMM-UBM (and NAP) of the supervector scorer, the
  network embedder (``--epochs`` > 0: ``asp`` with the AAM-softmax), the S-norm cohort, the fusion
  weights (logistic regression on development trials) and the calibration (LLR map + the open-set
  threshold for ``--far``, chosen on the development phones' open-set impostor scores).
* Test phones: enrolled from segments 1-2, questioned = segments 3-5 (different speech). Pairwise
  trials (every questioned recording x every test profile) give EER / minDCF / Cllr / Cllr_min of
  the calibrated LLRs (pooled over folds and seeds); the open-set verdicts leave each test phone
  out of the registry in turn: its recordings must be called unknown, the others named and accepted.
* Systems side by side, same folds, same run: ``gsv`` (the baseline: 64-mixture UBM, MAP means,
  cosine), ``gsv+nap<k>`` (within-device directions of the development data projected out), each
  with and without S-norm against the development recordings, the network, and the fusion of the
  network with each supervector system. Each with three open-set threshold rules (see ``Pool``);
  the shipped scorer (``devrecd train-gsv --nap 16 --threshold-rule llr0``) is ``gsv+nap16 @llr0``.

Run:  nice python benchmarks/openset.py [--epochs 10] [--seeds 0,1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import load_config
from devrecd.data import FeatureCache, load_dataset
from devrecd.openset.calibration import Decision
from devrecd.openset.gsv import GsvScorer, fit_nap
from devrecd.openset.gsvtrain import calibrate_blocks
from devrecd.openset.protocol import (QUESTIONED_GROUPS, REFERENCE_GROUPS, Fold, Outcomes, TrialMatrix,
                                      calibration_summary, open_set_outcomes, phone_folds, profile_vectors,
                                      s_norm, trial_figures, trial_matrix)
from devrecd.openset.scorers import EmbedderScorer, fit_fusion
from devrecd.openset.vectors import unit

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Rec:
    path: str
    device: str
    group: str
    feats: np.ndarray  # serving windows (--hop)


def trials_for(scorer: Any, vecs: dict[str, np.ndarray], recs: list[Rec], phones: Sequence[str]) -> TrialMatrix:
    refs: dict[str, list[np.ndarray]] = {}
    for r in recs:
        if r.device in phones and r.group in REFERENCE_GROUPS:
            refs.setdefault(r.device, []).append(vecs[r.path])
    questioned = [(r.device, vecs[r.path]) for r in recs if r.device in phones and r.group in QUESTIONED_GROUPS]
    return trial_matrix(scorer, refs, questioned)


def normalised(scorer: Any, vecs: dict[str, np.ndarray], recs: list[Rec], train: Sequence[str],
               phones: Sequence[str], tm: TrialMatrix, top: int) -> TrialMatrix:
    """S-norm (AS-norm with ``top``) of trials on ``phones`` against every recording of the ``train`` phones."""
    cohort = [r for r in recs if r.device in train]
    cvec = np.stack([vecs[r.path] for r in cohort])
    cdev = np.array([r.device for r in cohort])
    q = [r for r in recs if r.device in phones and r.group in QUESTIONED_GROUPS]
    refs: dict[str, list[np.ndarray]] = {}
    for r in recs:
        if r.device in phones and r.group in REFERENCE_GROUPS:
            refs.setdefault(r.device, []).append(vecs[r.path])
    names, prof = profile_vectors(refs)
    qc = scorer.score(np.stack([vecs[r.path] for r in q]), cvec)
    pc = scorer.score(prof, cvec)
    qx = np.array([r.device for r in q])[:, None] == cdev[None, :]
    px = np.array(names)[:, None] == cdev[None, :]
    return s_norm(tm, qc, pc, qx, px, top=top)


def score_systems(train: Sequence[str], phones: Sequence[str], recs: list[Rec], args: argparse.Namespace,
                  cfg: Any, seed: int, tick: Callable[[str, float], None]) -> dict[str, TrialMatrix]:
    """Train every scorer on the ``train`` phones' recordings; trials of the ``phones`` (enrolled among themselves)."""
    train_recs = [r for r in recs if r.device in train]
    labels = [r.device for r in train_recs]
    used = [r for r in recs if r.device in train or r.device in phones]
    out: dict[str, TrialMatrix] = {}
    frontend = cfg.frontend
    t0 = time.perf_counter()
    base = GsvScorer.train([r.feats for r in train_recs], labels, frontend, mixtures=args.mixtures,
                           relevance=args.relevance, seed=seed)
    tick("ubm_train", t0)
    train_sv = np.stack([unit(base.ubm.supervector(r.feats, args.relevance)) for r in train_recs])
    for k in args.naps:
        t0 = time.perf_counter()
        scorer = base if not k else GsvScorer(base.ubm, frontend, relevance=args.relevance,
                                              nap=fit_nap(train_sv, labels, k))
        vecs = {r.path: scorer.recording_vector(r.feats) for r in used}
        tick("gsv_vectors", t0)
        name = "gsv" if not k else f"gsv+nap{k}"
        out[name] = trials_for(scorer, vecs, used, phones)
        if args.snorm:
            out[name + "+snorm"] = normalised(scorer, vecs, used, train, phones, out[name], args.asnorm_top)
    if args.epochs:
        import tempfile

        from devrecd.openset.embedder import load_embedder
        from devrecd.train import train as train_network, train_options
        from devrecd.train_data import restrict_dataset

        t0 = time.perf_counter()
        opts = train_options(cfg.train, arch=args.arch, loss="aam", epochs=args.epochs, batch_size=32, lr=1e-3,
                             lr_step_epochs=max(1, 2 * args.epochs // 3), patience=0, seed=seed,
                             hop_seconds=args.train_hop)
        with tempfile.TemporaryDirectory() as run:  # the one training loop, as `devrecd train-embedder`
            train_network(restrict_dataset(args.dataset, train, split="train"), run, cfg, opts)
            emb = load_embedder(run)
        tick("network_train", t0)
        net = EmbedderScorer(emb)
        vecs = {r.path: net.recording_vector(r.feats) for r in used}
        out["network"] = trials_for(net, vecs, used, phones)
        if args.snorm:
            out["network+snorm"] = normalised(net, vecs, used, train, phones, out["network"], args.asnorm_top)
    return out


@dataclass
class Pooled:
    """Several trial blocks' target, non-target and open-set scores (cross-block pairs are no trials)."""

    target: np.ndarray
    nontarget: np.ndarray
    open_set: np.ndarray


def pooled(blocks: list[TrialMatrix]) -> Pooled:
    return Pooled(*(np.concatenate([getattr(b, k) for b in blocks]) for k in ("target", "nontarget", "open_set")))


def fused(part_cal: list[list[TrialMatrix]], part_test: list[TrialMatrix]) -> tuple[list[TrialMatrix], TrialMatrix]:
    """Logistic-regression fusion fitted on the calibration blocks' part scores, applied to both."""
    stack = lambda parts: np.stack([p.scores for p in parts], axis=-1)  # noqa: E731
    tar = np.concatenate([stack(block)[block[0].is_target] for block in part_cal])
    non = np.concatenate([stack(block)[~block[0].is_target] for block in part_cal])
    w, b = fit_fusion(tar, non)
    make = lambda parts: TrialMatrix(parts[0].profiles, parts[0].devices, stack(parts) @ w + b)  # noqa: E731
    return [make(block) for block in part_cal], make(part_test)


class Pool:
    """Per-system figures pooled over folds; ``rule`` sets the open-set threshold from the calibration
    trials: ``empirical`` (the (1 - far) quantile of the open-set impostor scores: the ``far``
    decision rule), ``gaussian`` (mean + z * std of those scores: less noisy with few impostor
    recordings) or ``llr0`` (the ``bayes`` rule at its defaults: where the calibrated log10 LR is 0,
    every trial used, targets too; what the product decides by default)."""

    def __init__(self, rule: str = "empirical") -> None:
        self.rule = rule
        self.outcomes = Outcomes()
        self.tar: list[np.ndarray] = []
        self.non: list[np.ndarray] = []
        self.folds: list[dict[str, Any]] = []

    def add(self, fold: Fold, cal_blocks: list[TrialMatrix], test: TrialMatrix, far: float) -> None:
        dev = pooled(cal_blocks)
        cal = calibrate_blocks(cal_blocks, decision=Decision(rule="bayes" if self.rule == "llr0" else "far", far=far))
        threshold = cal.threshold
        if self.rule == "gaussian":
            from scipy.stats import norm

            imp = dev.open_set
            threshold = float(imp.mean() + norm.ppf(1.0 - far) * imp.std(ddof=1))
        o = open_set_outcomes(test, threshold)
        self.outcomes.add(o)
        llr = test.map(lambda s: cal.log10_lr(s)[0])
        self.tar.append(llr.target)
        self.non.append(llr.nontarget)
        self.folds.append({"fold": fold.name, "test_phones": list(fold.test), **calibration_summary(cal),
                           "threshold_used": round(threshold, 5),
                           **{k: v["rate"] for k, v in o.to_dict().items()},
                           "test_eer": trial_figures(llr.target, llr.nontarget)["eer"]})

    def report(self) -> dict[str, Any]:
        return {"threshold_rule": self.rule, **self.outcomes.to_dict(),
                "test_trials": trial_figures(np.concatenate(self.tar), np.concatenate(self.non)),
                "mean_fold_eer": round(float(np.mean([f["test_eer"] for f in self.folds])), 5),
                "folds": self.folds}


def load(ds: Any, cache: FeatureCache, hop: float) -> list[Rec]:
    return [Rec(str(it.path), it.device, it.group, cache.features(it.path, hop)[0]) for it in ds.items]


def make_report(args: argparse.Namespace, seeds: Sequence[int], recs: list[Rec], timing: dict[str, float],
                pools: dict[str, Pool]) -> dict[str, Any]:
    """Protocol, timings and every system's figures pooled over the folds added to ``pools`` so far."""
    return {
        "protocol": {"corpus": str(args.ccnu), "phones": len({r.device for r in recs}), "folds": args.folds,
                     "seeds": list(seeds), "folds_done": len(next(iter(pools.values())).folds) if pools else 0,
                     "references": list(REFERENCE_GROUPS), "questioned": list(QUESTIONED_GROUPS),
                     "hop_seconds": args.hop, "clip_seconds": args.clip_seconds, "target_far_open_set": args.far,
                     "mixtures": args.mixtures, "relevance": args.relevance, "epochs": args.epochs,
                     "asnorm_top": args.asnorm_top, "calibration": args.calibration, "inner_folds": args.inner},
        "seconds": dict(timing),
        "systems": {n: p.report() for n, p in pools.items()},
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'system':<34} {'named+accepted':>15} {'rank-1':>11} {'unknown rej.':>13} {'EER':>7} "
          f"{'minDCF':>7} {'Cllr':>6} {'Cllr_min':>8}  trials (tar/non)")
    for n, r in report["systems"].items():
        t = r["test_trials"]
        frac = lambda d: f"{d['k']}/{d['n']} {d['rate']:.1%}"  # noqa: E731
        print(f"{n:<34} {frac(r['named_accepted']):>15} {frac(r['rank1']):>11} {frac(r['unknown_rejected']):>13} "
              f"{t['eer']:>7.2%} {t['min_dcf']:>7.3f} {t['cllr']:>6.3f} {t['cllr_min']:>8.3f}  "
              f"{t['n_target']}/{t['n_nontarget']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ccnu", type=Path, default=REPO.parent / "shared/data/ccnu_mobile_sample")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--hop", type=float, default=2.0, help="window hop (s) of enrolment and questioned recordings")
    ap.add_argument("--clip-seconds", type=float, default=None,
                    help="frontend clip length (s; sets the frame hop); default: the config's frontend.clip_seconds")
    ap.add_argument("--far", type=float, default=0.05, help="open-set false-acceptance rate of the threshold")
    ap.add_argument("--mixtures", type=int, default=16)
    ap.add_argument("--relevance", type=float, default=16.0)
    ap.add_argument("--nap", default="0,4,8", help="NAP dimensions of the supervector systems to compare")
    ap.add_argument("--asnorm-top", type=int, default=0, help="AS-norm: top cohort scores (0 = plain S-norm)")
    ap.add_argument("--snorm", action=argparse.BooleanOptionalAction, default=True, help="also S-normed systems")
    ap.add_argument("--calibration", choices=("crossfit", "dev"), default="crossfit",
                    help="calibration/fusion trials: cross-fitted inside the development phones (scored by "
                         "scorers trained without them), or the development phones' own trials")
    ap.add_argument("--gaussian", action=argparse.BooleanOptionalAction, default=True,
                    help="also report every system with the Gaussian and the LLR = 0 threshold rules")
    ap.add_argument("--inner", type=int, default=3, help="cross-fitting folds inside the development phones")
    ap.add_argument("--epochs", type=int, default=0, help="network embedder epochs (0 = no network)")
    ap.add_argument("--train-hop", type=float, default=0.5, help="window hop (s) of the network's training windows")
    ap.add_argument("--arch", default="asp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    naps = [int(s) for s in args.nap.split(",") if s.strip()]
    overrides: dict[str, Any] = {"train.threads": args.threads}
    if args.clip_seconds is not None:
        overrides["frontend.clip_seconds"] = args.clip_seconds
    cfg = load_config(overrides=overrides)
    args.clip_seconds = cfg.frontend.clip_seconds
    cache = FeatureCache(Path(cfg.train.cache_dir), cfg.frontend, cfg.audio)
    args.dataset = load_dataset(args.ccnu)
    recs = load(args.dataset, cache, args.hop)
    folds = phone_folds([r.device for r in recs], n_folds=args.folds, seeds=seeds)
    pools: dict[str, Pool] = {}
    timing: dict[str, float] = {}
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    def tick(name: str, t0: float) -> None:
        timing[name] = round(timing.get(name, 0.0) + time.perf_counter() - t0, 1)

    args.naps = naps
    for fold in folds:
        test = score_systems(fold.dev, fold.test, recs, args, cfg, fold.seed, tick)
        if args.calibration == "crossfit":  # calibration trials on phones the scorers did not see
            blocks = [score_systems(tr, held, recs, args, cfg, fold.seed, tick)
                      for tr, held in ((f.dev, f.test) for f in phone_folds(fold.dev, n_folds=args.inner,
                                                                                   seeds=(fold.seed,)))]
        else:  # the development phones' own trials (the phones the scorers were trained on)
            blocks = [score_systems(fold.dev, fold.dev, recs, args, cfg, fold.seed, tick)]
        cal = {name: [b[name] for b in blocks] for name in test}
        if "network" in test:
            for g in [n for n in list(test) if n.startswith("gsv")]:
                cal[f"fusion(network,{g})"], test[f"fusion(network,{g})"] = fused(
                    [[b["network"], b[g]] for b in blocks], [test["network"], test[g]])
        for name in test:
            pools.setdefault(name, Pool()).add(fold, cal[name], test[name], args.far)
            if args.gaussian:
                pools.setdefault(name + " @gauss", Pool("gaussian")).add(fold, cal[name], test[name], args.far)
                pools.setdefault(name + " @llr0", Pool("llr0")).add(fold, cal[name], test[name], args.far)
        log(f"{fold.name}: test {', '.join(fold.test)}; " + "; ".join(
            f"{n} {p.folds[-1]['named_accepted']}/{p.folds[-1]['unknown_rejected']}" for n, p in pools.items()))
        if args.json:  # the folds done so far, pooled: a long run that is stopped still leaves its figures
            args.json.write_text(json.dumps(make_report(args, seeds, recs, timing, pools), indent=1, default=float))

    report = make_report(args, seeds, recs, timing, pools)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
