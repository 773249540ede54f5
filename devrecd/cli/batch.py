"""``devrecd batch``: an archive judged by a Ray Data job, on this machine or a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import (BackendKind, BackendOption, ConfigOption, EngineOption, ModelOption, cli_logging, command,
                             load_cli_config)
from devrecd.cli.serve import RegistryOption


@command()
def batch(
    sources: List[Path] = typer.Argument(..., help="Folders of recordings, manifests (.csv with a path column), "
                                                   "file lists (.txt, one path a line) or recordings."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: Parquet parts, verdicts.jsonl, summary.json. "
                                                      "A rerun on the same folder judges only what is missing."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: auto | HOST:PORT | ray://HOST:PORT "
                                                                  "(cluster.address); none = a local Ray instance."),
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    engine: Optional[str] = EngineOption,
    backend: Optional[BackendKind] = BackendOption,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Candidates kept per verdict (watch.top_k)."),
    registry: Optional[Path] = RegistryOption,
) -> None:
    """Judge a finite archive on Ray (same verdicts as the daemon, each file exactly once per --out).

    With --registry and no --model: the registry's open-set verdicts alone, as `identify --registry`."""
    from devrecd.cluster.job import run_batch

    cfg = load_cli_config(config, {"backend.model": model, "backend.engine": engine, "backend.kind": backend,
                                   "watch.top_k": top_k, "cluster.address": address,
                                   "registry.path": str(registry) if registry else None})
    cli_logging(cfg)
    s = run_batch(cfg, [str(p) for p in sources], out)
    run, total = s["this_run"], s["in_folder"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(run["failed_by_reason"].items()))
    rate = f", {s['files_per_second']:.1f} files/s" if s["files_per_second"] else ""
    typer.echo(f"{s['listed']} listed, {s['already_recorded']} already recorded, {s['submitted']} submitted: "
               f"{run['judged']} judged, {run['failed']} failed{' (' + reasons + ')' if reasons else ''}, "
               f"{run['unchanged']} unchanged{rate}")
    typer.echo(f"{s['out']}: {total['records']} records in {total['parts']} parts "
               f"(verdicts.jsonl, parts/*.parquet, summary.json)")
