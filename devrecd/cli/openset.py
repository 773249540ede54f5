"""``devrecd enroll``, ``devrecd devices``, ``devrecd calibrate``: the open-set device registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import ConfigOption, command, load_cli_config
from devrecd.errors import ConfigError

RegistryOption = typer.Option(None, "--registry", "-r", help="Registry JSON file (registry.path).")
ModelOption = typer.Option(..., "--model", "-m", exists=True, help="Checkpoint (.pt) or run directory of the embedder.")


def _registry_path(cfg, given: Optional[Path]) -> Path:
    path = given or (Path(cfg.registry.path) if cfg.registry.path else None)
    if path is None:
        raise ConfigError("no registry: pass --registry FILE or set registry.path in the config")
    return path


@command()
def enroll(
    audio: List[Path] = typer.Argument(..., help="Reference recordings made by the device."),
    device: str = typer.Option(..., "--device", "-d", help="Name of the device profile to add to or create."),
    model: Path = ModelOption,
    registry: Optional[Path] = RegistryOption,
    hop_seconds: Optional[float] = typer.Option(None, help="Window hop in seconds (audio.hop_seconds)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Add reference recordings to a device profile (no retraining)."""
    from devrecd.openset.embedder import Embedder
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import enrol_files
    from devrecd.pipeline import resolve_device

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds})
    reg = open_registry(_registry_path(cfg, registry), create=True)
    embedder = Embedder.load(model, device=resolve_device(cfg.backend.device))
    added, skipped = enrol_files(reg, embedder, device, audio, cfg,
                                 on_file=lambda p, n: typer.echo(f"{p}: {n} window(s)"))
    reg.save()
    counts = reg.profiles[device].counts if device.strip() in reg.profiles else {"n_references": 0}
    note = f", {skipped} already enrolled" if skipped else ""
    typer.echo(f"{device}: +{added} reference(s){note}; {counts['n_references']} in total -> {reg.path}")
    if added and reg.calibration is None:
        typer.echo("note: the registry changed; run `devrecd calibrate` again for a calibrated threshold")


@command()
def devices(
    action: str = typer.Argument("list", help="list | show NAME | remove NAME"),
    name: Optional[str] = typer.Argument(None, help="Device name (show, remove)."),
    registry: Optional[Path] = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """List, show or remove enrolled device profiles."""
    from devrecd.openset.registry import open_registry

    cfg = load_cli_config(config)
    reg = open_registry(_registry_path(cfg, registry))
    if action == "list":
        rows = [reg.profiles[n].summary() for n in reg.names]
        if as_json:
            typer.echo(json.dumps({"registry": str(reg.path), "embedder": reg.embedder, "devices": rows,
                                   "calibrated": reg.calibration is not None}, indent=2))
            return
        typer.echo(f"{len(rows)} device(s) in {reg.path} (model {reg.embedder.get('fingerprint', '?')[:12]}, "
                   f"{'calibrated' if reg.calibration else 'not calibrated'})")
        for r in rows:
            typer.echo(f"  {r['name']:<28} {r['n_references']:>3} ref(s) {r['windows']:>5} windows {r['seconds']:>9.1f} s")
    elif action in ("show", "remove"):
        if not name:
            raise ConfigError(f"`devrecd devices {action}` needs a device NAME")
        if action == "show":
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
    else:
        raise ConfigError(f"unknown action {action!r} (expected list, show NAME or remove NAME)")


@command()
def calibrate(
    dataset: Path = typer.Argument(..., exists=True, help="Held-out recordings with known devices (any dataset layout)."),
    model: Path = ModelOption,
    registry: Optional[Path] = RegistryOption,
    split: str = typer.Option("test", help="Which split of the dataset gives the trials."),
    groups: Optional[str] = typer.Option(None, help="Use these groups/segments instead of a split, e.g. '4,5'."),
    far: Optional[float] = typer.Option(None, "--far", help="Target false-acceptance rate (registry.target_far)."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
    conditions: Optional[list[str]] = typer.Option(
        None, "--condition", help="Calibrate under a channel (aac64, amrnb, tel, ...; repeatable): trials pass "
        "through it and references are matched to it. Verdicts under other conditions get no LR."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Set the open-set threshold for a false-acceptance rate and fit score -> LLR calibration.

    Every held-out recording is scored against every profile: same device = target trial,
    otherwise non-target (devices that are not enrolled give only non-targets). Reports EER,
    minDCF (P_target 0.01, C_miss = C_fa = 1) and Cllr of the calibration set.
    """
    from devrecd.data import load_dataset
    from devrecd.openset.embedder import Embedder
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import calibrate_registry, score_recordings
    from devrecd.pipeline import resolve_device

    cfg = load_cli_config(config, {"registry.target_far": far})
    reg = open_registry(_registry_path(cfg, registry))
    ds = load_dataset(dataset)
    if groups:
        wanted = {g.strip() for g in groups.split(",") if g.strip()}
        items = [it for it in ds.items if it.group in wanted]
    else:
        items = ds.subset(split)
    if not items:
        raise ConfigError(f"{dataset}: no recordings in {'groups ' + groups if groups else 'split ' + split}")
    embedder = Embedder.load(model, device=resolve_device(cfg.backend.device))
    pairs = [(str(it.path), it.device) for it in items]
    if conditions:
        from devrecd.openset.matching import calibration_trials_under

        trials = calibration_trials_under(reg, embedder, pairs, cfg, conditions)
    else:
        trials = score_recordings(reg, embedder, pairs, cfg)
    cal = calibrate_registry(reg, trials, target_far=cfg.registry.target_far,
                             source={"dataset": str(dataset), "selection": groups or split,
                                     "dataset_sha256": ds.manifest_sha256, "conditions": list(conditions or ["clean"])})
    reg.save()
    if as_json:
        typer.echo(json.dumps({**cal.to_dict(), **reg.calibration_info}, indent=2))
        return
    typer.echo(f"{cal.n_target} target / {cal.n_nontarget} non-target trials from {len(trials.recordings)} recordings")
    typer.echo(f"EER {cal.eer:.2%}  minDCF {cal.min_dcf:.3f} (P_target {cal.p_target}, C_miss {cal.c_miss:g}, "
               f"C_fa {cal.c_fa:g})  Cllr {cal.cllr:.3f} bits (min {cal.cllr_min:.3f})")
    typer.echo(f"threshold {cal.threshold:.4f} for FAR {cal.target_far:g}: measured FAR {cal.far:.2%}, "
               f"FRR {cal.frr:.2%}; llr = {cal.slope:.3f} * score + {cal.offset:.3f}")
    if "unknown_rejected" in reg.calibration_info:
        typer.echo(f"recordings of non-enrolled devices called unknown: {reg.calibration_info['unknown_rejected']:.0%}")
    typer.echo(f"saved to {reg.path}")
