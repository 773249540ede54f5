"""``devrecd train-gsv`` and ``devrecd train-fusion``: the open-set scorers trained on development
recordings, with their development calibrations. The registry's own commands (``enroll``,
``devices``, ``calibrate``) and the options they share are :mod:`devrecd.cli.registry`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer

from devrecd.cli.app import ConfigOption, HopSecondsOption, command, load_cli_config, progress
from devrecd.cli.registry import GsvOption, calibration_line, check_checkpoint_option


@command("train-gsv")
def train_gsv(
    datasets: List[Path] = typer.Argument(..., exists=True, help="Development recordings of known devices "
                                                                 "(any dataset layout; several are merged)."),
    out: Path = typer.Option(..., "--out", "-o", help="GSV scorer file to write (.npz)."),
    mixtures: int = typer.Option(16, min=1, help="UBM components (16: best on the leave-phones-out protocol)."),
    nap: int = typer.Option(16, min=0, help="Within-device directions projected out (0 = none)."),
    channels: bool = typer.Option(True, "--channels/--no-channels", help="Also calibrate every channel of the channel "
                                  "table (aac64, opus32, amrnb, ...: development audio passed through it, references "
                                  "matched) and short questioned recordings; off: clean only."),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="Also calibrate noise-matched comparisons (clean/snr10, "
                               "/snr20, /snr30, each also /short: noisy development recordings against references "
                               "brought to their noise, as a verdict compares a noisier recording); needs --channels."),
    babble: Optional[Path] = typer.Option(None, "--babble", exists=True, file_okay=False, help="Folder of single-talker "
                                          "recordings (e.g. LibriSpeech; FLAC/WAV, one talker per file) for babble "
                                          "noise in the noise-matched calibrations; without it, white noise only."),
    augment: bool = typer.Option(False, "--augment/--no-augment", help="Also train the UBM and NAP on copies of the "
                                 "development recordings through each calibrated channel (needs --channels) and with "
                                 "noise added (--noise-copies): within-device variability that NAP projects out. "
                                 "Off by default: it names more recordings under noise and in calls but rejected "
                                 "fewer never-enrolled phones (docs/openset-model.md)."),
    noise_copies: int = typer.Option(2, "--noise-copies", min=0, help="Noisy copies of each development recording "
                                     "the UBM and NAP are trained on, with --augment and --noise (white or babble, "
                                     "SNR 4-36 dB)."),
    channel_models: str = typer.Option("", "--channel-models", help="Channels that get a UBM/NAP of their own, "
                                       "comma-separated (e.g. amrnb,tel; needs --channels): trained on the development "
                                       "recordings through that channel (NAME) or through several conditions "
                                       "(NAME=clean+NAME); comparisons under the channel, and its development "
                                       "calibrations, use it. EXPERIMENTAL, off by default: on held-out phones amrnb "
                                       "gained, tel named almost every never-enrolled phone (docs/openset.md)."),
    inner: int = typer.Option(3, min=2, help="Cross-fitting groups of devices for the development calibration "
                                             "(each held out in turn; needs 2 devices per group)."),
    repeats: int = typer.Option(1, min=1, help="Partitions of the devices into --inner groups, each "
                                "cross-fitted and their trials pooled (each trial once): more pairs of different "
                                "devices (phones of one maker among them) in the development calibrations. 3 "
                                "rejected more never-enrolled phones and named fewer enrolled ones on held-out "
                                "phones (docs/openset.md); off (1) by default."),
    seed: int = typer.Option(0),
    hop_seconds: Optional[float] = HopSecondsOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train the GMM-supervector scorer (UBM + NAP) and its cross-fitted development calibrations
    (one per comparison condition; the decision rule of [registry])."""
    from devrecd.openset.calibration import Decision
    from devrecd.openset.gsvtrain import Augment, train_gsv as train
    from devrecd.openset.scoring import parse_calibration_key
    from devrecd.openset.scorers import save_gsv

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds})
    models = _channel_models_option(channel_models, channels)  # refused before any decoding
    feats, devices, order, sources, paths = _development_features(datasets, cfg, cfg.frontend, with_paths=True)
    typer.echo(f"{len(feats)} recordings of {len(set(devices))} devices")
    conditions, under, audio = (_calibration_conditions(paths, cfg, noise=noise, babble=babble) if channels
                                else (["clean"], None, None))
    copies = Augment()
    if augment and channels:
        copies = Augment(channels=tuple(sorted({parse_calibration_key(c)[0] for c in conditions} - {"clean"})),
                         noise_copies=noise_copies if noise else 0)
        typer.echo(f"UBM and NAP also trained on copies through {', '.join(copies.channels) or 'no channel'} and "
                   f"{copies.noise_copies} noisy cop{'y' if copies.noise_copies == 1 else 'ies'} of each recording")
    scorer = train(feats, devices, order, cfg.frontend, mixtures=mixtures, nap_dims=nap, inner=inner, repeats=repeats,
                   seed=seed, source=out.name, decision=Decision.from_config(cfg.registry), conditions=conditions,
                   features_under=under, audio=audio, augment=copies, channel_models=models, on_step=typer.echo)
    # The SNR range of the development recordings (measured as a verdict measures it, before any
    # channel): a verdict on a noisier recording says it is outside the range its calibration saw.
    # The noise-matched calibrations carry the measured SNRs of their own noisy recordings.
    snr = [_snr_db(p, cfg) for p in paths]
    for cal in scorer.calibrations.values():
        if "snr_db_min" not in cal["conditions"]:
            cal["conditions"].update(snr_db_min=round(min(snr), 1), snr_db_max=round(max(snr), 1),
                                     snr_measured="on the development recordings before the channel")
    typer.echo(f"development recordings' SNR {min(snr):.1f}-{max(snr):.1f} dB")
    save_gsv(out, scorer, extra={"datasets": sources, "hop_seconds": cfg.audio.hop_seconds, "seed": seed,
                                 "training_copies": copies.describe(),
                                 "channel_models": {c: list(on) for c, on in models.items()}})
    typer.echo(f"wrote {out} (calibrated conditions: {', '.join(sorted(scorer.calibrations))})")


def _channel_models_option(text: str, channels: bool) -> dict[str, tuple[str, ...]]:
    """``--channel-models``: ``NAME`` (trained through that channel) or ``NAME=COND+COND`` (through each
    of them; ``clean``: as recorded), comma-separated; every channel one this run calibrates (those of
    the channel table whose encoder this FFmpeg has, with ``--channels``)."""
    from devrecd.audio.channel import CHANNELS
    from devrecd.audio.transmit import encoder_available

    calibrated = {c.name for c in CHANNELS.values() if not c.encoder or encoder_available(c.encoder)} if channels else set()
    out: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, spec = item.partition("=")
        on = tuple(filter(None, (t.strip() for t in spec.split("+")))) if spec else (name,)
        if name not in calibrated or any(c != "clean" and c not in calibrated for c in on):
            raise typer.BadParameter(f"{item!r}: channels must be among the calibrated ones "
                                     f"({', '.join(sorted(calibrated)) or 'none: --channels is off'})",
                                     param_hint="--channel-models")
        out[name] = on
    untried = sorted(f"{n}={'+'.join(on)}" for n, on in out.items() if VALIDATED_CHANNEL_MODELS.get(n) != on)
    if untried:
        typer.echo(f"warning: channel model(s) {', '.join(untried)} not validated on held-out phones (only "
                   f"{', '.join(f'{n}={chr(43).join(on)}' for n, on in VALIDATED_CHANNEL_MODELS.items())}, which the "
                   "shipped scorer carries, is: docs/openset.md, 'Channel models'); not for casework until "
                   "measured there", err=True)
    return out


# Channel models measured on held-out phones (benchmarks/conditions.py) and shipped: name -> training conditions.
VALIDATED_CHANNEL_MODELS = {"amrnb": ("clean", "amrnb")}


def _calibration_conditions(paths: list[Path], cfg, *, noise: bool = True, babble: Path | None = None
                            ) -> tuple[list[str], Any, Any]:
    """The comparison conditions a development calibration covers (clean and every channel whose
    encoder this FFmpeg has, each also ``/short``; with ``noise`` the noise-matched ``clean/snrNN``
    ones), ``features_under(i, channel, seconds)``: recording i's raw windows through the channel
    (whole recording), cut to its first ``seconds``, and the :class:`DevAudio` of the noise trials."""
    import functools

    from devrecd.audio.channel import CHANNELS
    from devrecd.audio.decode import read_evidence
    from devrecd.audio.transmit import apply_channel, encoder_available
    from devrecd.features import extract
    from devrecd.openset.scoring import SHORT
    from devrecd.audio.windows import cut_windows
    from devrecd.stages import finite_features, frontend_for, hop_samples

    usable = [c for c in CHANNELS.values() if not c.encoder or encoder_available(c.encoder)]
    skipped = sorted(set(CHANNELS) - {c.name for c in usable})
    if skipped:
        typer.echo(f"note: no encoder for {', '.join(skipped)} in this FFmpeg: not calibrated (verdicts under them: inconclusive)")
    conditions = [c for name in ["clean", *(c.name for c in usable)] for c in (name, name + SHORT)]

    @functools.lru_cache(maxsize=64)  # a recording is used whole and cut short: decoded and encoded once
    def decoded(i: int, channel: str) -> Any:
        rec = read_evidence(paths[i], cfg.frontend.sample_rate, cfg.audio)
        if channel != "clean":
            rec = replace(rec, samples=np.ascontiguousarray(apply_channel(CHANNELS[channel], rec.samples,
                                                                          rec.sample_rate), dtype=np.float32))
        return rec

    frontend = frontend_for(cfg.frontend)
    hop = hop_samples(cfg.audio.hop_seconds, cfg.frontend.sample_rate)

    def featurise(samples: np.ndarray, what: Any) -> np.ndarray:
        return finite_features(extract(cut_windows(samples, cfg.frontend.clip_samples, hop), frontend), what)

    def features_under(i: int, channel: str, seconds: float | None) -> np.ndarray:
        rec = decoded(i, channel)
        cut = None if seconds is None else int(round(seconds * rec.sample_rate))
        return featurise(rec.samples[:cut], paths[i])

    if not noise:
        return conditions, features_under, None
    from devrecd.openset.noisetrials import DevAudio
    from devrecd.openset.scoring import NOISE, NOISE_LEVELS

    conditions += [f"clean{NOISE}{level}{tail}" for level in NOISE_LEVELS for tail in ("", SHORT)]

    def noisy_features(samples: np.ndarray) -> np.ndarray:
        return featurise(np.ascontiguousarray(samples, dtype=np.float32), "noisy development audio")

    talkers = _talkers(babble, cfg) if babble is not None else []
    typer.echo(f"noise-matched calibrations: white{' and babble (' + str(len(talkers)) + ' talkers)' if talkers else ''} noise")
    audio = DevAudio(samples=lambda i: decoded(i, "clean").samples, features=noisy_features,
                     rate=cfg.frontend.sample_rate, talkers=talkers)
    return conditions, features_under, audio


def _talkers(folder: Path, cfg) -> list[np.ndarray]:
    """Single-talker recordings for babble noise (:func:`devrecd.audio.talkers.read_talkers`)."""
    from devrecd.audio.talkers import read_talkers

    try:
        return read_talkers(folder, cfg.frontend.sample_rate, cfg.audio, cfg.watch,
                            skipped=lambda f, exc: typer.echo(f"note: babble: {f.name} not used: {exc}"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--babble") from None


def _snr_db(path: Path, cfg) -> float:
    """The measured SNR of a recording (devrecd.audio.noise), as its verdict's condition states it."""
    from devrecd.audio.decode import read_evidence
    from devrecd.audio.noise import measure_noise

    rec = read_evidence(path, cfg.frontend.sample_rate, cfg.audio)
    return float(measure_noise(rec.samples, rec.sample_rate).snr_db)


def _development_features(datasets: List[Path], cfg, frontend, *, with_paths: bool = False) -> tuple:
    """Raw windows (``frontend``, ``audio.hop_seconds``) of every recording of ``datasets``, with device
    names (prefixed by the dataset's folder when several are merged), sort keys and sources (and,
    ``with_paths``, the recordings' paths)."""
    from devrecd.data import FeatureCache, load_dataset

    cache = FeatureCache(Path(cfg.train.cache_dir), frontend, cfg.audio)
    feats, devices, order, sources, paths = [], [], [], [], []
    loaded = [(ds_path, load_dataset(ds_path)) for ds_path in datasets]
    with progress(sum(len(ds.items) for _, ds in loaded), "features", unit="recording") as bar:
        for ds_path, ds in loaded:
            sources.append({"dataset": str(ds_path), "sha256": ds.manifest_sha256, "recordings": len(ds.items)})
            for it in ds.items:
                feats.append(cache.features(it.path, cfg.audio.hop_seconds)[0])
                paths.append(it.path)
                devices.append(it.device if len(datasets) == 1 else f"{ds_path.name}/{it.device}")
                order.append((str(it.group), it.path.name))
                bar.update(1)
    return (feats, devices, order, sources, paths) if with_paths else (feats, devices, order, sources)


@command("train-fusion")
def train_fusion(
    datasets: List[Path] = typer.Argument(..., exists=True, help="Development recordings of known devices, ideally "
                                                                 "devices the parts were not trained on (any "
                                                                 "dataset layout; several are merged)."),
    model: Path = typer.Option(..., "--model", "-m", exists=True,
                               help="Network embedder: checkpoint (.pt) or run directory (`devrecd train-embedder`), "
                                    "or its embedder export (.onnx from `devrecd export-embedder`)."),
    gsv: Optional[Path] = GsvOption,
    out: Path = typer.Option(..., "--out", "-o", help="Fusion scorer file to write (.npz)."),
    hop_seconds: Optional[float] = HopSecondsOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Fuse a network embedder with a GSV scorer: logistic-regression weights and a development calibration."""
    from devrecd.openset.calibration import Decision
    from devrecd.openset.embedder import load_embedder
    from devrecd.openset.fusion import train_fusion as train
    from devrecd.openset.scorers import EmbedderScorer, FusionScorer, default_gsv_path, load_gsv, save_fusion
    from devrecd.stages import resolve_device

    check_checkpoint_option(model)
    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds})
    net = EmbedderScorer(load_embedder(model.resolve(), device=resolve_device(cfg.backend.device),
                                       threads=cfg.backend.threads))
    supervector = load_gsv(gsv if gsv is not None else default_gsv_path())[0]
    parts = [net, supervector]
    frontend = FusionScorer(parts).frontend  # refuses parts of two frontends
    feats, devices, order, sources = _development_features(datasets, cfg, frontend)
    typer.echo(f"{len(feats)} recordings of {len(set(devices))} devices")
    seen = sorted(set(devices) & set(net.embedder.labels))
    if seen:
        typer.echo(f"note: {len(seen)} of these {len(set(devices))} devices trained the network; on them it looks "
                   "better than on new phones, and the fusion learns to over-trust it")
    scorer = train(parts, feats, devices, order, decision=Decision.from_config(cfg.registry))
    save_fusion(out, scorer, extra={"datasets": sources, "hop_seconds": cfg.audio.hop_seconds,
                                    "network_devices_seen": seen})
    typer.echo("weights: " + ", ".join(f"{p.kind} {w:.3f}" for p, w in zip(scorer.parts, scorer.weights))
               + f"; bias {scorer.bias:.3f}")
    typer.echo(f"development calibration (clean): {calibration_line(scorer.calibrations['clean'])}")
    typer.echo(f"wrote {out}")
