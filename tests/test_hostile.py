"""The daemon against the hostile corpus (tests/hostile.py), and a kill between the journal commit
and the verdict-log append. Real daemon subprocess, real exported model, real files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from devrecd.config import AudioConfig
from devrecd.pipeline.journal import Journal
from tests.hostile import Expect, build
from tests.helpers import DaemonProc, ccnu_recordings

BOMB_CAP = 48000 * 30 * 8  # audio.max_decoded_samples for the run: the 60 s x 8 channel bomb is over it


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): type, size, mtime and content or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                what = ("file", h.hexdigest())
            else:
                what = ("other", stat.S_IFMT(st.st_mode))
            out[os.path.relpath(p, root)] = (*what, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


@pytest.mark.slow
def test_daemon_survives_the_hostile_corpus_and_records_every_entry_once(tmp_path: Path, ccnu_dir: Path,
                                                                         exported_model) -> None:
    ev, outside = tmp_path / "evidence", tmp_path / "outside"
    src = ccnu_recordings(ccnu_dir, 4)
    expect, _ = build(ev, src[:3], outside)
    # Queued (the journal has it, as after a crash), then replaced by a FIFO before it was read:
    # the restart's resume must refuse it, not block on it.
    queued = ev / "queued then fifo.wav"
    queued.write_bytes(src[3].read_bytes())
    st = queued.stat()
    (tmp_path / "state").mkdir()
    j = Journal(tmp_path / "state" / "journal.sqlite")
    j.see(str(queued), st.st_size, st.st_mtime_ns)
    j.close()
    os.mkfifo(ev / ".swap")
    os.rename(ev / ".swap", queued)
    expect["queued then fifo.wav"] = Expect("failed", "not_a_file", hashed=False)
    # Opened for writing, again and again, while the daemon's lease check looks at it.
    leased = ev / "opened for writing.wav"
    leased.write_bytes(src[3].read_bytes())
    expect["opened for writing.wav"] = Expect("judged")
    assert len({e.reason or e.outcome for e in expect.values()}) >= 10 and len(expect) >= 50
    before = _tree(ev)

    d = DaemonProc(tmp_path, ev, Path(exported_model))
    d.config.write_text(d.config.read_text() + f"[audio]\nmax_decoded_samples = {BOMB_CAP}\n")
    stop_writer = threading.Event()
    opened = [0]

    def writer() -> None:
        while not stop_writer.is_set():
            for p in (leased, ev / "good one.wav"):
                os.close(os.open(p, os.O_WRONLY))  # no write: content and mtime stay as they are
                opened[0] += 1
            time.sleep(0.002)

    d.start()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        d.wait_records(len(expect), timeout=300)
        stop_writer.set()
        t.join(5)
        d.wait_drained()  # nothing more is waiting or in flight: nothing more may arrive
        recs = d.records()
        assert d.proc.poll() is None, "the daemon must stay up"
        peak = _peak_rss_mb(d.proc.pid)
    finally:
        stop_writer.set()
        code = d.stop()
    assert code == 0, d.log_path.read_text()[-3000:]
    assert opened[0] > 100

    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(os.path.relpath(r["path"], ev), []).append(r)
    assert set(by) == set(expect), f"missing {set(expect) - set(by)}, unexpected {set(by) - set(expect)}"
    for name, e in expect.items():
        got = by[name]
        assert len(got) == 1, f"{name!r}: {len(got)} records"
        r = got[0]
        assert r["outcome"] == e.outcome, (name, r.get("reason"), r.get("detail"))
        if e.outcome == "failed":
            assert r["reason"] == e.reason, (name, r["reason"], r["detail"])
            assert r["detail"]
        kind, content, size = before[name][0], before[name][1], before[name][2]
        if kind == "link" and e.outcome != "failed":  # followed inside the tree: the target's bytes, and its path
            target = os.path.relpath(os.path.realpath(ev / name), os.path.realpath(ev))
            assert r["resolved_path"] == os.path.realpath(ev / name), name
            kind, content, size = before[target][0], before[target][1], before[target][2]
        if e.hashed:
            assert kind == "file" and r["sha256"] == content and r["size"] == size, name
        else:
            assert r["sha256"] is None, name
        for flag in e.flags:
            assert flag in r["levels"]["flags"], (name, r["levels"])
    assert by["leaves the tree.wav"][0]["detail"].count(str(outside)) == 1, "the link's target is named"
    assert peak < 1536, f"daemon peak RSS {peak:.0f} MB under the hostile corpus"
    assert _tree(ev) == before, "the evidence tree must be byte-, mode- and mtime-identical"
    log = d.log_path.read_text()
    assert "Traceback" not in log and '"event": "internal error' not in log


def test_kill_between_journal_commit_and_log_append_is_repaired_on_restart(tmp_path: Path, ccnu_dir: Path,
                                                                           exported_model) -> None:
    """The daemon is SIGKILLed at the injected point (DEVRECD_TEST_KILL_AT): the verdict is in the journal,
    not in the log. The restart appends it exactly once and judges nothing again."""
    ev = tmp_path / "evidence"
    ev.mkdir()
    src = ccnu_recordings(ccnu_dir, 1)[0]
    (ev / "one.wav").write_bytes(src.read_bytes())
    d = DaemonProc(tmp_path, ev, Path(exported_model), workers=1)
    d.start(env={"DEVRECD_TEST_KILL_AT": "after_journal_commit"})
    assert d.proc.wait(timeout=120) == -signal.SIGKILL
    d.log.close()
    assert d.records() == []
    j = Journal.open_readonly(tmp_path / "state" / "journal.sqlite")
    try:
        [row] = j.unlogged()
        assert row.state == "judged" and row.path == str(ev / "one.wav")
    finally:
        j.close()
    d2 = DaemonProc(tmp_path, ev, Path(exported_model)).start()
    try:
        d2.wait_records(1)
        d2.wait_drained()
        recs = d2.records()
    finally:
        assert d2.stop() == 0
    assert len(recs) == 1 and recs[0]["id"] == row.id and recs[0]["outcome"] == "judged"
    assert recs[0] == row.record, "the line appended is the record committed before the kill"
    events = [json.loads(x) for x in d2.log_path.read_text().splitlines() if x.startswith("{")]
    repaired = [x for x in events if x["event"].startswith("appended verdicts a crash kept out")]
    assert repaired and repaired[-1]["count"] == 1
    j = Journal(tmp_path / "state" / "journal.sqlite")
    try:
        assert j.counts() == {"judged": 1} and j.unlogged() == []
    finally:
        j.close()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_every_hostile_class_gets_its_reason_from_the_intake_alone(tmp_path: Path, ccnu_dir: Path) -> None:
    """The same corpus through read_evidence + the feature stage (no daemon): fast, and names the class
    that regressed when the daemon test fails. No entry computes on samples it is then refused for:
    a RuntimeWarning (an overflow in the frontend) fails the test."""
    from devrecd.audio import AudioError, open_stream
    from devrecd.config import load_config
    from devrecd.stages import stream_features

    ev = tmp_path / "evidence"
    expect, _ = build(ev, ccnu_recordings(ccnu_dir, 3), tmp_path / "outside")
    cfg = load_config(None, env={}).with_overrides({"audio.max_decoded_samples": BOMB_CAP})
    assert isinstance(cfg.audio, AudioConfig)
    wrong = []
    for name, e in sorted(expect.items()):
        try:
            with open_stream(ev / name, cfg.frontend.sample_rate, cfg.audio, confine=[str(ev)]) as s:
                stream_features(s, cfg)
                got = ("judged", None, s.describe()["levels"]["flags"])
        except AudioError as exc:
            got = ("failed", exc.reason, exc.sha256 is not None)
        want = ("judged" if e.outcome == "duplicate" else e.outcome, e.reason)
        if got[:2] != want or (e.outcome == "failed" and got[2] != e.hashed) or not set(e.flags) <= set(
                got[2] if got[0] == "judged" else ()):
            wrong.append((name, want, got))
    assert not wrong, wrong


def test_absurd_float_samples_are_refused_before_any_computation(tmp_path: Path) -> None:
    """The corpus's ``1e30.wav`` (finite float samples 1e30 times a speech level): refused as it is
    decoded, with the reason and a detail that says why, before any level, condition or feature is
    computed on it (those overflowed float32: RuntimeWarnings in the frontend's power sum, mel product
    and level division). Warnings are errors here."""
    import re
    import warnings

    import numpy as np

    from devrecd.audio import NonFiniteAudio, open_stream, read_evidence
    from devrecd.config import load_config
    from devrecd.stages import stream_features
    from tests.hostile import SR, _speechlike, _wav

    cfg = load_config(None, env={})
    path = _wav(tmp_path / "1e30.wav", _speechlike(4, 6) * 1e30, subtype="FLOAT")
    near = _wav(tmp_path / "1e9.wav", _speechlike(4, 6) * 1e9, subtype="FLOAT")  # below the bound: judged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteAudio) as exc, open_stream(path, SR, cfg.audio) as s:
            stream_features(s, cfg)
        with pytest.raises(NonFiniteAudio, match="out-of-range"):
            read_evidence(path, SR, cfg.audio)
        with open_stream(near, SR, cfg.audio) as s:
            feats, _ = stream_features(s, cfg)
            assert np.isfinite(feats).all() and "over_full_scale" in s.describe()["levels"]["flags"]
    assert exc.value.reason == "nonfinite" and exc.value.sha256 is not None  # the bytes read are named
    assert re.fullmatch(r"\d+ out-of-range sample\(s\) in the block at 0\.00 s: float values up to 2\.11e\+29, "
                        r"beyond \+-1e\+10 \(full scale is 1\.0\): no recording holds them", exc.value.detail)
    assert "features" not in exc.value.detail  # not the frontend's overflow, refused before it


@pytest.mark.parametrize("watcher_first", [False, True], ids=["failed-then-seen", "seen-while-queued"])
def test_a_queued_file_replaced_by_a_fifo_gets_one_record(tmp_path: Path, ccnu_dir: Path, exported_model,
                                                          watcher_first: bool) -> None:
    """Queued (its version in the journal), then replaced by a FIFO before it was opened: the worker
    refuses what it finds, and the watcher seeing that FIFO, before or after, makes no second row."""
    from devrecd.config import load_config
    from devrecd.pipeline.runner import Pipeline
    from devrecd.pipeline.serving import load_serving_backend
    from devrecd.metrics import Metrics

    ev = tmp_path / "evidence"
    ev.mkdir()
    path = ev / "v.wav"
    path.write_bytes(ccnu_recordings(ccnu_dir, 1)[0].read_bytes())
    st = path.stat()
    journal = Journal(tmp_path / "journal.sqlite")
    journal.see(str(path), st.st_size, st.st_mtime_ns)
    os.mkfifo(ev / ".swap")
    os.rename(ev / ".swap", path)
    fifo = os.lstat(path)
    cfg = load_config(None, env={}).with_overrides({"backend.model": str(exported_model), "backend.device": "cpu",
                                                    "watch.workers": 1})
    backend = load_serving_backend(cfg)
    records: list[dict] = []
    pipeline = Pipeline(cfg, backend, journal=journal, verdict_log=None, metrics=Metrics(),
                        on_record=records.append, roots=[str(ev)])
    try:
        assert pipeline.resume() == 1
        if watcher_first:  # the watcher sees the FIFO while the queued version waits for a worker
            assert pipeline.submit(str(path), fifo.st_size, fifo.st_mtime_ns) is None
        pipeline.start()
        assert pipeline.drain(60)
        if not watcher_first:  # ... or once its failure is recorded
            assert pipeline.submit(str(path), fifo.st_size, fifo.st_mtime_ns) is None
            assert pipeline.drain(10)
    finally:
        pipeline.stop()
        backend.close()
    try:
        assert [(r["outcome"], r["reason"]) for r in records] == [("failed", "not_a_file")], records
        assert journal.counts() == {"failed": 1}
        row = journal.latest(str(path))
        assert (row.size, row.mtime_ns) == (fifo.st_size, fifo.st_mtime_ns), "the row names what was examined"
    finally:
        journal.close()


def test_identify_refuses_a_fifo_at_once_and_judges_the_file_beside_it(tmp_path: Path, ccnu_dir: Path,
                                                                         exported_model) -> None:
    """`devrecd identify p.wav` on a FIFO with no writer used to block forever in open()."""
    from devrecd.config import load_config
    from devrecd.pipeline.identify import identify_files

    os.mkfifo(tmp_path / "p.wav")
    good = ccnu_recordings(ccnu_dir, 1)[0]
    cfg = load_config(None, env={}).with_overrides({"backend.model": str(exported_model), "backend.device": "cpu"})
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(out=identify_files(cfg, [tmp_path / "p.wav", good])), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "identify blocked on a FIFO"
    fifo, judged = box["out"]
    assert (fifo["outcome"], fifo["reason"], fifo["sha256"]) == ("failed", "not_a_file", None)
    assert "FIFO" in fifo["detail"] and judged["outcome"] == "judged"
