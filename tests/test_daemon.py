"""Daemon parts on real files and threads: batcher, verdict aggregation, watcher, metrics, notify, HTTP.

The end-to-end tests (the daemon as a subprocess with a real exported model) are further down.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from devrecd.config import WatchConfig
from devrecd.errors import ConfigError
from devrecd.pipeline.batcher import Batcher, Unit
from devrecd.pipeline.journal import Journal
from devrecd.daemon.http import StatusServer
from devrecd.daemon.notify import WatchdogPinger, notify, watchdog_interval
from devrecd.pipeline.runner import Liveness
from devrecd.pipeline.verdict import aggregate, judged_record, top_k
from devrecd.audio.files import wanted
from devrecd.daemon.watcher import Watcher, fs_type, needs_polling, open_for_writing
from devrecd.metrics import Metrics
from tests.helpers import DaemonProc, ccnu_recordings, free_port, metric_sample

LABELS = ("a", "b", "c")


def _softmax_of_means(x: np.ndarray) -> np.ndarray:
    """A deterministic per-clip function (a stand-in network for batching tests only)."""
    z = np.stack([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, 0, 0]], axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --- batcher ---------------------------------------------------------------------------------------

def test_batcher_batches_across_files_and_gathers_in_order() -> None:
    rng = np.random.default_rng(0)
    sizes = [3, 50, 1, 8, 13]
    units = [Unit(key=i, features=rng.standard_normal((n, 128, 73)).astype(np.float32)) for i, n in enumerate(sizes)]
    batches: list[int] = []
    b = Batcher(_softmax_of_means, max_batch=8, max_wait_s=0.01, queue_size=2,
                on_batch=lambda n, dt: batches.append(n))
    stop = threading.Event()
    delivered: list[Unit] = []
    t = threading.Thread(target=b.run, args=(stop, delivered.append, lambda u, e: pytest.fail(str(e))))
    t.start()
    for u in units:  # queue_size=2: put blocks while inference catches up (backpressure)
        assert b.put(u, stop)
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive()
    assert sorted(u.key for u in delivered) == list(range(len(sizes)))
    for u in delivered:
        np.testing.assert_allclose(u.probs, _softmax_of_means(u.features), rtol=1e-6)
        assert u.done == len(u)
    assert sum(batches) == sum(sizes) and max(batches) == 8
    assert len(batches) < len(sizes) + sum(sizes) // 8, "small units must share batches"


def test_batcher_routes_a_units_results_to_its_own_callback() -> None:
    """A second source (live input) shares batches with files but gets its own results."""
    b = Batcher(_softmax_of_means, max_batch=8, max_wait_s=0.0)
    mine: list[Unit] = []
    live = Unit(key="live-window", features=np.ones((1, 128, 73), np.float32), on_done=mine.append)
    b.put(Unit(key="file", features=np.zeros((3, 128, 73), np.float32)))
    b.put(live)
    stop = threading.Event()
    stop.set()
    files: list[Unit] = []
    b.run(stop, files.append, lambda u, e: pytest.fail(str(e)))
    assert [u.key for u in files] == ["file"] and mine == [live]
    np.testing.assert_allclose(live.probs, _softmax_of_means(live.features), rtol=1e-6)


def test_batcher_flushes_a_full_batch_without_waiting_and_a_partial_one_after_max_wait() -> None:
    stop = threading.Event()
    b = Batcher(_softmax_of_means, max_batch=4, max_wait_s=3600.0)
    b.put(Unit(key="full", features=np.zeros((4, 128, 73), np.float32)))
    parts = b.next_batch(stop)  # max_wait is an hour: returning at all proves the size flush
    assert [(u.key, lo, hi) for u, lo, hi in parts] == [("full", 0, 4)]
    b.configure(max_batch=4, max_wait_s=0.02)
    b.put(Unit(key="lone", features=np.zeros((1, 128, 73), np.float32)))
    parts = b.next_batch(stop)
    assert [(u.key, lo, hi) for u, lo, hi in parts] == [("lone", 0, 1)]
    stop.set()
    assert b.next_batch(stop) == []


def test_a_wake_up_ends_a_waiting_inference_loop_after_what_was_queued_before_it() -> None:
    """After stop, wake() returns a thread waiting on the empty queue at once instead of at its next
    poll (an hour here), and units queued before the wake-ups are still inferred, in order."""
    stop = threading.Event()
    b = Batcher(_softmax_of_means, max_batch=2, max_wait_s=0.0)
    got: list = []
    t = threading.Thread(target=lambda: got.append(b.next_batch(stop, poll=3600.0)))
    t.start()
    time.sleep(0.1)  # now waiting on the empty queue
    stop.set()
    b.wake(1)
    t.join(timeout=60)
    assert not t.is_alive() and got == [[]]

    stop = threading.Event()
    b = Batcher(_softmax_of_means, max_batch=2, max_wait_s=0.0)
    for key, n in (("a", 3), ("b", 1)):
        assert b.put(Unit(key=key, features=np.full((n, 128, 73), float(n), np.float32)), stop)
    stop.set()
    b.wake(2)
    delivered: list[Unit] = []
    b.run(stop, delivered.append, lambda u, e: pytest.fail(str(e)))
    assert [u.key for u in delivered] == ["a", "b"] and all(u.done == len(u) for u in delivered)


def test_batcher_backend_error_fails_the_units_not_the_loop() -> None:
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return _softmax_of_means(x)

    b = Batcher(flaky, max_batch=2, max_wait_s=0.0)
    stop = threading.Event()
    ok, bad = [], []
    b.put(Unit(key="first", features=np.zeros((2, 128, 73), np.float32)))
    b.put(Unit(key="second", features=np.ones((2, 128, 73), np.float32)))
    stop.set()
    b.run(stop, ok.append, lambda u, e: bad.append((u.key, str(e))))
    assert bad == [("first", "device lost")] and [u.key for u in ok] == ["second"]


def test_batcher_with_parallel_inference_threads_delivers_every_unit_once_in_order() -> None:
    """Several inference threads share one batcher (one ORT session per core): units split across
    batches that finish in any order are gathered back exactly, and each is delivered once."""
    rng = np.random.default_rng(1)
    sizes = [5, 17, 1, 9, 30, 2, 11, 4]
    units = [Unit(key=i, features=rng.standard_normal((n, 128, 73)).astype(np.float32)) for i, n in enumerate(sizes)]
    in_flight, overlap = [0], [0]
    guard = threading.Lock()

    def slow(x: np.ndarray) -> np.ndarray:
        with guard:
            in_flight[0] += 1
            overlap[0] = max(overlap[0], in_flight[0])
        time.sleep(0.02 * rng.random())  # batches finish out of order
        with guard:
            in_flight[0] -= 1
        return _softmax_of_means(x)

    b = Batcher(slow, max_batch=4, max_wait_s=0.005, queue_size=3)
    stop = threading.Event()
    delivered: list[Unit] = []
    threads = [threading.Thread(target=b.run, args=(stop, delivered.append, lambda u, e: pytest.fail(str(e))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for u in units:
        assert b.put(u, stop)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(u.key for u in delivered) == list(range(len(sizes)))  # each exactly once
    for u in delivered:
        np.testing.assert_allclose(u.probs, _softmax_of_means(u.features), rtol=1e-6)
    assert overlap[0] >= 2, "batches never ran at the same time"


def test_batcher_parallel_failure_fails_a_split_unit_once() -> None:
    """A unit split over batches inferred by different threads, all of which fail: one error."""
    def broken(x: np.ndarray) -> np.ndarray:
        time.sleep(0.05)  # long enough for the other thread to take the unit's next batch
        raise RuntimeError("device lost")

    b = Batcher(broken, max_batch=2, max_wait_s=0.0)
    stop = threading.Event()
    b.put(Unit(key="big", features=np.zeros((8, 128, 73), np.float32)))
    errors: list[str] = []
    threads = [threading.Thread(target=b.run, args=(stop, lambda u: pytest.fail("delivered"),
                                                    lambda u, e: errors.append(u.key))) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while not errors and time.time() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert errors == ["big"]


def test_inference_streams_auto_explicit_and_capped_by_the_backend() -> None:
    from types import SimpleNamespace

    from devrecd.config import load_config
    from devrecd.pipeline.runner import inference_streams

    cores = len(os.sched_getaffinity(0))
    any_, one = SimpleNamespace(concurrency=None), SimpleNamespace(concurrency=1)
    auto = load_config(None, env={})
    assert inference_streams(auto, any_) == max(1, cores // auto.backend.threads)  # one per core per ORT thread
    assert inference_streams(load_config(None, env={}, overrides={"backend.threads": cores}), any_) == 1
    three = load_config(None, env={}, overrides={"batcher.streams": 3})
    assert inference_streams(three, any_) == 3
    assert inference_streams(three, one) == 1  # TensorRT / torch: one execution at a time
    with pytest.raises(ConfigError, match="batcher.streams must be >= 0"):
        load_config(None, env={}, overrides={"batcher.streams": -1})


# --- verdicts --------------------------------------------------------------------------------------

def test_aggregate_is_mean_log_prob() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]], np.float32)
    s = aggregate(p, LABELS)
    np.testing.assert_allclose(s.mean_log_prob, np.log(p).mean(axis=0), rtol=1e-6)
    g = np.exp(np.log(p).mean(axis=0))
    # Mean log-prob, not mean prob: the mean probability would pick "a" (0.47 vs 0.43), but the
    # window that is sure it is not "a" (0.1) weighs more than two mild votes for it.
    assert p.mean(axis=0).argmax() == 0
    assert s.label == "b" and s.score == pytest.approx(g[1] / g.sum(), rel=1e-6)
    assert s.probs.sum() == pytest.approx(1.0)
    assert [c["device"] for c in top_k(s, LABELS, 2)] == ["b", "a"]
    assert list(s.window_labels) == [0, 1, 0]
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 3)), LABELS)


def test_judged_record_has_provenance_and_windows() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]], np.float32)
    rec = judged_record({"path": "/e/x.wav", "sha256": "f" * 64, "duration": 4.0}, p, LABELS, [0.0, 2.0], k=2,
                        backend={"name": "onnxruntime", "model_sha256": "m", "contract_sha256": "c"},
                        timings={"decode": 0.01})
    assert rec["outcome"] == "judged" and rec["sha256"] == "f" * 64 and len(rec["top_k"]) == 2
    assert [(w["start"], w["device"]) for w in rec["windows"]] == [(0.0, "a"), (2.0, "b")]
    assert rec["model_sha256"] == "m" and rec["backend"] == "onnxruntime" and rec["software_version"]


# --- watcher ---------------------------------------------------------------------------------------

def test_wanted_filters_extensions_and_partial_names() -> None:
    cfg = WatchConfig()
    assert wanted("/e/call 1 – Ünïcode.WAV", cfg)
    assert wanted("/e/x.m4a", cfg)
    for name in ("x.txt", ".x.wav", "x.wav.part", "x.part", "~x.wav", "x.wav~", "x.tmp"):
        assert not wanted(f"/e/{name}", cfg), name


def test_fs_type_and_polling_decision(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/x {tmp_path} nfs4 rw 0 0\n")
    assert fs_type(tmp_path / "sub", mounts=str(mounts)) == "nfs4"
    assert fs_type("/usr", mounts=str(mounts)) == "ext4"
    assert needs_polling(tmp_path, "always") and not needs_polling(tmp_path, "never")
    assert needs_polling(tmp_path / "sub", "auto", mounts=str(mounts)), "NFS is polled"
    assert not needs_polling("/usr", "auto", mounts=str(mounts)), "a local ext4 is watched with inotify"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nsshfs#me@h: {tmp_path} fuse.sshfs rw 0 0\n")
    assert needs_polling(tmp_path, "auto", mounts=str(mounts)), "FUSE is polled"
    with pytest.raises(ConfigError):
        needs_polling(tmp_path, "sometimes")


def test_open_for_writing_sees_a_writer(tmp_path: Path) -> None:
    p = tmp_path / "x.wav"
    with open(p, "wb") as fh:
        fh.write(b"x")
        fh.flush()
        assert open_for_writing(str(p)) is True
    assert open_for_writing(str(p)) is False


def test_writers_opening_files_under_the_lease_check_never_kill_the_process(tmp_path: Path) -> None:
    """A read lease makes the kernel signal its holder when a writer opens the file (SIGIO by default,
    which terminates Python). A child checks files in a tight loop while this process opens them for
    writing thousands of times; the child must survive and finish normally."""
    import textwrap

    files = [tmp_path / f"{i}.wav" for i in range(4)]
    for f in files:
        f.write_bytes(b"x" * 1000)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from devrecd.daemon.watcher import open_for_writing
        files = {[str(f) for f in files]!r}
        end, n = time.time() + 4.0, 0
        while time.time() < end:
            for f in files:
                open_for_writing(f)
                n += 1
        print(n)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    opened = 0
    while child.poll() is None:
        for f in files:
            fd = os.open(f, os.O_WRONLY)  # what rsync or a copy tool does
            os.close(fd)
            opened += 1
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, f"killed by signal {-child.returncode}: {err.decode()[-500:]}"
    assert int(out) > 1000 and opened > 1000


def test_watcher_hands_over_every_audio_named_entry_that_is_not_a_plain_file(tmp_path: Path) -> None:
    """FIFOs, sockets, folders named x.wav, link loops, dangling, device and external links are handed
    over at once (the pipeline records each with its reason); a link out of the tree is never waited on."""
    ev, outside = tmp_path / "evidence", tmp_path / "outside"
    ev.mkdir(), outside.mkdir()
    os.mkfifo(ev / "pipe.wav")
    (ev / "folder.wav").mkdir()
    os.symlink(ev / "loop2.wav", ev / "loop1.wav")
    os.symlink(ev / "loop1.wav", ev / "loop2.wav")
    os.symlink(ev / "nothing", ev / "dangling.wav")
    os.symlink("/dev/zero", ev / "zero.wav")
    (outside / "t.wav").write_bytes(b"x" * 100)
    os.symlink(outside / "t.wav", ev / "external.wav")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(ev / "sock.wav"))
    got: list[str] = []
    w = Watcher([ev], WatchConfig(stable_seconds=30.0, polling="never"), lambda p, s, m: got.append(os.path.basename(p)))
    w.start()
    try:
        w.wait_scanned(10)
        deadline = time.time() + 10
        while len(got) < 8 and time.time() < deadline:
            time.sleep(0.05)
        os.mkfifo(ev / "late.wav")  # appears while watching (inotify)
        while len(got) < 9 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
        sock.close()
    assert sorted(got) == sorted(["pipe.wav", "folder.wav", "loop1.wav", "loop2.wav", "dangling.wav", "zero.wav",
                                  "external.wav", "sock.wav", "late.wav"])


def _cut_off(client: socket.socket) -> bool:
    """The server has closed this client's connection (EOF or reset waiting to be read)."""
    client.setblocking(False)
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_status_server_answers_head_drops_idle_clients_and_caps_connections() -> None:
    m = Metrics(CollectorRegistry())
    srv = StatusServer(m.registry, "127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ready"),
                       timeout=0.5, max_connections=4)
    srv.start()
    host, port = "127.0.0.1", srv.port
    idle = []
    try:
        req = urllib.request.Request(srv.url + "/metrics", method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
        before = threading.active_count()
        for _ in range(50):  # half-open requests: connected, never finish their headers
            c = socket.create_connection((host, port), timeout=5)
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
            idle.append(c)
        # The server takes them one by one, cutting off the oldest reader for each one past
        # max_connections: wait until it has taken all 50 (46 cut off) and only 4 threads serve.
        # The 4 still open show that the cap cut the others, not the idle timeout (which cuts all).
        def settled() -> bool:
            return sum(map(_cut_off, idle)) >= 46 and threading.active_count() - before <= 4

        deadline = time.monotonic() + 10
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert settled() and sum(map(_cut_off, idle)) < 50, "at most max_connections threads"
        # Past the socket timeout (0.5 s) the idle ones are dropped and the server serves again.
        deadline = time.time() + 10
        while threading.active_count() - before > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert threading.active_count() - before <= 1
        assert urllib.request.urlopen(srv.url + "/healthz", timeout=5).status == 200
    finally:
        for c in idle:
            c.close()
        srv.stop()


def test_text_log_values_are_escaped(capsys) -> None:
    import logging

    from devrecd.logs import setup_logging

    setup_logging("INFO", "text")
    logging.getLogger("devrecd.test").warning("cannot judge file", extra={
        "path": "/ev/a.wav\n2026-01-01T00:00:00.000Z info devrecd.daemon judged device=forged", "reason": "corrupt"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert 'path="/ev/a.wav\\n2026' in err and " reason=corrupt" in err


def test_batcher_bounds_the_clips_it_holds() -> None:
    b = Batcher(_softmax_of_means, max_batch=4, max_wait_s=0.0, queue_size=100, max_clips=10)
    stop = threading.Event()
    assert b.put(Unit(key=0, features=np.zeros((6, 128, 73), np.float32)), stop)
    t0 = time.monotonic()
    stop_later = threading.Timer(0.5, stop.set)
    stop_later.start()
    assert not b.put(Unit(key=1, features=np.zeros((6, 128, 73), np.float32)), stop), "12 clips > 10: must wait"
    assert time.monotonic() - t0 >= 0.4
    stop_later.join()
    # Inference frees room; a unit bigger than the cap still enters an empty queue.
    done: list[Unit] = []
    b.run(stop, done.append, lambda u, e: pytest.fail(str(e)))
    assert [u.key for u in done] == [0]
    assert b.put(Unit(key=2, features=np.zeros((25, 128, 73), np.float32)), threading.Event())


def test_a_failed_batch_frees_the_room_of_the_windows_it_drops() -> None:
    """A unit larger than a batch fails on its first batch: its windows still queued are dropped, and
    their room is given back (else the count stays high and a later big unit waits forever)."""
    b = Batcher(lambda x: (_ for _ in ()).throw(RuntimeError("backend down")), max_batch=4, max_wait_s=0.0,
                queue_size=100, max_clips=16)
    assert b.put(Unit(key="big", features=np.zeros((12, 128, 73), np.float32)), threading.Event())
    stop = threading.Event()
    stop.set()
    failed: list[str] = []
    b.run(stop, lambda u: pytest.fail("delivered"), lambda u, e: failed.append(u.key))
    assert failed == ["big"]
    stop_later = threading.Timer(2.0, stop.set)
    stop.clear()
    stop_later.start()
    try:  # 9 clips after a freed queue enter at once (with 8 clips leaked they would wait for `stop`)
        assert b.put(Unit(key="next", features=np.zeros((9, 128, 73), np.float32)), stop)
        assert not stop.is_set()
    finally:
        stop_later.cancel()


def test_non_finite_features_never_reach_the_backend() -> None:
    called = []
    b = Batcher(lambda x: called.append(x) or _softmax_of_means(x), max_batch=8, max_wait_s=0.0)
    bad = np.zeros((2, 128, 73), np.float32)
    bad[1, 5, 5] = np.nan
    b.put(Unit(key="bad", features=bad))
    stop = threading.Event()
    stop.set()
    failed: list[str] = []
    b.run(stop, lambda u: pytest.fail("delivered"), lambda u, e: failed.append(str(e)))
    assert not called and failed and "non-finite" in failed[0]


def _slow_copy(src: bytes, dst: Path, chunks: int = 8, pause: float = 0.15) -> None:
    with open(dst, "wb") as fh:
        step = -(-len(src) // chunks)
        for i in range(0, len(src), step):
            fh.write(src[i:i + step])
            fh.flush()
            time.sleep(pause)


@pytest.mark.parametrize("polling", ["never", "always"])
def test_watcher_takes_files_only_when_stable(tmp_path: Path, polling: str) -> None:
    ev = tmp_path / "evidence"
    (ev / "sub dir").mkdir(parents=True)
    (ev / "already there.wav").write_bytes(b"a" * 1000)
    got: list[tuple[str, int, float]] = []
    cfg = WatchConfig(stable_seconds=0.3, polling=polling, poll_interval=0.1)
    w = Watcher([ev], cfg, lambda p, s, m: got.append((p, s, time.time())))
    w.start()
    try:
        assert w.wait_scanned(10)
        payload = os.urandom(40_000)
        target = ev / "sub dir" / "ñame – slow.wav"
        _slow_copy(payload, target)  # written over ~1.2 s, longer than stable_seconds
        closed_at = time.time()
        (ev / "ignored.wav.part").write_bytes(b"x" * 10)
        (ev / "notes.txt").write_bytes(b"x" * 10)
        deadline = time.time() + 10
        while len(got) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    by_path = {os.path.basename(p): (s, t) for p, s, t in got}
    assert set(by_path) == {"already there.wav", "ñame – slow.wav"}
    size, taken = by_path["ñame – slow.wav"]
    assert size == len(payload), "a file must not be taken while it is still being written"
    assert taken >= closed_at
    assert w.pending() == 0


def test_watcher_reports_a_file_that_vanishes_before_it_is_stable(tmp_path: Path) -> None:
    gone: list[str] = []
    w = Watcher([tmp_path], WatchConfig(stable_seconds=5.0), lambda *a: pytest.fail("must not submit"),
                lambda p, s, m: gone.append(p))
    w.start()
    try:
        w.wait_scanned(10)
        p = tmp_path / "brief.wav"
        p.write_bytes(b"x" * 100)
        deadline = time.time() + 5
        while w.pending() == 0 and time.time() < deadline:
            time.sleep(0.05)
        p.unlink()
        while not gone and time.time() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert gone == [str(p)]


# --- metrics, notify, HTTP -------------------------------------------------------------------------

def test_metrics_names_on_a_fresh_registry() -> None:
    m = Metrics(CollectorRegistry())
    m.files.labels(outcome="judged").inc()
    m.errors.labels(reason="corrupt").inc(2)
    m.stage_seconds.labels(stage="decode").observe(0.2)
    m.set_backend({"name": "onnxruntime", "version": "1.2", "device": "cpu", "model_sha256": "m", "contract_sha256": "c"})
    r = m.registry
    assert r.get_sample_value("devrecd_files_total", {"outcome": "judged"}) == 1
    assert r.get_sample_value("devrecd_files_total", {"outcome": "failed"}) == 0
    assert r.get_sample_value("devrecd_errors_total", {"reason": "corrupt"}) == 2
    assert r.get_sample_value("devrecd_stage_seconds_count", {"stage": "decode"}) == 1
    assert r.get_sample_value("devrecd_backend_info", {"backend": "onnxruntime", "version": "1.2", "device": "cpu",
                                                       "model_sha256": "m", "contract_sha256": "c"}) == 1
    assert r.get_sample_value("devrecd_ready") == 0
    assert r.get_sample_value("devrecd_live_overruns_total", {"kind": "ring_overflow"}) == 0
    # Two daemons (or tests) in one process do not collide: Metrics() without a registry makes its
    # own, never prometheus_client's global one (a second daemon would raise Duplicated timeseries).
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()
    a.files.labels(outcome="judged").inc()
    assert a.registry is not b.registry and a.registry is not REGISTRY and b.registry is not REGISTRY
    assert b.registry.get_sample_value("devrecd_files_total", {"outcome": "judged"}) == 0
    assert REGISTRY.get_sample_value("devrecd_ready") is None


def test_sd_notify_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert srv.recv(100) == b"READY=1"
        assert not notify("READY=1", {})
        assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
        assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
        # Pings follow progress: a stale liveness withholds them.
        live = Liveness()
        sent: list[str] = []
        pinger = WatchdogPinger(live, 0.05, max_age=0.3, send=sent.append)
        pinger.start()
        time.sleep(0.2)
        assert "WATCHDOG=1" in sent
        time.sleep(0.3)  # no stamp for longer than max_age
        n = len(sent)
        time.sleep(0.3)
        assert len(sent) == n and pinger.missed > 0
        live.stamp()
        time.sleep(0.2)
        pinger.stop()
        assert len(sent) > n


def test_status_server_serves_metrics_and_probes() -> None:
    m = Metrics(CollectorRegistry())
    ready = {"ok": False}
    srv = StatusServer(m.registry, "127.0.0.1", 0, healthy=lambda: (True, "ok"),
                       ready=lambda: (ready["ok"], "ready" if ready["ok"] else "starting"))
    srv.start()
    try:
        body = urllib.request.urlopen(srv.url + "/metrics", timeout=5).read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"devrecd_files", "devrecd_stage_seconds", "devrecd_queue_depth", "devrecd_build_info"} <= names
        assert urllib.request.urlopen(srv.url + "/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/readyz", timeout=5)
        assert exc.value.code == 503
        ready["ok"] = True
        assert urllib.request.urlopen(srv.url + "/readyz", timeout=5).status == 200
    finally:
        srv.stop()


# --- end to end: the daemon as a subprocess, real files, real model, real clients ----------------

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import soundfile as sf  # noqa: E402

SR = 32000


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def served_model(exported_model) -> Path:
    """The exported ONNX model of the session (the ``exported_model`` fixture)."""
    return Path(exported_model)


@pytest.mark.slow
def test_daemon_judges_good_files_and_records_every_bad_one(tmp_path: Path, ccnu_dir: Path, served_model: Path) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    src = ccnu_recordings(ccnu_dir, 3)
    shutil.copy(src[0], ev / "already here.wav")  # before start: the initial scan
    d = DaemonProc(tmp_path, ev, served_model).start()
    try:
        status, body = d.get("/readyz")
        assert status == 200, body
        # Good files: a slow copy (partial writes over ~1.5 s), spaces + unicode, and a duplicate.
        _slow_copy(src[1].read_bytes(), ev / "slow cöpy – 二.wav", chunks=10, pause=0.15)
        (ev / "sub folder").mkdir()
        shutil.copy(src[2], ev / "sub folder" / "with spaces.wav")
        shutil.copy(src[0], ev / "копия.wav")  # same content as "already here.wav"
        # Bad files.
        data = src[1].read_bytes()
        (ev / "truncated.wav").write_bytes(data[: len(data) // 3])
        (ev / "not audio.mp3").write_bytes(os.urandom(20_000))
        sf.write(ev / "silent.wav", np.zeros(4 * SR, np.int16), SR, subtype="PCM_16")
        sf.write(ev / "short.wav", (0.1 * np.sin(np.arange(SR // 2) / 5)).astype(np.float32), SR, subtype="PCM_16")
        with open(ev / "huge.wav", "wb") as fh:  # sparse: over the 2 GiB cap without using the disk
            fh.write(data[:44])
            fh.truncate(2 * 1024**3 + 1)
        vanishing = ev / "vanishing.wav"
        vanishing.write_bytes(data[:50_000])
        time.sleep(0.25)
        vanishing.unlink()
        (ev / "notes.txt").write_text("not audio by name: ignored")
        (ev / "copying.wav.part").write_bytes(data[:1000])  # a partial name: ignored
        expected = {
            "already here.wav": ("judged", None), "slow cöpy – 二.wav": ("judged", None),
            "with spaces.wav": ("judged", None), "копия.wav": ("duplicate", None),
            "truncated.wav": ("failed", "corrupt"), "not audio.mp3": ("failed", "unsupported"),
            "silent.wav": ("failed", "silent"), "short.wav": ("failed", "too_short"),
            "huge.wav": ("failed", "too_long"), "vanishing.wav": ("failed", "missing"),
        }
        d.wait_records(len(expected))
        d.wait_drained()  # nothing else is waiting: ignored names were never taken, no second verdicts
        recs = d.records()
        got = {Path(r["path"]).name: (r["outcome"], r.get("reason")) for r in recs}
        assert got == expected
        assert len(recs) == len(expected), "exactly one record per file"
        by = {Path(r["path"]).name: r for r in recs}
        good = by["slow cöpy – 二.wav"]
        assert good["sha256"] == _sha(src[1]) and good["size"] == len(data), "judged the complete copy"
        assert good["device"] in {c["device"] for c in good["top_k"]} and 0 < good["score"] <= 1
        assert len(good["windows"]) >= 4 and good["resampled"] is False
        # The recording's condition is measured and the verdict says what it was judged under.
        assert good["condition"]["codec"] == "PCM_16" and good["condition"]["channel"] == ""
        assert good["condition_status"] == "validated" and good["comparison"]["compared_under"] == "clean"
        assert set(good["timings"]) == {"decode", "features", "queue", "inference", "end_to_end"}
        assert by["копия.wav"]["duplicate_of"] == by["already here.wav"]["id"]
        assert by["копия.wav"]["device"] == by["already here.wav"]["device"]
        assert by["already here.wav"]["model_sha256"] == _sha(served_model)

        status, text = d.get("/metrics")
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}

        def value(name: str, **labels: str) -> float:
            return next(s.value for f in fams.values() for s in f.samples if s.name == name and s.labels == labels)

        assert value("devrecd_files_total", outcome="judged") == 3
        assert value("devrecd_files_total", outcome="duplicate") == 1
        assert value("devrecd_files_total", outcome="failed") == 6
        for reason in ("corrupt", "unsupported", "silent", "too_short", "too_long", "missing"):
            assert value("devrecd_errors_total", reason=reason) == 1, reason
        assert value("devrecd_stage_seconds_count", stage="inference") == 3
        assert value("devrecd_ready") == 1 and value("devrecd_queue_depth") == 0
        assert sum(s.value for s in fams["devrecd_verdicts"].samples if s.name == "devrecd_verdicts_total") == 3
        assert value("devrecd_clips_total") == value("devrecd_batch_size_sum") >= 12
        assert d.get("/healthz")[0] == 200

        # promtool's linter accepts the exposition.
        lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

        # The evidence was not touched: same bytes, nothing added.
        assert _sha(ev / "already here.wav") == _sha(src[0])
        assert {p.name for p in ev.rglob("*") if p.is_file()} == (set(expected) - {"vanishing.wav"}) | {
            "notes.txt", "copying.wav.part"}
    finally:
        code = d.stop()
    assert code == 0
    log_lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
    events = [x["event"] for x in log_lines]
    assert "ready" in events and "stopped" in events
    assert not [x for x in log_lines if x["level"] == "info" and x["event"] == "judged"], "no INFO line per healthy file"
    assert {x["reason"] for x in log_lines if x["event"] == "cannot judge file"} == {
        "corrupt", "unsupported", "silent", "too_short", "too_long", "missing"}
    # Restart: nothing is judged again. A new file judged after the restart shows that the initial
    # scan ran and its files were taken; once the queue drains, that file is the only verdict added.
    d2 = DaemonProc(tmp_path, ev, served_model).start()
    try:
        shutil.copy(ccnu_recordings(ccnu_dir, 4)[3], ev / "after restart.wav")
        recs = d2.wait_records(len(expected) + 1)
        counts = d2.wait_drained()
        recs = d2.records()
        assert [Path(r["path"]).name for r in recs[len(expected):]] == ["after restart.wav"]
        assert counts == {"devrecd_files_total{outcome=judged}": 1.0}
    finally:
        assert d2.stop() == 0
    j = Journal(tmp_path / "state" / "journal.sqlite")
    try:
        assert j.counts() == {"judged": 4, "duplicate": 1, "failed": 6} and j.unlogged() == []
    finally:
        j.close()


def test_the_same_content_in_flight_twice_is_judged_once(tmp_path: Path, ccnu_dir: Path, served_model: Path) -> None:
    """Two names of one content in flight at once (one batch holds both, so neither was judged when
    its worker asked the journal): one verdict, the other recorded as its duplicate."""
    from devrecd.config import load_config
    from devrecd.pipeline.runner import Pipeline
    from devrecd.pipeline.serving import load_serving_backend
    from devrecd.stages import features_for_file

    src = ccnu_recordings(ccnu_dir, 1)[0]
    copies = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for c in copies:
        shutil.copy(src, c)
    base = load_config(None, env={})
    windows = len(features_for_file(src, base)[1])
    # The batch goes only when it is full: when both files' windows are in it.
    cfg = base.with_overrides({"backend.model": str(served_model), "backend.threads": 1, "watch.workers": 2,
                               "batcher.max_batch": 2 * windows, "batcher.max_wait_ms": 60_000})
    backend = load_serving_backend(cfg)
    journal = Journal(":memory:")
    records: list[dict] = []
    p = Pipeline(cfg, backend, journal=journal, verdict_log=None, metrics=Metrics(CollectorRegistry()),
                 rejudge_duplicates=False, on_record=records.append)
    p.start()
    try:
        ids = [p.submit(str(c)) for c in copies]
        assert p.drain(1e10)  # beyond threading.TIMEOUT_MAX: waits without a limit (no OverflowError)
        counts = journal.counts()
    finally:
        p.stop()
        backend.close()
        journal.close()
    assert counts == {"judged": 1, "duplicate": 1}
    by = {r["outcome"]: r for r in records}
    assert sorted(by) == ["duplicate", "judged"] and {by["judged"]["id"], by["duplicate"]["id"]} == set(ids)
    assert by["duplicate"]["duplicate_of"] == by["judged"]["id"] and by["duplicate"]["device"] == by["judged"]["device"]
    assert by["duplicate"]["sha256"] == by["judged"]["sha256"] == _sha(src)


@pytest.mark.slow
def test_kill_9_mid_batch_then_restart_gives_exactly_one_verdict_per_file(
        tmp_path: Path, ccnu_dir: Path, served_model: Path) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    files = ccnu_recordings(ccnu_dir, 30)
    for i, src in enumerate(files):  # a backlog present at start
        shutil.copy(src, ev / f"{i:02d} {src.name}")
    d = DaemonProc(tmp_path, ev, served_model, workers=1, queue_size=2).start()
    d.wait_records(1)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    first = d.records()
    assert 1 <= len(first) < len(files), "the kill must land while the backlog is being judged"
    d2 = DaemonProc(tmp_path, ev, served_model).start()
    try:
        d2.wait_records(len(files))
        d2.wait_drained()
        recs = d2.records()
    finally:
        assert d2.stop() == 0
    paths = [r["path"] for r in recs]
    assert len(paths) == len(set(paths)) == len(files), "exactly one verdict per file"
    assert len({r["id"] for r in recs}) == len(recs)
    assert recs[: len(first)] == first, "verdicts written before the kill stay as they were"
    assert {r["outcome"] for r in recs} == {"judged"}
    # The journal agrees with the log.
    j = Journal(tmp_path / "state" / "journal.sqlite")
    try:
        assert j.counts() == {"judged": len(files)} and j.unlogged() == []
    finally:
        j.close()


def test_prometheus_scrapes_the_daemon(tmp_path: Path, ccnu_dir: Path, served_model: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus server is not installed (.ci/run installs it)")
    ev = tmp_path / "evidence"
    ev.mkdir()
    shutil.copy(ccnu_recordings(ccnu_dir, 1)[0], ev / "one.wav")
    d = DaemonProc(tmp_path, ev, served_model).start()
    port = free_port()
    target = d.url.split("//", 1)[1]
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: devrecd\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        d.wait_records(1)
        query = "http://127.0.0.1:%d/api/v1/query?query=%s" % (port, urllib.request.quote('devrecd_files_total{outcome="judged"}'))
        result, deadline = [], time.time() + 60
        while time.time() < deadline:
            try:
                doc = json.loads(urllib.request.urlopen(query, timeout=5).read())
                result = doc["data"]["result"]
                if result and float(result[0]["value"][1]) == 1.0:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # Prometheus still starting
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) == 1.0, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["metric"]["job"] == "devrecd"
        up = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/v1/query?query=devrecd_ready", timeout=5).read())["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        series = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/v1/label/__name__/values", timeout=5).read())["data"]
        assert {"devrecd_stage_seconds_bucket", "devrecd_backend_info", "devrecd_queue_depth"} <= set(series)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        assert d.stop() == 0


def test_systemd_notify_watchdog_reload_and_drain(tmp_path: Path, ccnu_dir: Path, served_model: Path) -> None:
    """READY once warm, WATCHDOG pings while the pipeline lives, SIGHUP reloads, SIGTERM drains + STOPPING."""
    ev = tmp_path / "evidence"
    ev.mkdir()
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(sock_path)
        srv.settimeout(0.2)
        d = DaemonProc(tmp_path, ev, served_model, workers=1).start(env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "600000"})
        messages: list[str] = []

        def collect(seconds: float) -> None:
            end = time.time() + seconds
            while time.time() < end:
                try:
                    messages.extend(srv.recv(4096).decode().splitlines())
                except socket.timeout:
                    pass

        try:
            collect(1.5)
            assert "READY=1" in messages and messages.count("WATCHDOG=1") >= 2
            # SIGHUP: a new batcher setting and log level are applied without a restart.
            # A queue bound cannot change under running threads: kept and named as needing a restart.
            d.config.write_text(d.config.read_text().replace("max_batch = 8", "max_batch = 4\nmax_queued_clips = 777")
                                .replace('format = "json"', 'format = "json"\nlevel = "DEBUG"'))
            d.proc.send_signal(signal.SIGHUP)
            collect(1.0)
            assert "RELOADING=1" in messages
            # Work in flight when SIGTERM arrives is finished before the exit.
            # 30 distinct recordings (3 offsets of 10 phones): enough that some are still in flight.
            for i, src in enumerate(ccnu_recordings(ccnu_dir, 10)):
                audio, rate = sf.read(src, dtype="int16")
                for k in range(3):
                    sf.write(ev / f"{i}-{k}.wav", audio[k * rate // 2:], rate, subtype="PCM_16")
            deadline = time.time() + 30
            while time.time() < deadline and metric_sample(d.get("/metrics")[1], "devrecd_oldest_pending_age_seconds") == 0:
                time.sleep(0.02)  # until files are admitted (stable) and in flight
            d.proc.send_signal(signal.SIGTERM)
            collect(0.5)
            assert d.proc.wait(timeout=60) == 0
            collect(0.3)
        finally:
            d.stop()
    assert "STOPPING=1" in messages
    log_lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
    reload = [x for x in log_lines if x["event"] == "configuration reloaded"]
    assert reload and reload[0]["max_batch"] == 4 and reload[0]["log_level"] == "DEBUG"
    assert reload[0]["needs_restart"] == "batcher.max_queued_clips", reload[0]
    assert any(x["event"] == "judged" and x["level"] == "debug" for x in log_lines), "DEBUG took effect"
    stopping = [x for x in log_lines if x["event"].startswith("stopping")][-1]
    stopped = [x for x in log_lines if x["event"] == "stopped"][-1]
    assert stopping["in_flight"] >= 1, "SIGTERM must have found work in flight"
    assert stopped["drained"] is True and "seen" not in stopped and "hashed" not in stopped, stopped
    assert len(d.records()) == stopped["judged"] >= stopping["in_flight"]


def test_slow_clients_cannot_starve_the_probes_and_early_resets_log_nothing(capfd) -> None:
    """16 clients each sending a header byte now and then (under the per-read timeout) hold every
    connection; /healthz, /readyz and /metrics are answered all the same (total deadline per request,
    the oldest client still sending its request evicted). Clients that reset before reading their
    reply leave no traceback: with log.format = "json" every line on stderr stays JSON."""
    import json as _json
    import struct

    from devrecd.logs import setup_logging

    setup_logging("INFO", "json")
    m = Metrics(CollectorRegistry())
    srv = StatusServer(m.registry, "127.0.0.1", 0, healthy=lambda: (True, "ok"), ready=lambda: (True, "ready"))
    srv.start()
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for c in list(slow):
                try:
                    c.send(b"X")
                except OSError:
                    pass  # cut off by the server: what it should do

    feeder = threading.Thread(target=trickle, name="test-trickle")
    try:
        for _ in range(16):
            c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            c.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            slow.append(c)
        feeder.start()
        time.sleep(0.3)
        for path in ("/healthz", "/readyz", "/metrics") * 3:
            with urllib.request.urlopen(srv.url + path, timeout=3) as r:
                assert r.status == 200
        for _ in range(20):  # send a request, then reset the connection before the reply is read
            c = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            c.close()
        time.sleep(0.5)
        assert urllib.request.urlopen(srv.url + "/healthz", timeout=3).status == 200
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join()
        for c in slow:
            c.close()
        srv.stop()
        setup_logging("INFO", "text")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    for line in err.splitlines():
        _json.loads(line)


def test_a_stop_signal_never_waits_for_the_stop_events_lock(tmp_path: Path) -> None:
    """A Python signal handler runs in the main thread between two bytecodes, possibly inside
    ``Daemon._stop.wait()`` while it holds the event's lock: a handler that called ``Event.set()``
    then waited for that lock forever (a CI run's daemon ignored SIGTERM for 60 s). The handler that
    runs there must return without the lock, and the signal must still stop (and SIGHUP reload) the
    daemon, through the wakeup pipe (devrecd.daemon.signals, which `devrecd listen` uses too); afterwards
    the handlers are as they were."""
    import signal

    from devrecd.config import load_config
    from devrecd.daemon.service import Daemon

    (tmp_path / "ev").mkdir()
    cfg = load_config(None, env={}, overrides={"watch.state_dir": str(tmp_path / "state")})
    daemon = Daemon(cfg, [str(tmp_path / "ev")])
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    daemon._install_signals()
    try:
        # Installed (from the main thread): else the real signals below would end the test run.
        assert daemon._signals is not None and daemon._signals.installed
        handler, returned = signal.getsignal(signal.SIGTERM), threading.Event()

        def as_inside_wait() -> None:
            with daemon._stop._cond:  # what Event.wait() holds between two bytecodes
                handler(signal.SIGTERM, None)
            returned.set()

        threading.Thread(target=as_inside_wait, daemon=True).start()
        assert returned.wait(5), "the signal handler waited for the stop event's lock"
        assert not daemon._stop.is_set()  # the handler itself did nothing
        os.kill(os.getpid(), signal.SIGHUP)
        assert daemon._reload.wait(5) and not daemon._stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert daemon._stop.wait(5)
    finally:
        daemon._restore_signals()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    assert signal.set_wakeup_fd(-1) == -1  # none left installed
