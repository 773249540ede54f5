"""Storage faults: the state folder's disk fills up (or turns read-only) under a running daemon.

No thread of the daemon ends, no file fails: the daemon is not ready (``/readyz`` 503,
``devrecd_storage_writable`` 0) while the journal cannot be written, retries with backoff, and once
space returns every file that arrived meanwhile gets exactly one record. The fault is injected
in-process on the journal's and the verdict log's write paths (``DEVRECD_TEST_STORAGE_FAULT``,
deterministic); a real 5 MB tmpfs shows the journal's own behaviour where mounting is permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.config import load_config
from devrecd.daemon.service import STATUS_NAME, Daemon
from devrecd.pipeline.journal import FAULT_ENV, Journal, JournalError, Recorder, VerdictLog

RATE = 32000


class UniformBackend:
    """A closed-set backend with no network: every window equally likely (the storage is under test)."""

    name, labels, concurrency, input_device = "uniform", ("p1", "p2"), 1, "cpu"

    def __init__(self, frontend) -> None:
        self.frontend = frontend

    def infer(self, x) -> np.ndarray:
        return np.full((len(x), len(self.labels)), 1 / len(self.labels), dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "model": "none"}

    def close(self) -> None:
        pass


def _recording(path: Path, seed: int) -> None:
    x = np.random.default_rng(seed).normal(0, 0.05, int(RATE * 2.5)).astype(np.float32)
    sf.write(path, x, RATE, subtype="PCM_16")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(what, timeout: float = 120, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := what()):
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def _records(state: Path) -> list[dict]:
    path = state / "verdicts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _start_daemon(cfg, ev: Path, monkeypatch) -> tuple[Daemon, threading.Thread, list[int]]:
    """A daemon with the uniform backend (retries at most 0.5 s apart) running in a thread; its exit
    code lands in the list."""
    monkeypatch.setattr("devrecd.daemon.service.load_served", lambda c, m, device: UniformBackend(c.frontend))
    monkeypatch.setattr("devrecd.pipeline.retry.STORAGE_RETRY_MAX_S", 0.5)
    daemon = Daemon(cfg, [str(ev)])
    out: list[int] = []
    runner = threading.Thread(target=lambda: out.append(daemon.run()), name="test-daemon")
    runner.start()
    return daemon, runner, out


def _fill_and_free(tmp_path: Path, monkeypatch, n_before: int, n_during: int, kind: str) -> None:
    ev, state, flag = tmp_path / "ev", tmp_path / "state", tmp_path / "storage-fault"
    ev.mkdir()
    monkeypatch.setenv(FAULT_ENV, f"{kind}:{flag}")
    cfg = load_config(None, env={}, overrides={"watch.state_dir": str(state), "watch.stable_seconds": 0.0,
                                               "metrics.port": 0, "watch.workers": 2, "watch.queue_size": 8})
    daemon, runner, out = _start_daemon(cfg, ev, monkeypatch)
    try:
        url = _wait(lambda: (state / STATUS_NAME).exists() and json.loads((state / STATUS_NAME).read_text())["url"])
        for i in range(n_before):
            _recording(ev / f"before-{i:03d}.wav", i)
        _wait(lambda: len(_records(state)) >= n_before)
        assert _get(url + "/readyz")[0] == 200
        flag.touch()  # the disk is full from here on
        for i in range(n_during):
            _recording(ev / f"during-{i:03d}.wav", 10_000 + i)
        status, body = _wait(lambda: (r := _get(url + "/readyz"))[0] == 503 and r)
        assert "cannot write the state folder" in body and ("disk is full" in body or "readonly" in body), body
        assert "devrecd_storage_writable 0.0" in _get(url + "/metrics")[1]
        time.sleep(1.5)  # several retries while the fault lasts
        names = {t.name for t in threading.enumerate()}
        assert "devrecd-watch" in names and "devrecd-writer" in names, names
        assert {f"devrecd-decode-{i}" for i in range(2)} <= names, names
        assert _get(url + "/healthz")[0] == 200  # alive, waiting on purpose
        stuck = len(_records(state))
        assert stuck < n_before + n_during
        _space_returns(url, state, flag.unlink, n_before + n_during)
    finally:
        daemon.request_stop()
        runner.join(timeout=60)
    assert out == [0]
    _assert_exactly_once(state, n_before + n_during)


def _space_returns(url: str, state: Path, free, n: int) -> None:
    """``free()`` gives the space back: ``n`` records come, the daemon is ready and writable again."""
    free()
    _wait(lambda: len(_records(state)) >= n)
    _wait(lambda: _get(url + "/readyz")[0] == 200)
    assert "devrecd_storage_writable 1.0" in _get(url + "/metrics")[1]
    time.sleep(1.0)  # nothing more arrives later (no second record)


def _assert_exactly_once(state: Path, n: int) -> None:
    """``n`` files, each with one judged record in the verdict log and one judged row in the journal."""
    records = _records(state)
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == n, "every file exactly once"
    assert {r["outcome"] for r in records} == {"judged"}, {r["outcome"] for r in records}
    journal = Journal.open_readonly(state / "journal.sqlite")
    try:
        assert journal.counts() == {"judged": n}
    finally:
        journal.close()


@pytest.mark.parametrize("kind", ["full", "readonly"])
def test_a_full_or_read_only_state_disk_pauses_the_daemon_and_loses_nothing(tmp_path, monkeypatch, kind) -> None:
    _fill_and_free(tmp_path, monkeypatch, n_before=5, n_during=25, kind=kind)


@pytest.mark.slow
def test_two_hundred_files_over_a_full_disk_each_get_exactly_one_record(tmp_path, monkeypatch) -> None:
    _fill_and_free(tmp_path, monkeypatch, n_before=20, n_during=200, kind="full")


def _start_on_unwritable_state(tmp_path: Path, monkeypatch, state: Path, space_returns, expect: str) -> None:
    """A daemon started while its state folder cannot be written: it serves /readyz 503 and
    ``devrecd_storage_writable 0`` with every thread of its own alive, watches nothing yet, and once
    ``space_returns()`` it starts by itself and records every file (present before it started or
    arrived meanwhile) exactly once."""
    ev = tmp_path / "ev"
    ev.mkdir()
    for i in range(3):
        _recording(ev / f"before-start-{i}.wav", i)
    cfg = load_config(None, env={}, overrides={"watch.state_dir": str(state), "watch.stable_seconds": 0.0,
                                               "metrics.port": 0, "watch.workers": 2})
    daemon, runner, out = _start_daemon(cfg, ev, monkeypatch)
    try:
        url = _wait(lambda: daemon.url)
        status, body = _wait(lambda: (r := _get(url + "/readyz"))[0] == 503 and "state folder" in r[1] and r)
        assert "cannot write the state folder" in body and expect in body, body
        assert "devrecd_storage_writable 0.0" in _get(url + "/metrics")[1]
        for i in range(4):
            _recording(ev / f"while-full-{i}.wav", 100 + i)
        time.sleep(1.5)  # several retries while the fault lasts
        assert runner.is_alive() and out == []
        assert _get(url + "/healthz")[0] == 200  # alive, waiting on purpose
        assert _get(url + "/readyz")[0] == 503 and _records(state) == []
        _space_returns(url, state, space_returns, 7)
    finally:
        daemon.request_stop()
        runner.join(timeout=60)
    assert out == [0]
    _assert_exactly_once(state, 7)


def test_a_daemon_started_on_a_full_disk_waits_not_ready_and_starts_when_space_returns(tmp_path, monkeypatch) -> None:
    """The journal cannot be opened at start (simulated full disk): the daemon does not fail, it
    waits not ready and starts by itself once space returns, losing and duplicating nothing."""
    flag = tmp_path / "storage-fault"
    flag.touch()
    monkeypatch.setenv(FAULT_ENV, f"full:{flag}")
    _start_on_unwritable_state(tmp_path, monkeypatch, tmp_path / "state", flag.unlink, "disk is full")


def test_a_daemon_started_on_a_real_full_tmpfs_starts_when_space_returns(tmp_path, monkeypatch) -> None:
    """The state folder on a real 5 MB tmpfs filled to the last byte before the daemon starts
    (skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        filler = mnt / "filler"
        _fill(filler)
        _start_on_unwritable_state(tmp_path, monkeypatch, mnt / "state", filler.unlink, "disk is full")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_daemon_asked_to_stop_while_its_state_cannot_be_written_exits_cleanly(tmp_path, monkeypatch) -> None:
    flag = tmp_path / "storage-fault"
    flag.touch()
    monkeypatch.setenv(FAULT_ENV, f"full:{flag}")
    (tmp_path / "ev").mkdir()
    cfg = load_config(None, env={}, overrides={"watch.state_dir": str(tmp_path / "state"), "metrics.port": 0})
    daemon, runner, out = _start_daemon(cfg, tmp_path / "ev", monkeypatch)
    url = _wait(lambda: daemon.url)
    _wait(lambda: _get(url + "/readyz")[0] == 503 and "state folder" in _get(url + "/readyz")[1])
    daemon.request_stop()
    runner.join(timeout=30)
    assert not runner.is_alive() and out == [0]


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_a_failed_write_changes_nothing_and_raises_the_journals_error(tmp_path, monkeypatch) -> None:
    """A transaction that fails is rolled back (no "cannot rollback" over the real error); a verdict
    line cut short is cut off the log again."""
    flag = tmp_path / "flag"
    monkeypatch.setenv(FAULT_ENV, f"full:{flag}")
    j = Journal(tmp_path / "journal.sqlite")
    log = VerdictLog(tmp_path / "verdicts.jsonl")
    e, _ = j.see("/ev/a.wav", 1, 1)
    flag.touch()
    with pytest.raises(JournalError, match="journal write failed: database or disk is full"):
        j.see("/ev/b.wav", 1, 1)
    with pytest.raises(JournalError, match="cannot append to the verdict log"):
        log.append({"id": 1})
    with pytest.raises(JournalError, match="disk is full"):
        Recorder(j, log).commit(e.id, "judged", {"path": "/ev/a.wav"})
    flag.unlink()
    assert j.latest("/ev/b.wav") is None and j.get(e.id).state == "seen"
    assert (tmp_path / "verdicts.jsonl").read_bytes() == b""
    assert Recorder(j, log).commit(e.id, "judged", {"path": "/ev/a.wav"}) is not None
    j.close()
    log.close()


def test_a_real_full_tmpfs_fails_writes_cleanly_and_recovers(tmp_path) -> None:
    """The journal on a real 5 MB tmpfs filled to the last byte (skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        j = Journal(mnt / "journal.sqlite")
        log = VerdictLog(mnt / "verdicts.jsonl")
        rec = Recorder(j, log)
        e, _ = j.see("/ev/first.wav", 1, 1)
        filler = mnt / "filler"
        _fill(filler)
        errors = []
        for i in range(50):  # enough rows to need a page the disk no longer has
            try:
                j.see(f"/ev/{'x' * 200}-{i}.wav", i, i)
                rec.commit(j.latest(f"/ev/{'x' * 200}-{i}.wav").id, "judged", {"path": i, "pad": "y" * 2000})
            except JournalError as exc:
                errors.append(str(exc))
                break
        assert errors and ("full" in errors[0] or "No space" in errors[0]), errors
        assert "cannot rollback" not in errors[0]
        filler.unlink()
        j.see("/ev/after.wav", 1, 1)  # space returned: the same journal writes again
        assert rec.commit(e.id, "judged", {"path": "/ev/first.wav"}) is not None
        j.close()
        log.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_setup_failures_are_judged_again_at_the_next_start_file_failures_are_not(tmp_path, monkeypatch) -> None:
    """A backend broken by the daemon's setup fails every file (``inference``); once fixed and
    restarted, those files are judged (their failures kept as history); a file's own failure
    (``corrupt``) is not retried."""
    from devrecd.backends.base import InferenceError

    class Broken(UniformBackend):
        def infer(self, x) -> np.ndarray:
            raise InferenceError("the model does not fit this configuration")

    ev, state = tmp_path / "ev", tmp_path / "state"
    ev.mkdir()
    for i in range(3):
        _recording(ev / f"r{i}.wav", i)
    (ev / "bad.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    cfg = load_config(None, env={}, overrides={"watch.state_dir": str(state), "watch.stable_seconds": 0.0,
                                               "metrics.enabled": False})

    def run(backend_cls, n: int) -> list[dict]:
        monkeypatch.setattr("devrecd.daemon.service.load_served", lambda c, m, device: backend_cls(c.frontend))
        daemon = Daemon(cfg, [str(ev)])
        t = threading.Thread(target=daemon.run, name="test-daemon")
        t.start()
        try:
            return _wait(lambda: len(r := _records(state)) >= n and r)
        finally:
            daemon.request_stop()
            t.join(timeout=60)

    first = run(Broken, 4)
    assert sorted(r["reason"] for r in first) == ["corrupt", "inference", "inference", "inference"]
    second = run(UniformBackend, 7)
    again = second[4:]
    assert sorted(r["path"] for r in again) == sorted(str(ev / f"r{i}.wav") for i in range(3))
    assert {r["outcome"] for r in again} == {"judged"} and all(len(r["supersedes"]) == 1 for r in again)
    time.sleep(0.5)
    assert len(_records(state)) == 7  # the corrupt file is not retried
    j = Journal.open_readonly(state / "journal.sqlite")
    try:
        assert [e.record["outcome"] for e in j.finished()].count("judged") == 3
        assert sorted(e.reason for e in j.finished() if e.state == "failed") == ["corrupt"]
    finally:
        j.close()
