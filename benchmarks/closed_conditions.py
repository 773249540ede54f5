"""The closed-set paper network under case conditions (level, noise, length, codecs), two code versions side by side.

What is measured: the paper network trained with the recipe of docs/model.md ("Real phones":
segments 1-3 of the 15 shared CCNU phones, 4 s windows, hop 0.5 s, batch 32, lr 1e-3, seeds as given (--seeds),
no early stopping) by each checkout's own ``devrecd train``, then ``devrecd evaluate`` of that run
on segments 4-5 (30 recordings) under each condition: the questioned files of
``benchmarks/conditions.py`` (the same generator and the same files when ``--work`` is shared:
``level-20dB``, ``white20dB``, ``first3s``, codecs, combinations; see its docstring). Per condition
and checkout: recordings right (of 30) and windows right (of their count), from the evaluation
report (``audio.silence_dbfs = -100``: at the old default -70 dBFS (-90 since 2026-12-07) two -30 dB recordings are refused
as silent and ``evaluate`` stops).

Each checkout runs in its own subprocesses (``PYTHONPATH=<checkout>``, ``python -m devrecd``,
``DEVRECD_FRONTEND__CLIP_SECONDS=4``, ``DEVRECD_TRAIN__THREADS=1``, its own feature cache), both
checkouts side by side. Cost: one training per checkout (~13 CPU-minutes each for 30 epochs on
this machine) plus a few seconds per condition.

Run:  nice python benchmarks/closed_conditions.py --baseline ../wt-base --new . --work /tmp/ccond
      [--conditions wav,level-20dB,white20dB,first3s] [--epochs 30] [--json out.json]
      [--seeds 0,1,2] [--new-env DEVRECD_TRAIN__NOISE_AUGMENT_P=0.5] [--baseline-env KEY=VALUE]
      (settings for one side only; e.g. babble augmentation: --new-env DEVRECD_TRAIN__NOISE_AUGMENT_BABBLE=
      $PWD/../shared/data/librispeech/librispeech_train-clean-100, other talkers than the questioned
      babble's: an absolute path, as devrecd runs in --work)
Each checkout, seed and setting trains into its own run directory (``<label>-seed<S>-<hash of the
settings>``): a run is reused only by the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conditions as cond_bench  # noqa: E402  (the questioned files and the dataset folders)

RECIPE = ("--epochs", "{epochs}", "--batch-size", "32", "--lr", "1e-3", "--hop-seconds", "0.5", "--patience", "0",
          "--seed", "{seed}")
TRAIN_SEGMENTS = ("1", "2", "3")


def side(label: str, checkout: Path, work: Path, conditions: list[str], epochs: int, extra_env: dict[str, str],
         seed: int = 0) -> dict:
    """Train (with ``seed``) and evaluate one checkout; returns {condition: figures}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVRECD_")}
    env.update(extra_env)
    # audio.silence_dbfs -100 (as benchmarks/noise.py): at the old default -70 dBFS two recordings at -30 dB
    # are refused as silent and evaluate stops; the level conditions measure the network, not that gate.
    env.update(PYTHONPATH=str(checkout), DEVRECD_FRONTEND__CLIP_SECONDS="4", DEVRECD_TRAIN__THREADS="1",
               DEVRECD_TRAIN__CACHE_DIR=str(work / label / "cache"), DEVRECD_AUDIO__SILENCE_DBFS="-100",
               OMP_NUM_THREADS="1")
    run = work / label / "run"

    def devrecd(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "devrecd", *args], env=env, cwd=work, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"[{label}] devrecd {' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
        return out.stdout

    t0 = time.perf_counter()
    if not (run / "best.pt").exists():
        devrecd("train", str(work / "data" / "train"), "--out", str(run),
                *[a.format(epochs=epochs, seed=seed) for a in RECIPE])
    cond_bench.log(f"[{label}] trained ({time.perf_counter() - t0:.0f} s)")
    results = {}
    for cond in conditions:
        out = work / label / "eval" / cond
        line = devrecd("evaluate", str(run), str(work / "data" / cond), "--out", str(out)).strip().splitlines()
        rep = json.loads((out / "report.json").read_text())
        n_files = len(json.loads((work / "data" / cond / "files.json").read_text()))
        rec, win = rep["recording"], rep["window"]
        right = round(rec["accuracy"] * rec["n"])
        results[cond] = {"recordings_right": right, "recordings": n_files, "judged": rec["n"],
                         "windows_right": round(win["accuracy"] * win["n"]), "windows": win["n"], "summary": line[-2:]}
        cond_bench.log(f"[{label}] {cond}: {right}/{n_files} recordings, {results[cond]['windows_right']}/{win['n']} windows")
    return results


def prepare(rows: list[dict], conditions: list[str], work: Path, librispeech: Path | None) -> None:
    """The training set (segments 1-3 of ``rows``, a CCNU-style manifest's: conditions.read_ccnu) and
    the questioned sets (segments 4-5 under each condition) under ``work/data``, as :func:`side` reads them."""
    index = cond_bench.generate(rows, conditions, work / "questioned", librispeech)
    cond_bench.write_dataset(work / "data" / "train", [r for r in rows if r["segment"] in TRAIN_SEGMENTS], "train")
    for cond in conditions:
        folder = cond_bench.write_dataset(work / "data" / cond, index["files"][cond], "test")
        (folder / "files.json").write_text(json.dumps(index["files"][cond]))


def _settings_hash(env: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest()[:8]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--new", type=Path, default=cond_bench.REPO)
    ap.add_argument("--ccnu", type=Path, default=cond_bench.SHARED / "ccnu_mobile_sample")
    ap.add_argument("--librispeech", type=Path, default=cond_bench.SHARED / "librispeech" / "librispeech_test-other")
    ap.add_argument("--work", type=Path, default=Path("/tmp/devrecd-closed-conditions"))
    ap.add_argument("--conditions", default="wav,level-20dB,white20dB,first3s")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated: one training per checkout and seed")
    ap.add_argument("--new-env", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for the new checkout only, e.g. DEVRECD_TRAIN__NOISE_AUGMENT_P=0.5")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for the baseline checkout only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    envs = {"baseline": dict(kv.split("=", 1) for kv in args.baseline_env),
            "new": dict(kv.split("=", 1) for kv in args.new_env)}
    seeds = sorted({int(x) for x in args.seeds.split(",") if x})
    if not args.ccnu.exists():
        raise SystemExit(f"{args.ccnu}: the CCNU sample is needed")
    work = args.work.resolve()
    conditions = [c for c in args.conditions.split(",") if c]
    prepare(cond_bench.read_ccnu(args.ccnu), conditions, work, args.librispeech if args.librispeech.is_dir() else None)
    from concurrent.futures import ThreadPoolExecutor

    sides = {"baseline": args.baseline.resolve(), "new": args.new.resolve()}
    with ThreadPoolExecutor(2) as pool:  # the two checkouts of a seed side by side, seed after seed
        futures = {(label, seed): pool.submit(side, f"{label}-seed{seed}-{_settings_hash(envs[label])}", path, work,
                                              conditions, args.epochs, envs[label], seed)
                   for seed in seeds for label, path in sides.items()}
        runs = {key: f.result() for key, f in futures.items()}
    heads = {label: cond_bench.git_head(path) for label, path in sides.items()}
    settings = "; ".join(f"{label} with {' '.join(f'{k}={v}' for k, v in env.items())}" for label, env in envs.items() if env)
    print(f"\nclosed set, paper network ({args.epochs} epochs, 4 s windows, seeds {args.seeds}), CCNU segments 4-5 "
          f"of 15 phones{'; ' + settings if settings else ''}")
    print("recordings right of (recordings x seeds); per seed in brackets; windows right")
    print(f"{'condition':<24}" + "".join(f"{label + ' ' + heads[label]:>44}" for label in sides))
    results: dict[str, dict[str, dict]] = {label: {} for label in sides}
    for cond in conditions:
        cells = []
        for label in sides:
            per = [runs[label, seed][cond] for seed in seeds]
            total = {k: sum(r[k] for r in per) for k in ("recordings_right", "recordings", "windows_right", "windows")}
            results[label][cond] = {**total, "per_seed": {str(seed): r for seed, r in zip(seeds, per)}}
            cells.append(f"{total['recordings_right']}/{total['recordings']} "
                         f"[{' '.join(str(r['recordings_right']) for r in per)}], "
                         f"{total['windows_right']}/{total['windows']} win")
        print(f"{cond:<24}" + "".join(f"{c:>44}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"heads": heads, "epochs": args.epochs, "seeds": seeds, "env": envs,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
