"""CPU per recording of the condition measurement (band and noise: ``devrecd.audio.condition.measure_condition``,
measured on every verdict's recording), this checkout against a baseline checkout in the same run, and
whether the two give the same conditions.

Each checkout runs in its own subprocess (``PYTHONPATH=<checkout>``) on the same decoded recordings (the
shared CCNU phones, or ``--files``), alternating baseline / new for ``--rounds`` rounds so that both see
the same machine load; the figure is process CPU time per recording (median over rounds), beside the
conditions each code measured, compared field by field (JSON of every field: identical or not).

    nice python benchmarks/condition.py --baseline ../wt-base [--new .] [--rounds 5] [--files A.wav B.wav]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

_CHILD = r"""
import json, sys, time
from devrecd.audio.decode import read_evidence
from devrecd.audio.condition import measure_condition
files, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
recs = [read_evidence(f, 32000) for f in files]
conds = [json.dumps(measure_condition(r).to_json(), sort_keys=True) for r in recs]  # also the warm-up
t = time.process_time()
for _ in range(repeats):
    for r in recs:
        measure_condition(r)
print(json.dumps({"ms": (time.process_time() - t) / (repeats * len(recs)) * 1000, "conditions": conds}))
"""


def measure(checkout: Path, files: list[str], repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(files), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="baseline checkout (e.g. a worktree of main)")
    ap.add_argument("--new", type=Path, default=REPO, help="new checkout (default: this one)")
    ap.add_argument("--files", nargs="*", default=None, help="recordings (default: the shared CCNU phones)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the recordings per round")
    args = ap.parse_args(argv)
    files = args.files or sorted(str(p) for p in (SHARED / "ccnu_mobile_sample").glob("*.wav"))
    if not files:
        raise SystemExit(f"no recordings: pass --files, or put the shared data at {SHARED}")
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    for _ in range(args.rounds):
        for label, checkout in (("baseline", args.baseline), ("new", args.new)):
            runs[label].append(measure(checkout.resolve(), files, args.repeats))
    base = statistics.median(r["ms"] for r in runs["baseline"])
    new = statistics.median(r["ms"] for r in runs["new"])
    same = sum(a == b for a, b in zip(runs["baseline"][0]["conditions"], runs["new"][0]["conditions"]))
    print(f"condition measurement, {len(files)} recordings x {args.repeats} passes, {args.rounds} rounds (median)")
    print(f"  baseline {args.baseline}: {base:.2f} ms CPU per recording")
    print(f"  new      {args.new}: {new:.2f} ms CPU per recording  ({base / max(new, 1e-9):.2f}x the baseline)")
    print(f"  conditions identical (every field): {same} of {len(files)}")
    return 0 if same == len(files) else 1


if __name__ == "__main__":
    raise SystemExit(main())
