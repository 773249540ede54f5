"""``devrecd doctor``, ``devrecd features``, ``devrecd config``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import ConfigOption, command, load_cli_config
from devrecd.errors import DevrecdError

log = logging.getLogger("devrecd.cli")


@command()
def doctor() -> None:
    """Report what this machine can run (GPU, TensorRT, ONNX Runtime, PortAudio, decoders)."""
    from devrecd.doctor import run_checks

    for check in run_checks():
        mark = typer.style("ok  ", fg=typer.colors.GREEN) if check.ok else typer.style("no  ", fg=typer.colors.YELLOW)
        line = f"{mark}{check.name:<18} {check.detail}"
        if not check.ok and check.hint:
            line += f"  -> {check.hint}"
        typer.echo(line)


@command("config")
def show_config(config: Optional[Path] = ConfigOption) -> None:
    """Print the effective configuration (after file, environment and defaults) as JSON."""
    from devrecd.config import config_to_toml_dict

    typer.echo(json.dumps(config_to_toml_dict(load_cli_config(config)), indent=2))


@command()
def features(
    audio: List[Path] = typer.Argument(..., help="Recordings to process."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <name>.npy (windows, 128, 73) and <name>.json."),
    config: Optional[Path] = ConfigOption,
    hop_seconds: Optional[float] = typer.Option(None, help="Window hop in seconds (audio.hop_seconds)."),
    device: Optional[str] = typer.Option(None, help="torch device for the frontend: auto, cpu, cuda (backend.device)."),
) -> None:
    """Compute the 73-dim features of each recording: one .npy per input, plus a JSON sidecar."""
    from devrecd.pipeline.stages import features_for_file, resolve_device

    cfg = load_cli_config(config, {"audio.hop_seconds": hop_seconds, "backend.device": device})
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
