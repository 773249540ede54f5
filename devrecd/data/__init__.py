"""Device corpora: load a dataset in one of three layouts and split it without leakage.

Layouts (detected from ``path``):

* ``"manifest"``: a CSV with columns ``path,device`` and optional ``group`` (or ``segment``, read
  as the group) and ``split``; paths are relative to the CSV. A folder that holds a
  ``manifest.csv`` is read through it (the CCNU sample and ``devrecd synth`` output both do).
* ``"folders"``: one folder per device, ``DATA/<device>/**/<file>``; each recording is its own group.
* ``"ccnu"``: a flat folder of ``<device>_<segment>.<ext>`` files (CCNU_Mobile naming: spaces and
  parentheses allowed in the device name); the group is the segment number.

Splits, in order of precedence:

1. a ``split`` column is obeyed exactly;
2. ``split_by_group={"train": [...], "val": [...], "test": [...]}`` assigns whole groups
   (:data:`CCNU_SPLIT` is the canonical CCNU one: segments 1-3 train, 4-5 test);
3. otherwise a stratified split per device by ``ratios`` over *groups*: every recording of a
   group lands on one side. Groups are ordered by one seeded global permutation of group names,
   so a group name shared by several devices (a CCNU segment) goes to the same side for all of
   them when their group sets agree. This split is written to ``split_file`` and reused.

A window is cut from one recording, and a recording has exactly one split, so no recording's
windows can straddle train and test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from devrecd.audio.files import wanted
from devrecd.config import WatchConfig
from devrecd.data.cache import FeatureCache  # re-exported: devrecd.data is the package's front door
from devrecd.errors import ConfigError, DatasetError
from devrecd.fsutil import atomic_write

SPLITS = ("train", "val", "test")
RECORDINGS = WatchConfig()  # which files of a dataset folder are recordings: the watcher's default rule
MANIFEST_NAME = "manifest.csv"
SPLIT_FILE_NAME = ".devrecd-split.json"
# The canonical CCNU_Mobile evaluation split (segments 1-3 train, 4-5 test), as used by the paper.
CCNU_SPLIT: dict[str, tuple[str, ...]] = {"train": ("1", "2", "3"), "test": ("4", "5")}
_CCNU_NAME = re.compile(r"^(?P<device>.+)_(?P<segment>\d+)$")


@dataclass(frozen=True)
class Item:
    """One recording of a dataset."""

    path: Path
    device: str
    group: str  # recording/segment group: all items of a group share one split
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class Dataset:
    """A loaded, split dataset."""

    root: Path
    items: tuple[Item, ...]
    labels: tuple[str, ...]  # sorted device names
    manifest_sha256: str  # hash of the canonical (path, device, group, split) listing
    layout: str  # "folders" | "manifest" | "ccnu"

    def subset(self, split: str) -> list[Item]:
        """The items of one split."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        return [it for it in self.items if it.split == split]

    def split_map(self) -> dict[str, str]:
        """``{relative path: split}`` for checkpoints and reports."""
        return {_rel(it.path, self.root): it.split for it in self.items}

    def counts(self) -> dict[str, dict[str, int]]:
        """Recordings per device per split."""
        out: dict[str, dict[str, int]] = {d: {s: 0 for s in SPLITS} for d in self.labels}
        for it in self.items:
            out[it.device][it.split] += 1
        return out


@dataclass(frozen=True)
class _Row:
    path: Path
    device: str
    group: str
    split: str | None


def parse_split_groups(text: str | None) -> dict[str, tuple[str, ...]] | None:
    """``"ccnu"`` or ``"train=1,2,3 test=4,5 [val=...]"`` -> a ``split_by_group`` mapping (None for none)."""
    if not text:
        return None
    if text.strip().lower() == "ccnu":
        return dict(CCNU_SPLIT)
    out: dict[str, tuple[str, ...]] = {}
    for part in text.replace(";", " ").split():
        name, sep, groups = part.partition("=")
        if not sep or not groups:
            raise ConfigError(f"--split-groups: {part!r} is not of the form split=g1,g2 (e.g. train=1,2,3 test=4,5)")
        out[name.strip()] = tuple(g.strip() for g in groups.split(",") if g.strip())
    return out


def load_dataset(
    path: str | os.PathLike,
    *,
    ratios: Sequence[float] = (0.64, 0.16, 0.20),
    seed: int = 0,
    split_file: Path | None = None,
    split_by_group: Mapping[str, Iterable[str | int]] | None = None,
) -> Dataset:
    """Load a dataset (folder per device, manifest CSV, or CCNU-style flat folder) and split it.

    ``split_file`` (default ``<dataset>/.devrecd-split.json``, or a file under
    ``~/.cache/devrecd/splits`` when the dataset folder is read-only) keeps ratio-based splits
    so that later runs reuse them. Raises :class:`DatasetError`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}", reason="dataset_missing")
    root, layout, rows = _read_layout(path)
    if not rows:
        raise DatasetError(f"{path}: no audio recordings found", reason="dataset_empty")
    given = [r.split is not None for r in rows]
    if any(given) and not all(given):
        raise DatasetError(f"{path}: the split column is empty for some rows; fill it for all or none",
                           reason="dataset_split")
    if all(given):
        if split_by_group is not None:
            raise DatasetError(f"{path}: the manifest gives a split column; split_by_group cannot override it",
                               reason="dataset_split")
        assignment = {r.path: r.split for r in rows}
    elif split_by_group is not None:
        assignment = _split_by_group(rows, split_by_group, path)
    else:
        assignment = _ratio_split_persisted(root, rows, _check_ratios(ratios), seed, split_file)
    items = tuple(sorted((Item(r.path, r.device, r.group, assignment[r.path]) for r in rows),
                         key=lambda it: (it.device, _rel(it.path, root))))
    return Dataset(root=root, items=items, labels=tuple(sorted({it.device for it in items})),
                   manifest_sha256=listing_sha256(items, root), layout=layout)


def listing_sha256(items: Iterable[Item], root: Path) -> str:
    """sha256 of the sorted ``path<TAB>device<TAB>group<TAB>split`` lines (paths relative to root)."""
    lines = sorted(f"{_rel(it.path, root)}\t{it.device}\t{it.group}\t{it.split}\n" for it in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --- layouts -----------------------------------------------------------------------------------

def _is_audio(p: Path) -> bool:
    return p.is_file() and wanted(p.name, RECORDINGS)


def _read_layout(path: Path) -> tuple[Path, str, list[_Row]]:
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: a dataset is a folder or a manifest .csv", reason="dataset_layout")
        return path.parent.resolve(), "manifest", _read_manifest(path)
    if (path / MANIFEST_NAME).is_file():
        return path.resolve(), "manifest", _read_manifest(path / MANIFEST_NAME)
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot list the folder: {exc.strerror or exc}", reason="dataset_unreadable") from None
    flat = [p for p in entries if _is_audio(p)]
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    nested = [d for d in dirs if any(_is_audio(f) for f in d.rglob("*"))]
    if flat and nested:
        raise DatasetError(
            f"{path}: mixes audio files ({flat[0].name}) with device folders ({nested[0].name}); "
            "use one layout, or a manifest.csv", reason="dataset_layout")
    root = path.resolve()
    if nested:
        rows = []
        for d in nested:
            for f in sorted(d.rglob("*")):
                if _is_audio(f) and not any(part.startswith(".") for part in f.relative_to(path).parts):
                    rel = f.resolve().relative_to(root).as_posix()
                    rows.append(_Row(f.resolve(), d.name, rel, None))
        return root, "folders", rows
    rows = []
    for f in flat:
        m = _CCNU_NAME.match(f.stem)
        if not m:
            raise DatasetError(
                f"{f}: a flat dataset folder needs <device>_<segment>.<ext> names (CCNU_Mobile style); "
                "put recordings in one folder per device or list them in a manifest.csv", reason="dataset_layout")
        rows.append(_Row(f.resolve(), m["device"].strip(), str(int(m["segment"])), None))
    return root, "ccnu", rows


def _read_manifest(csv_path: Path) -> list[_Row]:
    base = csv_path.parent.resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            records = list(reader)
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read the manifest: {exc.strerror or exc}", reason="dataset_unreadable") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv_path}: not a valid CSV manifest: {exc}", reason="dataset_manifest") from None
    missing = {"path", "device"} - set(columns)
    if missing:
        raise DatasetError(f"{csv_path}: the manifest needs columns path,device (missing: {', '.join(sorted(missing))})",
                           reason="dataset_manifest")
    group_col = "group" if "group" in columns else "segment" if "segment" in columns else None
    rows: list[_Row] = []
    seen: set[Path] = set()
    absent: list[str] = []
    for line_no, raw in enumerate(records, start=2):
        rec = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not rec.get("path") or not rec.get("device"):
            raise DatasetError(f"{csv_path}:{line_no}: empty path or device", reason="dataset_manifest")
        p = (base / rec["path"]).resolve()
        if p in seen:
            raise DatasetError(f"{csv_path}:{line_no}: {rec['path']} is listed twice", reason="dataset_manifest")
        seen.add(p)
        if not p.is_file():
            absent.append(rec["path"])
            continue
        split = rec.get("split") or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{csv_path}:{line_no}: split {split!r} is not one of {', '.join(SPLITS)}",
                               reason="dataset_manifest")
        # Without a group column each recording is its own group.
        group = (rec.get(group_col, "") if group_col else "") or _rel(p, base)
        rows.append(_Row(p, rec["device"], group, split))
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise DatasetError(f"{csv_path}: {len(absent)} listed file(s) do not exist: {', '.join(absent[:3])}{more}",
                           reason="dataset_missing_files")
    return rows


# --- splits ------------------------------------------------------------------------------------

def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    r = tuple(float(x) for x in ratios)
    if len(r) != 3 or any(x < 0 for x in r) or r[0] <= 0 or abs(sum(r) - 1.0) > 1e-6:
        raise DatasetError(f"split ratios {tuple(ratios)} must be three non-negative numbers "
                           "(train > 0) that sum to 1", reason="dataset_split")
    return r  # type: ignore[return-value]


def _split_by_group(rows: list[_Row], by_group: Mapping[str, Iterable[str | int]], where: Path) -> dict[Path, str]:
    owner: dict[str, str] = {}
    for split, groups in by_group.items():
        if split not in SPLITS:
            raise DatasetError(f"split_by_group: unknown split {split!r}", reason="dataset_split")
        for g in groups:
            g = str(g)
            if g in owner:
                raise DatasetError(f"split_by_group: group {g!r} is in both {owner[g]} and {split}", reason="dataset_split")
            owner[g] = split
    unassigned = sorted({r.group for r in rows} - set(owner))
    if unassigned:
        raise DatasetError(f"{where}: group(s) {', '.join(unassigned[:5])} are in no split of split_by_group",
                           reason="dataset_split")
    return {r.path: owner[r.group] for r in rows}


def ratio_split(rows_by_device: Mapping[str, Sequence[str]], ratios: Sequence[float], seed: int) -> dict[tuple[str, str], str]:
    """Stratified split of each device's groups: ``{(device, group): split}``.

    Each device gets ``round(n * val)`` and ``round(n * test)`` groups (at least one where the
    ratio is non-zero) and at least one training group; groups are taken in one seeded global
    order of group names so that a group shared by devices lands on one side for all of them.
    """
    r = _check_ratios(ratios)
    names = sorted({g for groups in rows_by_device.values() for g in groups})
    rank = {g: i for i, g in enumerate(np.random.default_rng(seed).permutation(names))}
    needed = sum(1 for x in r if x > 0)
    out: dict[tuple[str, str], str] = {}
    for device, groups in sorted(rows_by_device.items()):
        ordered = sorted(set(groups), key=lambda g: rank[g])
        n = len(ordered)
        if n < needed:
            raise DatasetError(
                f"device {device!r} has {n} recording group(s); a {'/'.join(f'{x:g}' for x in r)} split needs at "
                f"least {needed} (add recordings, change the ratios, or give a split column)", reason="dataset_split")
        n_test = max(1, round(n * r[2])) if r[2] > 0 else 0
        n_val = max(1, round(n * r[1])) if r[1] > 0 else 0
        while n_test + n_val > n - 1:  # keep at least one training group
            if n_val > (1 if r[1] > 0 else 0):
                n_val -= 1
            else:
                n_test -= 1
        for i, g in enumerate(ordered):
            out[(device, g)] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _ratio_split_persisted(root: Path, rows: list[_Row], ratios: tuple[float, float, float], seed: int,
                           split_file: Path | None) -> dict[Path, str]:
    key = f"ratios={','.join(f'{x:g}' for x in ratios)};seed={seed}"
    rel_rows = {_rel(r.path, root): r for r in rows}
    file = Path(split_file) if split_file is not None else default_split_file(root)
    stored = _read_split_file(file)
    entry = stored.get("splits", {}).get(key)
    if entry is not None:
        listed = entry.get("assignment", {})
        added = sorted(set(rel_rows) - set(listed))
        removed = sorted(set(listed) - set(rel_rows))
        if added or removed:
            raise DatasetError(
                f"the dataset changed since its split in {file} was made ({len(added)} recording(s) added, "
                f"{len(removed)} removed, e.g. {(added + removed)[0]}); delete that file to split again",
                reason="dataset_split_stale")
        bad = sorted({s for s in listed.values() if s not in SPLITS})
        if bad:
            raise DatasetError(f"{file}: invalid split name(s) {bad}", reason="dataset_split")
        return {rel_rows[k].path: s for k, s in listed.items()}
    by_device: dict[str, list[str]] = {}
    for r in rows:
        by_device.setdefault(r.device, []).append(r.group)
    groups = ratio_split(by_device, ratios, seed)
    assignment = {rel: groups[(r.device, r.group)] for rel, r in rel_rows.items()}
    stored.setdefault("version", 1)
    stored.setdefault("splits", {})[key] = {"ratios": list(ratios), "seed": seed, "assignment": dict(sorted(assignment.items()))}
    _write_json_atomic(file, stored)
    return {rel_rows[k].path: s for k, s in assignment.items()}


def default_split_file(root: Path) -> Path:
    """``<root>/.devrecd-split.json`` when the folder is writable, else one under the user cache.

    A folder without write bits counts as read-only even for root (who may write anyway): a shared,
    read-only data set must not be changed by a run.
    """
    if os.access(root, os.W_OK) and os.stat(root).st_mode & 0o222:
        return root / SPLIT_FILE_NAME
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path("~/.cache/devrecd/splits").expanduser() / f"{root.name}-{tag}.json"


def _read_split_file(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"split file {file} cannot be read ({exc}); delete it to split again",
                           reason="dataset_split") from None
    if not isinstance(data, dict) or not isinstance(data.get("splits", {}), dict):
        raise DatasetError(f"split file {file} is not a devrecd split file; delete it to split again", reason="dataset_split")
    return data


def _write_json_atomic(file: Path, data: dict) -> None:
    try:
        atomic_write(file, json.dumps(data, indent=1, sort_keys=True))
    except OSError as exc:
        raise DatasetError(f"cannot write the split file {file}: {exc.strerror or exc}", reason="dataset_split") from None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


__all__ = [
    "CCNU_SPLIT", "Dataset", "FeatureCache", "Item", "SPLITS", "default_split_file", "listing_sha256",
    "parse_split_groups",
    "load_dataset", "ratio_split",
]
