"""The serving install: its size, `devrecd identify`'s start-and-answer time and memory, and the
numpy frontend's parity with the torch frontend, each beside a baseline measured in the same run.

1. Size. A fresh venv gets ONLY the base install: the project's wheel (built here, --no-deps) and
   its declared dependencies, resolved by pip from the indexes pip is configured with (on the
   development machine a local mirror; no extras). Its size is every file under the venv (du -b),
   pip and setuptools included. Baseline: the same sum over the installed distributions of the
   dependency closure the previous base install declared (BASELINE_DEPS: torch, scipy, scikit-learn,
   matplotlib, onnx, onnxscript, tqdm, ...) read from their RECORD files in this interpreter's
   environment (that install cannot be repeated here without the network: pip resolves "torch" to
   a CUDA build), plus the same venv overhead.
2. Start + answer. `devrecd identify FILE --model M.onnx` as a whole process, RUNS times each,
   interleaved: A = the serving venv (no torch installed) serving the export's NAME.ort (ONNX
   Runtime's format of the optimised graph); A' = the same venv serving the .onnx (a copy of the
   export whose contract names no .ort, as exports before .ort files); B = the baseline, the code of
   --baseline-rev (default: main) in this environment (torch, scipy, ... installed, as today); with
   --serving-baseline-rev REV also C = that revision's code in the serving venv on the same model (code
   from before .ort files serves its .onnx): the start-time baseline of the serving install itself.
   Wall seconds, CPU seconds (user + system) and peak RSS (the largest resident set), median/min/max.
3. Parity: the same ONNX model on features from the frontend run on numpy (serving) and on torch
   tensors (training, GPU): max abs difference of probabilities over every window of one recording of
   each of the 15 CCNU phones (segment 4), and recording verdicts that agree.

    python benchmarks/serving.py [--model export/NAME.onnx] [--runs 5] [--venv DIR] [--baseline-rev main]

Without --model, a model is made first (the paper network after 40 full-batch Adam steps on CCNU
segment 1, exported by `devrecd export`; ~2 min). A barely trained model (the tests' one-step
fixture) gives near-uniform probabilities that hardly react to its features: parity on it proves less. Timings are whole-process: on a busy 2-core
machine quote the medians and look at the spread.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CCNU = REPO.parent / "shared" / "data" / "ccnu_mobile_sample"
# The base install before the serving split (pyproject.toml's dependencies until then).
BASELINE_DEPS = ("torch", "numpy", "scipy", "soundfile", "soxr", "av", "typer", "prometheus-client", "onnx",
                 "onnxscript", "onnxruntime", "watchdog", "tqdm", "matplotlib", "scikit-learn")
TRAINING_STACK = ("torch", "sklearn", "scipy", "matplotlib", "onnx", "onnxscript")


def du(path: Path) -> int:
    """Bytes of every regular file under ``path`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def closure(names: tuple[str, ...]) -> dict[str, int]:
    """Installed bytes (from RECORD) of each distribution in the dependency closure of ``names``
    (environment markers evaluated, extras not taken), in this interpreter's environment."""
    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = sum((f.size or 0) for f in dist.files or ())
        for req in dist.requires or ():
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def build_venv(venv: Path, work: Path) -> float:
    """A fresh venv with the base install only; returns the seconds pip took."""
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True)
    (wheel,) = wheels.glob("devrecd-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t0 = time.perf_counter()
    # As .ci/setup does: the venv's bundled pip first upgraded (pip 23.2 installed the dependencies
    # of a local wheel and then not the wheel itself, exiting 0).
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True,
                   stderr=subprocess.DEVNULL)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   stderr=subprocess.DEVNULL)  # (pip warns about every missing mirror folder)
    if not (venv / "bin/devrecd").is_file():
        raise SystemExit(f"pip install {wheel.name} left no {venv}/bin/devrecd")
    return time.perf_counter() - t0


def make_model(work: Path) -> Path:
    """The paper network after 40 Adam steps on CCNU segment 1 (all windows at once), exported."""
    code = f"""
import csv, sys
from pathlib import Path
import numpy as np, torch
from devrecd.config import load_config
from devrecd.model import build_model
from devrecd.model.checkpoint import Checkpoint, save_checkpoint
from devrecd.stages import features_for_file
ccnu = Path({str(CCNU)!r}); run = Path({str(work / 'run')!r})
rows = [r for r in csv.DictReader(open(ccnu / "manifest.csv")) if r["segment"] == "1"]
cfg = load_config(None, env={{}})
labels = sorted({{r["device"] for r in rows}})
feats, ys = [], []
for r in rows:
    _, f = features_for_file(ccnu / r["path"], cfg, hop_seconds=4.0)
    feats.append(f); ys += [labels.index(r["device"])] * len(f)
x = np.concatenate(feats).reshape(-1, 73)
mean, std = x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)
torch.manual_seed(0)
net = build_model("paper", len(labels)); net.train()
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
xx = torch.from_numpy((np.concatenate(feats) - mean) / std)
for _ in range(40):  # trained (on segment 1) far enough that its probabilities react to the features
    loss = torch.nn.functional.cross_entropy(net(xx), torch.tensor(ys)); opt.zero_grad(); loss.backward(); opt.step()
run.mkdir(parents=True, exist_ok=True)
save_checkpoint(run / "best.pt", Checkpoint(arch="paper", hparams={{}}, labels=labels, frontend=cfg.frontend,
    norm_mean=mean, norm_std=std, state_dict=net.eval().state_dict(), dataset_sha256="0" * 64,
    split={{"train": [r["path"] for r in rows]}}, meta={{"epoch": 1}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    out = work / "paper.onnx"
    subprocess.run([sys.executable, "-m", "devrecd", "export", str(work / "run"), "--out", str(out), "--parity-audio",
                    str(CCNU)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def peak_rss_run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float, str]:
    """(wall s, CPU s (user + system), peak RSS MB, stdout) of one run of ``cmd``, in a fresh helper
    process so that RUSAGE_CHILDREN is this command's alone."""
    code = ("import os, resource, subprocess, sys, time, json\n"
            "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "w = time.perf_counter() - t\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps([w, u.ru_utime + u.ru_stime, u.ru_maxrss / 1024, p.returncode,"
            " p.stdout, p.stderr[-2000:]]))\n")
    done = subprocess.run([sys.executable, "-c", code, *cmd], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"timing helper failed: {done.stderr.strip()[-2000:]}")
    wall, cpu, peak, rc, out, err = json.loads(done.stdout)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}): {err}")
    return wall, cpu, peak, out


def parity() -> tuple[float, int, int, int]:
    """(max abs probability difference, windows, recordings, recording verdicts that agree)."""
    import numpy as np
    import torch

    from devrecd.audio import cut_windows, read_evidence
    from devrecd.backends.onnxrt import OnnxRuntimeBackend
    from devrecd.features import Frontend

    torch.set_num_threads(1)
    backend = OnnxRuntimeBackend(ARGS.model)
    cfg = backend.frontend
    frontend = Frontend(cfg)
    with open(CCNU / "manifest.csv", newline="") as fh:
        files = [CCNU / r["path"] for r in csv.DictReader(fh) if r["segment"] == "4"]
    worst, windows, agree = 0.0, 0, 0
    for path in files:
        clips = cut_windows(read_evidence(path, cfg.sample_rate).samples, cfg.clip_samples, cfg.clip_samples // 2)
        p_np = backend.infer(frontend(clips))
        p_t = backend.infer(frontend(torch.from_numpy(clips)).numpy())
        worst = max(worst, float(np.abs(p_np - p_t).max()))
        windows += len(clips)
        agree += int(np.log(p_np).mean(0).argmax() == np.log(p_t).mean(0).argmax())
    return worst, windows, len(files), agree


def checkout(rev: str, dst: Path) -> tuple[Path, str]:
    """The ``devrecd`` package of git revision ``rev`` extracted under ``dst``; (dst, short sha)."""
    dst.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "devrecd"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True,
                         text=True, check=True).stdout.strip()
    return dst, sha


def onnx_only_copy(model: Path, dst: Path) -> Path:
    """A copy of the export (.onnx + contract) whose contract names no .ort: what exports made
    before .ort files look like, served from the .onnx."""
    dst.mkdir(parents=True, exist_ok=True)
    doc = json.loads(model.with_suffix(".json").read_text())
    doc.pop("ort", None)
    (dst / model.with_suffix(".json").name).write_text(json.dumps(doc, indent=2))
    (dst / model.name).write_bytes(model.read_bytes())
    return dst / model.name


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f}  (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="export/NAME.onnx (default: make one, ~2 min)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--venv", type=Path, help="the serving venv: built there when it does not exist, then kept "
                    "(default: a fresh one in a temporary folder)")
    ap.add_argument("--baseline-rev", default="main", help="git revision whose code is the start-time baseline")
    ap.add_argument("--audio", type=Path, default=CCNU / "xiaomi8se_5.wav")
    ap.add_argument("--serving-baseline-rev", help="git revision whose code is also run in the serving venv")
    ARGS = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="devrecd-serving-") as tmp:
        work = Path(tmp)
        model = ARGS.model or make_model(work)
        ARGS.model = model
        venv = ARGS.venv or work / "venv"
        print("== serving venv: the base install only")
        if not venv.exists():
            seconds = build_venv(venv, work)
            print(f"   built {venv} with pip install devrecd-*.whl in {seconds:.0f} s")
        size = du(venv)
        missing = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.util as u; print(' '.join("
                                  f"n for n in {TRAINING_STACK!r} if u.find_spec(n)))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        fresh = subprocess.run([str(venv / "bin/python"), "-c", "import importlib.metadata as m, json; print(json.dumps("
                                "sorted(((sum((f.size or 0) for f in d.files or ()), d.metadata['Name']) for d in "
                                "m.distributions()), reverse=True)[:6]))"], capture_output=True, text=True, check=True)
        print(f"   size: {size / 1e6:.0f} MB (target <= 350 MB); training stack importable there: {missing or 'none'}")
        print(f"   largest distributions: {fresh.stdout.strip()}")
        base = closure(BASELINE_DEPS)
        overhead = sum(closure(("pip", "setuptools")).values())
        print(f"   baseline (previous base dependencies' closure, RECORD sizes + pip/setuptools): "
              f"{(sum(base.values()) + overhead) / 1e6:.0f} MB over {len(base)} distributions; largest: "
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(base.items(), key=lambda kv: -kv[1])[:5]))

        print(f"== devrecd identify {ARGS.audio.name} --model {model.name}: whole process, {ARGS.runs} runs each")
        rev, sha = checkout(ARGS.baseline_rev, work / "baseline")
        # Bytecode caches allowed, as in an installed package (the baseline's are written in its warm-up run).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")} | {
            "OMP_NUM_THREADS": "1"}
        args = ["identify", str(ARGS.audio)]
        has_ort = bool(json.loads(model.with_suffix(".json").read_text()).get("ort"))
        onnx_only = onnx_only_copy(model, work / "onnx-only")
        commands = {}
        if has_ort:
            commands["serving venv (this code, no torch installed), serving NAME.ort"] = (
                [str(venv / "bin/devrecd"), *args, "--model", str(model)], env)
        else:
            print(f"   ({model.with_suffix('.json').name} names no .ort: re-export the model to measure the .ort)")
        commands["serving venv (this code, no torch installed), serving NAME.onnx (contract without .ort)"] = (
            [str(venv / "bin/devrecd"), *args, "--model", str(onnx_only)], env)
        if ARGS.serving_baseline_rev:
            srev, ssha = checkout(ARGS.serving_baseline_rev, work / "serving-baseline")
            commands[f"serving baseline: {ARGS.serving_baseline_rev} ({ssha}) in the serving venv, same model"] = (
                [str(venv / "bin/python"), "-m", "devrecd", *args, "--model", str(model)],  # code before .ort serves the .onnx
                env | {"PYTHONPATH": str(srev)})
        commands[f"baseline: {ARGS.baseline_rev} ({sha}) in the full environment"] = (
            [sys.executable, "-m", "devrecd", *args, "--model", str(model)], env | {"PYTHONPATH": str(rev)})
        results: dict[str, list[tuple[float, float, float, str]]] = {k: [] for k in commands}
        for name, (cmd, e) in commands.items():  # warm-up: page cache, .pyc files
            peak_rss_run(cmd, e, work)
        for _ in range(ARGS.runs):
            for name, (cmd, e) in commands.items():
                results[name].append(peak_rss_run(cmd, e, work))
        for name, runs in results.items():
            verdict = next((l for l in runs[-1][3].splitlines() if l.startswith(str(ARGS.audio))), "?")
            print(f"   {name}:\n      wall s  {summary([r[0] for r in runs])}\n      CPU s   {summary([r[1] for r in runs])}"
                  f"\n      peak RSS MB {summary([r[2] for r in runs])}")
            print(f"      verdict: {' '.join(verdict[len(str(ARGS.audio)):].split()[:2])}")
        walls = [statistics.median(r[0] for r in v) for v in results.values()]
        cpus = [statistics.median(r[1] for r in v) for v in results.values()]
        for name, wall, cpu in zip(list(results)[:-1], walls, cpus):
            print(f"   {name.split(':')[0].split(', ')[-1]} / the full-environment baseline: wall {wall / walls[-1]:.2f}, "
                  f"CPU {cpu / cpus[-1]:.2f}")
        print(f"   load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (target: serving wall <= 1.5 s; "
              "on a busy machine CPU seconds are the steadier figure)")

        print("== parity: numpy frontend vs torch frontend, same ONNX model, CCNU segment 4 (15 phones)")
        worst, windows, recordings, agree = parity()
        print(f"   max abs probability difference {worst:.2e} over {windows} windows (target <= 1e-4); "
              f"recording verdicts agree {agree}/{recordings}")


if __name__ == "__main__":
    main()
