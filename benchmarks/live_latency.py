"""Live input latency: from the last sample of a window to its verdict, p50/p99, CPU backend, hop 1 s.

Real CCNU_Mobile recordings (segments 4-5, back to back) are pushed through the capture callback at
real-time pace (blocks of ``--block`` frames at 32 kHz, as a sound card delivers them; this machine has
no capture device with a clock, see docs/live.md), cut into windows, and judged by ONNX Runtime
through the same frontend and batcher as files. Latency per window = verdict time - arrival time of
the block holding the window's last sample (``devrecd_live_latency_seconds``).

Baseline in the same run: the one-shot floor for one window, i.e. features of one clip plus one
batch-of-1 inference, called directly with nothing else running.

    python benchmarks/live_latency.py --model export/NAME.onnx [--seconds 60] [--block 1024] [--threads 1] [--max-wait-ms 5]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from devrecd.config import load_config
from devrecd.pipeline.serving import load_serving_backend
from devrecd.features import extract
from devrecd.live import Listener
from devrecd.metrics import Metrics
from devrecd.stages import frontend_for

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def stream_audio(shared: Path, seconds: float, rate: int) -> np.ndarray:
    """Segments 4-5 of the CCNU sample back to back, as float32 the way PortAudio converts int16."""
    root = shared / "data" / "ccnu_mobile_sample"
    with open(root / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["segment"]) >= 4]
    parts, total = [], 0
    for r in rows:
        x, sr = sf.read(root / r["path"], dtype="int16")
        assert sr == rate, f"{r['path']}: {sr} Hz"
        parts.append(x.astype(np.float32) * np.float32(1 / 32768))
        total += len(x)
        if total >= seconds * rate:
            break
    return np.concatenate(parts)[: int(seconds * rate)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of audio streamed (real time)")
    ap.add_argument("--block", type=int, default=1024, help="frames per callback")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (backend.threads)")
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="batcher.max_wait_ms (default: the config's, 50); a live window every hop has little to batch with")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = ap.parse_args()

    over = {"backend.model": args.model, "backend.kind": "onnxruntime", "backend.threads": args.threads,
            "live.hop_seconds": 1.0, "live.window_seconds": 0.0}
    if args.max_wait_ms is not None:
        over["batcher.max_wait_ms"] = args.max_wait_ms
    cfg = load_config(None, env={}, overrides=over)
    rate = cfg.frontend.sample_rate
    audio = stream_audio(args.shared, args.seconds, rate).reshape(-1, 1)
    metrics = Metrics()
    backend = load_serving_backend(cfg, metrics)

    # Baseline: one window's features + a batch-of-1 inference, directly.
    frontend = frontend_for(cfg.frontend)
    clip = cfg.frontend.clip_samples
    floor = []
    for i in range(3):  # warm-up: the first calls build tables and thread pools
        backend.infer(extract(audio[:clip, 0][None], frontend))
    for i in range(30):
        t0 = time.perf_counter()
        backend.infer(extract(audio[i * rate: i * rate + clip, 0][None], frontend))
        floor.append(time.perf_counter() - t0)

    records: list[dict] = []
    listener = Listener(cfg, backend, metrics)
    listener.start(records.append, feed_rate=rate)
    cb = listener.source.capture.callback
    t_start = time.monotonic()
    for k, i in enumerate(range(0, len(audio), args.block)):
        due = t_start + (i + args.block) / rate  # a card hands over a block once its last frame is sampled
        time.sleep(max(0.0, due - time.monotonic()))
        block = audio[i:i + args.block]
        cb(block, len(block), None, None)
    time.sleep(1.0)
    listener.stop()
    backend.close()

    lat = [r["latency"] for r in records if r["outcome"] == "judged" and r["latency"] is not None]
    stats = listener.source.stats()
    print(f"live latency, hop 1 s, window {clip / rate:.1f} s, block {args.block} frames "
          f"({args.block / rate * 1000:.0f} ms), ONNX Runtime {args.threads} thread(s), "
          f"batcher.max_wait_ms {cfg.batcher.max_wait_ms:g}, {args.seconds:.0f} s streamed")
    print(f"  windows judged       {len(lat)} (skipped {stats['skipped']}, ring overflows {stats['ring_overflows']})")
    print(f"  live end->verdict    p50 {pct(lat, 50) * 1000:7.1f} ms   p99 {pct(lat, 99) * 1000:7.1f} ms   "
          f"max {max(lat) * 1000 if lat else float('nan'):7.1f} ms")
    print(f"  baseline one-shot    p50 {pct(floor, 50) * 1000:7.1f} ms   p99 {pct(floor, 99) * 1000:7.1f} ms   "
          "(features + batch-1 inference, called directly)")
    print(f"  overhead p50         {(pct(lat, 50) - pct(floor, 50)) * 1000:7.1f} ms (windowing, batcher wait, threads)")


if __name__ == "__main__":
    main()
