"""Backlog: N recordings of 10 s dropped into a watched folder at once, vs the naive loop.

Two modes: the closed-set model (``--model``), or open set only (``--registry R`` without
``--model``: the registry's scorer, e.g. the shipped GSV scorer, and no network); ``--enroll K``
makes that registry first, with ``devrecd enroll`` of K CCNU phones (segments 1-2 each). Open set,
every timed run (each naive pass, each daemon) judges against its own copy of the registry without
the noise-matched reference vectors kept on disk (:func:`fresh_registry`): all meet the backlog's
noise conditions as new, so all do the same matching work.

The daemon (``devrecd watch`` as a subprocess, CPU backend) judges the backlog; measured: files/s,
audio-seconds per second, p50/p99 latency from the drop to the verdict, the daemon's peak RSS (with its
worker processes: the sum of each process's peak) and CPU (the daemon and its worker processes).
Baseline, measured in the same run on the same files: the naive loop (decode, features and infer
one file at a time, the same model through the same backend), once with 1 and once with 2 ONNX
Runtime threads; the daemon is compared against the faster of the two.

Evidence is real phone audio: the CCNU_Mobile sample concatenated and cut into 10 s recordings at
distinct offsets (distinct content, so no file is a duplicate of another).

    python benchmarks/backlog.py --model export/NAME.onnx [--files 1000] [--naive-files 200]
    python benchmarks/backlog.py --registry /tmp/reg/registry.json --enroll 4 [--files 400] [--naive-files 100]
    ... [--baseline-code ../other-checkout] [--rounds 3]   (the daemons of both codes take turns, same files)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SR = 32000
# CPU seconds (user + system, all threads) of the best pass of each naive loop: (id(files), threads) -> s
NAIVE_CPU: dict[tuple[int, int], float] = {}


def make_evidence(out: Path, n: int, seconds: float, shared: Path) -> list[Path]:
    """n real recordings of ``seconds`` each, cut from the CCNU sample at distinct offsets."""
    ccnu = shared / "data" / "ccnu_mobile_sample"
    with open(ccnu / "manifest.csv", newline="") as fh:
        paths = [ccnu / r["path"] for r in csv.DictReader(fh)]
    audio = np.concatenate([sf.read(p, dtype="int16")[0] for p in paths])
    length = int(seconds * SR)
    step = max(1, (len(audio) - length) // max(1, n))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        start = (i * step) % (len(audio) - length)
        p = out / f"rec {i:05d}.wav"
        sf.write(p, audio[start:start + length], SR, subtype="PCM_16")
        files.append(p)
    return files


def fresh_registry(registry: str, dst: Path) -> str:
    """A copy of ``registry`` (its JSON, arrays and reference store) in ``dst``, without the
    noise-matched reference vectors kept on disk (``<stem>.refs/conditions/<channel>/noise``); returns
    the copy's JSON path. Every timed run (each naive pass, each daemon) judges against such a copy,
    so each meets the backlog's noise conditions as new, as a daemon does a new backlog: with the
    original registry, the naive loop's timed pass (the best of two) found every vector its earlier
    pass had computed, ~0.4 s of CPU for each noise condition (31 of 300 CCNU files here), while the
    daemon computed them for the files the naive loop had not judged: measured 17 vs 35 ms of CPU
    per file, the daemon reported 0.52x its naive loop."""
    import shutil

    src = Path(registry)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.parent.glob(f"{src.stem}.*"):  # registry.json, registry.<sha>.npz, registry.refs/
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=lambda d, names: ["noise"] if Path(d).parent.name == "conditions" else [])
        else:
            shutil.copy2(p, dst / p.name)
    return str(dst / src.name)


def naive_open_set(files: list[Path], registry: str, work: Path, repeats: int = 2, threads: int = 1) -> float:
    """Seconds to judge ``files`` one at a time with the registry's scorer alone (the open-set-only
    daemon's work: decode, features on the scorer's frontend, the registry's verdict with its
    noise-matched references), best of ``repeats`` passes, with numpy's BLAS on ``threads`` threads;
    each pass against its own fresh copy of the registry (:func:`fresh_registry`), as each daemon."""
    import shutil
    from dataclasses import replace

    from threadpoolctl import threadpool_limits

    from devrecd.config import load_config
    from devrecd.pipeline.serving import OpenSetOnly
    from devrecd.stages import features_for_file

    with threadpool_limits(threads, user_api="blas"):
        best = float("inf")
        for i in range(repeats):
            copy = work / f"naive-registry-{threads}-{i}"
            cfg = load_config(None, overrides={"registry.path": fresh_registry(registry, copy)})
            served = OpenSetOnly(cfg)
            cfg = replace(cfg, frontend=served.frontend)
            features_for_file(files[0], cfg)  # warm-up of the frontend (the judge's caches stay cold)
            t0, c0 = time.perf_counter(), time.process_time()
            for p in files:
                rec, feats = features_for_file(p, cfg)
                served.judge(feats, rec.describe())
            if time.perf_counter() - t0 < best:
                best, NAIVE_CPU[id(files), threads] = time.perf_counter() - t0, time.process_time() - c0
            shutil.rmtree(copy)
    return best


def enroll(registry: Path, phones: int, shared: Path) -> list[str]:
    """``devrecd enroll`` (the shipped GSV scorer) of the first ``phones`` CCNU phones, segments 1-2."""
    ccnu = shared / "data" / "ccnu_mobile_sample"
    with open(ccnu / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    devices = sorted({r["device"] for r in rows})[:phones]
    for dev in devices:
        refs = [str(ccnu / r["path"]) for r in rows if r["device"] == dev and int(r["segment"]) <= 2]
        subprocess.run([sys.executable, "-c", "from devrecd.cli import main; main()", "enroll", "--profile", dev,
                        *refs, "--registry", str(registry)], check=True, capture_output=True)
    return devices


def naive_loop(files: list[Path], model: str, repeats: int = 2, threads: int = 1) -> float:
    """Seconds to judge ``files`` one at a time: decode, features, infer, aggregate, and the condition
    the verdict is judged under (``describe()``: a closed-set verdict names no device under a condition
    the model was not validated for, so the daemon measures it for every file; this loop did not
    before 2026-12-07), best of ``repeats`` passes (the machine is shared: the best pass is the
    fairest baseline)."""
    from devrecd.config import load_config
    from devrecd.pipeline.serving import load_serving_backend
    from devrecd.pipeline.verdict import aggregate, closed_set_comparison, model_validation
    from devrecd.stages import features_for_file

    # The same ONNX Runtime thread count as the daemon run. Note: with 2 threads ORT's spinning
    # workers compete with torch for the cores (measured ~5x slower features with a tiny model).
    cfg = load_config(None, overrides={"backend.model": model, "backend.threads": threads})
    backend = load_serving_backend(cfg)
    validation = model_validation(cfg.backend, backend.describe())
    try:
        _, feats = features_for_file(files[0], cfg)  # warm-up (first torch call), as the daemon's
        backend.infer(feats)
        best = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for p in files:
                rec, feats = features_for_file(p, cfg)
                aggregate(backend.infer(feats), backend.labels)
                closed_set_comparison(rec.describe().get("condition"), validation)
            if time.perf_counter() - t0 < best:
                best, NAIVE_CPU[id(files), threads] = time.perf_counter() - t0, time.process_time() - c0
        return best
    finally:
        backend.close()


def _judged_at(rec: dict) -> float:
    return datetime.fromisoformat(rec["judged_at"].replace("Z", "+00:00")).timestamp()


def start_daemon(work: Path, evidence: Path, model: str | None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, registry: str | None = None) -> tuple[subprocess.Popen, Path]:
    state = work / "state"
    served = ["--model", model] if model else ["--registry", str(registry)]
    # This checkout's code unless ``env`` names another's PYTHONPATH, run from ``work``: ``python -c``
    # puts the current folder ahead of PYTHONPATH (run from a checkout, a --baseline-code daemon
    # imported that checkout's code), and without PYTHONPATH the editable install's would be taken.
    proc = subprocess.Popen([sys.executable, "-c", "from devrecd.cli import main; main()", "watch", str(evidence),
                             *served, "--state-dir", str(state), "--port", "0", *(extra or [])],
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=work,
                            stderr=open(work / "daemon.log", "wb"))
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("daemon exited:\n" + (work / "daemon.log").read_text()[-3000:])
        if (state / "daemon.json").is_file():
            return proc, state
        time.sleep(0.1)
    sys.exit("daemon did not get ready")


def read_records(state: Path) -> list[dict]:
    p = state / "verdicts.jsonl"
    # Only whole lines: the daemon appends a group of records in one write, which a reader may
    # catch half done (the line without its newline is not written yet).
    text = p.read_text() if p.is_file() else ""
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (the daemon's worker processes and their helpers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and the live processes below it (all threads)."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_rss_mib(pid: int) -> float:
    """The daemon's peak RSS: the sum of the peaks (VmHWM) of it and of every live process below it
    (worker processes). An upper bound of the tree's peak: pages shared between the processes (the
    interpreter, numpy) count once per process, and the peaks need not coincide."""
    total = 0.0
    for p in tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(x.split()[1]) / 1024 for x in lines if x.startswith("VmHWM:")), 0.0)
    return total if total else float("nan")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="export/NAME.onnx (closed set)")
    ap.add_argument("--registry", help="open set only (no --model): a device registry, e.g. of the shipped GSV scorer")
    ap.add_argument("--enroll", type=int, default=0, help="first enrol this many CCNU phones into --registry")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--naive-files", type=int, default=200, help="files timed for the naive loop (rate extrapolates)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per daemon inference stream")
    ap.add_argument("--streams", type=int, default=0, help="daemon inference streams (0 = auto)")
    ap.add_argument("--baseline-code", metavar="DIR", help="also run the daemon with another checkout's code (its "
                    "PYTHONPATH), on the same files, taking turns with this code's daemon")
    ap.add_argument("--rounds", type=int, default=1, help="daemon runs of each code (medians are printed)")
    args = ap.parse_args()
    if bool(args.model) == bool(args.registry):
        ap.error("give --model (closed set) or --registry (open set only)")
    if args.enroll:
        enrolled = enroll(Path(args.registry), args.enroll, args.shared)
        print(f"enrolled {len(enrolled)} phones (shipped GSV scorer): {', '.join(enrolled)}")

    with tempfile.TemporaryDirectory(prefix="devrecd-backlog-") as tmp:
        work = Path(tmp)
        staging = work / "staging"
        files = make_evidence(staging, args.files, args.seconds, args.shared)

        naive_n = min(args.naive_files, len(files))
        # The naive loop runs before AND after the daemons (the best pass counts): the machine is
        # shared, and a load spike during one pass must not flatter the daemon.
        # Closed set: 1 and 2 ONNX Runtime threads; open set (no network): numpy's BLAS on 1 and 2 threads.
        naive_threads = (1, 2)

        def naive(paths: list[Path], threads: int) -> float:
            return naive_loop(paths, args.model, threads=threads) if args.model else \
                naive_open_set(paths, args.registry, work, threads=threads)

        first = files[:naive_n]
        naive_before = {t: naive(first, t) for t in naive_threads}
        cpu_before = {t: NAIVE_CPU[id(first), t] for t in naive_threads}
        codes = [("this code", None)] + ([("baseline", args.baseline_code)] if args.baseline_code else [])
        runs: dict[str, list[dict]] = {name: [] for name, _ in codes}
        for r in range(args.rounds):  # the daemons take turns: the same load for both
            for name, code in (codes if r % 2 == 0 else codes[::-1]):
                runs[name].append(run_daemon(work / f"run-{r}-{len(runs[name])}-{name.replace(' ', '_')}", files,
                                             args, code))
        moved = files[:naive_n]
        naive_after = {t: naive(moved, t) for t in naive_threads}
        cpu_after = {t: NAIVE_CPU[id(moved), t] for t in naive_threads}
        naive_cpu = {t: (cpu_before if naive_before[t] <= naive_after[t] else cpu_after)[t] / naive_n
                     for t in naive_threads}
        naive_s = {t: min(naive_before[t], naive_after[t]) for t in naive_threads}
        best_t = min(naive_threads, key=naive_s.get)
        naive_rate = naive_n / naive_s[best_t]
        mode = f"closed set {Path(args.model).name}" if args.model else f"open set only, registry {args.registry}"
        print(f"backlog ({mode}): {len(files)} x {args.seconds:.0f} s real phone recordings dropped at once; CPU; "
              f"workers={args.workers} max_batch={args.max_batch} ort_threads={args.threads} "
              f"inference_streams={runs['this code'][0]['streams']}; {args.rounds} round(s), medians")
        for name, code in codes:
            rs = runs[name]
            med = {k: float(np.median([x[k] for x in rs])) for k in ("rate", "p50", "p99", "rss", "cpu")}
            label = "daemon" if code is None else f"daemon ({code})"
            rates = ", ".join(f"{x['rate']:.2f}" for x in rs)
            loads = ", ".join(f"{x['load']:.1f}" for x in rs)
            print(f"  {label}: {med['rate']:7.2f} files/s  {med['rate'] * args.seconds:8.1f} audio-s/s  "
                  f"drop->verdict p50 {med['p50']:6.1f} s  p99 {med['p99']:6.1f} s  peak RSS {med['rss']:.0f} MiB  "
                  f"CPU {med['cpu']:.0f} ms/file  (each round: {rates} files/s; "
                  f"outcomes {rs[0]['outcomes']}; loads {loads})")
        for t in naive_threads:
            r = naive_n / naive_s[t]
            what = f"{t} ORT thread(s)" if args.model else f"registry scorer, {t} BLAS thread(s)"
            print(f"  naive loop  : {r:7.2f} files/s  {r * args.seconds:8.1f} audio-s/s  ({what}: "
                  f"{naive_n} files, best of passes before/after the daemons: {naive_before[t]:.1f} s / "
                  f"{naive_after[t]:.1f} s; one file at a time, same model and backend; CPU {naive_cpu[t] * 1e3:.0f} ms/file)")
        for name, code in codes:
            rate = float(np.median([x["rate"] for x in runs[name]]))
            print(f"  speed-up    : {rate / naive_rate:.2f}x ({name}) over the faster naive loop ({best_t} thread(s)) "
                  f"(target >= 1.75x; load average {os.getloadavg()[0]:.1f})")


def run_daemon(work: Path, files: list[Path], args: argparse.Namespace, code: str | None) -> dict:
    """One daemon (this checkout's code, or ``code``'s: PYTHONPATH) judging the whole backlog dropped at
    once into a fresh folder and state; the files go back where they were afterwards."""
    evidence = work / "evidence"
    evidence.mkdir(parents=True)
    env = {"DEVRECD_WATCH__WORKERS": str(args.workers), "DEVRECD_BATCHER__MAX_BATCH": str(args.max_batch),
           "DEVRECD_WATCH__STABLE_SECONDS": "1.0", "DEVRECD_BACKEND__THREADS": str(args.threads),
           "DEVRECD_BATCHER__STREAMS": str(args.streams), "DEVRECD_LOG__FORMAT": "json"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(code).resolve()), os.environ.get("PYTHONPATH")]))
    registry = fresh_registry(args.registry, work / "registry") if args.registry else None
    proc, state = start_daemon(work, evidence, args.model, registry=registry, env=env)
    try:
        cpu0 = cpu_seconds(proc.pid)
        dropped = time.time()
        for p in files:  # a rename is atomic: the whole backlog appears at once
            os.rename(p, evidence / p.name)
        while len(recs := read_records(state)) < len(files):
            if proc.poll() is not None:
                sys.exit("daemon died:\n" + (work / "daemon.log").read_text()[-3000:])
            time.sleep(0.2)
        rss = peak_rss_mib(proc.pid)
        daemon_cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop(proc)
    for p in files:
        os.rename(evidence / p.name, p)
    wall = max(_judged_at(r) for r in recs) - dropped
    latency = [_judged_at(r) - dropped for r in recs]
    logged = [json.loads(x) for x in (work / "daemon.log").read_text().splitlines() if x.startswith("{")]
    ready = next((r for r in logged if r.get("event") == "ready"), {})
    return {"rate": len(files) / wall, "p50": pct(latency, 50), "p99": pct(latency, 99), "rss": rss,
            "cpu": daemon_cpu / len(files) * 1e3, "load": os.getloadavg()[0], "streams": ready.get("inference_streams", "?"),
            "outcomes": {o: sum(r["outcome"] == o for r in recs) for o in ("judged", "duplicate", "failed")}
            | {"noise-matched": sum(bool((r.get("comparison") or {}).get("noise_matched")) for r in recs)}}


if __name__ == "__main__":
    main()
