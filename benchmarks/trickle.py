"""Trickle: one 10 s recording every 200 ms into a watched folder; latency to the verdict.

Reported: p50/p99 of the daemon's own end-to-end time (file taken as stable -> verdict written,
``timings.end_to_end``) and of complete -> verdict (which adds the ``watch.stable_seconds`` wait).
Baseline in the same run: the naive per-file time (decode, features, infer one file) on the same
files, which is the floor a one-file-at-a-time service would have without any waiting.

    python benchmarks/trickle.py --model export/NAME.onnx [--files 100] [--interval 0.2] [--stable 0.5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backlog import REPO, _judged_at, make_evidence, naive_loop, pct, read_records, start_daemon, stop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--stable", type=float, default=0.5, help="watch.stable_seconds")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="devrecd-trickle-") as tmp:
        work = Path(tmp)
        staging, evidence = work / "staging", work / "evidence"
        evidence.mkdir()
        files = make_evidence(staging, args.files, 10.0, args.shared)
        n_naive = min(50, len(files))
        naive_before = naive_loop(files[:n_naive], args.model) / n_naive
        proc, state = start_daemon(work, evidence, args.model, env={
            "DEVRECD_WATCH__STABLE_SECONDS": str(args.stable), "DEVRECD_BACKEND__THREADS": "1"})
        complete: dict[str, float] = {}
        try:
            next_t = time.time()
            for p in files:
                time.sleep(max(0.0, next_t - time.time()))
                shutil.copyfile(p, evidence / p.name)  # written now: the stability wait applies
                complete[str(evidence / p.name)] = time.time()
                next_t += args.interval
            while len(recs := read_records(state)) < len(files):
                if proc.poll() is not None:
                    sys.exit("daemon died:\n" + (work / "daemon.log").read_text()[-3000:])
                time.sleep(0.1)
        finally:
            stop(proc)
        # Best of a pass before and after the daemon: the machine is shared (see backlog.py).
        naive_s = min(naive_before, naive_loop([evidence / p.name for p in files[:n_naive]], args.model) / n_naive)
        e2e = [r["timings"]["end_to_end"] for r in recs]
        total = [_judged_at(r) - complete[r["path"]] for r in recs]
        print(f"trickle: {len(files)} x 10 s real recordings, one every {args.interval * 1000:.0f} ms; CPU; "
              f"stable_seconds={args.stable}")
        print(f"  stable -> verdict   p50 {pct(e2e, 50) * 1000:7.1f} ms  p99 {pct(e2e, 99) * 1000:7.1f} ms  "
              f"max {max(e2e) * 1000:7.1f} ms")
        print(f"  complete -> verdict p50 {pct(total, 50) * 1000:7.1f} ms  p99 {pct(total, 99) * 1000:7.1f} ms "
              f"(includes the {args.stable * 1000:.0f} ms stability wait)")
        print(f"  baseline: naive one-file time (decode + features + infer) {naive_s * 1000:.1f} ms/file")


if __name__ == "__main__":
    main()
