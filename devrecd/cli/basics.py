"""``devrecd doctor``, ``devrecd features``, ``devrecd config``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import (EXIT_FAILED, EXIT_USAGE, ConfigOption, ModelOption, TextFormat, TorchDeviceOption,
                             audio_paths, command, load_cli_config, HopSecondsOption)
from devrecd.errors import ConfigError, DevrecdError

log = logging.getLogger("devrecd.cli")


@command()
def doctor(
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    registry: Optional[Path] = typer.Option(None, "--registry", "-r", help="Device registry to check (registry.path)."),
    fmt: TextFormat = typer.Option(TextFormat.table, "--format", case_sensitive=False, help="table or json."),
) -> None:
    """Check what this machine can run (GPU, TensorRT, ONNX Runtime, PortAudio, decoders) and that
    the configuration can serve: model and contract, engine, registry, state folder, metrics port.

    Exit code 1 when something the configuration names does not work, 2 when the configuration is invalid."""
    from devrecd.doctor import Check, configured_checks, run_checks

    checks = run_checks()
    try:
        cfg = load_cli_config(config, {"backend.model": model, "registry.path": str(registry) if registry else None})
    except ConfigError as exc:  # reported like every other check; the exit code says "configuration"
        checks.append(Check("config", False, str(exc), required=True))
        code = EXIT_USAGE
    else:
        checks += configured_checks(cfg, source=f"file {config}" if config else "defaults and environment")
        code = EXIT_FAILED if any(c.failed for c in checks) else 0
    if fmt is TextFormat.json:
        typer.echo(json.dumps({"ok": code == 0, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            if check.ok:
                mark = typer.style("ok   ", fg=typer.colors.GREEN)
            else:
                mark = typer.style("FAIL " if check.failed else "no   ", fg=typer.colors.RED if check.failed else typer.colors.YELLOW)
            line = f"{mark}{check.name:<18} {check.detail}"
            if not check.ok and check.hint:
                line += f"  -> {check.hint}"
            typer.echo(line)
    if code:
        raise typer.Exit(code)


@command("config")
def show_config(config: Optional[Path] = ConfigOption) -> None:
    """Print the effective configuration (after file, environment and defaults) as JSON."""
    from devrecd.config import config_to_toml_dict

    typer.echo(json.dumps(config_to_toml_dict(load_cli_config(config)), indent=2))


@command()
def features(
    audio: List[Path] = typer.Argument(..., help="Recordings (or folders of recordings) to process."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <name>.npy (windows, 128, 73) and <name>.json."),
    config: Optional[Path] = ConfigOption,
    hop_seconds: Optional[float] = HopSecondsOption,
    torch_device: Optional[str] = TorchDeviceOption,
) -> None:
    """Compute the 73-dim features of each recording (folders: their audio files): one .npy per input, plus a JSON sidecar."""
    from devrecd.stages import features_for_file, resolve_device

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds, "backend.device": torch_device})
    audio = audio_paths(audio, cfg)
    dev = resolve_device(cfg.backend.device)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    used: set[str] = set()
    for path in audio:
        try:
            rec, feats = features_for_file(path, cfg, device=dev)
        except DevrecdError as exc:
            failed += 1
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            continue
        name = path.name if path.name not in used else f"{path.name}.{rec.sha256[:8]}"
        used.add(name)
        import numpy as np

        np.save(out / f"{name}.npy", feats)
        sidecar = {
            "input": rec.describe(),
            "shape": list(feats.shape),
            "window_hop_seconds": cfg.audio.hop_seconds,
            "frontend": cfg.frontend.to_dict(),
            "frontend_sha256": cfg.frontend.fingerprint(),
            "device": dev,
        }
        (out / f"{name}.json").write_text(json.dumps(sidecar, indent=2))
        typer.echo(f"{path} -> {out / (name + '.npy')} {tuple(feats.shape)}")
    if failed:
        typer.secho(f"{failed} of {len(audio)} file(s) failed", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
