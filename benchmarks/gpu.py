"""The GPU path, measured in one run: CUDA frontend, torch CUDA backend, the daemon end to end, TensorRT.

    python benchmarks/gpu.py --device cuda --minutes 5 --out gpu.json [--data DIR] [--files 5000]
    python benchmarks/gpu.py --device cpu --tiny --out gpu-cpu.json      # the test suite's run

Sections (each prints a table beside its target and its baseline, all measured in this run):

a. frontend: CUDA vs CPU frontend on real 10 s phone recordings (max abs diff per feature dim, the
   FP16 overflow of raw mel power), and 10 s clips/s at batch 1..1024 vs the CPU frontend.
b. network through the torch backend: FP32, FP16/BF16 autocast, CUDA graphs; clips/s and p50/p99
   latency at batch 1, 8, 64, 512; top-1 agreement and max probability difference vs FP32 on the CPU
   on held-out real windows.
c. end to end: the daemon's pipeline (``identify``) with the CUDA frontend and the torch CUDA backend
   on a backlog of >= 5,000 ten-second files in tmpfs: files/s, time per stage (decode, H2D,
   frontend, inference, writer), GPU utilisation; baseline: the CPU daemon (CPU frontend + ONNX
   Runtime) on a subset of the same backlog, extrapolated (labelled so).
d. TensorRT through ``build-engine`` when ``tensorrt`` imports (skipped with the reason otherwise).
e. the shipped open-set scorer (GMM supervectors, the default ``devrecd enroll`` scorer) on the
   device (devrecd/supervector_torch.py: frontend, GMM statistics, supervector, NAP and scores in
   torch): parity with the numpy scorer on every real recording (same verdict, max score
   difference, target <= 1e-4), and the open-set-only daemon (``identify --registry``, 4 enrolled
   phones) end to end on the device vs the CPU daemon on a subset (extrapolated, labelled so).

The model: the paper network fitted here, on the benchmark's device, for a few Adam steps on CCNU
segments 1-3 (saved as a real checkpoint and loaded through the backend like any other), so that
its outputs are confident enough for top-1 agreement to mean something; agreement is measured on
segments 4-5. Speed does not depend on the weights. Audio: ``--data`` (default: the CCNU_Mobile
sample in ``.gpucheck/data/`` in the repository, where the GPU check carries it, else ``../shared``);
when absent or unreadable, synthesised audio, with a note in the output.

``--minutes`` is a budget: sizes (timing per cell, batches, backlog) shrink to fit it, and every cell
dropped for time says so. ``--tiny`` is the smallest run of every section (the test suite runs it
on the CPU so that this script cannot rot); its figures are not measurements of anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SR = 32000
FILE_SECONDS = 10.0
NET_BATCHES = (1, 8, 64, 512)
FRONTEND_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FP16_MAX = 65504.0

TARGETS = {
    "network_fp16_graphs_b512_clips_per_s": 20000.0,
    "network_b1_latency_ms": 2.0,
    "e2e_files_per_s": 2000.0,
    "e2e_speedup_vs_cpu": 20.0,
    "frontend_speedup_b256": 50.0,
    "gsv_max_score_diff": 1e-4,
}


# --- small helpers ----------------------------------------------------------------------------

class Budget:
    """Seconds left of ``--minutes``, shared out between sections."""

    def __init__(self, minutes: float) -> None:
        self.total = minutes * 60.0
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def deadline(self, share: float) -> float:
        """A perf_counter deadline ``share`` of what is left from now."""
        return time.perf_counter() + max(0.0, self.left()) * share


def say(line: str = "") -> None:
    print(line, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_calls(fn: Callable[[], Any], device: str, *, seconds: float, min_calls: int = 1,
                max_calls: int = 10_000) -> list[float]:
    """Per-call wall times (synchronised) of ``fn`` for about ``seconds`` (at least ``min_calls``)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


# --- audio ------------------------------------------------------------------------------------

def default_data() -> Path:
    for p in (REPO / ".gpucheck" / "data" / "ccnu_mobile_sample", REPO.parent / "shared" / "data" / "ccnu_mobile_sample"):
        if (p / "manifest.csv").is_file():
            return p
    return REPO.parent / "shared" / "data" / "ccnu_mobile_sample"


def load_recordings(data: Path, *, limit_per_segment: int | None = None) -> tuple[list[dict], str]:
    """[{device, segment, samples}] of real recordings via the daemon's decoder, or synthesised ones.

    The second value says which (and why synthesised).
    """
    from devrecd.audio import read_evidence
    from devrecd.config import AudioConfig

    manifest = data / "manifest.csv"
    if manifest.is_file():
        try:
            with open(manifest, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if limit_per_segment:
                per: dict[str, int] = {}
                rows = [r for r in rows if per.setdefault(r["segment"], 0) < limit_per_segment
                        and not per.__setitem__(r["segment"], per[r["segment"]] + 1)]
            recs = [{"device": r["device"], "segment": int(r["segment"]),
                     "samples": read_evidence(data / r["path"], SR, AudioConfig()).samples} for r in rows]
            secs = sum(len(r["samples"]) for r in recs) / SR
            return recs, f"real: {len(recs)} CCNU_Mobile recordings ({secs:.0f} s) from {data}"
        except Exception as exc:  # noqa: BLE001 - e.g. soundfile missing on the lent machine: say so, go on
            why = f"{type(exc).__name__}: {exc}"
    else:
        why = f"{manifest} not found"
    return synth_recordings(), f"SYNTHESISED audio (no real recordings: {why}); parity/agreement figures are on synthetic audio"


def synth_recordings(devices: int = 15, segments: int = 5, seconds: float = 9.0) -> list[dict]:
    """Speech-like noise (AM-modulated, per-device random FIR colouring), deterministic."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(0)
    recs = []
    n = int(seconds * SR)
    t = np.arange(n) / SR
    for d in range(devices):
        fir = rng.normal(size=32) * np.exp(-np.arange(32) / 6.0)
        for s in range(1, segments + 1):
            x = rng.normal(size=n) * (0.5 + 0.5 * np.sin(2 * np.pi * (3 + d * 0.3) * t)) ** 2
            y = lfilter(fir, [1.0], x)
            y = 0.3 * y / (np.abs(y).max() + 1e-9)
            recs.append({"device": f"synth{d:02d}", "segment": s, "samples": y.astype(np.float32)})
    return recs


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit PCM mono WAV at 32 kHz (stdlib: nothing to install)."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def ten_second_clips(recs: list[dict], n: int) -> np.ndarray:
    """``n`` distinct 10 s clips cut from all recordings end to end (offsets spread evenly)."""
    audio = np.concatenate([r["samples"] for r in recs])
    length = int(FILE_SECONDS * SR)
    if len(audio) < length + 1:
        audio = np.resize(audio, length * 2)
    step = max(1, (len(audio) - length) // max(1, n))
    return np.stack([audio[(i * step) % (len(audio) - length):][:length] for i in range(n)])


# --- the model --------------------------------------------------------------------------------

def fit_model(recs: list[dict], device: str, steps: int, out: Path) -> tuple[Path, dict]:
    """A real checkpoint: paper network, ``steps`` Adam steps on segments 1-3 windows, on ``device``."""
    import torch

    from devrecd.features import FrontendConfig, extract
    from devrecd.model import build_model
    from devrecd.model.checkpoint import Checkpoint, save_checkpoint
    from devrecd.stages import clips_for, frontend_for

    frontend = FrontendConfig()
    labels = sorted({r["device"] for r in recs})

    class _Rec:  # what clips_for needs of a Recording
        def __init__(self, samples: np.ndarray) -> None:
            self.samples = samples

    def windows(segments: set[int]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for r in recs:
            if r["segment"] in segments:
                clips = clips_for(_Rec(r["samples"]), frontend, frontend.clip_seconds)
                xs.append(extract(clips, frontend_for(frontend), device=device))
                ys += [labels.index(r["device"])] * len(clips)
        return np.concatenate(xs), np.asarray(ys)

    x, y = windows({1, 2, 3})
    x_test, y_test = windows({4, 5})
    if not len(x_test):
        x_test, y_test = x, y
    mean = x.reshape(-1, 73).mean(0).astype(np.float32)
    std = (x.reshape(-1, 73).std(0) + 1e-6).astype(np.float32)
    torch.manual_seed(0)
    net = build_model("paper", len(labels)).to(device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt = torch.from_numpy((x - mean) / std).to(device)
    yt = torch.from_numpy(y).to(device)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy((x_test - mean) / std).to(device)).argmax(-1).cpu().numpy() == y_test).mean())
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    ckpt = Checkpoint(arch="paper", hparams={}, labels=labels, frontend=frontend, norm_mean=mean, norm_std=std,
                      state_dict=state, dataset_sha256="0" * 64, split={},
                      meta={"note": f"benchmarks/gpu.py: {steps} Adam steps on segments 1-3"})
    path = out / "bench.pt"
    save_checkpoint(path, ckpt)
    info = {"arch": "paper", "labels": len(labels), "train_windows": int(len(x)), "test_windows": int(len(x_test)),
            "adam_steps": steps, "fit_seconds": round(time.perf_counter() - t0, 2), "final_loss": finite(loss.item()),
            "test_top1_accuracy": acc, "protocol": "fitted on segments 1-3, agreement measured on segments 4-5 "
            f"({len(x_test)} windows, {len(labels)} devices); not a trained model, only a confident one"}
    return path, {**info, "_test_windows": x_test}


# --- (a) frontend -----------------------------------------------------------------------------

def section_frontend(clips10: np.ndarray, device: str, budget: Budget, share: float, tiny: bool) -> dict:
    import torch

    from devrecd.features import SLICE_DELTA, SLICE_DELTA2, SLICE_FBANK, SLICE_LOGE, SLICE_MFCC, Frontend, \
        FrontendConfig, extract

    deadline = budget.deadline(share)
    cfg = FrontendConfig(clip_seconds=FILE_SECONDS)
    fe = Frontend(cfg)
    n_par = min(len(clips10), 4 if tiny else 64)
    ref = extract(clips10[:n_par], fe, device="cpu")
    got = extract(clips10[:n_par], fe, device=device, chunk=n_par if device != "cpu" else 1)
    diff = np.abs(got.astype(np.float64) - ref)
    scale = np.maximum(np.abs(ref).max(axis=(0, 1)), 1e-30)
    groups = {"mfcc": SLICE_MFCC, "logE": SLICE_LOGE, "delta": SLICE_DELTA, "delta2": SLICE_DELTA2,
              "prefbank": SLICE_FBANK}
    parity = {
        "clips": n_par, "source": "the same real 10 s clips through both", "compared": f"{device} vs cpu",
        "max_abs_diff_per_dim": [float(v) for v in diff.max(axis=(0, 1))],
        "max_rel_diff_per_dim": [float(v) for v in (diff.max(axis=(0, 1)) / scale)],
        "max_abs_diff_per_group": {k: float(diff[..., s].max()) for k, s in groups.items()},
        "max_rel_diff_per_group": {k: float((diff.max(axis=(0, 1)) / scale)[s].max()) for k, s in groups.items()},
        "finite": bool(np.isfinite(got).all()),
    }
    # FP16 overflow of raw mel power: real audio, a full-scale tone, and int16-scaled input. Raw: the
    # energies before the per-clip level normalisation (level "none"), i.e. what the frontend computes
    # before it divides by the clip's level (the served features with level "clip" are relative).
    from dataclasses import replace

    raw = Frontend(replace(cfg, level="none"))
    tone = np.sin(2 * np.pi * 1000.0 * np.arange(cfg.clip_samples) / SR).astype(np.float32)[None]
    probes = {"real clips": clips10[:n_par], "full-scale 1 kHz tone": tone}
    overflow = {}
    np.seterr(over="ignore")  # the casts below overflow on purpose: that is what is being counted
    for name, x in probes.items():
        fb = extract(x, raw, device=device)[..., SLICE_FBANK]
        overflow[name] = {"max_mel_energy": float(fb.max()), "overflows_fp16": bool(fb.max() > FP16_MAX),
                          "inf_if_cast_to_fp16": int(np.isinf(fb.astype(np.float16)).sum())}
    fb = extract(tone * 32768.0, raw, device=device)[..., SLICE_FBANK]
    overflow["tone as int16 values (unscaled)"] = {"max_mel_energy": float(fb.max()),
                                                   "overflows_fp16": bool(fb.max() > FP16_MAX),
                                                   "inf_if_cast_to_fp16": int(np.isinf(fb.astype(np.float16)).sum())}

    # Throughput, 10 s clips/s: CPU frontend (extract: its own chunking) vs this device.
    threads = torch.get_num_threads()
    cpu_n = min(len(clips10), 2 if tiny else 16)
    cpu_times = timed_calls(lambda: extract(clips10[:cpu_n], fe, device="cpu"), "cpu",
                            seconds=0.0 if tiny else min(5.0, max(0.0, deadline - time.perf_counter()) * 0.15))
    cpu_rate = cpu_n / float(np.median(cpu_times))
    rows = []
    batches = (1, 2) if tiny else FRONTEND_BATCHES
    per_cell = 0.0 if tiny else max(0.3, (deadline - time.perf_counter()) * 0.8 / (2 * len(batches)))
    host = np.resize(clips10, (max(batches), clips10.shape[1])) if not tiny else clips10[:max(batches)]
    if len(host) < max(batches):
        host = np.resize(host, (max(batches), host.shape[1]))
    for b in batches:
        if time.perf_counter() > deadline:
            rows.append({"batch": b, "skipped": "time budget"})
            continue
        xb_host = torch.from_numpy(np.ascontiguousarray(host[:b]))
        failed = None
        try:
            xb = xb_host.to(device)
            # the tensors bound as defaults: the loop drops its own references after each batch
            on_dev = timed_calls(lambda x=xb: fe(x), device, seconds=per_cell, min_calls=2 if not tiny else 1)
            with_h2d = timed_calls(lambda x=xb_host: fe(x.to(device)), device, seconds=per_cell,
                                   min_calls=2 if not tiny else 1)
        except RuntimeError as exc:  # out of memory at the largest batches: recorded, not fatal
            failed = f"{type(exc).__name__}: {str(exc)[:120]}"
        if failed is not None:  # out of the except block: its traceback no longer holds the tensors
            rows.append({"batch": b, "skipped": failed})
            xb = xb_host = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        r_dev, r_h2d = b / float(np.median(on_dev)), b / float(np.median(with_h2d))
        rows.append({"batch": b, "clips_per_s": r_dev, "clips_per_s_with_h2d": r_h2d,
                     "vs_cpu": r_dev / cpu_rate, "vs_cpu_with_h2d": r_h2d / cpu_rate, "calls": len(on_dev)})
        xb = xb_host = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    b256 = next((r for r in rows if r["batch"] == 256 and "vs_cpu" in r), None)
    out = {"config": "clip_seconds=10 (128 frames, hop 2500, frame 5000, 8192-point FFT)", "parity": parity,
           "fp16_overflow": overflow,
           "fp16_note": "pre-Fbank energies are normalised in FP32 inside the serving graph before any FP16 layer",
           "cpu_baseline": {"clips_per_s": cpu_rate, "torch_threads": threads, "clips_per_call": cpu_n,
                            "how": "devrecd.features.extract on the CPU (its own chunking)"},
           "throughput": rows, "speedup_b256": b256["vs_cpu"] if b256 else None}
    say(f"\n(a) frontend, 10 s clips: {device} vs CPU ({threads} torch threads) in this run")
    say(f"    parity on {n_par} real clips: max abs diff per group "
        + ", ".join(f"{k} {v:.2e}" for k, v in parity["max_abs_diff_per_group"].items())
        + "; max rel " + f"{max(parity['max_rel_diff_per_dim']):.2e}")
    for name, o in overflow.items():
        say(f"    FP16 check, {name}: max mel energy {o['max_mel_energy']:.3g} "
            f"({'OVERFLOWS' if o['overflows_fp16'] else 'fits'} FP16 max {FP16_MAX:g})")
    say(f"    {'batch':>5} {'clips/s':>10} {'+H2D':>10} {'vs CPU':>8}   CPU baseline {cpu_rate:.1f} clips/s")
    for r in rows:
        if "skipped" in r:
            say(f"    {r['batch']:>5} skipped: {r['skipped']}")
        else:
            say(f"    {r['batch']:>5} {r['clips_per_s']:>10.1f} {r['clips_per_s_with_h2d']:>10.1f} {r['vs_cpu']:>7.1f}x")
    say(f"    target: >= {TARGETS['frontend_speedup_b256']:.0f}x CPU at batch 256; measured: "
        f"{fmt(out['speedup_b256'])}x")
    return out


# --- (b) network ------------------------------------------------------------------------------

def network_variants(device: str) -> list[tuple[str, dict]]:
    if device.startswith("cuda"):
        return [("fp32", {}), ("fp16 autocast", {"autocast": "fp16"}), ("bf16 autocast", {"autocast": "bf16"}),
                ("fp32 + graphs", {"cuda_graphs": True}), ("fp16 + graphs", {"autocast": "fp16", "cuda_graphs": True}),
                ("bf16 + graphs", {"autocast": "bf16", "cuda_graphs": True})]
    return [("fp32", {}), ("bf16 autocast", {"autocast": "bf16"})]


def section_network(ckpt: Path, test_x: np.ndarray, device: str, budget: Budget, share: float, tiny: bool) -> dict:
    import torch

    from devrecd.backends.torch_backend import TorchBackend

    deadline = budget.deadline(share)
    reference = TorchBackend(ckpt, device="cpu")
    ref_probs = reference.infer(test_x)
    # CPU baseline for speed: the FP32 torch backend on the CPU at batch 8 and 64 (same run).
    cpu_rows = {}
    for b in ((1,) if tiny else (8, 64)):
        xb = np.resize(test_x, (b, 128, 73)).astype(np.float32)
        t = timed_calls(lambda: reference.infer(xb), "cpu", seconds=0.0 if tiny else 2.0)
        cpu_rows[b] = b / float(np.median(t))
    reference.close()
    variants = network_variants(device)
    batches = (1, 8) if tiny else NET_BATCHES
    per_cell = 0.0 if tiny else max(0.3, (deadline - time.perf_counter()) * 0.7 / (len(variants) * len(batches)))
    results = []
    for name, opts in variants:
        entry: dict[str, Any] = {"variant": name, "options": opts, "cells": []}
        try:
            backend = TorchBackend(ckpt, device=device, **opts)
            backend.warmup()
            probs = backend.infer(test_x)
            entry["agreement"] = {"windows": int(len(test_x)),
                                  "top1_agreement": float((probs.argmax(-1) == ref_probs.argmax(-1)).mean()),
                                  "top1_agree_count": int((probs.argmax(-1) == ref_probs.argmax(-1)).sum()),
                                  "max_prob_diff": float(np.abs(probs - ref_probs).max()),
                                  "reference": "FP32 torch backend on the CPU, same checkpoint"}
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, the rest goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"
            results.append(entry)
            continue
        for b in batches:
            if time.perf_counter() > deadline:
                entry["cells"].append({"batch": b, "skipped": "time budget"})
                continue
            x = torch.from_numpy(np.resize(test_x, (b, 128, 73)).astype(np.float32)).to(device)
            try:
                backend.infer_device(x)  # capture (graphs) / first-call costs outside the timing
                sync(device)
                t = timed_calls(lambda: backend.infer_device(x), device, seconds=per_cell, min_calls=3 if not tiny else 1)
            except Exception as exc:  # noqa: BLE001
                entry["cells"].append({"batch": b, "skipped": f"{type(exc).__name__}: {str(exc)[:160]}"})
                continue
            arr = np.asarray(t)
            entry["cells"].append({"batch": b, "clips_per_s": b / float(arr.mean()),
                                   "p50_ms": float(np.percentile(arr, 50) * 1e3),
                                   "p99_ms": float(np.percentile(arr, 99) * 1e3), "calls": len(t)})
        backend.close()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        results.append(entry)

    def cell(variant: str, b: int) -> dict | None:
        for e in results:
            if e["variant"] == variant:
                return next((c for c in e["cells"] if c["batch"] == b and "clips_per_s" in c), None)
        return None

    best_b1 = min((c["p50_ms"] for e in results for c in e["cells"] if c.get("batch") == 1 and "p50_ms" in c),
                  default=None)
    b512 = cell("fp16 + graphs", 512)
    # The end-to-end run serves with the variant that was fastest at the largest batch measured here.
    largest = max(batches)
    ranked = sorted(((c["clips_per_s"], e) for e in results if "error" not in e for c in e["cells"]
                     if c.get("batch") == largest and "clips_per_s" in c), key=lambda t: -t[0])
    best = ranked[0][1] if ranked else results[0]
    out = {"best_variant": {"variant": best["variant"], "options": best["options"], "at_batch": largest},"variants": results, "cpu_baseline_clips_per_s": {str(k): v for k, v in cpu_rows.items()},
           "cpu_baseline_how": f"FP32 torch backend on the CPU ({torch.get_num_threads()} threads)",
           "fp16_graphs_b512_clips_per_s": b512["clips_per_s"] if b512 else None, "best_b1_p50_ms": best_b1}
    say(f"\n(b) network through the torch backend on {device}; baseline: FP32 torch on the CPU "
        + ", ".join(f"b{k} {v:.1f} clips/s" for k, v in cpu_rows.items()))
    say(f"    {'variant':<15} {'batch':>5} {'clips/s':>10} {'p50 ms':>8} {'p99 ms':>8}  agreement vs FP32 CPU")
    for e in results:
        if "error" in e:
            say(f"    {e['variant']:<15} error: {e['error'][:200]}")
            continue
        a = e["agreement"]
        agree = f"top-1 {a['top1_agree_count']}/{a['windows']}, max prob diff {a['max_prob_diff']:.2e}"
        for i, c in enumerate(e["cells"]):
            tail = agree if i == 0 else ""
            if "skipped" in c:
                say(f"    {e['variant']:<15} {c['batch']:>5} skipped: {c['skipped']}")
            else:
                say(f"    {e['variant']:<15} {c['batch']:>5} {c['clips_per_s']:>10.1f} {c['p50_ms']:>8.2f} "
                    f"{c['p99_ms']:>8.2f}  {tail}")
    say(f"    targets: >= {TARGETS['network_fp16_graphs_b512_clips_per_s']:.0f} clips/s at batch 512 FP16 + graphs "
        f"(measured {fmt(out['fp16_graphs_b512_clips_per_s'])}); batch-1 latency <= {TARGETS['network_b1_latency_ms']} ms "
        f"(best p50 {fmt(best_b1, '.2f')} ms; paper: 5.2 ms on a TITAN RTX)")
    return out


# --- (c) end to end ---------------------------------------------------------------------------

class GpuSampler:
    """GPU utilisation (%) sampled every 100 ms in a thread (NVML through torch, else nvidia-smi)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.samples: list[float] = []
        self.how = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self) -> Callable[[], float] | None:
        if not self.device.startswith("cuda"):
            self.how = "not a GPU run"
            return None
        import torch

        try:
            torch.cuda.utilization()
            self.how = "torch.cuda.utilization (NVML)"
            return lambda: float(torch.cuda.utilization())
        except Exception as exc:  # noqa: BLE001 - pynvml missing: try the command line
            why = f"{type(exc).__name__}: {exc}"
        smi = shutil.which("nvidia-smi")
        if smi:
            import subprocess

            self.how = "nvidia-smi --query-gpu=utilization.gpu"
            return lambda: float(subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                                capture_output=True, text=True, timeout=5).stdout.split()[0])
        self.how = f"unavailable ({why}; no nvidia-smi)"
        return None

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append(self._read())  # type: ignore[misc]
            except Exception:  # noqa: BLE001
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"how": self.how, "mean_pct": None, "samples": 0}
        a = np.asarray(self.samples)
        return {"how": self.how, "mean_pct": float(a.mean()), "p50_pct": float(np.median(a)),
                "max_pct": float(a.max()), "samples": len(a)}


def make_backlog(recs: list[dict], n: int, root: Path) -> list[Path]:
    """``n`` distinct 10 s 16-bit WAV files (real audio cut at distinct offsets) under ``root``."""
    audio = np.concatenate([r["samples"] for r in recs])
    length = int(FILE_SECONDS * SR)
    step = max(1, (len(audio) - length) // max(1, n))
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        start = (i * step) % max(1, len(audio) - length)
        seg = audio[start:start + length]
        if len(seg) < length:
            seg = np.resize(seg, length)
        p = root / f"rec_{i:05d}.wav"
        write_wav(p, seg)
        files.append(p)
    return files


def run_identify(cfg: Any, files: list[Path], device: str) -> dict:
    """The daemon's pipeline over ``files``; files/s and seconds per stage from its own metrics."""
    from devrecd.pipeline.identify import identify_files
    from devrecd.pipeline.runner import inference_streams
    from devrecd.pipeline.serving import OpenSetOnly, load_served
    from devrecd.metrics import Metrics

    metrics = Metrics()
    backend = load_served(cfg, metrics, device=device)  # open set only (the registry's scorer) without a model
    streams = 0 if isinstance(backend, OpenSetOnly) else inference_streams(cfg, backend)
    try:
        with GpuSampler(device) as gpu:
            t0 = time.perf_counter()
            records = identify_files(cfg, files, backend=backend, metrics=metrics)
            wall = time.perf_counter() - t0
        info = backend.describe()
    finally:
        backend.close()
    judged = sum(r["outcome"] == "judged" for r in records)
    failed = [r for r in records if r["outcome"] != "judged"]
    stages = {}
    for stage in ("decode", "h2d", "frontend", "features", "scoring", "queue", "inference", "writer", "end_to_end"):
        total = metrics.registry.get_sample_value("devrecd_stage_seconds_sum", {"stage": stage})
        count = metrics.registry.get_sample_value("devrecd_stage_seconds_count", {"stage": stage})
        if count:
            stages[stage] = {"total_s": float(total), "mean_ms": float(total) / count * 1e3, "files": int(count)}
    workers = cfg.watch.workers
    # Busy share of the wall time of the thread(s) running each stage: the largest one binds.
    threads_of = {"decode": workers, "h2d": workers, "frontend": workers, "features": workers, "scoring": workers,
                  "inference": max(1, streams), "writer": 1}
    busy = {s: stages[s]["total_s"] / (wall * threads_of[s]) for s in threads_of if s in stages}
    worker_busy = sum(busy.get(s, 0.0) for s in ("decode", "features", "scoring"))
    binding = max({"workers (decode + features)": worker_busy, "inference": busy.get("inference", 0.0),
                   "writer": busy.get("writer", 0.0)}.items(), key=lambda kv: kv[1])[0]
    return {"files": len(files), "judged": judged, "failed": len(failed),
            "failures": [f"{r.get('reason')}: {r.get('detail')}" for r in failed[:3]],
            "wall_s": wall, "files_per_s": len(files) / wall, "audio_s_per_s": len(files) * FILE_SECONDS / wall,
            "stages": stages, "busy_share": busy, "binding_stage": binding, "gpu_utilisation": gpu.summary(),
            "backend": {k: info.get(k) for k in ("name", "device", "precision", "autocast", "cuda_graphs")},
            "workers": workers, "inference_streams": streams, "max_batch": cfg.batcher.max_batch, "batches": metrics.registry.get_sample_value(
                "devrecd_batch_size_count") or 0}


def section_e2e(recs: list[dict], ckpt: Path, device: str, n_files: int, budget: Budget, share: float, tiny: bool,
                shm: Path, options: dict) -> dict:
    from devrecd.config import load_config
    from devrecd.export import export_checkpoint

    deadline = budget.deadline(share)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need = n_files * (FILE_SECONDS * SR * 2 + 100)
    note = ""
    if need > 0.8 * shutil.disk_usage(shm).free:  # a small /dev/shm: the page cache of a disk folder will do
        other = Path(tempfile.gettempdir())
        if need <= 0.8 * shutil.disk_usage(other).free:
            note = f"{shm} too small ({shutil.disk_usage(shm).free / 2**30:.1f} GiB free): backlog in {other}"
            shm = other
    free = shutil.disk_usage(shm).free
    if need > 0.8 * free:
        fit = max(16, int(0.8 * free / (FILE_SECONDS * SR * 2 + 100)))
        note = f"backlog cut from {n_files} to {fit} files: {shm} has {free / 2**30:.1f} GiB free"
        n_files = fit
    work = Path(tempfile.mkdtemp(prefix="devrecd-gpu-", dir=shm))
    try:
        t0 = time.perf_counter()
        files = make_backlog(recs, n_files, work / "evidence")
        gen = time.perf_counter() - t0
        gpu_cfg = load_config(None, env={}, overrides={
            "backend.kind": "torch", "backend.model": str(ckpt), "backend.device": device,
            "backend.autocast": options.get("autocast", "none"),
            "backend.cuda_graphs": bool(options.get("cuda_graphs", False)),
            "batcher.max_batch": 512 if device.startswith("cuda") else 32, "batcher.max_wait_ms": 5.0,
            "watch.workers": max(1, cores - 2) if device.startswith("cuda") else max(1, min(2, cores)),
            "watch.queue_size": 256, "log.level": "ERROR"})
        # A probe first (it also warms the pipeline up); then the whole backlog, unless its rate says
        # the backlog would not fit in this section's time (cut, with a note: never a silent overrun).
        probe_n = min(len(files), 8 if tiny else 256)
        probe_rate = run_identify(gpu_cfg, files[:probe_n], device)["files_per_s"]
        fits = int(probe_rate * max(1.0, deadline - time.perf_counter()) * 0.5)
        if not tiny and fits < len(files):
            note = (note + "; " if note else "") + (f"backlog cut from {len(files)} to {max(probe_n, fits)} files: "
                                                    f"{probe_rate:.0f} files/s on the {probe_n}-file probe")
            files = files[:max(probe_n, fits)]
            n_files = len(files)
        main = run_identify(gpu_cfg, files, device)
        # Baseline: the CPU daemon (CPU frontend + ONNX Runtime, the default backend) on a subset.
        onnx = work / "export" / "bench.onnx"
        onnx.parent.mkdir()
        parity_audio = files[:2]
        export_checkpoint(ckpt, onnx, cfg=load_config(None, env={}), parity_audio=parity_audio, max_parity_clips=8)
        cpu_cfg = load_config(None, env={}, overrides={
            "backend.kind": "onnxruntime", "backend.model": str(onnx), "backend.device": "cpu",
            "backend.threads": 1, "watch.workers": cores, "log.level": "ERROR"})
        left = max(1.0, deadline - time.perf_counter())
        probe = files[: min(len(files), 8 if tiny else 64)]
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the CPU daemon's parallelism is its workers: one torch thread each
        try:
            first = run_identify(cpu_cfg, probe, "cpu")
            subset = probe
            if not tiny:  # as many files as the rest of this section's time allows (rate from the probe)
                k = int(min(len(files), max(len(probe), first["files_per_s"] * left * 0.6)))
                if k > len(probe):
                    subset = files[:k]
                    first = run_identify(cpu_cfg, subset, "cpu")
        finally:
            torch.set_num_threads(threads)
        cpu = {**first, "extrapolated_wall_s_for_backlog": len(files) / first["files_per_s"],
               "label": f"CPU daemon (CPU frontend with 1 torch thread per worker + ONNX Runtime 1 thread per stream, {cores} "
                        f"workers, streams auto) on {len(subset)} "
                        f"of the {len(files)} files; wall time for the whole backlog EXTRAPOLATED from its rate"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"backlog": {"files": n_files, "seconds_each": FILE_SECONDS, "where": str(shm), "generate_s": gen,
                       "source": "real recordings cut at distinct offsets, 16-bit PCM WAV", "note": note},
           "gpu_path": main, "cpu_baseline": cpu, "speedup_vs_cpu": main["files_per_s"] / cpu["files_per_s"]}
    say(f"\n(c) end to end: the daemon's pipeline (identify) on {n_files} ten-second WAV files in {shm}"
        + (f" [{note}]" if note else "") + f"; torch backend options {options or 'fp32 eager'} (fastest at the "
        "largest batch in (b)), batcher.max_batch " + str(main["max_batch"]))
    for name, r in (("torch " + device, main), ("CPU baseline", cpu)):
        g = r["gpu_utilisation"]
        say(f"    {name:<14} {r['files']:>6} files {r['wall_s']:>8.1f} s {r['files_per_s']:>9.1f} files/s "
            f"judged {r['judged']}/{r['files']}  binds: {r['binding_stage']}  GPU util "
            f"{fmt(g.get('mean_pct'))}% ({g['how']})")
        say("        per file, mean ms: " + ", ".join(f"{s} {v['mean_ms']:.2f}" for s, v in r["stages"].items())
            + "; busy share: " + ", ".join(f"{s} {v:.0%}" for s, v in r["busy_share"].items()))
    say(f"    {cpu['label']}")
    say(f"    targets: >= {TARGETS['e2e_files_per_s']:.0f} files/s (measured {main['files_per_s']:.1f}), >= "
        f"{TARGETS['e2e_speedup_vs_cpu']:.0f}x the CPU daemon (measured {out['speedup_vs_cpu']:.1f}x)")
    return out


# --- (e) the shipped open-set scorer on the device ---------------------------------------------

def gsv_parity(recs: list[dict], device: str, tiny: bool) -> dict:
    """The shipped GSV scorer in torch on ``device`` vs the numpy scorer on the CPU, on real recordings:
    profiles are each phone's segment-1 recording (numpy scorer); every other recording is judged
    both ways (numpy frontend + numpy scorer; the frontend, statistics, supervector, NAP and scores on
    the device from the samples). Same verdict (arg-max profile) and the largest score difference."""
    from devrecd.features import FrontendConfig, extract
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.stages import frontend_for
    from devrecd.audio import cut_windows
    from devrecd.supervector_torch import TorchGsvScorer

    shipped, _ = load_gsv(default_gsv_path())
    fe: FrontendConfig = shipped.frontend
    on_dev = TorchGsvScorer(shipped, device)

    def clips(samples: np.ndarray) -> np.ndarray:
        return cut_windows(samples, fe.clip_samples, fe.clip_samples)

    first: dict[str, dict] = {}  # each phone's earliest segment: its profile
    for r in sorted(recs, key=lambda r: r["segment"]):
        first.setdefault(r["device"], r)
    names = sorted(first)
    profiles = np.stack([shipped.recording_vector(extract(clips(first[n]["samples"]), frontend_for(fe))) for n in names])
    questioned = [r for r in recs if r is not first[r["device"]]][: 8 if tiny else None]
    same, worst, t_cpu, t_dev = 0, 0.0, 0.0, 0.0
    for r in questioned:
        c = clips(r["samples"])
        t0 = time.perf_counter()
        want = shipped.score(shipped.recording_vector(extract(c, frontend_for(fe))), profiles)[0]
        t_cpu += time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = on_dev.features(c)
        got = on_dev.score(on_dev.recording_vector_on_device(feats), profiles)[0]  # scores come back to the host
        t_dev += time.perf_counter() - t0
        same += int(np.argmax(got) == np.argmax(want))
        worst = max(worst, float(np.abs(got - want).max()))
    return {"recordings": len(questioned), "profiles": len(names), "same_verdict": same, "max_score_diff": worst,
            "target_max_score_diff": TARGETS["gsv_max_score_diff"], "met": worst <= TARGETS["gsv_max_score_diff"]
            and same == len(questioned), "cpu_numpy_s_per_recording": t_cpu / max(1, len(questioned)),
            "device_s_per_recording": t_dev / max(1, len(questioned))}


def section_openset(recs: list[dict], device: str, n_files: int, budget: Budget, share: float, tiny: bool,
                    shm: Path) -> dict:
    """(e): parity of the torch GSV scorer, then the open-set-only daemon on the device vs the CPU."""
    import subprocess

    from devrecd.config import load_config

    deadline = budget.deadline(share)
    out: dict[str, Any] = {"parity": gsv_parity(recs, device, tiny)}
    p = out["parity"]
    say(f"\n(e) the shipped GSV scorer on {device} (torch) vs numpy on the CPU, {p['recordings']} real recordings "
        f"against {p['profiles']} profiles: same verdict {p['same_verdict']}/{p['recordings']}, max score difference "
        f"{p['max_score_diff']:.2e} (target <= {p['target_max_score_diff']:g}: {'met' if p['met'] else 'NOT met'}); "
        f"per recording {p['device_s_per_recording'] * 1e3:.1f} ms on the device vs {p['cpu_numpy_s_per_recording'] * 1e3:.1f} ms numpy")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="devrecd-gpu-openset-", dir=shm))
    try:
        phones = sorted({r["device"] for r in recs})[:4]
        reg = work / "registry.json"
        for name in phones:  # devrecd enroll (the shipped scorer), each phone's first two recordings
            refs = []
            for r in [r for r in recs if r["device"] == name][:2]:
                refs.append(work / "refs" / f"{name}_{r['segment']}.wav")
                refs[-1].parent.mkdir(exist_ok=True)
                write_wav(refs[-1], r["samples"])
            subprocess.run([sys.executable, "-c", "from devrecd.cli import main; main()", "enroll", "--profile", name,
                            *map(str, refs), "--registry", str(reg)], check=True, capture_output=True)
        files = make_backlog(recs, n_files, work / "evidence")
        common = {"registry.path": str(reg), "watch.queue_size": 256, "log.level": "ERROR"}
        gpu_cfg = load_config(None, env={}, overrides={**common, "backend.device": device,
                                                        "watch.workers": max(1, cores - 2) if device.startswith("cuda") else max(1, min(2, cores))})
        probe_n = min(len(files), 8 if tiny else 256)
        probe_rate = run_identify(gpu_cfg, files[:probe_n], device)["files_per_s"]  # warms up too
        fits = int(probe_rate * max(1.0, deadline - time.perf_counter()) * 0.5)
        if not tiny and fits < len(files):
            files = files[:max(probe_n, fits)]
        main = run_identify(gpu_cfg, files, device)
        cpu_cfg = load_config(None, env={}, overrides={**common, "backend.device": "cpu", "watch.workers": cores})
        left = max(1.0, deadline - time.perf_counter())
        subset = files[: min(len(files), 8 if tiny else 64)]
        cpu = run_identify(cpu_cfg, subset, "cpu")
        if not tiny:
            k = int(min(len(files), max(len(subset), cpu["files_per_s"] * left * 0.6)))
            if k > len(subset):
                subset = files[:k]
                cpu = run_identify(cpu_cfg, subset, "cpu")
        cpu["label"] = (f"CPU open-set daemon (numpy frontend and scorer, {cores} workers) on {len(subset)} of the "
                        f"{len(files)} files; wall time for the whole backlog EXTRAPOLATED from its rate")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.update({"phones_enrolled": phones, "files": len(files), "gpu_path": main, "cpu_baseline": cpu,
                "speedup_vs_cpu": main["files_per_s"] / cpu["files_per_s"]})
    for name, r in ((f"GSV on {device}", main), ("CPU baseline", cpu)):
        say(f"    {name:<14} {r['files']:>6} files {r['wall_s']:>8.1f} s {r['files_per_s']:>9.1f} files/s "
            f"judged {r['judged']}/{r['files']}  binds: {r['binding_stage']}  GPU util {fmt(r['gpu_utilisation'].get('mean_pct'))}%")
        say("        per file, mean ms: " + ", ".join(f"{s} {v['mean_ms']:.2f}" for s, v in r["stages"].items()))
    say(f"    {cpu['label']}; speed-up {out['speedup_vs_cpu']:.1f}x")
    return out


# --- (d) TensorRT -----------------------------------------------------------------------------

def section_tensorrt(recs: list[dict], ckpt: Path, test_x: np.ndarray, device: str, budget: Budget, tiny: bool, work: Path) -> dict:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        out = {"skipped": f"tensorrt does not import ({type(exc).__name__}: {exc})"}
        say(f"\n(d) TensorRT: skipped: {out['skipped']}")
        return out
    if not device.startswith("cuda"):
        out = {"skipped": "TensorRT needs --device cuda"}
        say(f"\n(d) TensorRT: skipped: {out['skipped']}")
        return out
    import torch

    from devrecd.backends.tensorrt import Profile, TensorRTBackend
    from devrecd.backends.torch_backend import TorchBackend
    from devrecd.config import load_config
    from devrecd.engine_build import BuildOptions, build_engine
    from devrecd.export import export_checkpoint

    ref = TorchBackend(ckpt, device="cpu").infer(test_x)
    onnx = work / "trt" / "bench.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    wavs = work / "trt" / "parity"
    wavs.mkdir()
    for i, r in enumerate(recs[:2]):  # the export's parity check runs on real recordings
        write_wav(wavs / f"{i}.wav", r["samples"])
    export_checkpoint(ckpt, onnx, cfg=load_config(None, env={}), parity_audio=[wavs], fp16=True, max_parity_clips=4)
    out: dict[str, Any] = {"version": tensorrt.__version__, "engines": []}
    for fp16 in (False, True):
        name = "fp16" if fp16 else "fp32"
        try:
            result = build_engine(onnx, BuildOptions(profile=Profile(1, 64, 512), fp16=fp16,
                                                     engine_dir=work / "trt" / "engine"))
            backend = TensorRTBackend(result.engine_path)
            probs = backend.infer(test_x)
            cells = []
            for b in ((1,) if tiny else NET_BATCHES):
                x = torch.from_numpy(np.resize(test_x, (b, 128, 73)).astype(np.float32)).to(device)
                backend.infer_device(x)
                t = np.asarray(timed_calls(lambda: backend.infer_device(x), device, seconds=0.0 if tiny else 1.5,
                                           min_calls=3))
                cells.append({"batch": b, "clips_per_s": b / float(t.mean()), "p50_ms": float(np.percentile(t, 50) * 1e3),
                              "p99_ms": float(np.percentile(t, 99) * 1e3)})
            backend.close()
            out["engines"].append({"precision": name, "build_s": result.meta.build_seconds, "cells": cells,
                                   "top1_agreement": float((probs.argmax(-1) == ref.argmax(-1)).mean()),
                                   "max_prob_diff": float(np.abs(probs - ref).max())})
        except Exception as exc:  # noqa: BLE001
            out["engines"].append({"precision": name, "error": f"{type(exc).__name__}: {exc}"})
    say(f"\n(d) TensorRT {out['version']} through build-engine")
    for e in out["engines"]:
        if "error" in e:
            say(f"    {e['precision']}: error: {e['error'][:300]}")
            continue
        for c in e["cells"]:
            say(f"    {e['precision']:<5} b{c['batch']:<4} {c['clips_per_s']:>10.1f} clips/s p50 {c['p50_ms']:.2f} ms "
                f"p99 {c['p99_ms']:.2f} ms")
        say(f"    {e['precision']}: top-1 agreement {e['top1_agreement']:.3f}, max prob diff {e['max_prob_diff']:.2e}")
    return out


# --- main -------------------------------------------------------------------------------------

def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": device, "host": platform.node()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def targets_table(result: dict) -> list[dict]:
    fe, net, e2e = result["frontend"], result["network"], result["end_to_end"]
    rows = [
        ("network clips/s, batch 512, FP16 + CUDA graphs", ">=", TARGETS["network_fp16_graphs_b512_clips_per_s"],
         net.get("fp16_graphs_b512_clips_per_s")),
        ("network batch-1 latency p50 (ms), best variant", "<=", TARGETS["network_b1_latency_ms"], net.get("best_b1_p50_ms")),
        ("end to end files/s (10 s files)", ">=", TARGETS["e2e_files_per_s"], e2e.get("gpu_path", {}).get("files_per_s")),
        ("end to end vs CPU daemon", ">=", TARGETS["e2e_speedup_vs_cpu"], e2e.get("speedup_vs_cpu")),
        ("frontend vs CPU at batch 256", ">=", TARGETS["frontend_speedup_b256"], fe.get("speedup_b256")),
        ("shipped GSV scorer: max score diff torch vs numpy", "<=", TARGETS["gsv_max_score_diff"],
         result.get("openset", {}).get("parity", {}).get("max_score_diff")),
    ]
    out = []
    say("\ntargets (H100/H200) vs measured here")
    for name, op, target, got in rows:
        met = None if got is None else (got >= target if op == ">=" else got <= target)
        out.append({"what": name, "target": f"{op} {target:g}", "measured": got, "met": met})
        say(f"    {name:<50} {op} {target:>8g}   measured {fmt(got, '.2f'):>10}   "
            f"{'-' if met is None else ('met' if met else 'NOT met')}")
    return out


def dump(result: dict, path: Path) -> None:
    from devrecd.fsutil import atomic_write

    atomic_write(path, json.dumps(result, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--minutes", type=float, default=5.0, help="time budget; sizes shrink to fit it")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--tiny", action="store_true", help="smallest size of every section (the test suite's run)")
    ap.add_argument("--data", type=Path, default=None, help="CCNU_Mobile sample (manifest.csv + WAVs)")
    ap.add_argument("--files", type=int, default=5000, help="backlog of 10 s files for the end-to-end run")
    ap.add_argument("--shm", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                    help="tmpfs folder for the backlog (default /dev/shm)")
    ap.add_argument("--fit-steps", type=int, default=None, help="Adam steps fitting the model (default 60; tiny 1)")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda but torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 2
    budget = Budget(args.minutes)
    n_files = 16 if args.tiny else args.files
    shm = args.shm or Path(tempfile.gettempdir())
    say(f"devrecd GPU check: device {args.device}, budget {args.minutes:g} min{', TINY (not a measurement)' if args.tiny else ''}")
    result: dict[str, Any] = {"machine": machine(args.device), "args": {k: str(v) for k, v in vars(args).items()},
                              "targets": TARGETS}
    say("    " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
    recs, source = load_recordings(args.data or default_data(), limit_per_segment=3 if args.tiny else None)
    result["audio"] = source
    say(f"    audio: {source}")
    with tempfile.TemporaryDirectory(prefix="devrecd-gpucheck-") as tmp:
        work = Path(tmp)
        steps = args.fit_steps if args.fit_steps is not None else (1 if args.tiny else 60)
        ckpt, model = fit_model(recs, args.device, steps, work)
        test_x = model.pop("_test_windows")
        result["model"] = model
        say(f"    model: {model['protocol']}; {steps} steps in {model['fit_seconds']} s, held-out top-1 "
            f"{model['test_top1_accuracy']:.3f}")
        clips10 = ten_second_clips(recs, 8 if args.tiny else 64)
        result["frontend"] = section_frontend(clips10, args.device, budget, 0.15, args.tiny)
        dump(result, args.out)  # after every section: a run stopped later still leaves what it measured
        result["network"] = section_network(ckpt, test_x, args.device, budget, 0.40, args.tiny)
        dump(result, args.out)
        result["end_to_end"] = section_e2e(recs, ckpt, args.device, n_files, budget, 0.85, args.tiny, shm,
                                           result["network"]["best_variant"]["options"])
        dump(result, args.out)
        result["tensorrt"] = section_tensorrt(recs, ckpt, test_x, args.device, budget, args.tiny, work)
        dump(result, args.out)
        result["openset"] = section_openset(recs, args.device, n_files, budget, 0.9, args.tiny, shm)
    result["target_check"] = targets_table(result)
    result["elapsed_s"] = budget.elapsed()
    say(f"\ntotal {budget.elapsed():.0f} s of a {budget.total:.0f} s budget")
    dump(result, args.out)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
