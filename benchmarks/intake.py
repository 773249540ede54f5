"""Intake under hostile input: peak RSS and time of ``devrecd identify`` per input class, each beside
a normal recording of the same duration measured in the same run, and the daemon's peak RSS on the
hostile corpus (tests/hostile.py) beside the daemon on good files only.

Input classes (all written fresh under a temporary folder):

* ``normal_10s``      10 s mono 32 kHz PCM-16 WAV: the resident baseline of the process
* ``long_wav``        ``--long-minutes`` (default 120) mono 32 kHz PCM-16 WAV (460 MB at 2 h)
* ``flac_bomb``       10 min, 8 channels, 48 kHz FLAC of a constant (a few hundred KB on disk)
* ``rate_1hz``        a 3.6 KB WAV whose header says 1 Hz (it would "last" 1,800 s)
* ``nan_float``       10 min float WAV with NaN samples
* ``stereo_48k``      10 min stereo 48 kHz float WAV (resampled and mixed block by block)

Each is compared with ``normal_<duration>``: a mono 32 kHz WAV of the same duration (``normal_600s``
is the 10 min WAV, ``normal_7200s`` the 2 h one at the default ``--long-minutes``). Targets: peak
RSS of identify on any single input <= 600 MB; daemon on the hostile corpus <= 1.5 GB.

    python benchmarks/intake.py --model export/NAME.onnx [--long-minutes 120] [--code DIR]
                                [--baseline-code DIR] [--classes normal_10s,normal_600s,long_wav]

``--code DIR`` runs the subprocesses with DIR first on PYTHONPATH (e.g. an older checkout, to
measure the same classes before a change). ``--baseline-code DIR`` measures every identify input a
second time with DIR's code in the same run (interleaved, so that both see the same machine load)
and prints it beside this code's figures: the named baseline of a change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SR = 32000


def _speech_like(seconds: float, rate: int = SR, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Noise bursts at a syllable rhythm, generated in 60 s pieces (a normal level, not silent)."""
    rng = np.random.default_rng(seed)
    out = np.empty((int(seconds * rate), channels), np.float32)
    step = 60 * rate
    for lo in range(0, len(out), step):
        n = min(step, len(out) - lo)
        t = np.arange(lo, lo + n) / rate
        env = (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))[:, None]
        out[lo:lo + n] = 0.05 * env * rng.standard_normal((n, channels))
    return out[:, 0] if channels == 1 else out


def _write_long(path: Path, seconds: float, rate: int = SR, channels: int = 1, subtype: str = "PCM_16",
                fill=None) -> Path:
    """A long file written in 60 s pieces (the benchmark itself stays small); kept when a previous
    run (same ``--work``) wrote it already."""
    if path.is_file() and sf.info(path).duration == seconds:
        return path
    with sf.SoundFile(path, "w", rate, channels, subtype=subtype) as fh:
        done = 0.0
        while done < seconds:
            piece = min(60.0, seconds - done)
            fh.write(fill(piece, rate, channels, int(done)) if fill else _speech_like(piece, rate, int(done), channels))
            done += piece
    return path


def make_inputs(d: Path, long_minutes: float) -> dict[str, tuple[Path, float]]:
    """{class: (path, seconds)}."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, float]] = {}
    out["normal_10s"] = (_write_long(d / "normal_10s.wav", 10), 10)
    out["long_wav"] = (_write_long(d / "long.wav", long_minutes * 60), long_minutes * 60)
    out["flac_bomb"] = (_write_long(d / "bomb.flac", 600, 48000, 8, "PCM_16",
                                    fill=lambda s, r, c, k: np.full((int(s * r), c), 0.1, np.float32)), 600)
    rate1 = bytearray((d / "normal_10s.wav").read_bytes()[:3600])
    rate1[24:28] = (1).to_bytes(4, "little")
    rate1[28:32] = (2).to_bytes(4, "little")
    (d / "rate_1hz.wav").write_bytes(bytes(rate1))
    out["rate_1hz"] = (d / "rate_1hz.wav", 1800)

    def nan_fill(s, r, c, k):
        x = _speech_like(s, r, k, c)
        x[::1000] = np.nan
        return x

    out["nan_float"] = (_write_long(d / "nan.wav", 600, subtype="FLOAT", fill=nan_fill), 600)
    out["stereo_48k"] = (_write_long(d / "stereo48.wav", 600, 48000, 2, "FLOAT"), 600)
    for seconds in sorted({s for _, s in out.values()} - {10}):
        out[f"normal_{seconds:.0f}s"] = (_write_long(d / f"normal_{seconds:.0f}s.wav", seconds), seconds)
    return out


def _env(code: Path | None) -> dict[str, str]:
    path = [str(code)] if code else [str(REPO)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "DEVRECD_TRAIN__THREADS": "1"}


def _outcome(out: bytes, err: bytes) -> str:
    try:
        rec = json.loads(out.decode().strip().splitlines()[0])
        return rec.get("reason") or rec.get("outcome") or "?"
    except (ValueError, IndexError):
        return (err.decode().strip().splitlines() or ["?"])[-1][:80]


def _run_measured(args: list[str], env: dict[str, str], code: Path | None) -> tuple[int, float, float, bytes, bytes]:
    """Run a process (in ``code``'s checkout: ``python -m`` puts the working folder first on the path);
    -> (exit code, peak RSS MB from wait4's rusage, wall s, stdout, stderr)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(args, stdout=fo, stderr=fe, env=env, cwd=str(code or REPO))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, time.monotonic() - t0, fo.read(), fe.read()


def measure_identify(path: Path, model: str, code: Path | None) -> dict:
    code_, peak, wall, out, err = _run_measured(
        [sys.executable, "-m", "devrecd", "identify", "--model", model, "--format", "json", str(path)], _env(code), code)
    return {"peak_rss_mb": round(peak, 1), "seconds": round(wall, 1), "exit": code_, "outcome": _outcome(out, err)}


def measure_daemon(evidence: Path, model: str, code: Path | None, work: Path, n_expected: int,
                   timeout: float = 1200) -> dict:
    """``devrecd watch`` on ``evidence`` until ``n_expected`` records; -> its peak RSS and time."""
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    cfg = work / "daemon.toml"
    cfg.write_text(f'[watch]\nstable_seconds = 0.5\npoll_interval = 0.5\nworkers = 2\n[metrics]\nport = 0\n'
                   f'[backend]\nmodel = {json.dumps(model)}\nthreads = 1\n')
    t0 = time.monotonic()
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "devrecd", "watch", str(evidence), "--config", str(cfg),
                             "--state-dir", str(state)], stdout=log, stderr=subprocess.STDOUT, env=_env(code),
                            cwd=str(code or REPO))
    records, peak = 0, 0.0
    try:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    peak = max(peak, next(int(x.split()[1]) for x in fh if x.startswith("VmHWM:")) / 1024)
            except (OSError, StopIteration):
                pass
            p = state / "verdicts.jsonl"
            records = len(p.read_text().splitlines()) if p.is_file() else 0
            if records >= n_expected:
                break
            time.sleep(0.5)
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    return {"peak_rss_mb": round(peak, 1), "seconds": round(time.monotonic() - t0, 1), "records": records,
            "expected": n_expected, "stayed_up": alive, "exit": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported ONNX model (its contract JSON beside it)")
    ap.add_argument("--long-minutes", type=float, default=120.0)
    ap.add_argument("--code", type=Path, default=None, help="run the subprocesses with this checkout's devrecd")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip-daemon", action="store_true")
    ap.add_argument("--skip-identify", action="store_true")
    ap.add_argument("--baseline-code", type=Path, default=None,
                    help="also measure every identify input with this checkout's devrecd (the baseline)")
    ap.add_argument("--classes", default="", help="comma-separated identify classes to run (default: all)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="devrecd-intake-"))
    model = str(Path(args.model).resolve())
    inputs = make_inputs(work / "inputs", args.long_minutes)
    wanted = [c for c in args.classes.split(",") if c] or [n for n in inputs if not n.startswith("normal_") or n == "normal_10s"]
    unknown = sorted(set(wanted) - set(inputs))
    if unknown:
        ap.error(f"unknown classes {unknown}; known: {sorted(inputs)}")
    base_code = args.baseline_code.resolve() if args.baseline_code else None
    print(f"code: {args.code or REPO}; baseline code: {base_code or 'none'}; inputs in {work / 'inputs'}")
    print(f"{'class':<16} {'input MB':>9} {'seconds':>8} {'peak RSS MB':>12} {'time s':>7}  {'outcome':<20} "
          f"| normal mono WAV, same duration: peak RSS MB, time s" + (" | baseline code, same input: peak RSS MB, time s, outcome"
                                                                      if base_code else ""))
    results: dict[str, dict] = {}
    baseline: dict[str, dict] = {}
    for name in ([] if args.skip_identify else wanted):
        path, seconds = inputs[name]
        r = measure_identify(path, model, args.code)
        base_name = "normal_10s" if seconds == 10 else f"normal_{seconds:.0f}s"
        b = r if name == base_name else results.get(base_name) or measure_identify(inputs[base_name][0], model, args.code)
        results[base_name] = b
        results[name] = r
        line = (f"{name:<16} {path.stat().st_size / 1e6:9.2f} {seconds:8.0f} {r['peak_rss_mb']:12.0f} {r['seconds']:7.1f}  "
                f"{r['outcome'][:20]:<20} | {b['peak_rss_mb']:.0f}, {b['seconds']:.1f}")
        if base_code:
            o = baseline[name] = measure_identify(path, model, base_code)
            line += f" | {o['peak_rss_mb']:.0f}, {o['seconds']:.1f}, {o['outcome'][:20]}"
        print(line, flush=True)
    if results:
        worst = max(results.items(), key=lambda kv: kv[1]["peak_rss_mb"])
        rest = results.get("normal_10s")
        print(f"identify: worst peak RSS {worst[1]['peak_rss_mb']:.0f} MB ({worst[0]}) over {len(results)} inputs "
              f"(target <= 600 MB)" + (f"; resident (normal_10s) {rest['peak_rss_mb']:.0f} MB" if rest else ""))
    if baseline:
        worst = max(baseline.items(), key=lambda kv: kv[1]["peak_rss_mb"])
        print(f"baseline code: worst peak RSS {worst[1]['peak_rss_mb']:.0f} MB ({worst[0]}) over {len(baseline)} inputs")
    if args.skip_daemon:
        return
    sys.path.insert(0, str(REPO))
    from tests.hostile import build

    import csv

    ccnu = REPO.parent / "shared" / "data" / "ccnu_mobile_sample"
    with open(ccnu / "manifest.csv", newline="") as fh:
        good = [ccnu / r["path"] for r in csv.DictReader(fh) if int(r["segment"]) >= 4][:3]
    hostile = work / "hostile"
    shutil.rmtree(hostile, ignore_errors=True)
    shutil.rmtree(work / "goods", ignore_errors=True)
    expect, _ = build(hostile / "evidence", good, hostile / "outside")
    for name in ("long_wav", "flac_bomb", "nan_float", "stereo_48k"):
        os.link(inputs[name][0], hostile / "evidence" / f"bench {name}{inputs[name][0].suffix}")
    n_hostile = len(expect) + 4
    goods = work / "goods"
    (goods / "evidence").mkdir(parents=True, exist_ok=True)
    for name, e in expect.items():
        if e.outcome == "judged" and (hostile / "evidence" / name).is_file():
            shutil.copy(hostile / "evidence" / name, goods / "evidence" / f"{len(os.listdir(goods / 'evidence'))}.wav")
    os.link(inputs["long_wav"][0], goods / "evidence" / "long.wav")
    n_goods = len(os.listdir(goods / "evidence"))
    d_good = measure_daemon(goods / "evidence", model, args.code, goods, n_goods)
    d_host = measure_daemon(hostile / "evidence", model, args.code, hostile, n_hostile)
    print(f"daemon, hostile corpus ({n_hostile} entries incl. the {args.long_minutes:.0f} min WAV, the bomb, NaN and "
          f"48 kHz stereo): peak RSS {d_host['peak_rss_mb']:.0f} MB, {d_host['seconds']:.0f} s, "
          f"{d_host['records']}/{d_host['expected']} records, stayed up: {d_host['stayed_up']} (target <= 1536 MB)")
    print(f"baseline daemon, good files only ({n_goods} files incl. the same long WAV): peak RSS "
          f"{d_good['peak_rss_mb']:.0f} MB, {d_good['seconds']:.0f} s, {d_good['records']}/{d_good['expected']} records")


if __name__ == "__main__":
    main()
