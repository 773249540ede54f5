"""The journal and verdict log: states, dedupe keys, crash-ordering repair, torn lines."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devrecd.pipeline.journal import Journal, JournalError, Recorder, VerdictLog


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def test_states_from_seen_to_judged(journal: Journal, tmp_path: Path) -> None:
    log = VerdictLog(tmp_path / "v.jsonl")
    rec = Recorder(journal, log)
    e, new = journal.see("/ev/a.wav", 100, 1)
    assert new and e.state == "seen"
    again, new = journal.see("/ev/a.wav", 100, 1)
    assert not new and again.id == e.id
    journal.mark_hashed(e.id, "ab" * 32, 100)
    assert journal.get(e.id).state == "hashed"
    assert [a.id for a in journal.active()] == [e.id]
    assert rec.commit(e.id, "judged", {"path": "/ev/a.wav", "device": "p1"})
    assert not rec.commit(e.id, "judged", {"path": "/ev/a.wav", "device": "p1"}), "a second verdict must be refused"
    got = journal.get(e.id)
    assert got.state == "judged" and got.logged and got.record["device"] == "p1" and got.record["id"] == e.id
    assert journal.active() == []
    lines = (tmp_path / "v.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [e.id]
    # The same version seen again needs nothing; a changed file at the same path is a new row.
    assert journal.see("/ev/a.wav", 100, 1) == (got, False)
    changed, new = journal.see("/ev/a.wav", 120, 2)
    assert new and changed.id != e.id
    log.close()


def test_duplicate_lookup_by_content(journal: Journal) -> None:
    a, _ = journal.see("/ev/a.wav", 10, 1)
    b, _ = journal.see("/ev/copy of a.wav", 10, 2)
    journal.mark_hashed(a.id, "cd" * 32, 10)
    journal.mark_hashed(b.id, "cd" * 32, 10)
    assert journal.judged_with("cd" * 32, exclude=b.id) is None, "only judged rows count as originals"
    Recorder(journal, None).commit(a.id, "judged", {"device": "x"})
    assert journal.judged_with("cd" * 32, exclude=b.id).id == a.id
    assert journal.judged_with("cd" * 32, exclude=a.id) is None


def test_failed_keeps_reason_and_export_filters_by_time(journal: Journal) -> None:
    e, _ = journal.see("/ev/bad.wav", 5, 1)
    Recorder(journal, None).commit(e.id, "failed", {"path": "/ev/bad.wav", "reason": "corrupt"}, reason="corrupt")
    rows = list(journal.finished())
    assert [(r.state, r.reason) for r in rows] == [("failed", "corrupt")]
    assert list(journal.finished(since=rows[0].updated_at + 1)) == []
    assert journal.counts() == {"failed": 1}


def test_repair_appends_only_missing_lines(journal: Journal, tmp_path: Path) -> None:
    """Crash after the journal commit (line missing) and after the append (line present, unmarked)."""
    log = VerdictLog(tmp_path / "v.jsonl")
    a, _ = journal.see("/ev/a.wav", 1, 1)
    b, _ = journal.see("/ev/b.wav", 1, 1)
    # a: committed, never appended. b: committed and appended, never marked.
    journal.finish(a.id, "judged", {"id": a.id, "device": "p1"})
    journal.finish(b.id, "judged", {"id": b.id, "device": "p2"})
    log.append({"id": b.id, "device": "p2"})
    assert Recorder(journal, log).repair() == 1
    ids = [json.loads(x)["id"] for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert sorted(ids) == [a.id, b.id]
    assert journal.unlogged() == []
    assert Recorder(journal, log).repair() == 0
    log.close()


def test_torn_last_line_is_cut(tmp_path: Path) -> None:
    p = tmp_path / "v.jsonl"
    p.write_bytes(b'{"id":1}\n{"id":2,"dev')
    log = VerdictLog(p)
    log.append({"id": 3})
    log.close()
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == [1, 3]


def test_unwritable_state_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        Journal(tmp_path / "missing-dir" / "j.sqlite")
    with pytest.raises(JournalError):
        VerdictLog(tmp_path / "missing-dir" / "v.jsonl")


def test_commit_survives_kill_9(tmp_path: Path) -> None:
    """A process that commits and is then SIGKILLed leaves a journal and log that agree after repair."""
    script = textwrap.dedent(f"""
        import os, signal
        from devrecd.pipeline.journal import Journal, Recorder, VerdictLog
        j = Journal({str(tmp_path / 'j.sqlite')!r}); log = VerdictLog({str(tmp_path / 'v.jsonl')!r})
        rec = Recorder(j, log)
        for i in range(20):
            e, _ = j.see(f"/ev/{{i}}.wav", i, i)
            if i == 19:
                j.finish(e.id, "judged", {{"id": e.id}})  # committed, crash before the append
                os.kill(os.getpid(), signal.SIGKILL)
            rec.commit(e.id, "judged", {{"device": "p"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    j = Journal(tmp_path / "j.sqlite")
    log = VerdictLog(tmp_path / "v.jsonl")
    assert Recorder(j, log).repair() == 1
    ids = [json.loads(x)["id"] for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(1, 21)) and len(ids) == len(set(ids))
    assert j.counts() == {"judged": 20}
    j.close()
    log.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "j.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failure_of_a_file_that_then_grows_is_superseded_by_the_later_verdict(journal: Journal, tmp_path: Path) -> None:
    """A share copy paused longer than watch.stable_seconds: partial versions fail, the complete one is judged;
    one current record per path, the failures kept as history."""
    rec = Recorder(journal, VerdictLog(tmp_path / "v.jsonl"))
    partial = []
    for size in (100, 200, 300):
        e, new = journal.see("/ev/copy.wav", size, size)
        assert new
        rec.commit(e.id, "failed", {"path": "/ev/copy.wav", "reason": "corrupt"}, reason="corrupt")
        partial.append(e.id)
    other, _ = journal.see("/ev/other.wav", 5, 5)
    rec.commit(other.id, "failed", {"path": "/ev/other.wav", "reason": "unsupported"}, reason="unsupported")
    final, _ = journal.see("/ev/copy.wav", 400, 400)
    out = rec.commit(final.id, "judged", {"path": "/ev/copy.wav", "device": "p1"})
    assert out["supersedes"] == partial
    current = list(journal.finished())
    assert [(r.path, r.state) for r in current] == [("/ev/other.wav", "failed"), ("/ev/copy.wav", "judged")]
    history = list(journal.finished(history=True))
    assert len(history) == 5 and {r.superseded_by for r in history if r.id in partial} == {final.id}
    # A later *judged* version does not hide an earlier judged one: that was different evidence.
    again, _ = journal.see("/ev/copy.wav", 500, 500)
    rec.commit(again.id, "judged", {"path": "/ev/copy.wav", "device": "p2"})
    assert [r.state for r in journal.finished() if r.path == "/ev/copy.wav"] == ["judged", "judged"]


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o000)
    try:
        j = Journal(tmp_path / "journal.sqlite")
        e, _ = j.see("/ev/a.wav", 1, 1)  # creates the WAL and shm files
        log = VerdictLog(tmp_path / "verdicts.jsonl")
        Recorder(j, log).commit(e.id, "judged", {"device": "p"})
        from devrecd.fsutil import atomic_write

        atomic_write(tmp_path / "daemon.json", "{}", mode=0o640)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        j.close()
        log.close()
    finally:
        os.umask(old)
    assert modes["journal.sqlite"] == 0o600 and modes["journal.sqlite-wal"] == 0o600, modes
    assert modes["verdicts.jsonl"] == 0o640 and modes["daemon.json"] == 0o640, modes
    assert not [n for n, m in modes.items() if m & 0o007], f"world-accessible state: {modes}"


def test_artifacts_written_atomically_get_the_umasks_mode_like_any_file(tmp_path: Path) -> None:
    """A file written atomically (a model's contract, a scorer file, a report) gets what a plain
    open() gives, 0666 less the umask, not a temporary file's 0600: a service user who can read the
    .onnx beside a contract must be able to read the contract. An explicit mode still wins, and the
    temporary file is private until that mode is set."""
    import os
    import stat

    from devrecd.fsutil import atomic_write

    def mode_of(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    seen: dict[int, int] = {}  # umask -> the temporary file's mode while an explicit-mode write runs
    modes = {}
    for umask in (0o022, 0o077, 0o002):
        old = os.umask(umask)
        try:
            written = atomic_write(tmp_path / f"contract{umask:o}.json", "{}\n")
            plain = tmp_path / f"plain{umask:o}.bin"
            plain.write_bytes(b"x")

            def body(fh, umask=umask) -> None:
                seen[umask] = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
                fh.write(b"{}")

            explicit = atomic_write(tmp_path / f"state{umask:o}.json", body, mode=0o640)
        finally:
            os.umask(old)
        modes[umask] = (mode_of(written), mode_of(plain), mode_of(explicit))
    assert modes == {0o022: (0o644, 0o644, 0o640), 0o077: (0o600, 0o600, 0o640), 0o002: (0o664, 0o664, 0o640)}
    assert set(seen.values()) <= {0o600}, seen  # (0o600 less the umask: never wider)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_opens_the_journal_read_only_and_writes_nothing(tmp_path: Path) -> None:
    import os

    j = Journal(tmp_path / "journal.sqlite")
    e, _ = j.see("/ev/a.wav", 1, 1)
    Recorder(j, None).commit(e.id, "judged", {"device": "p"})
    j.close()
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.iterdir()}
    ro = Journal.open_readonly(tmp_path / "journal.sqlite")
    try:
        assert [r.state for r in ro.finished()] == ["judged"] and ro.schema_version == 1
        with pytest.raises(JournalError):
            ro.see("/ev/b.wav", 1, 1)  # mode=ro: sqlite refuses any write
    finally:
        ro.close()
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.iterdir()}
    assert after == before, "a read-only export must not create or touch any file"
    os.chmod(tmp_path / "journal.sqlite", 0o400)


def test_a_version_0_journal_is_read_as_is_and_migrated_when_opened_for_writing(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "journal.sqlite"
    with sqlite3.connect(path) as db:  # the schema before versioning (no superseded_by, user_version 0)
        db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, size INTEGER NOT NULL, "
                   "mtime_ns INTEGER NOT NULL, sha256 TEXT, state TEXT NOT NULL, reason TEXT, duplicate_of INTEGER, "
                   "record TEXT, logged INTEGER NOT NULL DEFAULT 0, seen_at REAL NOT NULL, updated_at REAL NOT NULL)")
        db.execute("INSERT INTO files (path, size, mtime_ns, state, record, logged, seen_at, updated_at) "
                   "VALUES ('/ev/old.wav', 1, 1, 'judged', '{\"id\": 1}', 1, 1.0, 1.0)")
    ro = Journal.open_readonly(path)
    assert ro.schema_version == 0 and [r.path for r in ro.finished()] == ["/ev/old.wav"]
    ro.close()
    rw = Journal(path)
    assert rw.schema_version == 1 and [r.superseded_by for r in rw.finished()] == [None]
    rw.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match="schema version 99"):
        Journal.open_readonly(path)


def test_kill_between_journal_commit_and_log_append_is_repaired(tmp_path: Path) -> None:
    """The injected kill point (DEVRECD_TEST_KILL_AT): the real Recorder.commit dies after the journal
    commit and before the append; the restart's repair appends the missing line exactly once."""
    import os

    script = textwrap.dedent(f"""
        from devrecd.pipeline.journal import Journal, Recorder, VerdictLog
        j = Journal({str(tmp_path / 'j.sqlite')!r}); rec = Recorder(j, VerdictLog({str(tmp_path / 'v.jsonl')!r}))
        e, _ = j.see("/ev/a.wav", 1, 1)
        rec.commit(e.id, "judged", {{"device": "p"}})
    """)
    env = {**os.environ, "DEVRECD_TEST_KILL_AT": "after_journal_commit"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=env)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (tmp_path / "v.jsonl").read_text() == ""
    j = Journal(tmp_path / "j.sqlite")
    log = VerdictLog(tmp_path / "v.jsonl")
    assert [e.id for e in j.unlogged()] == [1]
    assert Recorder(j, log).repair() == 1
    assert [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()] == [{"id": 1, "device": "p"}]
    assert j.unlogged() == [] and Recorder(j, log).repair() == 0
    j.close()
    log.close()


def test_verdicts_cli_exports_current_records_read_only_and_history_on_request(tmp_path: Path) -> None:
    import os

    from typer.testing import CliRunner

    from devrecd.cli import app

    j = Journal(tmp_path / "journal.sqlite")
    rec = Recorder(j, None)
    e1, _ = j.see("/ev/copy.wav", 100, 1)
    rec.commit(e1.id, "failed", {"path": "/ev/copy.wav", "outcome": "failed", "reason": "too_short"}, reason="too_short")
    e2, _ = j.see("/ev/copy.wav", 900, 2)
    rec.commit(e2.id, "judged", {"path": "/ev/copy.wav", "outcome": "judged", "device": "p1"})
    j.close()
    before = sorted(os.listdir(tmp_path))
    run = CliRunner().invoke(app, ["verdicts", "--state-dir", str(tmp_path)])
    assert run.exit_code == 0, run.output
    assert [json.loads(x)["outcome"] for x in run.output.splitlines()] == ["judged"]
    assert json.loads(run.output)["supersedes"] == [e1.id]
    run = CliRunner().invoke(app, ["verdicts", "--state-dir", str(tmp_path), "--history", "--format", "csv"])
    assert run.exit_code == 0, run.output
    rows = run.output.splitlines()
    assert len(rows) == 3 and rows[1].startswith(f"{e1.id},failed") and rows[1].endswith(f",{e2.id}")
    assert sorted(os.listdir(tmp_path)) == before, "the export created no file (no WAV, no shm)"


FORGED = "/ev/a.wav\n/ev/b.wav  p9  0.999\x1b]0;owned\x07\x9b2J"


def test_human_readable_outputs_escape_names_like_the_log(tmp_path: Path) -> None:
    """A newline in a file name forges no extra line and no escape sequence reaches the terminal, in
    identify's table and its error lines and in `devrecd verdicts --format table`."""
    import io

    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.cli.app import Format
    from devrecd.cli.serve import VerdictPrinter, error_line

    failed = {"path": FORGED, "outcome": "failed", "reason": "corrupt", "detail": "cut\nshort\x1b[2J"}
    judged = {"path": FORGED, "outcome": "judged", "device": "p\n1", "score": 0.5,
              "top_k": [{"device": "p\n1", "score": 0.5}, {"device": "q\x1b", "score": 0.2}], "duration": 3.0}
    line = error_line(failed)
    assert "\n" not in line and "\x1b" not in line and "\x9b" not in line and "\\n" in line
    out = io.StringIO()
    printer = VerdictPrinter(Format.table, out)
    printer.add(failed)
    printer.add(judged)
    text = out.getvalue()
    assert len(text.splitlines()) == 3 and "\x1b" not in text and "\x07" not in text and "\x9b" not in text, text
    j = Journal(tmp_path / "journal.sqlite")
    e, _ = j.see(FORGED, 1, 1)
    Recorder(j, None).commit(e.id, "judged", judged)
    j.close()
    run = CliRunner().invoke(app, ["verdicts", "--state-dir", str(tmp_path), "--format", "table"])
    assert run.exit_code == 0, run.output
    assert len(run.output.splitlines()) == 2 and "\x1b" not in run.output and "\x9b" not in run.output, run.output


def test_a_file_moved_into_place_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path: Path, monkeypatch) -> None:
    """An export's checked ``.partial`` file goes into place as durably as an atomic write: its data
    is fsynced before the rename, the folder after it."""
    import os

    from devrecd import fsutil

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd))[1])
    tmp = tmp_path / ".m.onnx.partial"
    tmp.write_bytes(b"model")
    out = fsutil.move_into_place(tmp, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx" and out.read_bytes() == b"model" and not tmp.exists()
    assert synced == [str(tmp), str(tmp_path)]


@pytest.mark.parametrize("kill_at", ["after_journal_commit", "inside_log_append"])
def test_a_kill_inside_a_group_commit_is_repaired_exactly_once(tmp_path: Path, kill_at: str) -> None:
    """A group of five verdicts (one journal transaction, one log append): SIGKILLed after the
    group's journal commit, or inside its log append (the first line written whole, the second torn).
    The restart cuts the torn line and appends every missing record once: each of the five is in
    the log exactly once, as committed, and every row is terminal and logged."""
    import os

    script = textwrap.dedent(f"""
        from devrecd.pipeline.journal import Journal, Recorder, Terminal, VerdictLog
        j = Journal({str(tmp_path / 'j.sqlite')!r}); log = VerdictLog({str(tmp_path / 'v.jsonl')!r})
        rec = Recorder(j, log)
        e, _ = j.see("/ev/before.wav", 1, 1)  # an earlier verdict, in the order a commit takes (no kill point)
        j.finish(e.id, "judged", {{"id": e.id, "device": "p", "n": 0}}); log.append({{"id": e.id, "device": "p", "n": 0}})
        j.mark_logged(e.id)
        ids = [j.see(f"/ev/{{i}}.wav", i, i)[0].id for i in range(5)]
        rec.commit_many([Terminal(i, "judged", {{"device": "p", "n": i}}) for i in ids])
    """)
    env = {**os.environ, "DEVRECD_TEST_KILL_AT": kill_at}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=env)
    assert proc.returncode == -9, proc.stderr.decode()
    raw = (tmp_path / "v.jsonl").read_bytes()
    if kill_at == "inside_log_append":
        assert raw.count(b"\n") == 2 and not raw.endswith(b"\n"), "one whole line of the group, one torn"
    j = Journal(tmp_path / "j.sqlite")
    log = VerdictLog(tmp_path / "v.jsonl")  # cuts the torn line
    assert j.counts() == {"judged": 6}, "the group's journal commit went through before the kill"
    expected = {e.id: e.record for e in j.finished()}
    assert Recorder(j, log).repair() == (4 if kill_at == "inside_log_append" else 5)
    lines = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(expected) and len(lines) == 6
    assert all(r == expected[r["id"]] for r in lines), "each line is the record the journal committed"
    assert j.unlogged() == [] and Recorder(j, log).repair() == 0
    j.close()
    log.close()


def test_reads_do_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """Lookups (a worker's dedupe, the writer's supersedes) read through their own connection: they
    answer while another thread holds the write lock (e.g. during a commit's fsync)."""
    import threading

    j = Journal(tmp_path / "j.sqlite")
    e, _ = j.see("/ev/a.wav", 1, 1)
    j.mark_hashed(e.id, "ab" * 32, 1)
    j.finish(e.id, "judged", {"id": e.id})
    got: list = []
    with j._lock:  # a writer mid-commit
        t = threading.Thread(target=lambda: got.append((j.judged_with("ab" * 32), j.get(e.id), j.superseded(e.id))))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "a read waited for the write lock"
    assert got[0][0].id == e.id and got[0][1].state == "judged" and got[0][2] == []
    j.close()


def test_threads_beyond_the_read_connections_share_the_writers(tmp_path: Path) -> None:
    """Short-lived threads (more than MAX_READERS of them) do not each keep a connection open."""
    import threading

    from devrecd.pipeline.journal_store import MAX_READERS

    j = Journal(tmp_path / "j.sqlite")
    e, _ = j.see("/ev/a.wav", 1, 1)
    got: list = []
    for _ in range(MAX_READERS + 5):
        t = threading.Thread(target=lambda: got.append(j.get(e.id).id))
        t.start()
        t.join()
    assert got == [e.id] * (MAX_READERS + 5) and len(j._readers) == MAX_READERS
    j.close()
