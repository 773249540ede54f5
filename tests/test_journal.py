"""The journal and verdict log: states, dedupe keys, crash-ordering repair, torn lines."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devrecd.daemon.journal import Journal, JournalError, Recorder, VerdictLog


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
        from devrecd.daemon.journal import Journal, Recorder, VerdictLog
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
