"""``devrecd watch``, ``devrecd identify``, ``devrecd verdicts``."""

from __future__ import annotations

import csv
import json
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, List, Optional

import typer

from devrecd.cli.app import (EXIT_FAILED, EXIT_INTERRUPTED, BackendKind, BackendOption, ConfigOption, EngineOption,
                             Format, ModelOption, TorchDeviceOption, audio_paths, cli_logging, command,
                             load_cli_config, logs_above_bars, progress)
from devrecd.errors import ConfigError
from devrecd.logs import printable

RegistryOption = typer.Option(None, "--registry", "-r", help="Open-set verdicts against this device registry (registry.path).")


@command()
def watch(
    dirs: Optional[List[Path]] = typer.Argument(None, help="Evidence folders to watch (added to watch.dirs)."),
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    engine: Optional[str] = EngineOption,
    backend: Optional[BackendKind] = BackendOption,
    torch_device: Optional[str] = TorchDeviceOption,
    registry: Optional[Path] = RegistryOption,
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="Journal and verdict log folder (watch.state_dir)."),
    port: Optional[int] = typer.Option(None, "--port", help="Metrics/health port; 0 = any free port (metrics.port)."),
) -> None:
    """Watch folders and judge every recording that appears there, exactly once (the daemon)."""
    from devrecd.daemon.service import Daemon

    overrides = {"backend.model": model, "backend.engine": engine, "backend.kind": backend,
                 "backend.device": torch_device, "registry.path": str(registry) if registry else None,
                 "watch.state_dir": state_dir, "metrics.port": port}
    cfg = load_cli_config(config, overrides)
    cli_logging(cfg)
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
    backend: Optional[BackendKind] = BackendOption,
    torch_device: Optional[str] = TorchDeviceOption,
    fmt: Format = typer.Option(Format.table, "--format", case_sensitive=False,
                               help="table (one row per file), json (one verdict per line) or csv."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Candidates kept per verdict (watch.top_k)."),
    registry: Optional[Path] = RegistryOption,
) -> None:
    """Judge recordings once through the daemon's pipeline, printing each verdict as it is made.

    Verdicts come in the order they finish. Ctrl-C stops: what was printed stays, exit code 130."""
    from devrecd.pipeline.identify import identify_files

    cfg = load_cli_config(config, {"backend.model": model, "backend.engine": engine,
                                   "backend.kind": backend, "backend.device": torch_device,
                                   "watch.top_k": top_k, "registry.path": str(registry) if registry else None})
    cli_logging(cfg, quiet=True)  # failures are printed as results below
    files = audio_paths(audio, cfg)
    printer = VerdictPrinter(fmt, sys.stdout, path_width=max(len(str(p.absolute())) for p in files))
    bar = progress(len(files), "identify")

    def show(record: dict) -> None:  # in the writer thread, as each verdict is made
        with bar.external_write_mode(file=sys.stdout):  # the bar leaves the line, and is redrawn below it
            printer.add(record)
        bar.update(1)

    try:
        with logs_above_bars():
            records = identify_files(cfg, files, on_record=show)
    except KeyboardInterrupt:
        bar.close()
        typer.secho(f"interrupted: {printer.count} of {len(files)} verdict(s) printed", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        bar.close()  # (again: closing twice is harmless) before an error is printed, not onto the bar
    failed = [r for r in records if r["outcome"] == "failed"]
    for r in failed:
        typer.secho(error_line(r), fg=typer.colors.RED, err=True)
    if failed:
        raise typer.Exit(EXIT_FAILED)


class VerdictPrinter:
    """Prints verdict records one at a time as they arrive (from any thread): a table row, a JSON
    line or a CSV row, after the header. Each record is written and flushed whole, under a lock."""

    def __init__(self, fmt: Format, out: IO[str], *, path_width: int = 40) -> None:
        self.fmt, self.out, self.count = fmt, out, 0
        self._lock = threading.Lock()
        self._widths = (max(path_width, 4), 24, 5, 30, 7)
        self._csv = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        self._started = False

    def _start(self) -> None:
        if not self._started:
            if self.fmt is Format.csv:
                self._csv.writeheader()
            elif self.fmt is Format.table:
                self.out.write(_row(TABLE_HEADER, self._widths) + "\n")
            self._started = True

    def close(self) -> None:
        """The header even when no record came (an empty CSV export still names its columns)."""
        with self._lock:
            self._start()
            self.out.flush()

    def add(self, record: dict, superseded_by: Optional[int] = None) -> None:
        with self._lock:
            self._start()
            if self.fmt is Format.json:
                self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            elif self.fmt is Format.csv:
                self._csv.writerow(csv_row(record, superseded_by))
            else:
                self.out.write(_row(table_cells(record), self._widths) + "\n")
            self.out.flush()
            self.count += 1


def error_line(r: dict) -> str:
    """A failed file's ``error:`` line: one line whatever its name holds (names escaped as in the log)."""
    return f"error: {printable(r['path'])}: {printable(r['reason'])}: {printable(r['detail'])}"


TABLE_HEADER = ("FILE", "DEVICE", "SCORE", "RUNNER-UP", "SECONDS")


def table_cells(r: dict) -> tuple[str, ...]:
    """One verdict as the cells of a table row: file, device, score, runner-up, duration."""
    if r["outcome"] == "failed":
        return (printable(r["path"]), f"(failed: {printable(r['reason'])})", "", "", "")
    second = r["top_k"][1] if len(r.get("top_k") or []) > 1 else None
    return (printable(r["path"]), printable(r["device"]), f"{r['score']:.3f}",
            f"{printable(second['device'])} {second['score']:.3f}" if second else "", f"{r.get('duration') or 0:.1f}")


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def format_table(records: list[dict]) -> str:
    """A fixed-width table of finished verdicts, columns as wide as their widest cell."""
    rows = [TABLE_HEADER, *(table_cells(r) for r in records)]
    widths = tuple(max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER)))
    return "\n".join(_row(row, widths) for row in rows)


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
              "model_sha256", "contract_sha256", "software_version", "resolved_path", "level_flags", "integrity_flags",
              "supersedes",
              "superseded_by")


def csv_row(record: dict, superseded_by: Optional[int] = None) -> dict:
    """A verdict record flattened for CSV_FIELDS (lists joined with ';')."""
    row = dict(record or {})
    if row.get("top_k"):
        row["top_k"] = ";".join(f"{c['device']}:{c['score']}" for c in row["top_k"])
    row["level_flags"] = ";".join((row.get("levels") or {}).get("flags") or [])
    row["integrity_flags"] = ";".join((row.get("integrity") or {}).get("flags") or [])
    row["supersedes"] = ";".join(map(str, row.get("supersedes") or []))
    row["superseded_by"] = superseded_by
    return row


@command()
def verdicts(
    config: Optional[Path] = ConfigOption,
    state_dir: Optional[str] = typer.Option(None, "--state-dir", help="The daemon's state folder (watch.state_dir)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only verdicts from this time: 30m, 12h, 7d or an ISO date."),
    fmt: Format = typer.Option(Format.json, "--format", case_sensitive=False,
                               help="json (one record per line, the default: an export), csv or table."),
    history: bool = typer.Option(False, "--history", help="Also the failures a later version of the same file superseded."),
) -> None:
    """Export the verdicts recorded in the daemon's journal (opened read-only)."""
    import os

    from devrecd.pipeline.journal import JOURNAL_NAME, Journal

    cfg = load_cli_config(config, {"watch.state_dir": state_dir})
    path = Path(os.path.expanduser(cfg.watch.state_dir)) / JOURNAL_NAME
    if not path.is_file():
        raise ConfigError(f"no journal at {path} (is watch.state_dir / --state-dir right?)")
    journal = Journal.open_readonly(path)
    try:
        entries = list(journal.finished(parse_since(since) if since else 0.0, history=history))
    finally:
        journal.close()
    if fmt is Format.table:
        typer.echo(format_table([e.record for e in entries]))
        return
    printer = VerdictPrinter(fmt, sys.stdout)
    for e in entries:
        printer.add(e.record, e.superseded_by)
    printer.close()
