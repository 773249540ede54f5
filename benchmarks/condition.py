"""CPU per recording of the condition measurement (band and noise: ``devrecd.audio.condition.measure_condition``,
measured on every verdict's recording), this checkout against a baseline checkout in the same run, and
whether the two give the same conditions.

Each checkout runs in its own subprocess (``PYTHONPATH=<checkout>``) on the same decoded recordings (the
shared CCNU phones, or ``--files``), alternating baseline / new for ``--rounds`` rounds so that both see
the same machine load; the figure is process CPU time per recording (median over rounds).

Parity: the conditions each code measures on the recordings, and with ``--variants`` (generated once
under a temporary folder by the baseline's code, read by both) on versions of each made quieter
(``level-20dB``, ``level-30dB``: re-quantised to 16-bit PCM), noisier (``white20dB``: white noise at
20 dB SNR, :func:`devrecd.audio.noise.add_noise`), shorter (``first3s``) and passed through AMR-NB
(``amrnb``: :func:`devrecd.audio.transmit.apply_channel`, stored as a 16-bit WAV). Compared field by
field: every categorical field (band limits, channel, codec verdicts) identical, every float of the
condition's JSON (rounded as it is stored) within ``1e-3``, and the unrounded noise profile
(:func:`devrecd.audio.noise.measure_noise` on the same samples) within ``0.01`` dB; the worst
difference of each field is printed. The exit status is 1 when any of these fails.

    nice python benchmarks/condition.py --baseline ../wt-base [--new .] [--rounds 5] [--variants] [--files A.wav B.wav]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS = ("level-20dB", "level-30dB", "white20dB", "first3s", "amrnb")
FLOAT_TOL = 1e-3  # the condition's JSON floats (rounded as stored: dB to 0.1, Hz to 0.1)
NOISE_TOL_DB = 0.01  # the unrounded noise profile

_CHILD = r"""
import json, sys, time
from devrecd.audio.decode import read_evidence
from devrecd.audio.condition import measure_condition
from devrecd.audio.noise import measure_noise
files, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
recs = [read_evidence(f, 32000) for f in files]
conds = [measure_condition(r).to_json() for r in recs]  # also the warm-up
t = time.process_time()
for _ in range(repeats):
    for r in recs:
        measure_condition(r)
ms = (time.process_time() - t) / max(1, repeats * len(recs)) * 1000
noise = []
for r in recs:
    p = measure_noise(r.samples if r.excerpt is None else r.excerpt, r.sample_rate)
    noise.append([p.speech_dbfs, p.noise_dbfs, *p.bands_db])
print(json.dumps({"ms": ms, "conditions": conds, "noise": noise}))
"""

_MAKE = r"""
import json, sys
import numpy as np, soundfile as sf
from devrecd.audio.channel import get_channel
from devrecd.audio.decode import read_evidence
from devrecd.audio.noise import add_noise
from devrecd.audio.transmit import apply_channel
files, variants, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
made = []
for i, f in enumerate(files):
    x = read_evidence(f, 32000).samples
    for v in variants:
        if v.startswith("level"):
            y = x * 10 ** (float(v[5:-2]) / 20)
        elif v == "white20dB":
            y = add_noise(x, 32000, 20.0, seed=i)
        elif v == "first3s":
            y = x[:3 * 32000]
        else:
            y = apply_channel(get_channel(v), x, 32000)
        path = f"{out}/{i:03d}_{v}.wav"
        sf.write(path, np.clip(np.round(np.asarray(y, np.float64) * 32768.0), -32768, 32767).astype(np.int16),
                 32000, subtype="PCM_16")
        made.append(path)
print(json.dumps(made))
"""


def _child(code: str, checkout: Path, *args: str) -> str:
    """``code`` run with ``checkout``'s devrecd. In the checkout's folder: ``python -c`` puts the
    current folder ahead of PYTHONPATH, so run from another checkout, both would import that one."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    check = f"import devrecd; assert devrecd.__file__.startswith({str(checkout) + os.sep!r}), devrecd.__file__\n"
    out = subprocess.run([sys.executable, "-c", check + code, *args], env=env, cwd=checkout, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def measure(checkout: Path, files: list[str], repeats: int) -> dict:
    return json.loads(_child(_CHILD, checkout, json.dumps(files), str(repeats)))


def compare(base: dict, new: dict) -> tuple[bool, list[str]]:
    """Field-by-field comparison of two runs' conditions (see the module docstring): (all within, lines)."""
    worst: dict[str, float] = {}
    differ: dict[str, int] = {}
    for a, b in zip(base["conditions"], new["conditions"]):
        for key in a:
            va, vb = a[key], b[key]
            if key == "noise_bands_db":
                d = max(abs(x - y) for x, y in zip(va, vb))
            elif isinstance(va, float) and isinstance(vb, float):
                d = abs(va - vb)
            else:
                differ[key] = differ.get(key, 0) + (va != vb)
                continue
            worst[key] = max(worst.get(key, 0.0), d)
    raw = max((abs(x - y) for a, b in zip(base["noise"], new["noise"]) for x, y in zip(a, b)), default=0.0)
    ok = not any(differ.values()) and all(d <= FLOAT_TOL for d in worst.values()) and raw <= NOISE_TOL_DB
    channels: dict[str, int] = {}
    for a in base["conditions"]:
        channels[a["channel"] or "none"] = channels.get(a["channel"] or "none", 0) + 1
    lines = [f"  channels measured (baseline): {', '.join(f'{k} {n}' for k, n in sorted(channels.items()))}",
             f"  categorical fields differing: {sum(differ.values())} "
             f"({', '.join(f'{k} {n}' for k, n in differ.items() if n) or 'none'})",
             "  worst float difference (as stored): " + ", ".join(f"{k} {d:.3g}" for k, d in worst.items()),
             f"  worst unrounded noise profile difference (speech, floor, bands): {raw:.3g} dB"]
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="baseline checkout (e.g. a worktree of main)")
    ap.add_argument("--new", type=Path, default=REPO, help="new checkout (default: this one)")
    ap.add_argument("--files", nargs="*", default=None, help="recordings (default: the shared CCNU phones)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the recordings per round")
    ap.add_argument("--variants", action="store_true", help=f"parity also on {', '.join(VARIANTS)} of each recording")
    args = ap.parse_args(argv)
    files = args.files or sorted(str(p) for p in (SHARED / "ccnu_mobile_sample").glob("*.wav"))
    if not files:
        raise SystemExit(f"no recordings: pass --files, or put the shared data at {SHARED}")
    baseline, new = args.baseline.resolve(), args.new.resolve()
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    for _ in range(args.rounds):
        for label, checkout in (("baseline", baseline), ("new", new)):
            runs[label].append(measure(checkout, files, args.repeats))
    base_ms = statistics.median(r["ms"] for r in runs["baseline"])
    new_ms = statistics.median(r["ms"] for r in runs["new"])
    print(f"condition measurement, {len(files)} recordings x {args.repeats} passes, {args.rounds} rounds (median)")
    print(f"  baseline {args.baseline}: {base_ms:.2f} ms CPU per recording")
    print(f"  new      {args.new}: {new_ms:.2f} ms CPU per recording  ({base_ms / max(new_ms, 1e-9):.2f}x the baseline)")
    ok, lines = compare(runs["baseline"][0], runs["new"][0])
    print(f"parity on the {len(files)} recordings:", "within" if ok else "NOT within", "the tolerances")
    print("\n".join(lines))
    if args.variants:
        with tempfile.TemporaryDirectory(prefix="condition-variants-") as tmp:
            made = json.loads(_child(_MAKE, baseline, json.dumps(files), json.dumps(VARIANTS), tmp))
            for v in VARIANTS:
                subset = [m for m in made if m.endswith(f"_{v}.wav")]
                v_ok, lines = compare(measure(baseline, subset, 0), measure(new, subset, 0))
                ok = ok and v_ok
                print(f"parity on {len(subset)} x {v}:", "within" if v_ok else "NOT within", "the tolerances")
                print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
