"""Frontend throughput: devrecd's torch frontend vs librosa vs python_speech_features.

All three compute the same 73 dims (MFCC c1-c12, logE, deltas, delta-deltas, 34 pre-Fbank) for
10 s clips at 32 kHz (128 frames, hop 2500, frame 5000, 8192-point FFT) on real LibriSpeech speech,
with 1 worker and with 2 worker processes (one thread each: the second core is used by running
clips on two workers, not by a library's internal threads). Every worker loads the clips once,
before the timing, so the figures time feature computation, not moving audio between processes. Also: decode cost per 10 s WAV and
per 10 s m4a.

    python benchmarks/frontend.py [--clips 48] [--rounds 5] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from devrecd.features import FrontendConfig  # noqa: E402

CFG = FrontendConfig(clip_seconds=10.0)


def _ours(clips: np.ndarray) -> int:
    import torch

    from devrecd.features import extract
    from devrecd.pipeline.stages import frontend_for

    torch.set_num_threads(1)
    extract(clips, frontend_for(CFG))  # the process's cached frontend, as the daemon uses it
    return len(clips)


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


IMPLS = {"devrecd (torch)": _ours, "librosa": _librosa, "python_speech_features": _psf}


_LOADED: dict[str, np.ndarray] = {}


def _run(task: tuple[str, str, int, int]) -> int:
    """Worker entry: one implementation over clips [start, stop) of the clip file, which each
    process loads into its own memory once (during the warm-up, outside the timing)."""
    name, path, start, stop = task
    if path not in _LOADED:
        _LOADED[path] = np.load(path)
    return IMPLS[name](_LOADED[path][start:stop])


def clips_per_second(name: str, path: str, n: int, workers: int, rounds: int) -> float:
    """Median over ``rounds`` of clips/s for all ``n`` clips (tasks name index ranges; no audio is
    pickled), so only the feature computation is timed."""
    per = max(1, n // (workers * 4))
    tasks = [(name, path, i, min(n, i + per)) for i in range(0, n, per)]
    rates = []
    if workers == 1:
        _run((name, path, 0, 2))  # warm-up (imports, tables)
        for _ in range(rounds):
            t0 = time.perf_counter()
            done = sum(map(_run, tasks))
            rates.append(done / (time.perf_counter() - t0))
        return float(np.median(rates))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_run, [(name, path, 0, 2)] * workers * 2))  # warm each worker
        for _ in range(rounds):
            t0 = time.perf_counter()
            done = sum(pool.map(_run, tasks))
            rates.append(done / (time.perf_counter() - t0))
    return float(np.median(rates))


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
    args = ap.parse_args()
    clips = load_clips(args.shared, args.clips)
    print(f"{len(clips)} clips of 10 s at 32 kHz (real speech), 128 x 73 features each; {os.cpu_count()} CPUs")
    print(f"  median of {args.rounds} passes; glibc malloc settings from the environment, the same for all")
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "clips.npy")
        np.save(path, clips)
        for workers in (1, 2):
            for name in IMPLS:
                results[name, workers] = clips_per_second(name, path, len(clips), workers, args.rounds)
                print(f"  {workers} worker(s)  {name:<24} {results[name, workers]:8.1f} clips/s")
    for workers in (1, 2):
        best_ref = max(v for (n, w), v in results.items() if w == workers and n != "devrecd (torch)")
        print(f"  speed-up over the fastest reference, {workers} worker(s): {results['devrecd (torch)', workers] / best_ref:.2f}x (target >= 2x)")
    for name, ms in decode_costs(args.shared).items():
        print(f"  decode (read + sha256 + decode + checks) per 10 s {name}: {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
