"""``devrecd install-service``: the systemd unit, user, folders and default config."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import command


@command("install-service")
def install_service(
    prefix: Path = typer.Option(Path("/"), "--prefix", help="Install under this root instead of / (staging, packaging)."),
    evidence: Optional[List[str]] = typer.Option(None, "--evidence", help="Evidence folder to watch, read-only (repeat; default /srv/evidence)."),
    devrecd_bin: Optional[Path] = typer.Option(None, "--devrecd-bin", help="devrecd executable for ExecStart= (default: the one beside this Python)."),
    source: Optional[Path] = typer.Option(None, "--source", help="devrecd source checkout holding systemd/ and config.toml."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be written; change nothing."),
    force: bool = typer.Option(False, "--force", help="Also replace an existing /etc/devrecd/config.toml and devrecd.env."),
    activate: bool = typer.Option(True, "--activate/--no-activate", help="Run systemd-sysusers, systemd-tmpfiles (and daemon-reload on /)."),
    allow_home: bool = typer.Option(False, "--allow-home", help="Accept a devrecd under /home or /root (the unit must then relax ProtectHome)."),
) -> None:
    """Install devrecd as a systemd service (unit, sysusers, tmpfiles, /etc/devrecd/config.toml)."""
    from devrecd import service_install as si

    plan = si.plan_install(prefix, evidence=evidence or si.DEFAULT_EVIDENCE, devrecd_bin=devrecd_bin,
                           source=source, allow_home=allow_home)
    for line in plan.describe(force=force):
        typer.echo(("would " if dry_run else "") + line)
    typer.echo(f"ExecStart={plan.exec_start}")
    for note in plan.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if dry_run:
        return
    si.apply_plan(plan, force=force)
    if activate:
        for cmd in si.activate(plan):
            typer.echo(f"ran     {cmd}")
    typer.echo("next:")
    for step in si.next_steps(plan):
        typer.echo(f"  {step}")
