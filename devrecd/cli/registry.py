"""``devrecd enroll``, ``devrecd devices``, ``devrecd calibrate``: the open-set device registry, and
the options and scorer choice its commands share with ``compare`` and the scorer training
(:mod:`devrecd.cli.openset`: ``train-gsv``, ``train-fusion``)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import (ConfigOption, SplitName, TextFormat, audio_paths, choice, command, load_cli_config,
                             progress, HopSecondsOption)
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
    hop_seconds: Optional[float] = HopSecondsOption,
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
        typer.echo(f"[{cond}] {calibration_line(cal.to_dict())}")
    typer.echo(f"plots and lr-calibration.json in {out}; saved to {reg.path}")


def calibration_line(cal: dict) -> str:
    """One line of a calibration's held-out figures and decision (a Calibration.to_dict())."""
    m, d = cal["metrics"], cal["decision"]
    return (f"{m['n_target']} target / {m['n_nontarget']} non-target trials: EER {m['eer']:.2%}, Cllr {m['cllr']:.3f} "
            f"bits (min {m['cllr_min']:.3f}); log10 LR = {cal['slope']:.3f} * score + {cal['offset']:.3f}, bounded to "
            f"[{cal['lower']:g}, {cal['upper']:g}] (ELUB); decision ({d['rule']}): log10 LR >= {d['log10_threshold']:+.3f} "
            f"(score {cal['threshold']:.4f}): held-out FRR {m['frr']:.1%}, FAR {m['far']:.1%}"
            + (f", open-set FAR {m['open_set_far']:.1%} of {m['n_open_set']}" if "open_set_far" in m else ""))
