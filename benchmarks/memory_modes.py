"""Peak RSS of ``devrecd identify`` on one long WAV in every scorer mode, beside a baseline checkout.

Modes (each one ``devrecd identify --format json FILE`` process, its peak RSS from ``wait4``):

* ``gsv``            ``--registry`` of the shipped GSV scorer, no model (open set only)
* ``embedder``       ``--registry`` of a network embedder, served from its ONNX export
                     (``registry.embedder_model``: the serving install's path, no torch)
* ``fusion``         ``--registry`` of a fusion (that network + the shipped GSV), served from the export
* ``model``          ``--model`` (a closed-set ONNX export) alone
* ``model+gsv``      ``--model`` and ``--registry`` (GSV): the registry served beside the closed-set model
* ``model+embedder`` ``--model`` and ``--registry`` (embedder)

The networks are small and barely trained (memory does not depend on what they learnt): a ``paper``
classifier at its initial weights exported with ``devrecd export``, and an ``asp`` embedder
(hidden 32) trained one epoch on CCNU phones, exported with ``devrecd export-embedder``. The long
WAVs are speech-like noise at 32 kHz PCM-16 (``--hours``, default 1 and 4: 4 h is
``audio.max_seconds``, the longest file the defaults accept). Everything is built once under
``--work`` and kept for the next run.

Target (issue 29): peak RSS <= 600 MB for any file within the limits, in every mode, and not
growing with the file's length.

    nice python benchmarks/memory_modes.py --baseline /path/to/main-checkout [--hours 1,4]
                                           [--modes gsv,model+gsv] [--work DIR]

``--baseline PATH`` measures every (mode, length) a second time with PATH's devrecd in the same run,
right after this checkout's (both see the same machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from intake import _env, _outcome, _run_measured, _write_long  # noqa: E402

CCNU = Path(os.environ.get("DEVRECD_SHARED", REPO.parent / "shared")) / "data" / "ccnu_mobile_sample"  # as the tests
MODES = ("gsv", "embedder", "fusion", "model", "model+gsv", "model+embedder")
TARGET_MB = 600


def _cli(*args: str) -> None:
    """This checkout's devrecd CLI (the artefacts it writes are read by both checkouts)."""
    res = subprocess.run([sys.executable, "-m", "devrecd", *args], env=_env(None), cwd=str(REPO),
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"devrecd {' '.join(args[:2])} failed:\n{res.stdout}\n{res.stderr}")


def _classifier(work: Path, phones: dict[str, dict[int, Path]]) -> Path:
    """A ``paper`` network at its initial weights (normalised on CCNU features), exported to ONNX."""
    onnx = work / "paper.onnx"
    if onnx.is_file():
        return onnx
    import numpy as np
    import torch

    from devrecd.config import load_config
    from devrecd.model import build_model
    from devrecd.model.checkpoint import Checkpoint, save_checkpoint
    from devrecd.stages import features_for_file
    from devrecd.train import normalisation_stats

    cfg = load_config(None, env={})
    labels = sorted(phones)
    feats = [features_for_file(phones[p][1], cfg)[1] for p in labels[:4]]
    mean, std = normalisation_stats(feats)
    torch.manual_seed(0)
    net = build_model("paper", len(labels)).eval()
    ckpt = Checkpoint(arch="paper", hparams={}, labels=labels, frontend=cfg.frontend, norm_mean=mean, norm_std=std,
                      state_dict=net.state_dict(), dataset_sha256="0" * 64, split={"train": []},
                      meta={"epoch": 0, "loss": float(np.nan), "note": "initial weights, for memory benchmarks"})
    run = work / "paper-run"
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run / "best.pt", ckpt)
    parity = [a for p in labels[:3] for a in ("--parity-audio", str(phones[p][4]))]
    _cli("export", str(run), "--out", str(onnx), *parity)
    return onnx


def _embedder(work: Path, phones: dict[str, dict[int, Path]]) -> tuple[Path, Path]:
    """(run folder, ONNX export) of an ``asp`` embedder trained one epoch on 8 CCNU phones."""
    run, onnx = work / "asp-run", work / "asp.onnx"
    if not onnx.is_file():
        from devrecd.config import TrainConfig, load_config
        from devrecd.data import load_dataset
        from devrecd.train import train
        from devrecd.train_data import restrict_dataset

        cfg = load_config(None, env={}, overrides={"audio.hop_seconds": 1.0, "train.threads": 2,
                                                   "train.cache_dir": str(work / "cache")})
        ds = load_dataset(CCNU, split_by_group={"train": ("1", "2"), "test": ("3", "4", "5")},
                          split_file=work / "split.json")
        opts = TrainConfig(arch="asp", loss="aam", epochs=1, batch_size=32, lr=1e-3, lr_step_epochs=1, patience=0,
                           seed=0, hop_seconds=1.0)
        train(restrict_dataset(ds, sorted(ds.labels)[:8], splits=("train",)), run, cfg, opts,
              hparams={"hidden": 32, "attention": 16, "emb_dim": 32})
        parity = [a for p in sorted(phones)[:3] for a in ("--parity-audio", str(phones[p][4]))]
        _cli("export-embedder", str(run), "--out", str(onnx), *parity)
    return run, onnx


def _registries(work: Path, phones: dict[str, dict[int, Path]], run: Path) -> dict[str, Path]:
    """{kind: registry} of three phones the embedder never saw: GSV (shipped), embedder, fusion."""
    names = sorted(phones)
    enrolled = names[11:14]
    out = {k: work / f"registry-{k}" / "registry.json" for k in ("gsv", "embedder", "fusion")}
    fusion = work / "fusion.npz"
    if not fusion.is_file():
        dev = work / "fusion-dev"
        dev.mkdir(parents=True, exist_ok=True)
        lines = ["path,device,segment"] + [f'"{path}","{p}",{s}' for p in names[8:11]
                                           for s, path in sorted(phones[p].items())]
        (dev / "manifest.csv").write_text("\n".join(lines) + "\n")
        _cli("train-fusion", str(dev), "--model", str(run), "--out", str(fusion))
    how = {"gsv": [], "embedder": ["--scorer", "embedder", "--model", str(run)], "fusion": ["--fusion", str(fusion)]}
    for kind, reg in out.items():
        if reg.is_file():
            continue
        for p in enrolled:
            _cli("enroll", "--registry", str(reg), "--profile", p, *how[kind], str(phones[p][1]), str(phones[p][2]))
    return out


def prepare(work: Path) -> dict:
    """Build (or find) the models and registries under ``work``; their paths."""
    sys.path.insert(0, str(REPO))
    from tests.test_openset_fusion import _by_phone  # phone -> segment -> recording

    phones = _by_phone(CCNU)
    model = _classifier(work, phones)
    run, embedder_onnx = _embedder(work, phones)
    regs = _registries(work, phones, run)
    return {"model": str(model), "embedder_onnx": str(embedder_onnx), "registries": {k: str(v) for k, v in regs.items()}}


def mode_args(mode: str, model: Path, regs: dict[str, Path], embedder_onnx: Path) -> tuple[list[str], dict[str, str]]:
    """(identify flags, extra environment) of one mode."""
    args: list[str] = []
    if mode.startswith("model"):
        args += ["--model", str(model)]
    kind = mode.split("+")[-1]
    if kind in regs:
        args += ["--registry", str(regs[kind])]
    env = {"DEVRECD_REGISTRY__EMBEDDER_MODEL": str(embedder_onnx)} if kind in ("embedder", "fusion") else {}
    return args, env


def measure(code: Path, wav: Path, args: list[str], extra_env: dict[str, str]) -> dict:
    """One ``identify`` process with ``code``'s devrecd: peak RSS MB, seconds, exit code, outcome."""
    env = {**_env(code), **extra_env}
    rc, peak, wall, out, err = _run_measured([sys.executable, "-m", "devrecd", "identify", "--format", "json",
                                              *args, str(wav)], env, code)
    return {"peak_rss_mb": round(peak, 1), "seconds": round(wall, 1), "exit": rc, "outcome": _outcome(out, err)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="checkout of the baseline (e.g. main) to measure beside")
    ap.add_argument("--hours", default="1,4", help="comma-separated file lengths in hours (default 1,4)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes (default: all of {', '.join(MODES)})")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder, kept between runs (default: a new one)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the child that builds the models
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="devrecd-memory-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        print(json.dumps(prepare(work)))
        return
    base = args.baseline.resolve()
    # Built in a child process: a measured process forked from one that imported torch would report
    # the parent's peak (Linux keeps the high-water mark of RSS across fork and exec).
    made = subprocess.run([sys.executable, __file__, "--prepare", "--work", str(work), "--baseline", str(base)],
                          env=_env(None), capture_output=True, text=True)
    if made.returncode:
        raise SystemExit(f"preparing the models and registries failed:\n{made.stdout}\n{made.stderr}")
    paths = json.loads(made.stdout.strip().splitlines()[-1])
    model, embedder_onnx = Path(paths["model"]), Path(paths["embedder_onnx"])
    regs = {k: Path(v) for k, v in paths["registries"].items()}
    hours = [float(h) for h in args.hours.split(",") if h]
    wavs = {h: _write_long(work / f"long-{h:g}h.wav", h * 3600) for h in hours}
    print(f"this checkout: {REPO}; baseline: {base}; work: {work}; target <= {TARGET_MB} MB")
    print(f"{'mode':<16} {'hours':>5} | {'peak RSS MB':>11} {'time s':>7} {'outcome':<16} | baseline: "
          f"{'peak RSS MB':>11} {'time s':>7} {'outcome':<16}", flush=True)
    rows = []
    for mode in modes:
        flags, env = mode_args(mode, model, regs, embedder_onnx)
        for h in hours:
            this, then = measure(REPO, wavs[h], flags, env), measure(base, wavs[h], flags, env)
            rows.append({"mode": mode, "hours": h, "this": this, "baseline": then})
            print(f"{mode:<16} {h:5g} | {this['peak_rss_mb']:11.0f} {this['seconds']:7.1f} {this['outcome'][:16]:<16} | "
                  f"baseline: {then['peak_rss_mb']:11.0f} {then['seconds']:7.1f} {then['outcome'][:16]:<16}", flush=True)
    over = [r for r in rows if r["this"]["peak_rss_mb"] > TARGET_MB]
    print(f"this checkout: {len(over)} of {len(rows)} runs above {TARGET_MB} MB" +
          "".join(f"; {r['mode']} {r['hours']:g} h {r['this']['peak_rss_mb']:.0f} MB" for r in over))
    if args.json:
        args.json.write_text(json.dumps({"this": str(REPO), "baseline": str(base), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
