"""Which files are recordings: the one rule for the watcher, folders named on a command line, the
export's parity audio and the case report (``watch.extensions`` / ``watch.ignore_patterns``)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable, Protocol


class RecordingNames(Protocol):
    """What the rule reads: ``watch.extensions`` and ``watch.ignore_patterns`` (a
    :class:`~devrecd.config.WatchConfig`, or the datasets' own rule)."""

    @property
    def extensions(self) -> tuple[str, ...]: ...

    @property
    def ignore_patterns(self) -> tuple[str, ...]: ...


def wanted(path: str, cfg: RecordingNames) -> bool:
    """An audio file by extension, and not a temporary/partial name."""
    name = os.path.basename(path)
    if any(fnmatch.fnmatchcase(name, pat) for pat in cfg.ignore_patterns):
        return False
    return name.lower().endswith(tuple(e.lower() for e in cfg.extensions))


def scan_files(paths: Iterable[str | os.PathLike], cfg: RecordingNames) -> list[Path]:
    """Files as named, folders expanded recursively (sorted) to the audio files they hold."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(Path(dp, n) for dp, _, ns in os.walk(p) for n in ns if wanted(os.path.join(dp, n), cfg))
        else:
            out.append(p)
    return out
