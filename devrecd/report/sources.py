"""Where a case report's records come from: a daemon state folder (its journal, read-only, or its
verdict log), ``identify --json`` / ``compare --json`` outputs, and audio files named without a
record (inventory only)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from devrecd.audio.files import scan_files
from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.pipeline.journal import JOURNAL_NAME, VERDICT_LOG_NAME

RECORD_OUTCOMES = ("judged", "failed", "duplicate", "compared")


class ReportError(DevrecdError):
    """A report source that cannot be read (no journal, not a run output, no such file)."""

    reason = "report"


def read_state_dir(path: Path) -> list[dict[str, Any]]:
    """Terminal records of a daemon state folder: the journal (opened read-only), else the verdict log."""
    journal = path / JOURNAL_NAME
    if journal.is_file():
        try:
            db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT record FROM files WHERE state IN ('judged', 'failed', 'duplicate') "
                                  "AND record IS NOT NULL ORDER BY id").fetchall()
            finally:
                db.close()
            return [json.loads(r[0]) for r in rows]
        except sqlite3.Error as exc:
            if not (path / VERDICT_LOG_NAME).is_file():
                raise ReportError(f"cannot read the journal {journal}: {exc}") from None
    if (path / VERDICT_LOG_NAME).is_file():
        return read_jsonl(path / VERDICT_LOG_NAME)
    raise ReportError(f"{path}: no {JOURNAL_NAME} or {VERDICT_LOG_NAME} (not a daemon state folder)")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of an ``identify --json`` / ``compare --json`` output or a verdict log."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ReportError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict) or rec.get("outcome") not in RECORD_OUTCOMES:
            raise ReportError(f"{path}:{n}: not a devrecd verdict or comparison record")
        out.append(rec)
    return out


def gather(sources: Sequence[str | os.PathLike], cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """Records from every source, plus audio files named without a record (inventory only)."""
    records, loose = [], []
    for src in map(Path, sources):
        if src.is_dir() and ((src / JOURNAL_NAME).is_file() or (src / VERDICT_LOG_NAME).is_file()):
            records += read_state_dir(src)
        elif src.is_file() and src.suffix in (".jsonl", ".json", ".ndjson"):
            records += read_jsonl(src)
        elif src.exists():
            loose += [str(p) for p in scan_files([src], cfg.watch)]
        else:
            raise ReportError(f"{src}: no such file or folder")
    seen = {os.path.abspath(r["path"]) for r in records if r.get("path")}
    loose = [p for p in loose if os.path.abspath(p) not in seen]
    return records, loose
