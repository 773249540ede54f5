"""Live input: ring, windows, levels, smoothing, recording, reopen, and the real PortAudio stack.

Real recordings from the CCNU_Mobile sample go either through PortAudio (an ALSA ``file`` PCM defined
in a test ALSA configuration, in a subprocess so that PortAudio initialises with it), or, for the
pieces after the callback, through :meth:`Capture.callback` itself with sounddevice's signature.
Inference uses a real classifier trained here on the sample (the MFCC-statistics SVM baseline on the
one frontend's features); the PortAudio end-to-end test serves the session's exported model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.baselines import MfccSvm
from devrecd.config import load_config
from devrecd.pipeline.batcher import Batcher
from devrecd.pipeline.verdict import aggregate
from devrecd.live import LiveSource, RunningVerdict, SampleRing, measure
from devrecd.metrics import Metrics
from devrecd.stages import features_for_file

REPO = Path(__file__).resolve().parents[1]
SR = 32000


def _rows(ccnu_dir: Path) -> list[dict]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _cfg(**live):
    over = {"live.hop_seconds": 1.0, "audio.hop_seconds": 1.0, "batcher.max_wait_ms": 5.0, "watch.top_k": 3}
    over.update({f"live.{k}": v for k, v in live.items()})
    return load_config(None, env={}, overrides=over)


@pytest.fixture(scope="module")
def classifier(ccnu_dir: Path, feature_cache):
    """A real device classifier on the sample's training segments (1-3): (infer, labels)."""
    cfg = _cfg()
    cache = feature_cache(cfg)
    feats, labels = [], []
    for r in _rows(ccnu_dir):
        if int(r["segment"]) <= 3:
            feats.append(cache.features(ccnu_dir / r["path"], cfg.audio.hop_seconds)[0])
            labels.append(r["device"])
    svm = MfccSvm(seed=0).fit(feats, labels)
    return (lambda x: svm.predict_proba(x).astype(np.float32)), tuple(svm.classes_)


@pytest.fixture(scope="module")
def evidence(ccnu_dir: Path) -> tuple[Path, str]:
    """A held-out recording (segment 4) and its device."""
    r = next(r for r in _rows(ccnu_dir) if int(r["segment"]) == 4)
    return ccnu_dir / r["path"], r["device"]


def _read(path: Path) -> np.ndarray:
    x, rate = sf.read(path, dtype="int16")
    assert rate == SR
    return x.astype(np.float32) * np.float32(1 / 32768)  # as PortAudio converts int16 to float32


class Harness:
    """A LiveSource on a real batcher + inference thread, fed through its callback."""

    def __init__(self, cfg, infer, labels, *, rate: int = SR) -> None:
        self.metrics = Metrics()
        self.batcher = Batcher(infer, max_batch=8, max_wait_s=0.005, queue_size=4)
        self.source = LiveSource(cfg, self.batcher, labels=labels, backend_info={"name": "mfcc-svm"},
                                 metrics=self.metrics)
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._infer = threading.Thread(target=self.batcher.run, args=(self._stop, lambda u: None, lambda u, e: None),
                                       daemon=True)
        self._infer.start()
        self.source.start(self.records.append, feed_rate=rate)

    def push(self, audio: np.ndarray, block: int = 1024) -> int:
        """Push mono audio through the callback in blocks (as PortAudio would); returns the block count."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1, 1)
        n = 0
        for i in range(0, len(audio), block):
            self.source.capture.callback(audio[i:i + block], len(audio[i:i + block]), None, None)
            n += 1
        return n

    def settle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.source.ring.available() == 0 and self.source.in_flight() == 0:
                time.sleep(0.1)  # one more pump round
                if self.source.ring.available() == 0 and self.source.in_flight() == 0:
                    return
            time.sleep(0.02)
        raise AssertionError("live source did not settle")

    def close(self) -> None:
        self.source.stop()
        self._stop.set()
        self._infer.join(timeout=10)

    def value(self, name: str, labels: dict | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels or {})


# --- pieces ----------------------------------------------------------------------------------------

def test_ring_keeps_order_across_wraps_and_drops_whole_blocks_when_full() -> None:
    ring = SampleRing(1000)
    data = np.arange(5000, dtype=np.float32).reshape(-1, 1)
    got = []
    for i in range(0, 2500, 300):  # blocks of 300 through a 1000-frame ring, consumed as they come
        assert ring.write(data[i:i + 300], now=float(i))
        got.append(ring.take(ring.available()))
    assert np.array_equal(np.concatenate(got), data[:2500 + 200])
    # A consumer that stops: the fourth block no longer fits, is dropped whole and logged as a gap.
    for i in range(3000, 4200, 300):
        ring.write(data[i:i + 300], now=float(i))
    assert ring.overflows == 1 and ring.dropped_frames == 300 and ring.available() == 900
    assert ring.gap(ring.gap_count - 1) == (ring.written, 0)
    assert np.array_equal(ring.take(900)[:, 0], np.arange(3000, 3900))
    # Arrival times: the block holding frame p-1 is found for any logged position.
    assert ring.arrival_time(ring.written) == 3600.0 and ring.arrival_time(ring.written + 1) is None


def test_windows_never_span_dropped_audio() -> None:
    from devrecd.live import Windower

    ring = SampleRing(3000)
    ring.mark_gap(1000)  # a stream opened at 1000 Hz (the model's rate here: no resampling)
    win = Windower(ring, model_rate=1000, window=1000, hop=400)
    ramp = np.arange(60000, dtype=np.float32).reshape(-1, 1)  # sample value = its position in the stream
    windows = []
    for i, start in enumerate(range(0, len(ramp), 250)):
        ring.write(ramp[start:start + 250], now=float(i))
        if i % 20 == 19:  # a consumer that only comes by now and then: the ring overflows in between
            windows += win.pump()
    windows += win.pump()
    assert ring.overflows > 0 and win.discontinuities > 0 and len(windows) > 10
    for w in windows:  # each window is one contiguous run of the stream, never glued across a drop
        assert np.all(np.diff(w.samples) == 1), w.index
    assert [w.index for w in windows] == list(range(len(windows)))


def test_level_meter_flags_silence_and_clipping(evidence) -> None:
    x = _read(evidence[0])[:SR * 2]
    ok = measure(x, silence_dbfs=-60, clip_fraction=0.01)
    assert ok.status == "ok" and -60 < ok.dbfs < 0 and ok.clip_fraction < 0.01
    assert measure(np.zeros(SR, np.float32), silence_dbfs=-60, clip_fraction=0.01).status == "silent"
    assert measure(x * 1e-4, silence_dbfs=-60, clip_fraction=0.01).status == "silent"
    hot = measure(np.clip(x * 50, -1, 1), silence_dbfs=-60, clip_fraction=0.01)
    assert hot.status == "clipped" and hot.clip_fraction >= 0.01 and hot.peak == 1.0


def test_running_verdict_is_the_file_rule_over_the_last_n_windows() -> None:
    labels = ("a", "b", "c")
    rv = RunningVerdict(labels, 3)
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    out = [rv.add(p) for p in probs]
    assert [o.windows for o in out] == [1, 2, 3, 3, 3]
    assert out[1].device == "a" and out[1].agreement == 1.0
    # After 5 windows only the last 3 count: "b" wins although "a" led at first.
    last = aggregate(probs[-3:], labels)
    assert out[-1].device == "b" == last.label and out[-1].confidence == pytest.approx(last.score)
    assert out[-1].agreement == 1.0
    # Geometric mean: one confident "b" outweighs two lukewarm "a"s, and agreement says it was 1 of 3.
    assert out[2].device == "b" and out[2].agreement == pytest.approx(1 / 3)


# --- after the callback: real audio pushed through Capture.callback --------------------------------

def test_streamed_windows_and_verdicts_equal_the_file_path(classifier, evidence) -> None:
    infer, labels = classifier
    path, truth = evidence
    cfg = _cfg(smoothing=100)
    rec, file_feats = features_for_file(path, cfg)  # the one-shot path: same clips at hop 1 s
    h = Harness(cfg, infer, labels)
    try:
        h.push(_read(path), block=997)  # an odd block size: windows straddle callback blocks
        h.settle()
    finally:
        h.close()
    judged = [r for r in h.records if r["outcome"] == "judged"]
    n_full = int((len(rec.samples) - cfg.frontend.clip_samples) // SR) + 1  # whole windows in the stream
    assert [r["window"] for r in judged] == list(range(n_full)) and [r["start"] for r in judged] == list(range(n_full))
    file_probs = infer(file_feats[:n_full])
    for r, p in zip(judged, file_probs):
        assert r["device"] == labels[int(np.argmax(p))] and r["score"] == pytest.approx(float(p.max()), abs=1e-6)
        assert not r["resampled"] and r["capture_rate"] == SR == r["sample_rate"]
        assert r["latency"] is not None and r["latency"] >= 0
    # Smoothing over every window equals the file verdict over the same windows.
    whole = aggregate(file_probs, labels)
    assert judged[-1]["running"]["device"] == whole.label
    assert judged[-1]["running"]["confidence"] == pytest.approx(whole.score, abs=1e-6)
    assert h.value("devrecd_live_windows_total") == n_full
    assert h.value("devrecd_live_latency_seconds_count") == n_full
    assert h.value("devrecd_live_overruns_total", {"kind": "ring_overflow"}) == 0
    assert h.value("devrecd_live_input_up") == 0  # stopped
    assert -60 < h.value("devrecd_live_level_dbfs") < 0


def test_card_at_another_rate_is_resampled_and_reported(classifier, evidence) -> None:
    import soxr

    infer, labels = classifier
    path, _ = evidence
    cfg = _cfg()
    x = _read(path)
    at48 = soxr.resample(x, SR, 48000, quality="VHQ").astype(np.float32)
    file_feats = features_for_file(path, cfg)[1]
    h = Harness(cfg, infer, labels, rate=48000)
    try:
        h.push(at48, block=1024)
        h.settle()
    finally:
        h.close()
    judged = [r for r in h.records if r["outcome"] == "judged"]
    assert len(judged) >= 5
    assert all(r["resampled"] and r["capture_rate"] == 48000 and r["sample_rate"] == SR for r in judged)
    # 32k -> 48k -> 32k through two VHQ resamplers changes little: the verdicts mostly agree with the file's.
    file_dev = [labels[i] for i in infer(file_feats[:len(judged)]).argmax(axis=1)]
    agree = np.mean([r["device"] == d for r, d in zip(judged, file_dev)])
    assert agree >= 0.8, (agree, [r["device"] for r in judged], file_dev)


def test_silence_and_clipping_are_reported_not_judged_and_readyz_follows_silence(classifier, evidence) -> None:
    infer, labels = classifier
    cfg = _cfg(missing_after=1.0)
    x = _read(evidence[0])
    h = Harness(cfg, infer, labels)
    try:
        h.push(x[: 3 * SR])
        h.settle()
        assert h.source.ready() == (True, "live input up")
        h.push(np.zeros(4 * SR, np.float32))
        h.push(np.clip(x[: 3 * SR] * 50, -1, 1))
        h.settle()
        kinds = [r["outcome"] for r in h.records]
        assert h.source.ready()[0]  # the last loud windows were clipped, not silent: still sound
        end = time.monotonic() + 1.6  # input keeps arriving, but silent, for longer than missing_after
        while time.monotonic() < end:
            h.push(np.zeros(SR // 4, np.float32))
            time.sleep(0.05)
        ok, why = h.source.ready()
        assert not ok and "silent" in why, why
        time.sleep(1.2)  # and then nothing arrives at all
        ok, why = h.source.ready()
        assert not ok and "missing" in why, why
    finally:
        h.close()
    assert {"judged", "silent", "clipped"} <= set(kinds)
    assert [r["window"] for r in h.records] == list(range(len(h.records)))  # in window order, judged or not
    for r in h.records:
        assert ("device" in r) == (r["outcome"] == "judged")
    assert h.source.windows_judged == kinds.count("judged")
    assert h.value("devrecd_live_windows_total") == kinds.count("judged")


def test_slow_backend_overflows_the_ring_counted_and_the_callback_never_waits(classifier, evidence) -> None:
    infer, labels = classifier
    release = threading.Event()

    def stuck(x):  # a backend that hangs until released
        release.wait(60)
        return infer(x)

    cfg = _cfg(ring_seconds=1.0)  # ring: 4 s at the model's rate
    x = _read(evidence[0])
    audio = np.tile(x, 8)  # ~65 s of real audio
    h = Harness(cfg, stuck, labels)
    try:
        pushed = {}
        t = threading.Thread(target=lambda: pushed.setdefault("blocks", h.push(audio)))
        t.start()
        t.join(timeout=60)
        # Every block returned from the callback while inference was still stuck.
        assert not t.is_alive() and pushed["blocks"] == -(-len(audio) // 1024) and not release.is_set()
        assert h.source.ring.overflows > 0
        release.set()
        h.settle()
        time.sleep(0.2)
    finally:
        release.set()
        h.close()
    assert h.value("devrecd_live_overruns_total", {"kind": "ring_overflow"}) == h.source.ring.overflows
    assert h.source.windower.discontinuities >= 1
    # No judged window spans dropped audio: each is a contiguous piece of the pushed stream.
    judged = [r for r in h.records if r["outcome"] == "judged"]
    assert judged
    stats = h.source.stats()
    assert stats["dropped_frames"] > 0 and stats["ring_overflows"] == h.source.ring.overflows


def test_recording_keeps_captured_audio_in_hashed_segments(classifier, evidence, tmp_path: Path) -> None:
    infer, labels = classifier
    cfg = _cfg(record_dir=str(tmp_path / "rec"), record_segment_seconds=1.0)
    x = _read(evidence[0])[: int(3.5 * SR)]
    h = Harness(cfg, infer, labels)
    try:
        h.push(x)
        h.settle()
    finally:
        h.close()
    lines = [json.loads(s) for s in (tmp_path / "rec" / "segments.jsonl").read_text().splitlines()]
    assert [e["frames"] for e in lines] == [SR, SR, SR, SR // 2]
    parts = []
    for e in lines:
        f = tmp_path / "rec" / e["path"]
        assert hashlib.sha256(f.read_bytes()).hexdigest() == e["sha256"]
        data, rate = sf.read(f, dtype="float32")
        assert rate == SR == e["sample_rate"]
        parts.append(data)
    assert np.array_equal(np.concatenate(parts), x)  # bit-exact: what the card delivered


# --- through PortAudio: an ALSA PCM whose capture data comes from a real recording ------------------
#
# The ALSA ``file`` plugin on a ``null`` slave delivers the infile's raw frames and then zeros, as fast
# as they are read (there is no clock without hardware), so these runs are also a flat-out overload:
# the ring fills and drops, which must be counted while the first ring-full stays bit-exact.

ALSA_CONF = """</usr/share/alsa/alsa.conf>
pcm.evidence {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
"""


@pytest.fixture
def alsa_evidence(tmp_path: Path, evidence):
    """(env with ALSA_CONFIG_PATH naming an 'evidence' capture PCM, its raw float32 infile, the WAV)."""
    pytest.importorskip("sounddevice", reason="sounddevice not installed (pip install 'devrecd[live]')")
    if not Path("/usr/share/alsa/alsa.conf").is_file():
        pytest.skip("ALSA configuration not installed (apt install libasound2)")
    infile = tmp_path / "evidence.f32"
    conf = tmp_path / "asound.conf"
    conf.write_text(ALSA_CONF.format(infile=infile))
    env = {**os.environ, "ALSA_CONFIG_PATH": str(conf), "PYTHONPATH": str(REPO)}
    return env, infile, evidence[0]


PROBE = r"""
import json, os, sys, time
import numpy as np, soundfile as sf
from devrecd.audio import cut_windows
from devrecd.live import Capture, SampleRing, Windower
wav, infile = sys.argv[1], sys.argv[2]
x, _ = sf.read(wav, dtype="int16")
ref = x.astype(np.float32) * np.float32(1 / 32768)
ring = SampleRing(32000 * 30)
cap = Capture(ring, device="evidence", model_rate=32000, missing_after=5.0, backoff_max=0.4)
win = Windower(ring, model_rate=32000, window=64000, hop=32000)
t0 = time.monotonic()
def wait(cond, limit=60):
    while not cond() and time.monotonic() - t0 < limit:
        time.sleep(0.02)
cap.start()
wait(lambda: cap.failures >= 2)          # no such device yet: retried with backoff
failures = cap.failures
ref.tofile(infile + ".tmp"); os.replace(infile + ".tmp", infile)   # the device appears
wait(lambda: cap.opens >= 1)
wait(lambda: ring.available() >= len(ref))
windows = win.pump()
n = (len(ref) - 64000) // 32000 + 1
same = [bool(np.array_equal(w.samples, e)) for w, e in zip(windows, cut_windows(ref, 64000, 32000)[:n])]
wait(lambda: ring.overflows > 0)
overflows = ring.overflows
cap._stream.stop()                       # the stream stops under PortAudio, as on a device error
wait(lambda: cap.opens >= 2)
wait(lambda: cap.up)
print(json.dumps({"failures": failures, "opens": cap.opens, "same": same, "n": n, "up": cap.up,
                  "rate": windows[0].capture_rate, "resampled": windows[0].resampled, "overflows": overflows,
                  "input": cap.info.name}))
cap.stop()
"""


def test_portaudio_capture_is_bit_exact_counts_overflow_and_survives_device_loss(alsa_evidence, tmp_path) -> None:
    env, infile, wav = alsa_evidence
    out = subprocess.run([sys.executable, "-c", PROBE, str(wav), str(infile)], env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["failures"] >= 2 and res["opens"] == 2 and res["up"]  # found after it appeared; reopened after loss
    assert res["input"] == "evidence" and res["rate"] == SR and not res["resampled"]
    assert res["same"] == [True] * res["n"]  # PortAudio -> callback -> ring -> windows: the file's own clips
    assert res["overflows"] > 0  # flat-out input: dropped blocks are counted, the callback kept returning
    assert "live input unavailable, retrying" in out.stderr and "live input lost, reopening" in out.stderr


def test_listen_lists_the_alsa_device(alsa_evidence) -> None:
    env, infile, wav = alsa_evidence
    _read(wav).tofile(infile)
    out = subprocess.run([sys.executable, "-c", "from devrecd.cli import main; main()", "listen", "--list-input-devices"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [m.groups() for m in re.finditer(r"^[* ]\s+(\d+)\s+(\S.*?)\s+\((\w+), (\d+) ch", out.stdout, re.M)]
    assert ("0", "evidence", "ALSA", "128") in rows, out.stdout


@pytest.mark.slow
def test_listen_through_portaudio_agrees_with_identify(alsa_evidence, exported_model) -> None:
    """``devrecd listen`` on the ALSA device vs ``identify`` on the same recording, exported model."""
    from devrecd.pipeline.identify import identify_files

    model = exported_model

    env, infile, wav = alsa_evidence
    _read(wav).tofile(infile)
    cfg = load_config(None, env={}, overrides={"backend.model": str(model), "backend.threads": 1,
                                               "audio.hop_seconds": 1.0})
    n = int((sf.info(wav).frames - cfg.frontend.clip_samples) // SR) + 1
    out = subprocess.run([sys.executable, "-c", "from devrecd.cli import main; main()", "listen", "--input-device", "evidence",
                          "--model", str(model), "--hop-seconds", "1", "--smoothing", str(n), "--format", "json", "--max-windows", str(n)],
                         env={**env, "DEVRECD_BACKEND__THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    live = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["window"] for r in live] == list(range(n)) and all(r["outcome"] == "judged" for r in live), live
    ref = identify_files(cfg, [wav])[0]
    assert ref["outcome"] == "judged"
    for r, w in zip(live, ref["windows"][:n]):
        assert r["start"] == w["start"] and r["device"] == w["device"] and r["score"] == pytest.approx(w["score"], abs=1e-4)
        assert r["input"] == "evidence" and r["capture_rate"] == SR and r["backend"] == "onnxruntime"
    if len(ref["windows"]) == n:  # the running verdict over all windows is the file verdict
        assert live[-1]["running"]["device"] == ref["device"]
        assert live[-1]["running"]["confidence"] == pytest.approx(ref["score"], abs=1e-4)
    assert "live input open" in out.stderr or "listened:" in out.stderr


# --- a device registry and no model: the registry's verdicts, as identify --registry gives them ---------

# What a window's record shares with identify's record of the same audio: the verdict and who made it
# (the rest of identify's record describes a file: path, hashes, codec; a live record describes the window).
OPEN_SET_VERDICT = ("outcome", "device", "score", "log10_lr", "candidate", "open_set", "top_k", "windows_best", "comparison",
                    "condition_status", "closed_set", "backend", "scorer", "software_version")


def _same(a, b, tol: float = 2e-6) -> bool:
    """Equal, floats within ``tol`` (a score is rounded to 6 decimals: one LSB of the 16-bit samples
    that went through PortAudio can move the last one)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


@pytest.fixture(scope="module")
def gsv_registry(ccnu_dir: Path, tmp_path_factory) -> Path:
    """Three real phones enrolled (segments 1-2) with the shipped GSV scorer, no model."""
    from tests.test_openset_serving import ENROLLED, _segment
    from typer.testing import CliRunner

    from devrecd.cli import app

    path = tmp_path_factory.mktemp("liveregistry") / "registry.json"
    for device in ENROLLED:
        result = CliRunner().invoke(app, ["enroll", "--registry", str(path), "--profile", device,
                                          *(str(_segment(ccnu_dir, device, s)) for s in (1, 2))])
        assert result.exit_code == 0, result.output
    return path


def _eight_seconds(ccnu_dir: Path, device: str, folder: Path) -> Path:
    """Segment 4 of ``device`` cut to 8 s (four 2 s clips: one live window of 8 s is exactly that file)."""
    from tests.test_openset_serving import _segment

    x, sr = sf.read(_segment(ccnu_dir, device, 4), dtype="int16")
    out = folder / f"{device}-8s.wav"
    sf.write(out, x[: 8 * sr], sr, subtype="PCM_16")
    return out


def test_open_set_window_is_identifys_registry_verdict(gsv_registry: Path, ccnu_dir: Path, tmp_path: Path) -> None:
    from devrecd.live import Listener
    from devrecd.pipeline.identify import identify_files
    from devrecd.pipeline.serving import load_served

    cfg = load_config(None, env={}, overrides={"registry.path": str(gsv_registry), "live.window_seconds": 8.0,
                                               "live.hop_seconds": 8.0, "live.smoothing": 2})
    wavs = [_eight_seconds(ccnu_dir, d, tmp_path) for d in ("IPHONEX", "huawei_p20")]  # enrolled, never enrolled
    want = identify_files(cfg, wavs)
    assert [r["device"] for r in want] == ["IPHONEX", "unknown device"]
    metrics = Metrics()
    served = load_served(cfg, metrics)
    listener = Listener(cfg, served, metrics)
    records: list[dict] = []
    listener.start(records.append, feed_rate=SR)
    try:
        for wav in wavs:
            audio = _read(wav).reshape(-1, 1)
            for i in range(0, len(audio), 1024):
                listener.source.capture.callback(audio[i:i + 1024], len(audio[i:i + 1024]), None, None)
        end = time.monotonic() + 60
        while len(records) < 2 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        listener.stop()
    assert [r["window"] for r in records] == [0, 1], records
    for got, ref in zip(records, want):
        for k in OPEN_SET_VERDICT:
            assert got[k] == ref[k], (k, got[k], ref[k])
        assert set(ref) - set(got) <= {"id", "path", "sha256", "size", "duration", "native_rate", "channels", "codec",
                                       "container", "decoder", "levels", "integrity"}  # a file's, not a window's
        assert got["condition"]["channel"] == ref["condition"]["channel"] == "" and got["condition"]["lossless"]
    # The running verdict judges the last live.smoothing windows together, as a file of them.
    assert records[0]["running"]["device"] == "IPHONEX" and records[0]["running"]["windows"] == 1
    assert records[1]["running"]["windows"] == 2
    assert metrics.registry.get_sample_value("devrecd_live_windows_total") == 2


def test_listen_with_a_registry_and_no_model(alsa_evidence, gsv_registry: Path, ccnu_dir: Path, tmp_path: Path) -> None:
    """``devrecd listen --registry R`` through PortAudio: the registry's verdict, as ``identify --registry``."""
    from devrecd.pipeline.identify import identify_files

    env, infile, _ = alsa_evidence
    wav = _eight_seconds(ccnu_dir, "xiaomi8se", tmp_path)
    _read(wav).tofile(infile)
    out = subprocess.run([sys.executable, "-m", "devrecd", "listen", "--input-device", "evidence", "--registry",
                          str(gsv_registry), "--window-seconds", "8", "--hop-seconds", "8", "--format", "json",
                          "--max-windows", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    live = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ref = identify_files(load_config(None, env={}, overrides={"registry.path": str(gsv_registry)}), [wav])[0]
    assert live and live[0]["outcome"] == "judged" and ref["device"] == "xiaomi8se"
    for k in OPEN_SET_VERDICT:
        assert _same(live[0][k], ref[k]), (k, live[0][k], ref[k])
    assert live[0]["input"] == "evidence" and live[0]["backend"] == "open-set-only"


def test_live_source_and_its_capture_read_one_injected_clock() -> None:
    """LiveSource takes a clock as Capture does (and hands it on): silence longer than
    live.missing_after is seen on that clock, without waiting for it."""
    now = [100.0]
    cfg = _cfg(missing_after=5.0)
    batcher = Batcher(lambda x: np.zeros((len(x), 2), np.float32), max_batch=8, max_wait_s=0.005, queue_size=4)
    source = LiveSource(cfg, batcher, labels=("a", "b"), backend_info={"name": "fake"}, metrics=Metrics(),
                        clock=lambda: now[0])
    assert source.capture.clock is source.clock
    source.start(feed_rate=SR)
    try:
        assert source.ready() == (True, "live input up")
        now[0] += 6.0
        source.capture.callback(np.zeros((1024, 1), np.float32), 1024, None, None)  # audio arrives, silent
        assert source.ready() == (False, "live input silent for 6 s")
    finally:
        source.stop()
