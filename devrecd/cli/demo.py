"""``devrecd demo``: the shipped default on simulated phones: synth -> enroll -> identify --registry -> report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from devrecd.cli.app import command


@command()
def demo(
    workdir: Path = typer.Option(Path("demo"), "--workdir", help="Folder for the demo's corpus, registry, verdicts and report (a previous demo folder is replaced; any other non-empty folder only with --force)."),
    devices: int = typer.Option(6, "--devices", min=2, help="Simulated phones."),
    recordings: int = typer.Option(24, "--recordings", min=5, help="Recordings per phone."),
    seed: int = typer.Option(1, "--seed", help="Seed of the simulated devices."),
    shared: Optional[Path] = typer.Option(None, "--shared", help="Where ../shared is (LibriSpeech speech); espeak-ng otherwise."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Also write the summary as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace --workdir even if it is a non-empty folder that is not a demo folder."),
) -> None:
    """The shipped default on simulated phones: enrol with the shipped GSV scorer (no model), judge, write the case report."""
    from devrecd.demo import DemoSettings, run_demo

    result = run_demo(DemoSettings(workdir=workdir, devices=devices, recordings=recordings,
                                   seed=seed, shared=shared, force=force), say=typer.echo)
    if summary:
        summary.write_text(json.dumps(result, indent=2))
