"""The output folder of a batch job: Parquet parts, the daemon's JSON lines, exactly once across restarts.

::

    OUT/parts/part-<first id>.parquet   one part per block of verdicts (temp name, fsync, rename)
    OUT/commits.jsonl                   the commit log: one line per part, written after the rename
    OUT/verdicts.jsonl                  the daemon's verdict lines, appended after the commit
    OUT/summary.json                    the last run's counts and what the folder holds in all
    OUT/lock                            one driver at a time (flock; released by the kernel on kill -9)

A part counts once its commit line is on disk (one ``write`` + ``fsync``). A driver killed at any
point leaves at worst a part without a commit line (deleted at the next start, its files judged
again), a torn commit line (cut off: the same), or a committed part whose verdict lines are missing
or torn (rewritten from the part, which holds every record's exact JSON line). Each file version
(path, sha256, and the size and mtime it had when listed) therefore has exactly one record in the
parts and one line in ``verdicts.jsonl``, and a rerun on the same folder judges only what is missing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from devrecd.errors import DevrecdError
from devrecd.fsutil import atomic_write

log = logging.getLogger("devrecd.cluster")

PARTS = "parts"
COMMITS = "commits.jsonl"
VERDICTS = "verdicts.jsonl"
SUMMARY = "summary.json"
LOCK = "lock"

# Columns of every part; ``record`` is the verdict line exactly as verdicts.jsonl holds it.
COLUMNS = ("id", "path", "sha256", "file_size", "file_mtime_ns", "outcome", "reason", "device", "score",
           "judged_at", "record")


class OutputError(DevrecdError):
    """The output folder cannot be used or is damaged beyond what a restart repairs."""

    reason = "output"


def part_schema():
    """The Arrow schema of a part (pyarrow comes with the ``cluster`` extra)."""
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("path", pa.string()), ("sha256", pa.string()),
                      ("file_size", pa.int64()), ("file_mtime_ns", pa.int64()), ("outcome", pa.string()),
                      ("reason", pa.string()), ("device", pa.string()), ("score", pa.float64()),
                      ("judged_at", pa.string()), ("record", pa.string())])


def dumps(record: dict) -> str:
    """One verdict line, byte for byte as the daemon's verdict log writes it."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class BatchOutput:
    """An output folder opened by one driver: recovered on open, committed one part at a time."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir).resolve()
        self.parts_dir = self.dir / PARTS
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise OutputError(f"cannot use the output folder {self.dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise OutputError(f"another devrecd batch is writing to {self.dir}") from None
        self.run = uuid.uuid4().hex[:12]
        self.recorded: dict[str, set[tuple[str | None, int, int]]] = {}  # path -> {(sha256, size, mtime_ns)}
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.parts = 0
        self.next_id = 1
        self.verdicts_end = 0
        self.repaired = {"parts_removed": 0, "commit_tail_cut": 0, "verdict_lines_rewritten": 0}
        try:
            self._recover()
            self._fds = {name: os.open(self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                         for name in (COMMITS, VERDICTS)}
        except BaseException:
            self.close()
            raise

    # --- what is recorded ----------------------------------------------------------------------

    def is_recorded(self, path: str, size: int, mtime_ns: int) -> bool:
        """True when this version of the file (same size and mtime as when it was recorded) is done."""
        return any((s, m) == (size, mtime_ns) for _, s, m in self.recorded.get(path, ()))

    def recorded_hashes(self, path: str) -> set[str]:
        """Contents already recorded under ``path`` (a touched but unchanged file is not judged twice)."""
        return {sha for sha, _, _ in self.recorded.get(path, ()) if sha}

    def totals(self) -> dict[str, Any]:
        return {"records": sum(self.outcomes.values()), "parts": self.parts, "outcomes": dict(self.outcomes),
                "failed_by_reason": dict(self.reasons)}

    # --- commit --------------------------------------------------------------------------------

    def commit(self, rows: Sequence[dict[str, Any]]) -> list[dict]:
        """Record one block: ``rows`` of ``{"path", "file_size", "file_mtime_ns", "record"}``.
        Returns the records as written (with their ``id``)."""
        if not rows:
            return []
        import pyarrow as pa
        import pyarrow.parquet as pq

        from devrecd.audio import sha256_file

        first = self.next_id
        records = [{"id": first + i, **r["record"]} for i, r in enumerate(rows)]
        lines = [dumps(r) for r in records]
        table = pa.Table.from_pydict({
            "id": [r["id"] for r in records],
            "path": [r["path"] for r in rows],
            "sha256": [r.get("sha256") for r in records],
            "file_size": [int(r["file_size"]) for r in rows],
            "file_mtime_ns": [int(r["file_mtime_ns"]) for r in rows],
            "outcome": [r["outcome"] for r in records],
            "reason": [r.get("reason") for r in records],
            "device": [r.get("device") for r in records],
            "score": [r.get("score") for r in records],
            "judged_at": [r.get("judged_at") for r in records],
            "record": lines,
        }, schema=part_schema())
        name = f"part-{first:012d}.parquet"
        part = atomic_write(self.parts_dir / name, lambda fh: pq.write_table(table, fh))
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        start, end = self.verdicts_end, self.verdicts_end + len(data)
        commit = {"part": name, "first_id": first, "rows": len(rows), "part_sha256": sha256_file(part),
                  "verdicts_start": start, "verdicts_end": end, "run": self.run, "committed_at": time.time()}
        self._append(COMMITS, (dumps(commit) + "\n").encode("utf-8"))  # the commit point
        self._append(VERDICTS, data)
        self.next_id += len(rows)
        self.verdicts_end = end
        self.parts += 1
        self._remember(table.to_pydict())
        return records

    def write_summary(self, summary: dict) -> Path:
        return atomic_write(self.dir / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> BatchOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _append(self, name: str, data: bytes) -> None:
        fd = self._fds[name]
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError as exc:
            raise OutputError(f"cannot append to {self.dir / name}: {exc}") from None

    def _remember(self, cols: dict[str, list]) -> None:
        for path, sha, size, mtime, outcome, reason in zip(cols["path"], cols["sha256"], cols["file_size"],
                                                           cols["file_mtime_ns"], cols["outcome"], cols["reason"]):
            self.recorded.setdefault(path, set()).add((sha, size, mtime))
            self.outcomes[outcome] += 1
            if reason:
                self.reasons[reason] += 1

    def _recover(self) -> None:
        import pyarrow.parquet as pq

        commits = self._read_commits()
        committed = {c["part"] for c in commits}
        for f in sorted(self.parts_dir.iterdir()):
            if f.name not in committed:  # written but never committed (a killed driver), or a temp file
                f.unlink()
                self.repaired["parts_removed"] += 1
        tables = []
        for c in commits:
            part = self.parts_dir / c["part"]
            if not part.is_file():
                raise OutputError(f"{self.dir}: committed part {c['part']} is missing; the folder was changed "
                                  "by hand (restore the part, or start a new --out)")
            tables.append((c, part))
            cols = pq.read_table(part, columns=["path", "sha256", "file_size", "file_mtime_ns", "outcome",
                                                "reason"]).to_pydict()
            if len(cols["path"]) != c["rows"]:
                raise OutputError(f"{part}: {len(cols['path'])} rows, the commit log says {c['rows']}")
            self._remember(cols)
        if commits:
            self.next_id = commits[-1]["first_id"] + commits[-1]["rows"]
            self.verdicts_end = commits[-1]["verdicts_end"]
        self.parts = len(commits)
        self._repair_verdicts(tables)
        if any(self.repaired.values()):
            log.warning("output folder repaired after an interrupted run", extra={"out": str(self.dir), **self.repaired})

    def _read_commits(self) -> list[dict]:
        path = self.dir / COMMITS
        if not path.is_file():
            return []
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):  # a commit line cut short: that part never counted
            os.truncate(path, keep)
            self.repaired["commit_tail_cut"] += 1
        out = []
        for n, line in enumerate(data[:keep].splitlines(), 1):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise OutputError(f"{path}: line {n} is not JSON; the commit log was changed by hand") from None
        return out

    def _repair_verdicts(self, parts: Iterable[tuple[dict, Path]]) -> None:
        """Make verdicts.jsonl exactly the committed lines: cut what is past the last commit, and
        rewrite from the parts what a kill kept from being appended."""
        import pyarrow.parquet as pq

        path = self.dir / VERDICTS
        size = path.stat().st_size if path.exists() else 0
        if size == self.verdicts_end:
            return
        missing = [(c, p) for c, p in parts if c["verdicts_end"] > size]
        cut = missing[0][0]["verdicts_start"] if missing else self.verdicts_end
        with open(path, "ab") as fh:
            fh.truncate(cut)
            for c, part in missing:
                lines = pq.read_table(part, columns=["record"]).column("record").to_pylist()
                fh.write("".join(line + "\n" for line in lines).encode("utf-8"))
                self.repaired["verdict_lines_rewritten"] += len(lines)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.getsize(path) != self.verdicts_end:
            raise OutputError(f"{path}: holds {os.path.getsize(path)} bytes after repair, the commit log says "
                              f"{self.verdicts_end}; it was changed by hand")
