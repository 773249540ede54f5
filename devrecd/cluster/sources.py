"""What a batch job judges: recordings named by folders, manifests (CSV) and file lists."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable

from devrecd.config import WatchConfig
from devrecd.errors import ConfigError

MANIFEST_SUFFIXES = (".csv",)  # a CSV with a ``path`` column (relative paths: to the CSV's folder)
LIST_SUFFIXES = (".txt", ".lst", ".list")  # one path per line; blank lines and ``#`` comments skipped


def list_recordings(sources: Iterable[str | os.PathLike], cfg: WatchConfig, *,
                    exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Absolute paths of the recordings the sources name, each once, in order.

    A folder is walked recursively for ``watch.extensions`` (minus ``watch.ignore_patterns``), as
    ``devrecd identify`` does; a ``.csv`` is a manifest with a ``path`` column; a ``.txt``/``.lst``
    is a file list; anything else is a recording itself (judged even if it is not audio: it then
    fails with its reason). Folders under ``exclude`` (the job's own output) are never walked.
    """
    from devrecd.audio.files import scan_files

    skip = [os.path.realpath(p) for p in exclude]
    out: dict[str, None] = {}
    for source in map(Path, sources):
        if source.is_dir():
            for p in scan_files([source], cfg):
                real = os.path.realpath(p)
                if not any(real == s or real.startswith(s + os.sep) for s in skip):
                    out[os.path.abspath(p)] = None
        elif source.suffix.lower() in MANIFEST_SUFFIXES:
            out.update(dict.fromkeys(_manifest(source)))
        elif source.suffix.lower() in LIST_SUFFIXES:
            out.update(dict.fromkeys(_file_list(source)))
        elif source.exists() or source.is_symlink():
            out[os.path.abspath(source)] = None
        else:
            raise ConfigError(f"source not found: {source}")
    return list(out)


def _manifest(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ConfigError(f"manifest {path} has no 'path' column (columns: {', '.join(reader.fieldnames or [])})")
            rows = [r["path"] for r in reader if (r.get("path") or "").strip()]
    except OSError as exc:
        raise ConfigError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    return [_resolve(path.parent, p.strip()) for p in rows]


def _file_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the file list {path}: {exc.strerror or exc}") from None
    return [_resolve(path.parent, s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _resolve(base: Path, name: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(name)))
