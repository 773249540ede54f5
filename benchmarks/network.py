"""Network throughput (clips/s) per backend at batch 1, 8, 32, 64, all in the same run.

CPU: torch eager vs ONNX Runtime, both on the same thread count (default 2).
GPU (when torch sees CUDA and TensorRT is installed): torch CUDA vs TensorRT FP32 vs TensorRT FP16.
The baseline is torch eager (CPU) / torch CUDA (GPU), measured in this run.

    python benchmarks/network.py [--checkpoint RUN_DIR] [--threads 2] [--seconds 3]

Without --checkpoint the paper network (15 classes) with its initial weights is timed: throughput
does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32, 64)


def rate(fn, batch: int, seconds: float) -> float:
    """Clips per second of ``fn`` at this batch size (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="RUN_DIR or .pt (default: untrained paper network)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per cell")
    args = ap.parse_args()

    import torch

    from devrecd.backends.onnxrt import ort_session
    from devrecd.export import write_onnx
    from devrecd.model.serving import inference_graph

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from devrecd.model.checkpoint import load_checkpoint
        from devrecd.model.serving import graph_for_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        make = lambda precision="fp32": graph_for_checkpoint(ckpt, precision=precision)  # noqa: E731
    else:
        from devrecd.model import build_model

        torch.manual_seed(0)
        state = build_model("paper", 15).state_dict()

        def make(precision: str = "fp32"):
            net = build_model("paper", 15)
            net.load_state_dict(state)
            return inference_graph(net.eval(), np.zeros(73, np.float32), np.ones(73, np.float32), precision=precision)

    graph = make()
    rng = np.random.default_rng(0)
    feats = {b: rng.normal(size=(b, 128, 73)).astype(np.float32) for b in BATCHES}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "bench.onnx"
        t0 = time.perf_counter()
        write_onnx(graph, onnx_path)
        print(f"export (torchscript exporter): {time.perf_counter() - t0:.1f} s")
        session = ort_session(onnx_path, threads=args.threads)
        print(f"\nCPU, {args.threads} threads ({torch.__version__}); clips/s; baseline = torch eager")
        print(f"{'batch':>5} {'torch eager':>12} {'onnxruntime':>12} {'ORT/torch':>9}")
        for b in BATCHES:
            x = torch.from_numpy(feats[b])
            with torch.inference_mode():
                t = rate(lambda: graph(x), b, args.seconds)
            o = rate(lambda: session.run(None, {"features": feats[b]}), b, args.seconds)
            print(f"{b:>5} {t:>12.1f} {o:>12.1f} {o / t:>8.2f}x")
        gpu_part(make, feats, args.seconds, Path(tmp))
    return 0


def gpu_part(make, feats: dict, seconds: float, tmp: Path) -> None:
    """torch CUDA vs TensorRT FP32 vs FP16; parts skipped with a message when CUDA/TensorRT is absent."""
    import torch

    if not torch.cuda.is_available():
        print("\nGPU part skipped: no CUDA GPU visible (torch CUDA, TensorRT FP32/FP16 unmeasured)")
        return
    batches = (*BATCHES, 256, 1024)
    runners = {"torch CUDA": _torch_cuda(make)}
    try:
        for precision in ("fp32", "fp16"):
            runners[f"TRT {precision}"] = _tensorrt(make, precision, feats[BATCHES[-1]], tmp, max(batches))
    except Exception as exc:  # TensorRT missing or failing: torch CUDA alone is still measured
        print(f"\nTensorRT part skipped: {type(exc).__name__}: {exc}")
    print(f"\nGPU {torch.cuda.get_device_name(0)}; clips/s (inputs already on the GPU); baseline = torch CUDA")
    print(f"{'batch':>5} " + " ".join(f"{k:>12}" for k in runners) + "  vs torch CUDA")
    for b in batches:
        x = torch.from_numpy(np.resize(feats[BATCHES[-1]], (b, 128, 73))).cuda()
        rates = {k: rate(lambda: fn(x), b, seconds) for k, fn in runners.items()}
        base = rates["torch CUDA"]
        print(f"{b:>5} " + " ".join(f"{r:>12.1f}" for r in rates.values()) + "  "
              + " ".join(f"{k}: {r / base:.2f}x" for k, r in rates.items() if k != "torch CUDA"))


def _torch_cuda(make):
    import torch

    g = make().cuda()

    def run(x):
        with torch.inference_mode():
            g(x)
        torch.cuda.synchronize()

    return run


def _tensorrt(make, precision: str, sample: np.ndarray, tmp: Path, max_batch: int):
    """Export (FP32 and, for fp16, the FP16 variant), build an engine, return a runner on CUDA tensors."""
    from devrecd.backends.tensorrt import Profile, TensorRTBackend
    from devrecd.engine_build import BuildOptions, build_engine
    from devrecd.export import export_graph, fp16_path_for
    from devrecd.features import FrontendConfig

    common = dict(labels=[f"d{i}" for i in range(15)], frontend=FrontendConfig(), features=sample,
                  feature_source="benchmark (random features)", arch="paper", checkpoint_sha256="0" * 64)
    out = tmp / "bench.onnx"
    if not out.exists():
        export_graph(make(), out, **common)
    if precision == "fp16" and not fp16_path_for(out).exists():
        export_graph(make("fp16"), fp16_path_for(out), precision="fp16", reference=make(), **common)
    result = build_engine(out, BuildOptions(profile=Profile(1, 64, max_batch), fp16=precision == "fp16",
                                            engine_dir=tmp / "engine"))
    print(f"built {result.engine_path.name} in {result.meta.build_seconds:.0f} s "
          f"(vs ONNX Runtime: max abs diff {result.meta.parity['max_abs_diff']:.1e})")
    backend = TensorRTBackend(result.engine_path)
    return backend.infer_device  # synchronises at the end of each call


if __name__ == "__main__":
    sys.exit(main())
