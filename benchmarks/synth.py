"""Simulator benchmarks: realism (real phones vs simulated phones) and generation speed.

realism: the same classical classifiers on the real CCNU_Mobile sample (15 phones, segments 1-3
train, 4-5 test, 2 s windows) and on a simulated corpus of the same size (15 devices x 5
recordings, 3 train / 2 test, recordings as long as CCNU's). The baseline is the real corpus,
measured in the same run; the anchor on the real split is ~86% windows / 87% recordings for
MFCC statistics + RBF SVM.

speed: wall time to generate 20 devices x 100 clips x 10 s with --jobs 2, against the same corpus
size rendered with --jobs 1 for the first 2 devices (the per-clip baseline in the same run).

    python benchmarks/synth.py realism [--shared ../shared] [--spread 1.0] [--seeds 0 1 2]
    python benchmarks/synth.py speed [--shared ../shared] [--devices 20] [--clips 100] [--jobs 2]
    python benchmarks/synth.py plot --devices 15   # docs/img/sim_responses.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from devrecd.baselines import make_baseline, recording_accuracy  # noqa: E402
from devrecd.config import AudioConfig  # noqa: E402
from devrecd.data import CCNU_SPLIT, FeatureCache, load_dataset  # noqa: E402
from devrecd.features import FrontendConfig  # noqa: E402
from devrecd.synth import SynthSettings, generate  # noqa: E402

FRONTEND = FrontendConfig()  # 2 s windows at 32 kHz, as the anchors
HOP = 2.0


def evaluate(ds, cache: FeatureCache, names: list[str]) -> dict[str, tuple[float, float]]:
    """{baseline: (window accuracy, recording accuracy)} trained on train (+val), tested on test."""
    train = [it for it in ds.items if it.split in ("train", "val")]
    test = ds.subset("test")
    xtr = [cache.features(it.path, HOP)[0] for it in train]
    xte = [cache.features(it.path, HOP)[0] for it in test]
    out = {}
    for name in names:
        clf = make_baseline(name).fit(xtr, [it.device for it in train])
        probas = [clf.predict_proba(x) for x in xte]
        out[name] = recording_accuracy(probas, [it.device for it in test], clf.classes_)
    return out


def realism(args) -> None:
    import torch

    torch.set_num_threads(1)
    shared = Path(args.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp) / "cache", FRONTEND, AudioConfig())
        real = load_dataset(shared / "data" / "ccnu_mobile_sample", split_by_group=CCNU_SPLIT)
        t0 = time.perf_counter()
        base = evaluate(real, cache, args.baselines)
        print(f"real CCNU sample: {len(real.labels)} phones, {len(real.items)} recordings ({time.perf_counter() - t0:.0f} s)")
        for name, (w, r) in base.items():
            print(f"  {name:9s} windows {w:6.1%}  recordings {r:6.1%}")
        for seed in args.seeds:
            out = Path(tmp) / f"sim{seed}"
            settings = SynthSettings(devices=15, recordings_per_device=5, seed=seed, recording_seconds=args.recording_seconds,
                                     split=(0.6, 0.0, 0.4), spread=args.spread,
                                     same_model_fraction=args.same_model_fraction)
            t0 = time.perf_counter()
            generate(shared / "data" / "librispeech", out, settings, jobs=args.jobs)
            sim = load_dataset(out)
            res = evaluate(sim, cache, args.baselines)
            print(f"simulated seed {seed} spread {args.spread} same-model pairs {args.same_model_fraction}: "
                  f"{len(sim.labels)} devices, {len(sim.items)} recordings "
                  f"({time.perf_counter() - t0:.0f} s)")
            for name, (w, r) in res.items():
                bw, br = base[name]
                print(f"  {name:9s} windows {w:6.1%} (real {bw:6.1%}, gap {w - bw:+.1%})  "
                      f"recordings {r:6.1%} (real {br:6.1%}, gap {r - br:+.1%})")


def speed(args) -> None:
    speech = Path(args.shared) / "data" / "librispeech"
    with tempfile.TemporaryDirectory() as tmp:
        small = SynthSettings(devices=2, recordings_per_device=args.clips, seed=0, recording_seconds=10.0)
        t0 = time.perf_counter()
        generate(speech, Path(tmp) / "one", small, jobs=1)
        t1 = time.perf_counter() - t0
        per_clip = t1 / (2 * args.clips)
        print(f"baseline --jobs 1: 2 devices x {args.clips} clips x 10 s in {t1:.1f} s ({per_clip * 1000:.0f} ms/clip, "
              f"{10.0 / per_clip:.0f}x real time)")
        full = replace(small, devices=args.devices)
        t0 = time.perf_counter()
        generate(speech, Path(tmp) / "all", full, jobs=args.jobs)
        t2 = time.perf_counter() - t0
        n = args.devices * args.clips
        print(f"--jobs {args.jobs}: {args.devices} devices x {args.clips} clips x 10 s in {t2:.1f} s "
              f"({t2 / n * 1000:.0f} ms/clip, {10.0 * n / t2:.0f}x real time, "
              f"{per_clip * n / t2:.2f}x the --jobs 1 rate)")


def plot(args) -> None:
    """Each device's average end-to-end response (output/input spectrum of noise through the whole chain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.signal import welch

    from devrecd.synth import make_devices, render

    rate = 32000
    devices = make_devices(SynthSettings(devices=args.devices, recordings_per_device=1, seed=0))
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for dev in devices:
        curves = []
        for k in range(3):  # three recordings: per-recording variation averages out
            rng = np.random.default_rng([k, dev.model, dev.unit])
            x = rng.standard_normal(4 * rate)
            f, p_in = welch(x, rate, nperseg=2048)
            _, p_out = welch(render(x, rate, dev, rng), rate, nperseg=2048)
            curves.append(10 * np.log10(p_out / p_in + 1e-20))
        resp = np.mean(curves, axis=0)
        ax.semilogx(f[1:], resp[1:] - resp[np.searchsorted(f, 1000.0)], lw=1.2,
                    ls="--" if dev.unit > 1 else "-", label=f"{dev.name} ({dev.codec}, ADC {dev.adc_rate // 1000} kHz)")
    ax.set(xlabel="Hz", ylabel="dB re 1 kHz", ylim=(-70, 25), xlim=(30, rate / 2),
           title=f"Average responses of {len(devices)} simulated devices (seed 0; dashed: second unit of a model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    out = Path(__file__).resolve().parents[1] / "docs" / "img" / "sim_responses.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("realism", "speed", "plot"))
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--spread", type=float, default=SynthSettings(1, 1).spread)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recording-seconds", type=float, default=9.0, help="CCNU recordings are 8-11 s")
    parser.add_argument("--baselines", nargs="+", default=["mfcc-svm", "gsv-svm"])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--same-model-fraction", type=float, default=0.0,
                        help="realism: the CCNU sample's 15 phones are 15 different models")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    {"realism": realism, "speed": speed, "plot": plot}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
