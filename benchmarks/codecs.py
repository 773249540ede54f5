"""Device identification through codecs and band limits: mismatched and matched, in one run.

Protocol (the 15 shared CCNU phones, 5 aligned segments each):

* Questioned recordings (segments 4-5, 30 recordings) are passed through each condition the way a
  case receives them: encoded to a real file (AAC 64k in ADTS, Opus 32k/16k in Ogg, AMR-NB 12.2k
  and AMR-WB 23.85k in .amr, MP3 64k) or band-limited to 300-3400 Hz and saved as a 16-bit WAV,
  then decoded by the project's decoder; the condition is DETECTED from the file and signal
  (:mod:`devrecd.audio.condition`), and the detected channel is what matching uses.
* mismatched: references/training data as recorded (WAV). matched: references (open set) or the
  training recordings (closed set) passed through the detected channel first (:mod:`devrecd.openset.matching`).
* Closed set: segments 1-3 train, 4-5 questioned. gsv-svm (64-mixture UBM, MAP supervectors,
  linear SVM); matched = the SVM refitted on the training recordings through the channel (UBM kept).
  The paper network (``--network-epochs``): trained on WAV, and trained with
  ``train.channel_augment`` (every available channel, p = 0.5), both scored mismatched.
* Open set: leave-phones-out, 3 folds of 5 phones. The UBM (supervector scorer) and the ``asp``
  embedder (``--embedder-epochs``) learn from the other 10 phones' segments 1-3; all 15 phones are
  enrolled from segments 1-3; the held-out phones' segments 4-5 (10 per fold, 30 in all) are
  questioned against all 15 profiles. Rank-1 (trials beside it) and EER over all (30 x 15) trials.

    DEVRECD_TRAIN__THREADS=1 OMP_NUM_THREADS=1 DEVRECD_FRONTEND__CLIP_SECONDS=4 nice \\
        python benchmarks/codecs.py ../shared/data/ccnu_mobile_sample --out /tmp/codecs/bench \\
        --network-epochs 10 --embedder-epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from devrecd.audio import read_evidence
from devrecd.audio.channel import CHANNELS
from devrecd.audio.transmit import apply_channel, encode_file, encoder_available
from devrecd.baselines import GsvSvm
from devrecd.config import load_config
from devrecd.features import extract
from devrecd.openset.measures import eer
from devrecd.openset.matching import ConditionMatcher, ReferenceStore, embedding_scorer, matched_scores
from devrecd.stages import clips_for, frontend_for

CONDITIONS = ("wav", "aac64", "opus32", "opus16", "amrnb", "amrwb", "mp3_64", "tel")
SUFFIX = {"adts": ".aac", "ogg": ".opus", "amr": ".amr", "mp3": ".mp3"}
FOLDS = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Corpus:
    """The recordings, the questioned files per condition, and features (cached in memory)."""

    def __init__(self, root: Path, out: Path, cfg) -> None:
        import csv

        self.root, self.out, self.cfg = root, out, cfg
        with open(root / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.rows = [(root / r["path"], r["device"], int(r["segment"])) for r in rows]
        self.phones = sorted({d for _, d, _ in self.rows})
        self.refs = [(p, d) for p, d, s in self.rows if s <= 3]
        self.questioned = [(p, d) for p, d, s in self.rows if s >= 4]
        self.store = ReferenceStore(out / "refs")
        self.sha = {p: self.store.put(p) for p, _ in self.refs}
        self.matcher = ConditionMatcher(self.store, cfg.frontend, cfg.audio, cache_dir=out / "refs-conditions")
        self._q: dict[tuple[Path, str], tuple[np.ndarray, dict]] = {}

    def features(self, rec) -> np.ndarray:
        return extract(clips_for(rec, self.cfg.frontend, self.cfg.audio.hop_seconds), frontend_for(self.cfg.frontend))

    def questioned_file(self, path: Path, cond: str) -> Path:
        """The questioned recording as a case would hold it under ``cond``."""
        if cond == "wav":
            return path
        import soundfile as sf

        ch = CHANNELS[cond]
        x, rate = sf.read(path, dtype="float32")
        dest = self.out / "questioned" / cond / path.stem
        dest.parent.mkdir(parents=True, exist_ok=True)
        if ch.encoder:
            dest = dest.with_suffix(SUFFIX[ch.container])
            dest.write_bytes(encode_file(x, rate, ch))
        else:
            dest = dest.with_suffix(".wav")
            sf.write(dest, apply_channel(ch, x, rate), rate, subtype="PCM_16")
        return dest

    def question(self, path: Path, cond: str) -> tuple[np.ndarray, dict]:
        """(features, detected condition) of a questioned recording under ``cond``."""
        key = (path, cond)
        if key not in self._q:
            rec = read_evidence(self.questioned_file(path, cond), self.cfg.frontend.sample_rate, self.cfg.audio)
            self._q[key] = (self.features(rec), rec.condition.to_json())
        return self._q[key]

    def reference(self, path: Path, channel) -> np.ndarray:
        return self.matcher.reference_features(self.sha[path], channel)


def detected_channel(cond_json: dict):
    from devrecd.openset.matching import questioned_channel

    return questioned_channel(cond_json)


def rate(ok: int, n: int) -> str:
    return f"{100 * ok / max(n, 1):.1f}% ({ok}/{n})"


# --- closed set --------------------------------------------------------------------------------

def closed_gsv(corpus: Corpus, conds: list[str], seed: int) -> dict[str, dict]:
    labels = [d for _, d in corpus.refs]
    clean = [corpus.reference(p, None) for p, _ in corpus.refs]
    t0 = time.perf_counter()
    model = GsvSvm(seed=seed).fit(clean, labels)
    log(f"gsv-svm fitted on {len(clean)} WAV training recordings ({time.perf_counter() - t0:.0f} s)")
    out = {}
    for cond in conds:
        qs = [corpus.question(p, cond) for p, _ in corpus.questioned]
        channel = detected_channel(qs[0][1])
        res = {"detected": sorted({(q[1]["channel"] or "none") for q in qs})}
        for mode in ("mismatched", "matched"):
            if mode == "matched" and channel is None:
                res[mode] = res["mismatched"]
                continue
            m = model
            if mode == "matched":
                m = model.refit_classifier([corpus.reference(p, channel) for p, _ in corpus.refs], labels)
            res[mode] = _closed_scores(m.classes_, [m.predict_proba(f) for f, _ in qs], [d for _, d in corpus.questioned])
        out[cond] = res
        log(f"closed gsv {cond}: {res}")
    return out


def _closed_scores(classes, probas, truth) -> dict:
    classes = np.asarray(classes)
    rec_ok = sum(int(classes[p.mean(axis=0).argmax()] == t) for p, t in zip(probas, truth))
    win_ok = sum(int(np.sum(classes[p.argmax(axis=1)] == t)) for p, t in zip(probas, truth))
    return {"recordings": [rec_ok, len(truth)], "windows": [win_ok, sum(len(p) for p in probas)]}


def closed_network(corpus: Corpus, conds: list[str], args, augment: tuple[str, ...]) -> dict[str, dict]:
    from devrecd.evaluation import network_log_proba
    from devrecd.model.checkpoint import load_checkpoint
    from devrecd.train import train, train_options
    from devrecd.train_data import open_dataset

    cfg = corpus.cfg
    ds = open_dataset(corpus.root, cfg, "ccnu")
    run = args.out / ("network-augmented" if augment else "network")
    opts = train_options(cfg.train, arch="paper", epochs=args.network_epochs, batch_size=32, lr=1e-3,
                         hop_seconds=cfg.audio.hop_seconds, seed=args.seed, patience=0,
                         channel_augment=augment, channel_augment_p=0.5)
    t0 = time.perf_counter()
    train(ds, run, cfg, opts)
    wall = time.perf_counter() - t0
    log(f"paper network {'with channel augmentation ' if augment else ''}trained: {args.network_epochs} epochs, {wall:.0f} s")
    ckpt = load_checkpoint(run)
    predict = network_log_proba(ckpt)
    out = {"train_seconds": round(wall)}
    for cond in conds:
        qs = [corpus.question(p, cond) for p, _ in corpus.questioned]
        out[cond] = _closed_scores(ckpt.labels, [np.exp(predict(f)) for f, _ in qs], [d for _, d in corpus.questioned])
        log(f"closed network{' +aug' if augment else ''} {cond}: {out[cond]}")
    return out


# --- open set ----------------------------------------------------------------------------------

def per_array(fn):
    """``fn`` memoised per input array (reference features are the matcher's cached arrays: each
    reference is embedded once per scorer, not once per trial). The array is kept, so its id stays unique."""
    memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def wrapped(x: np.ndarray) -> np.ndarray:
        hit = memo.get(id(x))
        if hit is None or hit[0] is not x:
            hit = memo[id(x)] = (x, fn(x))
        return hit[1]

    return wrapped


def gsv_scorer(model: GsvSvm):
    """Supervector scorer: cosine of a recording's mean window supervector with each profile's mean
    of reference recording supervectors."""

    @per_array
    def rec_sv(f: np.ndarray) -> np.ndarray:
        v = model.supervectors(f).mean(axis=0)
        return v / max(np.linalg.norm(v), 1e-12)

    def score(q: np.ndarray, refs) -> np.ndarray:
        qv = rec_sv(q)
        prof = [np.mean([rec_sv(r) for r in rs], axis=0) for rs in refs]
        return np.array([p @ qv / max(np.linalg.norm(p), 1e-12) for p in prof])

    return score


def open_set(corpus: Corpus, conds: list[str], args, kind: str) -> dict[str, dict]:
    phones = corpus.phones
    folds = [phones[i::FOLDS] for i in range(FOLDS)]
    profiles_paths = [[p for p, d in corpus.refs if d == ph] for ph in phones]
    profiles = [[corpus.sha[p] for p in ps] for ps in profiles_paths]
    results = {c: {m: {"rank1": [0, 0], "tar": [], "non": []} for m in ("mismatched", "matched")} for c in conds}
    train_seconds = 0.0
    for k, held in enumerate(folds):
        seen = [(p, d) for p, d in corpus.refs if d not in held]
        feats = [corpus.reference(p, None) for p, _ in seen]
        t0 = time.perf_counter()
        if kind == "gsv":
            scorer = gsv_scorer(GsvSvm(seed=args.seed).fit(feats, [d for _, d in seen]))
        else:
            from devrecd.openset.embedder import load_embedder
            from devrecd.train import train, train_options
            from devrecd.train_data import open_dataset, restrict_dataset

            cfg = corpus.cfg
            run = args.out / f"asp-fold{k + 1}"
            opts = train_options(cfg.train, arch="asp", loss="aam", epochs=args.embedder_epochs,
                                 batch_size=32, lr=1e-3, hop_seconds=cfg.audio.hop_seconds,
                                 seed=args.seed, patience=0)
            ds = open_dataset(corpus.root, cfg, "ccnu")  # segments 1-3 train: the references
            train(restrict_dataset(ds, sorted({d for _, d in seen}), splits=("train",)), run, cfg, opts)
            emb = load_embedder(run)
            scorer = embedding_scorer(per_array(emb.embed_features))
        train_seconds += time.perf_counter() - t0
        log(f"open {kind} fold {k + 1}: trained on {len(set(d for _, d in seen))} phones "
            f"({time.perf_counter() - t0:.0f} s); held out {held}")
        for cond in conds:
            for path, dev in [(p, d) for p, d in corpus.questioned if d in held]:
                q, cj = corpus.question(path, cond)
                channel = detected_channel(cj)
                for mode in ("mismatched", "matched"):
                    scores = matched_scores(q, profiles, channel if mode == "matched" else None, corpus.matcher, scorer)
                    r = results[cond][mode]
                    truth = phones.index(dev)
                    r["rank1"][0] += int(np.argmax(scores) == truth)
                    r["rank1"][1] += 1
                    r["tar"].append(float(scores[truth]))
                    r["non"] += [float(s) for j, s in enumerate(scores) if j != truth]
            log(f"open {kind} fold {k + 1} {cond}: " + ", ".join(
                f"{m} {rate(*results[cond][m]['rank1'])}" for m in ("mismatched", "matched")))
    out = {"train_seconds": round(train_seconds)}
    for cond in conds:
        out[cond] = {m: {"rank1": r["rank1"], "eer": eer(np.array(r["tar"]), np.array(r["non"])),
                         "n_target": len(r["tar"]), "n_nontarget": len(r["non"])}
                     for m, r in results[cond].items()}
    return out


# --- report ------------------------------------------------------------------------------------

def table(res: dict, conds: list[str], unavailable: dict[str, str]) -> str:
    lines = ["| questioned condition (detected channel) | closed gsv-svm mismatched | closed gsv-svm matched | "
             "closed network (WAV-trained) | closed network (channel-augmented) | open supervector mismatched | "
             "open supervector matched | open asp mismatched | open asp matched |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell_closed(r):
        return f"{rate(*r['recordings'])} / win {100 * r['windows'][0] / max(r['windows'][1], 1):.1f}%" if r else "-"

    def cell_open(r):
        return f"{rate(*r['rank1'])}, EER {100 * r['eer']:.1f}%" if r else "-"

    for cond in CONDITIONS:
        if cond in unavailable:
            lines.append(f"| {cond} | {unavailable[cond]} |" + " |" * 7)
            continue
        if cond not in conds:
            continue
        g = res.get("closed_gsv", {}).get(cond, {})
        n0 = res.get("closed_network", {}).get(cond)
        n1 = res.get("closed_network_aug", {}).get(cond)
        og = res.get("open_gsv", {}).get(cond, {})
        oa = res.get("open_asp", {}).get(cond, {})
        det = ",".join(g.get("detected", [])) or "?"
        lines.append(f"| {cond} ({det}) | {cell_closed(g.get('mismatched'))} | {cell_closed(g.get('matched'))} | "
                     f"{cell_closed(n0)} | {cell_closed(n1)} | {cell_open(og.get('mismatched'))} | "
                     f"{cell_open(og.get('matched'))} | {cell_open(oa.get('mismatched'))} | {cell_open(oa.get('matched'))} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--network-epochs", type=int, default=0, help="paper network, closed set (0 = skip)")
    ap.add_argument("--embedder-epochs", type=int, default=0, help="asp embedder per open-set fold (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = load_config(None)
    cfg = cfg.with_overrides({"audio.hop_seconds": 1.0})
    args.out.mkdir(parents=True, exist_ok=True)
    unavailable = {c: f"not measured: the FFmpeg bundled with PyAV has no {CHANNELS[c].encoder} encoder"
                   for c in args.conditions.split(",") if c != "wav" and CHANNELS[c].encoder
                   and not encoder_available(CHANNELS[c].encoder)}
    conds = [c for c in args.conditions.split(",") if c not in unavailable]
    t_all = time.perf_counter()
    corpus = Corpus(args.dataset, args.out, cfg)
    log(f"{len(corpus.phones)} phones, {len(corpus.refs)} references, {len(corpus.questioned)} questioned; "
        f"conditions {conds}; unavailable {list(unavailable)}; clip {cfg.frontend.clip_seconds:g} s, hop 1 s")
    res: dict = {"unavailable": unavailable}
    save = lambda: (args.out / "results.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    res["closed_gsv"] = closed_gsv(corpus, conds, args.seed)
    save()
    res["open_gsv"] = open_set(corpus, conds, args, "gsv")
    save()
    if args.embedder_epochs:
        res["open_asp"] = open_set(corpus, conds, args, "asp")
        save()
    if args.network_epochs:
        res["closed_network"] = closed_network(corpus, conds, args, ())
        save()
        aug = tuple(c for c in CONDITIONS if c != "wav" and c not in unavailable)
        res["closed_network_aug"] = closed_network(corpus, conds, args, aug)
        save()
    res["seconds"] = round(time.perf_counter() - t_all)
    save()
    print(f"\nCCNU sample, 15 phones; clip {cfg.frontend.clip_seconds:g} s windows, hop 1 s; seed {args.seed}; "
          f"closed set: segments 1-3 train, 4-5 questioned (30 recordings); open set: {FOLDS} leave-5-phones-out "
          f"folds, 15 enrolled, 30 questioned recordings x 15 profiles; {res['seconds']} s in all")
    print(table(res, conds, unavailable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
