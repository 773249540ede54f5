"""Frontend throughput: devrecd's frontend (one implementation: on numpy, on torch tensors, and
exported into an ONNX graph run by ONNX Runtime) vs librosa vs python_speech_features.

The three devrecd rows are the two ways the issue named to serve without torch: (a) the frontend
code written against the array API, run on numpy (what serving uses) and on torch (training, GPU);
(b) the same code exported into an ONNX graph (torch's dynamo exporter: the FFT becomes ONNX's DFT,
opset 18), so that serving could run audio -> features (-> probabilities) in one graph. The numeric
difference of (a)-numpy and (b) from (a)-torch is printed too.

All compute the same 73 dims (MFCC c1-c12, logE, deltas, delta-deltas, 34 pre-Fbank) for
10 s clips at 32 kHz (128 frames, hop 2500, frame 5000, 8192-point FFT) on real LibriSpeech speech,
with 1 worker and with 2 worker processes (one thread each: the second core is used by running
clips on two workers, not by a library's internal threads). Every worker loads the clips once,
before the timing, so the figures time feature computation, not moving audio between processes. Also: decode cost per 10 s WAV and
per 10 s m4a.

A baseline row (``--baseline REV``: the numpy frontend of ``devrecd/features.py`` as committed at a
git revision, e.g. ``main``) is timed in the same passes, so that a change's before and after are
two rows of one run on the same load. ``--rows`` leaves out rows (the ONNX graph row alone takes
most of a run).

    python benchmarks/frontend.py [--clips 48] [--rounds 5] [--shared ../shared] [--seconds 10]
                                  [--baseline main] [--rows numpy,torch,onnx,librosa,psf]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from devrecd.features import FrontendConfig  # noqa: E402

CFG = FrontendConfig(clip_seconds=float(os.environ.get("DEVRECD_BENCH_CLIP_SECONDS", "10")))


def _chunk() -> int:
    """Clips per call: extract()'s CPU chunk (about 1 MB of FFT input), for every devrecd row alike."""
    return max(1, (1 << 18) // (CFG.n_frames * CFG.fft_size))


def _ours_numpy(clips: np.ndarray) -> int:
    from devrecd.features import extract
    from devrecd.stages import frontend_for

    extract(clips, frontend_for(CFG))  # the process's cached frontend, as the daemon uses it (numpy on the CPU)
    return len(clips)


_BASELINE: dict[str, object] = {}


def _load(name: str, path: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _baseline_numpy(clips: np.ndarray) -> int:
    """The numpy frontend of the baseline revision's features.py (``--baseline``), loaded as a module of
    its own beside this tree's devrecd (which it imports for the rest), with the revision's
    features_numpy.py (its numpy path) where it has one."""
    if "frontend" not in _BASELINE:
        own = sys.modules.get("devrecd.features_numpy")
        if os.environ.get("DEVRECD_BENCH_BASELINE_NUMPY"):  # the baseline's numpy path, while its features.py loads
            sys.modules["devrecd.features_numpy"] = _load("devrecd_baseline_features_numpy",
                                                          os.environ["DEVRECD_BENCH_BASELINE_NUMPY"])
        try:
            module = _load("devrecd_baseline_features", os.environ["DEVRECD_BENCH_BASELINE"])
        finally:
            if own is not None:
                sys.modules["devrecd.features_numpy"] = own
        _BASELINE["module"], _BASELINE["frontend"] = module, module.Frontend(module.FrontendConfig(**CFG.to_dict()))
    _BASELINE["module"].extract(clips, _BASELINE["frontend"])
    return len(clips)


def _ours_torch(clips: np.ndarray) -> int:
    import torch

    from devrecd.stages import frontend_for

    torch.set_num_threads(1)
    frontend = frontend_for(CFG)
    chunk = _chunk()
    for i in range(0, len(clips), chunk):
        frontend(torch.from_numpy(clips[i : i + chunk]))
    return len(clips)


_SESSIONS: dict[str, object] = {}


def _ours_onnx(clips: np.ndarray) -> int:
    from devrecd.backends.onnxrt import ort_session

    if "fe" not in _SESSIONS:
        _SESSIONS["fe"] = ort_session(os.environ["DEVRECD_FRONTEND_ONNX"], threads=1)
    session = _SESSIONS["fe"]
    chunk = _chunk()
    for i in range(0, len(clips), chunk):
        session.run(None, {"audio": clips[i : i + chunk]})
    return len(clips)


def export_frontend(out: Path) -> float:
    """The frontend (the same code, traced on torch) as an ONNX graph ``audio (B, samples) -> features``;
    returns the export's seconds."""
    import torch
    from array_api_compat import array_namespace

    from devrecd.features import Frontend

    frontend = Frontend(CFG)

    class FrontendGraph(torch.nn.Module):
        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            return frontend._features(array_namespace(audio), audio)

    t0 = time.perf_counter()
    torch.onnx.export(FrontendGraph().eval(), (torch.zeros(2, CFG.clip_samples),), str(out), dynamo=True,
                      opset_version=18, input_names=["audio"], output_names=["features"],
                      dynamic_shapes={"audio": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return time.perf_counter() - t0


def numeric_differences(clips: np.ndarray, onnx_path: Path | None, baseline: bool = False
                        ) -> dict[str, tuple[float, float]]:
    """(max abs difference of the log-domain dims, max relative difference of the pre-Fbank energies)
    of the numpy run, of the ONNX graph (``onnx_path``) and of the baseline's numpy run against the
    torch run of the same code."""
    import torch

    from devrecd.features import SLICE_FBANK, Frontend

    frontend = Frontend(CFG)
    ref = frontend(torch.from_numpy(clips)).numpy()
    got = {"numpy": frontend(clips)}
    if onnx_path is not None:
        from devrecd.backends.onnxrt import ort_session

        got["ONNX graph"] = ort_session(onnx_path).run(None, {"audio": clips})[0]
    if baseline:
        _baseline_numpy(clips[:1])
        got["baseline numpy"] = _BASELINE["module"].extract(clips, _BASELINE["frontend"])
    fb = SLICE_FBANK
    scale = float(ref[..., fb].max())
    return {k: (float(np.abs(v[..., : fb.start] - ref[..., : fb.start]).max()),
                float((np.abs(v[..., fb] - ref[..., fb]) / (np.abs(ref[..., fb]) + 1e-6 * scale)).max()))
            for k, v in got.items()}


def _librosa(clips: np.ndarray) -> int:
    import librosa
    import scipy.fft

    mel = librosa.filters.mel(sr=CFG.sample_rate, n_fft=CFG.fft_size, n_mels=34, htk=True, norm=None)
    hop, win = CFG.hop_length, CFG.win_length
    for x in clips:
        y = librosa.effects.preemphasis(x, coef=CFG.preemphasis)
        y = np.pad(y, ((win - hop) // 2, (win - hop) - (win - hop) // 2), mode="reflect")
        frames = librosa.util.frame(y, frame_length=win, hop_length=hop)[:, : CFG.n_frames] * np.hamming(win)[:, None]
        energy = np.log(np.maximum((frames**2).sum(0), CFG.log_floor))
        power = np.abs(np.fft.rfft(frames, n=CFG.fft_size, axis=0)) ** 2
        fbank = mel @ power
        mfcc = scipy.fft.dct(np.log(np.maximum(fbank, CFG.log_floor)), axis=0, norm="ortho")[1:13]
        base = np.vstack([mfcc, energy[None]])
        d1 = librosa.feature.delta(base, width=5, mode="nearest")
        d2 = librosa.feature.delta(d1, width=5, mode="nearest")
        np.vstack([base, d1, d2, fbank]).T
    return len(clips)


def _psf(clips: np.ndarray) -> int:
    import scipy.fft
    from python_speech_features import delta, fbank

    sr = CFG.sample_rate
    for x in clips:
        fb, energy = fbank(x, samplerate=sr, winlen=CFG.win_length / sr, winstep=CFG.hop_length / sr, nfilt=34,
                           nfft=CFG.fft_size, preemph=CFG.preemphasis, winfunc=np.hamming)
        fb, energy = fb[: CFG.n_frames], energy[: CFG.n_frames]
        mfcc = scipy.fft.dct(np.log(fb), axis=1, norm="ortho")[:, 1:13]
        base = np.hstack([mfcc, np.log(energy)[:, None]])
        d1 = delta(base, 2)
        d2 = delta(d1, 2)
        np.hstack([base, d1, d2, fb])
    return len(clips)


IMPLS = {"devrecd (numpy)": _ours_numpy, "devrecd (torch)": _ours_torch, "devrecd (ONNX graph)": _ours_onnx,
         "librosa": _librosa, "python_speech_features": _psf}
ROWS = {"numpy": "devrecd (numpy)", "torch": "devrecd (torch)", "onnx": "devrecd (ONNX graph)", "librosa": "librosa",
        "psf": "python_speech_features"}
OURS = [name for name in IMPLS if name.startswith("devrecd")]


_LOADED: dict[str, np.ndarray] = {}


def _run(task: tuple[str, str, int, int]) -> int:
    """Worker entry: one implementation over clips [start, stop) of the clip file, which each
    process loads into its own memory once (during the warm-up, outside the timing)."""
    name, path, start, stop = task
    if path not in _LOADED:
        _LOADED[path] = np.load(path)
    return IMPLS[name](_LOADED[path][start:stop])


def clips_per_second(names: list[str], path: str, n: int, workers: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of clips/s for all ``n`` clips, per implementation (tasks name index
    ranges; no audio is pickled), so only the feature computation is timed. The implementations take
    turns within every round (A B C A B C ...): on a shared machine a load spike then falls on all of
    them alike instead of on whichever was being timed."""
    per = max(1, n // (workers * 4))
    rates: dict[str, list[float]] = {name: [] for name in names}
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    run = map if pool is None else pool.map
    try:
        for name in names:  # warm every worker for every implementation (imports, tables, sessions)
            list(run(_run, [(name, path, 0, 2)] * workers * 2))
        for _ in range(rounds):
            for name in names:
                tasks = [(name, path, i, min(n, i + per)) for i in range(0, n, per)]
                t0 = time.perf_counter()
                done = sum(run(_run, tasks))
                rates[name].append(done / (time.perf_counter() - t0))
    finally:
        if pool is not None:
            pool.shutdown()
    return {name: float(np.median(r)) for name, r in rates.items()}


def load_clips(shared: Path, n: int) -> np.ndarray:
    from devrecd.audio import cut_windows, read_evidence

    clips = []
    for path in sorted((shared / "data" / "librispeech").glob("*/*/*.flac")):
        rec = read_evidence(path, CFG.sample_rate)
        if rec.duration >= 10.0:
            clips.extend(cut_windows(rec.samples, CFG.clip_samples, CFG.clip_samples))
        if len(clips) >= n:
            break
    return np.stack(clips[:n]).astype(np.float32)


def decode_costs(shared: Path) -> dict[str, float]:
    import av
    import soundfile as sf

    from devrecd.audio import read_evidence
    from devrecd.config import AudioConfig

    src = next(p for p in sorted((shared / "data" / "ccnu_mobile_sample").glob("*.wav")) if sf.info(p).duration >= 10)
    x, sr = sf.read(src, dtype="float32")
    x = x[: 10 * sr]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "ten.wav"
        sf.write(wav, x, sr, subtype="PCM_16")
        m4a = Path(tmp) / "ten.m4a"
        pcm = (x * 32767).astype(np.int16)[None]
        with av.open(str(m4a), "w", format="ipod") as o:
            st = o.add_stream("aac", rate=sr, layout="mono")
            fr = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            fr.sample_rate = sr
            for p in [*st.encode(fr), *st.encode(None)]:
                o.mux(p)
        cfg = AudioConfig()
        for name, path in (("wav", wav), ("m4a", m4a)):
            read_evidence(path, sr, cfg)
            reps = 50 if name == "wav" else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                read_evidence(path, sr, cfg)  # read + sha256 + decode + checks
            out[name] = (time.perf_counter() - t0) / reps * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5, help="timed passes over all clips; the median is reported")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (the frontend's clip_seconds)")
    ap.add_argument("--baseline", metavar="REV", help="also time the numpy frontend of devrecd/features.py at this "
                    "git revision (e.g. main), in the same passes")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to time, of {','.join(ROWS)} (default: all)")
    args = ap.parse_args()
    global CFG
    CFG = FrontendConfig(clip_seconds=args.seconds)
    os.environ["DEVRECD_BENCH_CLIP_SECONDS"] = str(args.seconds)  # for the worker processes
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        ap.error(f"--rows: unknown {', '.join(sorted(unknown))}; known: {', '.join(ROWS)}")
    names = [ROWS[r] for r in ROWS if r in args.rows.split(",")]
    baseline = None
    if args.baseline:
        baseline = f"devrecd (numpy, {args.baseline})"
        IMPLS[baseline] = _baseline_numpy
        OURS.append(baseline)
        names.insert(1, baseline)
    clips = load_clips(args.shared, args.clips)
    print(f"{len(clips)} clips of {args.seconds:g} s at 32 kHz (real speech), 128 x 73 features each; {os.cpu_count()} CPUs")
    print(f"  median of {args.rounds} passes, the implementations taking turns in every pass; glibc malloc "
          f"settings from the environment, the same for all; load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "clips.npy")
        np.save(path, clips)
        if baseline:
            source = subprocess.run(["git", "show", f"{args.baseline}:devrecd/features.py"], check=True,
                                    capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
            (Path(tmp) / "baseline_features.py").write_text(source)
            os.environ["DEVRECD_BENCH_BASELINE"] = str(Path(tmp) / "baseline_features.py")  # for the workers too
            numpy_path = subprocess.run(["git", "show", f"{args.baseline}:devrecd/features_numpy.py"],
                                        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if numpy_path.returncode == 0:  # a revision with the numpy path in a module of its own
                (Path(tmp) / "baseline_features_numpy.py").write_text(numpy_path.stdout)
                os.environ["DEVRECD_BENCH_BASELINE_NUMPY"] = str(Path(tmp) / "baseline_features_numpy.py")
        onnx_path = Path(tmp) / "frontend.onnx"
        if "devrecd (ONNX graph)" in names:
            print(f"  frontend exported to ONNX (dynamo, opset 18) in {export_frontend(onnx_path):.0f} s")
            os.environ["DEVRECD_FRONTEND_ONNX"] = str(onnx_path)  # the worker processes open it
        for name, (log_abs, fbank_rel) in numeric_differences(clips[:8], onnx_path if onnx_path.exists() else None,
                                                              baseline is not None).items():
            print(f"  {name} vs torch, 8 clips: max abs diff of log-domain dims {log_abs:.2e}, "
                  f"max relative diff of pre-Fbank {fbank_rel:.2e}")
        for workers in (1, 2):
            for name, rate in clips_per_second(names, path, len(clips), workers, args.rounds).items():
                results[name, workers] = rate
                print(f"  {workers} worker(s)  {name:<24} {rate:8.1f} clips/s")
    for workers in (1, 2):
        refs = [v for (n, w), v in results.items() if w == workers and n not in OURS]
        if not refs:
            continue
        best_ref = max(refs)
        for name in OURS:
            if (name, workers) in results:
                print(f"  {name} over the fastest reference, {workers} worker(s): "
                      f"{results[name, workers] / best_ref:.2f}x (target >= 2x)")
    if baseline and "devrecd (numpy)" in names:
        for workers in (1, 2):
            print(f"  devrecd (numpy) over {baseline}, {workers} worker(s): "
                  f"{results['devrecd (numpy)', workers] / results[baseline, workers]:.2f}x")
    for name, ms in decode_costs(args.shared).items():
        print(f"  decode (read + sha256 + decode + checks) per 10 s {name}: {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
