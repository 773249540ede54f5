"""``devrecd synth``: simulated device corpora."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from devrecd.cli.app import ConfigOption, command, load_cli_config


@command()
def synth(
    speech: Path = typer.Option(..., "--speech", help="Folder of speech recordings (e.g. LibriSpeech).",
                                exists=True, file_okay=False),
    devices: int = typer.Option(..., "--devices", min=1, help="Number of simulated devices."),
    recordings_per_device: int = typer.Option(..., "--recordings-per-device", min=1, help="Recordings per device."),
    out: Path = typer.Option(..., "--out", "-o", help="New (or empty) output folder."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same corpus, byte for byte."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Worker processes (synth.jobs)."),
    recording_seconds: Optional[float] = typer.Option(None, "--recording-seconds", help="Seconds per recording (synth.recording_seconds)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Record speech on simulated phones: <out>/<device>/*.wav, manifest.csv (split, group), devices.json."""
    from tqdm import tqdm

    from devrecd.synth import SynthSettings, generate

    cfg = load_cli_config(config, {"synth.jobs": jobs, "synth.recording_seconds": recording_seconds}).synth
    settings = SynthSettings.from_config(cfg, devices=devices, recordings_per_device=recordings_per_device, seed=seed)
    bars: list[tqdm] = []

    def progress(n: int) -> None:
        if not bars:  # the bar appears once the speech is checked and rendering starts
            bars.append(tqdm(total=devices * recordings_per_device, unit="recording", desc="synth", dynamic_ncols=True))
        bars[0].update(n)

    try:
        manifest = generate(speech, out, settings, jobs=cfg.jobs, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    typer.echo(f"{devices} devices x {recordings_per_device} recordings -> {manifest}")
