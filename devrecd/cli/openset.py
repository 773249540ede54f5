"""``devrecd enroll``, ``devrecd devices``, ``devrecd calibrate``: the open-set device registry; ``train-gsv``
and ``train-fusion``: its trained scorers."""

from __future__ import annotations

import enum
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer

from devrecd.cli.app import (ConfigOption, SplitName, TextFormat, audio_paths, choice, command, load_cli_config,
                             progress)
from devrecd.errors import ConfigError, UsageError
from devrecd.fsutil import atomic_write

RegistryOption = typer.Option(None, "--registry", "-r", help="Registry JSON file (registry.path).")
ModelOption = typer.Option(None, "--model", "-m", exists=True,
                           help="Network embedder (scorer 'embedder'): checkpoint (.pt), run directory, or its "
                                "embedder export (.onnx from `devrecd export-embedder`; no torch needed). "
                                "Default for an existing embedder/fusion registry: registry.embedder_model, else the "
                                "checkpoint it names.")


class ScorerKind(str, enum.Enum):
    """How recordings are compared with device profiles (devrecd.openset.scorers.KINDS)."""

    embedder = "embedder"
    gsv = "gsv"
    fusion = "fusion"


ScorerOption = typer.Option(None, "--scorer", case_sensitive=False,
                            help="Default: the registry's scorer; for a new registry fusion when --fusion is given, "
                                 "embedder when --model is given, else gsv.")
GsvOption = typer.Option(None, "--gsv", exists=True, dir_okay=False,
                         help="GSV scorer file from `devrecd train-gsv` (default: the shipped one).")
FusionOption = typer.Option(None, "--fusion", exists=True, dir_okay=False,
                            help="Fusion scorer file from `devrecd train-fusion` (scorer 'fusion'; its network is the "
                                 "checkpoint it names, or --model).")


def check_checkpoint_option(model: Optional[Path]) -> None:
    """``--model`` of the open-set commands is a network embedder: a checkpoint or an embedder export;
    any other ONNX file (a classifier export, or one without its embedder contract) is a usage error."""
    if model is None or not model.is_file() or model.suffix.lower() != ".onnx":
        return
    from devrecd.contract import CLASSIFIER, EMBEDDER, export_kind
    from devrecd.errors import ArtifactError

    try:
        kind = export_kind(model)
    except ArtifactError as exc:
        kind, why = "", f"no readable contract beside it ({exc.reason})"
    else:
        why = "it is a classifier export (`devrecd export`)" if kind == CLASSIFIER else f"its contract is of kind {kind!r}"
    if kind != EMBEDDER:
        raise UsageError(f"--model {model}: an ONNX export cannot embed recordings unless it is an embedder export, and "
                         f"{why}: pass the .pt (or run directory) written by `devrecd train-embedder` or `devrecd train` "
                         f"that {model.name} was exported from, or its `devrecd export-embedder` .onnx")


def choose_scorer(reg, scorer: Optional[ScorerKind | str], model: Optional[Path], gsv: Optional[Path], device: str,
                  fusion: Optional[Path] = None, *, embedder_model: str = "", threads: int = 1):
    """The scorer to enrol/score with: the registry's own when it has profiles (``reg`` may be None;
    a --gsv/--fusion FILE must then be that same scorer; its network is ``model``, else
    ``embedder_model`` (registry.embedder_model), else the checkpoint it names), else a new one of the
    kind asked for (gsv without --model: the shipped one, or --gsv FILE; fusion: the --fusion FILE)."""
    from devrecd.openset.scorers import (EmbedderScorer, default_gsv_path, load_fusion, load_gsv, registry_scorer,
                                         scorer_file_description)

    check_checkpoint_option(model)
    scorer = choice(scorer) if isinstance(scorer, enum.Enum) else scorer
    if reg is not None and reg.embedder:
        if scorer is not None and scorer != reg.kind:
            raise UsageError(f"registry {reg.path} was enrolled with scorer {reg.kind!r}, not {scorer!r}")
        for flag, path in (("--gsv", gsv), ("--fusion", fusion)):
            if path is None:
                continue
            given = scorer_file_description(path, fusion=flag == "--fusion")
            made = reg.embedder
            if given.get("kind") != reg.kind or given.get("fingerprint") != made.get("fingerprint"):
                raise UsageError(
                    f"{flag} {path} is {given.get('kind')!r} scorer {str(given.get('fingerprint'))[:12]}, but registry "
                    f"{reg.path} was made with {reg.kind!r} scorer {str(made.get('fingerprint'))[:12]} "
                    f"({made.get('source', '?')}); its profiles can only be used with that scorer: drop {flag} "
                    f"or use another registry")
        return registry_scorer(reg, model=model, configured=embedder_model, device=device, threads=threads)
    kind = scorer or ("fusion" if fusion is not None else "embedder" if model is not None else "gsv")
    if kind == "fusion":
        if fusion is None:
            raise UsageError("scorer 'fusion' needs --fusion FILE (from `devrecd train-fusion`)")
        return load_fusion(fusion, model=model, device=device, threads=threads)[0]
    if fusion is not None:
        raise UsageError(f"--fusion is a fusion scorer's file; it does not go with --scorer {kind}")
    if kind == "embedder":
        if model is None:
            raise UsageError("scorer 'embedder' needs --model (a checkpoint, run directory or embedder export)")
        from devrecd.openset.embedder import load_embedder

        return EmbedderScorer(load_embedder(model, device=device, threads=threads))
    return load_gsv(gsv if gsv is not None else default_gsv_path())[0]


class DevicesAction(str, enum.Enum):
    list = "list"
    show = "show"
    remove = "remove"


def _registry_path(cfg, given: Optional[Path]) -> Path:
    path = given or (Path(cfg.registry.path) if cfg.registry.path else None)
    if path is None:
        raise UsageError("no registry: pass --registry FILE or set registry.path in the config")
    return path


@command()
def enroll(
    audio: List[Path] = typer.Argument(..., help="Reference recordings made by the device (or folders of them)."),
    profile: str = typer.Option(..., "--profile", "-p", help="Name of the device profile to add to or create."),
    model: Optional[Path] = ModelOption,
    registry: Optional[Path] = RegistryOption,
    scorer: Optional[ScorerKind] = ScorerOption,
    gsv: Optional[Path] = GsvOption,
    fusion: Optional[Path] = FusionOption,
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop in seconds (audio.hop_seconds)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Add reference recordings to a device profile (no retraining).

    Without --model the shipped GSV scorer is used (or --gsv FILE, or --fusion FILE); a registry
    keeps the scorer it was created with."""
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import enrol_files
    from devrecd.stages import resolve_device

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds})
    check_checkpoint_option(model)
    files = audio_paths(audio, cfg, what="reference")
    reg = open_registry(_registry_path(cfg, registry), create=True)
    chosen = choose_scorer(reg, scorer, model, gsv, resolve_device(cfg.backend.device), fusion,
                           embedder_model=cfg.registry.embedder_model, threads=cfg.backend.threads)
    device = profile
    added, skipped = enrol_files(reg, chosen, device, files, cfg,
                                 on_file=lambda p, n: typer.echo(f"{p}: {n} window(s)"))
    reg.save()
    counts = reg.profiles[device].counts if device.strip() in reg.profiles else {"n_references": 0}
    note = f", {skipped} already enrolled" if skipped else ""
    typer.echo(f"{device}: +{added} reference(s){note}; {counts['n_references']} in total -> {reg.path}")
    if added and not reg.calibrations:
        dev = sorted(reg.embedder.get("dev_calibrations") or {})
        fallback = (f" (until then the scorer's development calibrations are used: {', '.join(dev)})" if dev else
                    " (until then verdicts name no device: 'inconclusive')")
        typer.echo(f"note: the registry changed; run `devrecd calibrate` for a case calibration{fallback}")


@command()
def devices(
    action: DevicesAction = typer.Argument(DevicesAction.list, case_sensitive=False, help="list | show NAME | remove NAME"),
    name: Optional[str] = typer.Argument(None, help="Device profile name (show, remove)."),
    registry: Optional[Path] = RegistryOption,
    fmt: TextFormat = typer.Option(TextFormat.table, "--format", case_sensitive=False, help="table or json."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """List, show or remove enrolled device profiles."""
    from devrecd.openset.registry import open_registry

    cfg = load_cli_config(config)
    reg = open_registry(_registry_path(cfg, registry))
    as_json = fmt is TextFormat.json
    if action is DevicesAction.list:
        rows = [reg.profiles[n].summary() for n in reg.names]
        if as_json:
            typer.echo(json.dumps({"registry": str(reg.path), "embedder": reg.embedder, "devices": rows,
                                   "calibrated": sorted(reg.calibrations)}, indent=2))
            return
        typer.echo(f"{len(rows)} device(s) in {reg.path} (model {reg.embedder.get('fingerprint', '?')[:12]}, "
                   f"{'calibrated: ' + ', '.join(sorted(reg.calibrations)) if reg.calibrations else 'not calibrated'})")
        for r in rows:
            typer.echo(f"  {r['name']:<28} {r['n_references']:>3} ref(s) {r['windows']:>5} windows {r['seconds']:>9.1f} s")
    else:
        if not name:
            raise UsageError(f"`devrecd devices {action.value}` needs a device NAME")
        if action is DevicesAction.show:
            profile = reg.get(name)
            info = profile.summary()
            if as_json:
                typer.echo(json.dumps(info, indent=2))
                return
            typer.echo(f"{info['name']}: {info['n_references']} reference(s), {info['windows']} windows, "
                       f"{info['seconds']} s; created {info['created_at']}, updated {info['updated_at']}")
            for ref in info["references"]:
                typer.echo(f"  {ref['sha256'][:16]}  {ref['windows']:>4} win  {ref['seconds']:>8.1f} s  {ref['path']}")
        else:
            profile = reg.remove(name)
            reg.save()
            typer.echo(f"removed {profile.name} ({len(profile.references)} reference(s)) from {reg.path}")


@command()
def calibrate(
    dataset: Path = typer.Argument(..., exists=True, help="Held-out recordings with known devices (any dataset layout)."),
    model: Optional[Path] = ModelOption,
    registry: Optional[Path] = RegistryOption,
    split: SplitName = typer.Option(SplitName.test, "--split", case_sensitive=False, help="Which split of the dataset gives the trials."),
    split_groups: Optional[str] = typer.Option(
        None, "--split-groups", help="Which recording groups make up the splits, as for train: 'ccnu' or e.g. "
        "'test=4,5' (then --split test uses groups 4 and 5; groups not listed are not used)."),
    far: Optional[float] = typer.Option(None, "--far", help="Open-set false-acceptance rate of the far rule "
                                        "(registry.target_far; with registry.decision = \"far\")."),
    fmt: TextFormat = typer.Option(TextFormat.table, "--format", case_sensitive=False, help="table or json (the calibration)."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Folder for tippett.png, det.png and lr-calibration.json "
                                         "(default: REGISTRY-calibration/ beside the registry)."),
    conditions: Optional[list[str]] = typer.Option(
        None, "--condition", help="Calibrate under a channel (aac64, amrnb, tel, ...; repeatable): trials pass "
        "through it and references are matched to it. Verdicts under other conditions get no LR."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Fit the case calibration: score -> bounded log10 likelihood ratio and the decision taken from it.

    Every held-out recording is scored against every profile: same device = target trial,
    otherwise non-target (devices that are not enrolled give only non-targets). One calibration per
    condition (--condition; clean by default), regularised toward the scorer's development
    calibration of that condition (a few case trials cannot make verdicts worse). Reports the
    held-out EER, minDCF, Cllr and the decision's error rates, with trial counts.
    """
    from devrecd.data import load_dataset, parse_split_groups
    from devrecd.forensic.plots import calibration_plots
    from devrecd.openset.calibration import Decision
    from devrecd.openset.registry import open_registry
    from devrecd.openset.scorers import registry_scorer
    from devrecd.openset.workflow import calibrate_registry, calibration_trials_under
    from devrecd.stages import resolve_device

    check_checkpoint_option(model)
    cfg = load_cli_config(config, {"registry.target_far": far})
    reg = open_registry(_registry_path(cfg, registry))
    ds = load_dataset(dataset)
    by_group = parse_split_groups(split_groups)
    if by_group is not None:  # a selection by group: works whatever split the dataset's manifest gives
        wanted = set(by_group.get(split.value, ()))
        items = [it for it in ds.items if str(it.group) in wanted]
        selection = f"split {split.value} = groups {','.join(sorted(wanted)) or '(none)'}"
    else:
        items = ds.subset(split.value)
        selection = f"split {split.value}"
    if not items:
        raise ConfigError(f"{dataset}: no recordings in {selection}")
    chosen = registry_scorer(reg, model=model, configured=cfg.registry.embedder_model,
                             device=resolve_device(cfg.backend.device), threads=cfg.backend.threads)
    pairs = [(str(it.path), it.device) for it in items]
    names = list(conditions or ["clean"])
    with progress(len(pairs) * len(names), "calibrate", unit="recording") as bar:
        trials = calibration_trials_under(reg, chosen, pairs, cfg, names, on_recording=lambda _: bar.update(1))
    cals = calibrate_registry(reg, trials, decision=Decision.from_config(cfg.registry),
                              source={"dataset": str(dataset), "selection": selection,
                                      "dataset_sha256": ds.manifest_sha256, "conditions": names})
    out = plots or reg.path.with_name(f"{reg.path.stem}-calibration")
    for cond, cal in cals.items():
        sub = out if len(cals) == 1 else out / cond
        cal.save(sub / "lr-calibration.json")
        for name, png in calibration_plots(cal).items():
            atomic_write(sub / name, png)
    reg.save()
    if fmt is TextFormat.json:
        typer.echo(json.dumps({"calibrations": {c: cal.summary() for c, cal in cals.items()},
                               "calibration_info": reg.calibration_info}, indent=2))
        return
    for cond, cal in cals.items():
        typer.echo(f"[{cond}] {_calibration_line(cal.to_dict())}")
    typer.echo(f"plots and lr-calibration.json in {out}; saved to {reg.path}")


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
    inner: int = typer.Option(3, min=2, help="Cross-fitting groups of devices for the development calibration "
                                             "(each held out in turn; needs 2 devices per group)."),
    seed: int = typer.Option(0),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop in seconds (audio.hop_seconds)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train the GMM-supervector scorer (UBM + NAP) and its cross-fitted development calibrations
    (one per comparison condition; the decision rule of [registry])."""
    from devrecd.openset.calibration import Decision
    from devrecd.openset.gsvtrain import train_gsv as train
    from devrecd.openset.scorers import save_gsv

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds})
    feats, devices, order, sources, paths = _development_features(datasets, cfg, cfg.frontend, with_paths=True)
    typer.echo(f"{len(feats)} recordings of {len(set(devices))} devices")
    conditions, under, audio = (_calibration_conditions(paths, cfg, noise=noise, babble=babble) if channels
                                else (["clean"], None, None))
    scorer = train(feats, devices, order, cfg.frontend, mixtures=mixtures, nap_dims=nap, inner=inner, seed=seed,
                   source=out.name, decision=Decision.from_config(cfg.registry), conditions=conditions,
                   features_under=under, audio=audio, on_step=typer.echo)
    # The SNR range of the development recordings (measured as a verdict measures it, before any
    # channel): a verdict on a noisier recording says it is outside the range its calibration saw.
    # The noise-matched calibrations carry the measured SNRs of their own noisy recordings.
    snr = [_snr_db(p, cfg) for p in paths]
    for cal in scorer.calibrations.values():
        if "snr_db_min" not in cal["conditions"]:
            cal["conditions"].update(snr_db_min=round(min(snr), 1), snr_db_max=round(max(snr), 1),
                                     snr_measured="on the development recordings before the channel")
    typer.echo(f"development recordings' SNR {min(snr):.1f}-{max(snr):.1f} dB")
    save_gsv(out, scorer, extra={"datasets": sources, "hop_seconds": cfg.audio.hop_seconds, "seed": seed})
    typer.echo(f"wrote {out} (calibrated conditions: {', '.join(sorted(scorer.calibrations))})")


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


MAX_TALKERS = 40  # babble: at most this many talkers' recordings are read (each cut to TALKER_SECONDS)
TALKER_SECONDS = 30.0


def _talkers(folder: Path, cfg) -> list[np.ndarray]:
    """Single-talker recordings for babble noise: the audio files under ``folder``, one per talker
    (LibriSpeech: the name's first field before '-' is the speaker), at the frontend rate."""
    from devrecd.audio.decode import read_evidence
    from devrecd.audio.errors import AudioError
    from devrecd.audio.files import scan_files

    talkers: dict[str, np.ndarray] = {}
    for f in scan_files([folder], cfg.watch):
        talker = f.name.split("-")[0]
        if talker in talkers:
            continue
        try:  # a talker's first usable recording (too short, silent or unreadable ones are passed over)
            x = read_evidence(f, cfg.frontend.sample_rate, cfg.audio).samples
        except AudioError as exc:
            typer.echo(f"note: babble: {f.name} not used: {exc}")
            continue
        talkers[talker] = np.asarray(x[: int(TALKER_SECONDS * cfg.frontend.sample_rate)], dtype=np.float64)
        if len(talkers) == MAX_TALKERS:
            break
    out = list(talkers.values())
    if len(out) < 2:
        raise typer.BadParameter(f"{folder}: babble needs recordings of at least 2 talkers, found {len(out)}",
                                 param_hint="--babble")
    return out


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


def _calibration_line(cal: dict) -> str:
    """One line of a calibration's held-out figures and decision (a Calibration.to_dict())."""
    m, d = cal["metrics"], cal["decision"]
    return (f"{m['n_target']} target / {m['n_nontarget']} non-target trials: EER {m['eer']:.2%}, Cllr {m['cllr']:.3f} "
            f"bits (min {m['cllr_min']:.3f}); log10 LR = {cal['slope']:.3f} * score + {cal['offset']:.3f}, bounded to "
            f"[{cal['lower']:g}, {cal['upper']:g}] (ELUB); decision ({d['rule']}): log10 LR >= {d['log10_threshold']:+.3f} "
            f"(score {cal['threshold']:.4f}): held-out FRR {m['frr']:.1%}, FAR {m['far']:.1%}"
            + (f", open-set FAR {m['open_set_far']:.1%} of {m['n_open_set']}" if "open_set_far" in m else ""))


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
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Window hop in seconds (audio.hop_seconds)."),
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
    typer.echo(f"development calibration (clean): {_calibration_line(scorer.calibrations['clean'])}")
    typer.echo(f"wrote {out}")
