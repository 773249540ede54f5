"""``devrecd watch``, ``devrecd identify``, ``devrecd verdicts``."""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import ConfigOption, command, load_cli_config
from devrecd.errors import ConfigError

ModelOption = typer.Option(None, "--model", "-m", help="export/NAME.onnx (contract JSON beside it) or a checkpoint (backend.model).")
EngineOption = typer.Option(None, "--engine", help="TensorRT engine/X.plan (backend.engine).")
BackendOption = typer.Option(None, "--backend", help="auto | onnxruntime | tensorrt | torch (backend.kind).")
DeviceOption = typer.Option(None, "--device", help="torch device for the frontend and the torch backend: "
                            "auto | cpu | cuda | cuda:N (backend.device).")


@command()
def watch(
    dirs: Optional[List[Path]] = typer.Argument(None, help="Evidence folders to watch (added to watch.dirs)."),
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    engine: Optional[str] = EngineOption,
    backend: Optional[str] = BackendOption,
    device: Optional[str] = DeviceOption,
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="Journal and verdict log folder (watch.state_dir)."),
    port: Optional[int] = typer.Option(None, "--port", help="Metrics/health port; 0 = any free port (metrics.port)."),
) -> None:
    """Watch folders and judge every recording that appears there, exactly once (the daemon)."""
    from devrecd.daemon.service import Daemon
    from devrecd.logs import setup_logging

    overrides = {"backend.model": model, "backend.engine": engine, "backend.kind": backend, "backend.device": device,
                 "watch.state_dir": state_dir, "metrics.port": port}
    cfg = load_cli_config(config, overrides)
    verbose = logging.getLogger("devrecd").level == logging.DEBUG  # --verbose given before the command
    setup_logging("DEBUG" if verbose else cfg.log.level, cfg.log.format)
    folders = list(dict.fromkeys([*cfg.watch.dirs, *(str(d) for d in dirs or ())]))
    given = {k: v for k, v in overrides.items() if v is not None}
    code = Daemon(cfg, folders, config_path=str(config) if config else None, overrides=given).run()
    raise typer.Exit(code)


@command()
def identify(
    audio: List[Path] = typer.Argument(..., help="Recordings (or folders of recordings) to judge."),
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    engine: Optional[str] = EngineOption,
    backend: Optional[str] = BackendOption,
    device: Optional[str] = DeviceOption,
    as_json: bool = typer.Option(False, "--json", help="One JSON verdict per line instead of a table."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Candidates kept per verdict (watch.top_k)."),
    registry: Optional[Path] = typer.Option(None, "--registry", "-r",
                                            help="Open-set verdicts against this device registry (registry.path)."),
) -> None:
    """Judge recordings once through the daemon's pipeline and print the verdicts."""
    from devrecd.pipeline.identify import identify_files
    from devrecd.daemon.watcher import scan_files
    from devrecd.logs import setup_logging

    cfg = load_cli_config(config, {"backend.model": model, "backend.engine": engine, "backend.kind": backend,
                                   "backend.device": device, "watch.top_k": top_k,
                                   "registry.path": str(registry) if registry else None})
    # Failures are printed as results below; only worse problems (and DEBUG when asked) go to the log.
    setup_logging("ERROR" if cfg.log.level.upper() in ("INFO", "WARNING") else cfg.log.level, cfg.log.format)
    files = scan_files(audio, cfg.watch)
    if not files:
        raise ConfigError("no audio files found in the given paths")
    records = identify_files(cfg, files)
    if as_json:
        for r in records:
            typer.echo(json.dumps(r, ensure_ascii=False))
    else:
        typer.echo(format_table(records))
    failed = [r for r in records if r["outcome"] == "failed"]
    for r in failed:
        typer.secho(f"error: {r['path']}: {r['reason']}: {r['detail']}", fg=typer.colors.RED, err=True)
    if failed:
        raise typer.Exit(1)


def format_table(records: list[dict]) -> str:
    """A fixed-width table: file, device, score, runner-up, duration."""
    rows = [("FILE", "DEVICE", "SCORE", "RUNNER-UP", "SECONDS")]
    for r in records:
        if r["outcome"] == "failed":
            rows.append((r["path"], f"(failed: {r['reason']})", "", "", ""))
            continue
        second = r["top_k"][1] if len(r.get("top_k") or []) > 1 else None
        rows.append((r["path"], r["device"], f"{r['score']:.3f}",
                     f"{second['device']} {second['score']:.3f}" if second else "", f"{r.get('duration', 0):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """'30m', '12h', '7d' (ago) or an ISO date/time (UTC unless it says otherwise) -> unix time."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text.strip().lower())
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r}: use e.g. 30m, 12h, 7d or 2024-05-01T12:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


CSV_FIELDS = ("id", "outcome", "judged_at", "path", "sha256", "size", "duration", "sample_rate", "native_rate",
              "resampled", "device", "score", "top_k", "reason", "detail", "duplicate_of_path", "backend",
              "model_sha256", "contract_sha256", "software_version", "resolved_path", "level_flags", "supersedes",
              "superseded_by")


@command()
def verdicts(
    config: Optional[Path] = ConfigOption,
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="The daemon's state folder (watch.state_dir)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only verdicts from this time: 30m, 12h, 7d or an ISO date."),
    fmt: str = typer.Option("json", "--format", help="json (one record per line) or csv."),
    history: bool = typer.Option(False, "--history", help="Also the failures a later version of the same file superseded."),
) -> None:
    """Export the verdicts recorded in the daemon's journal (opened read-only)."""
    import os

    from devrecd.pipeline.journal import JOURNAL_NAME, Journal

    if fmt not in ("json", "csv"):
        raise ConfigError(f"--format must be json or csv, not {fmt!r}")
    cfg = load_cli_config(config, {"watch.state_dir": state_dir})
    path = Path(os.path.expanduser(cfg.watch.state_dir)) / JOURNAL_NAME
    if not path.is_file():
        raise ConfigError(f"no journal at {path} (is watch.state_dir / --state-dir right?)")
    journal = Journal.open_readonly(path)
    try:
        entries = list(journal.finished(parse_since(since) if since else 0.0, history=history))
    finally:
        journal.close()
    if fmt == "json":
        for e in entries:
            typer.echo(json.dumps(e.record, ensure_ascii=False))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        row = dict(e.record or {})
        if row.get("top_k"):
            row["top_k"] = ";".join(f"{c['device']}:{c['score']}" for c in row["top_k"])
        row["level_flags"] = ";".join((row.get("levels") or {}).get("flags") or [])
        row["supersedes"] = ";".join(map(str, row.get("supersedes") or []))
        row["superseded_by"] = e.superseded_by
        writer.writerow(row)
