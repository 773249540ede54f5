"""Device identification of noisy and quiet evidence: noise matching ON vs OFF, in one run.

Protocol (the 15 shared CCNU phones, 5 aligned segments each; the shipped GSV scorer,
``devrecd/assets/gsv-ccnu15.npz``, which was TRAINED ON THESE SAME 15 PHONES: the figures are
optimistic and only compare matching on with matching off):

* References: segments 1-2 of every phone (30 recordings, as recorded), kept in a reference store
  as ``devrecd enroll`` keeps them; profiles = the unit mean of a phone's reference vectors.
* Questioned: segments 4-5 (30 recordings) degraded as a case receives them and written as 16-bit
  WAV files, decoded by the project's decoder, their condition (SNR, noise spectrum) MEASURED from
  the file: white noise and babble (6 LibriSpeech talkers, 16 kHz resampled to 32 kHz) at 30/20/10
  dB SNR (:func:`devrecd.audio.noise.add_noise`), and the level lowered by 20/30 dB (re-quantised to
  16 bit by the WAV file).
* OFF: the references as they are. ON: :func:`devrecd.openset.matching.resolve_noise` decides (margin
  ``NOISE_MARGIN_DB``) and :class:`~devrecd.openset.matching.ConditionMatcher` brings every
  reference to the questioned recording's measured noise (the code the registry judge runs).
* ``--folds``: leave-phones-out instead of the shipped scorer: 3 folds of 5 test phones (seed 0,
  :func:`devrecd.openset.protocol.phone_folds`); per fold a GSV scorer with the shipped recipe (16
  mixtures, NAP 16: ``GsvScorer.train``, the core of ``gsvtrain.train_gsv`` without its
  calibration, which rank-1 and EER do not use) learns from the other 10 phones' 5 segments; each
  questioned recording is scored, with its references, by the scorer of the fold its phone is
  held out in (pooled over the folds). Phones never seen in training: not optimistic.
* Rank-1 over the 30 questioned recordings, EER over the 30 target / 420 non-target trials
  (raw cosine scores), how many questioned recordings were noise-matched, and the margin's
  background: the noise excess of each clean questioned recording over the references.

    nice python benchmarks/noise.py ../shared/data/ccnu_mobile_sample ../shared/data/librispeech --out /tmp/noise
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from devrecd.audio import read_evidence
from devrecd.audio.noise import add_noise, measure_noise, noise_excess_db
from devrecd.config import load_config
from devrecd.features import extract
from devrecd.openset.measures import eer
from devrecd.openset.matching import NOISE_MARGIN_DB, ConditionMatcher, ReferenceStore, resolve_noise
from devrecd.openset.scorers import default_gsv_path, load_gsv
from devrecd.openset.vectors import unit
from devrecd.stages import clips_for, frontend_for

CONDITIONS = ("clean", "white30", "white20", "white10", "babble30", "babble20", "babble10", "level-20", "level-30")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def babble_talkers(root: Path, rate: int, n: int = 6) -> list[np.ndarray]:
    """One recording each of ``n`` different LibriSpeech speakers, at ``rate``."""
    import soundfile as sf
    import soxr

    out, seen = [], set()
    for p in sorted(root.rglob("*.flac")):
        spk = p.name.split("-")[0]
        if spk in seen:
            continue
        x, r = sf.read(p, dtype="float32")
        out.append(soxr.resample(x, r, rate, quality="VHQ"))
        seen.add(spk)
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"{root}: fewer than {n} LibriSpeech speakers")
    return out


def degrade(x: np.ndarray, rate: int, cond: str, seed: int, babble: list[np.ndarray]) -> np.ndarray:
    if cond == "clean":
        return x
    if cond.startswith("level"):
        return x * 10.0 ** (float(cond[5:]) / 20.0)
    kind, snr = ("white", cond[5:]) if cond.startswith("white") else ("babble", cond[6:])
    return add_noise(x, rate, float(snr), kind=kind, seed=seed, babble=babble)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ccnu", type=Path)
    ap.add_argument("librispeech", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--folds", action="store_true", help="leave-phones-out GSV scorers instead of the shipped one")
    args = ap.parse_args()
    import soundfile as sf

    t0 = time.perf_counter()
    scorer, _ = load_gsv(default_gsv_path())
    # -30 dB copies of the quieter phones fall below the old default audio.silence_dbfs (-70 dBFS; -90 since 2026-12-07) and would
    # be refused as silent: the benchmark lowers it (and says how many the default would refuse).
    cfg = load_config(overrides={"audio.silence_dbfs": -100.0})
    default_silence = load_config().audio.silence_dbfs
    fe = scorer.frontend
    rate = fe.sample_rate
    hop = cfg.audio.hop_seconds
    with open(args.ccnu / "manifest.csv", newline="") as fh:
        rows = [(args.ccnu / r["path"], r["device"], int(r["segment"])) for r in csv.DictReader(fh)]
    phones = sorted({d for _, d, _ in rows})
    refs = {d: [p for p, dd, s in rows if dd == d and s <= 2] for d in phones}
    questioned = [(p, d) for p, d, s in rows if s >= 4]
    store = ReferenceStore(args.out / "refs")
    profiles = [[store.put(p) for p in refs[d]] for d in phones]
    matcher = ConditionMatcher(store, fe, cfg.audio, cache_dir=args.out / "refs-conditions", noise_cache=0)
    babble = babble_talkers(args.librispeech, rate)
    truth = np.array([[d == ph for ph in phones] for _, d in questioned])
    scorer_of = {d: scorer for d in phones}  # the scorer each questioned phone is judged with
    if args.folds:
        from devrecd.openset.protocol import phone_folds
        from devrecd.openset.scorers import GsvScorer

        for fold in phone_folds(phones, n_folds=3, seeds=(0,)):
            dev = [(p, d) for p, d, _ in rows if d in fold.dev]
            feats = [extract(clips_for(read_evidence(p, rate, cfg.audio), fe, hop), frontend_for(fe)) for p, _ in dev]
            fold_scorer = GsvScorer.train(feats, [d for _, d in dev], fe, mixtures=16, nap_dims=16, seed=0)
            scorer_of.update({d: fold_scorer for d in fold.test})
            log(f"fold {fold.index}: GSV (16 mixtures, NAP 16) on {len(fold.dev)} phones, tests {', '.join(fold.test)}")

    def profile_means(sc, channel_noise) -> np.ndarray:
        return np.stack([unit(np.stack([sc.recording_vector(matcher.reference_features(s, None, channel_noise))
                                                for s in shas]).mean(axis=0)) for shas in profiles])

    clean_means = {id(sc): profile_means(sc, None) for sc in set(scorer_of.values())}
    ref_noise = [matcher.reference_noise(s, None) for shas in profiles for s in shas]
    log(f"references: {sum(map(len, profiles))} recordings of {len(phones)} phones, SNR "
        f"{min(r.snr_db for r in ref_noise):.1f}-{max(r.snr_db for r in ref_noise):.1f} dB")
    qdir = args.out / "questioned"
    print("\n| questioned condition | measured SNR (median) | matched | rank-1 OFF | rank-1 ON | EER OFF | EER ON |")
    print("|---|---|---|---|---|---|---|")
    for cond in args.conditions.split(","):
        scores = {"off": [], "on": []}
        snrs, n_matched, excess_clean, refused = [], 0, [], 0
        for i, (path, phone) in enumerate(questioned):
            scorer = scorer_of[phone]
            x, r = sf.read(path, dtype="float32")
            dest = qdir / cond / f"{path.stem}.wav"
            dest.parent.mkdir(parents=True, exist_ok=True)
            sf.write(dest, degrade(x, r, cond, 1000 + i, babble), r, subtype="PCM_16")  # 16 bit, as a case holds it
            rec = read_evidence(dest, rate, cfg.audio)
            refused += int((rec.levels or {}).get("rms_dbfs", 0.0) < default_silence)
            condition = rec.condition.to_json()
            snrs.append(condition["snr_db"])
            vec = scorer.recording_vector(extract(clips_for(rec, fe, hop), frontend_for(fe)))
            scores["off"].append(scorer.score(vec[None], clean_means[id(scorer)])[0])
            target, fields = resolve_noise(condition, matcher, profiles, None, enabled=True)
            if cond == "clean":
                q = measure_noise(rec.samples, rate)
                excess_clean.append(float(np.median([noise_excess_db(q, rn) for rn in ref_noise])))
            if target is not None:
                n_matched += 1
                scores["on"].append(scorer.score(vec[None], profile_means(scorer, target))[0])
            else:
                scores["on"].append(scores["off"][-1])
        row = [cond, f"{np.median(snrs):.1f} dB", f"{n_matched}/{len(questioned)}"]
        for k in ("off", "on"):
            s = np.array(scores[k])
            row.append(f"{int((s.argmax(axis=1) == truth.argmax(axis=1)).sum())}/{len(s)}")
        for k in ("off", "on"):
            s = np.array(scores[k])
            row.append(f"{100 * eer(s[truth], s[~truth]):.1f}% ({truth.sum()}/{(~truth).sum()})")
        print("| " + " | ".join(row) + " |", flush=True)
        if refused:
            print(f"  {refused}/{len(questioned)} of these would be refused as silent at audio.silence_dbfs = "
                  f"{default_silence:.0f} dBFS", flush=True)
        if excess_clean:
            e = np.array(excess_clean)
            print(f"  clean questioned: noise excess over the references (median over refs) median {np.median(e):.1f} dB, "
                  f"max {e.max():.1f} dB; above the {NOISE_MARGIN_DB} dB margin: {(e > NOISE_MARGIN_DB).sum()}/{len(e)}",
                  flush=True)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
