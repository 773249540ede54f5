"""The live source: capture -> windows -> the same frontend and batcher as files -> window verdicts.

:class:`LiveSource` plugs into any :class:`~devrecd.pipeline.batcher.Batcher` (the daemon's own, so
one service can watch folders and a line input at once, or the one :class:`Listener` runs for
``devrecd listen``). Each judged window yields a record with its own verdict and the running verdict
over the last ``live.smoothing`` windows; silent and clipped windows yield a record saying so and
are not judged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
from devrecd import __version__
from devrecd.audio import cut_windows
from devrecd.config import Config
from devrecd.pipeline.batcher import Batcher, Unit
from devrecd.pipeline.serving import Judge
from devrecd.pipeline.verdict import aggregate, model_validation, naming_no_device, open_set_record, top_k, with_comparison
from devrecd.provenance import utc_timestamp
from devrecd.errors import ConfigError
from devrecd.features import extract
from devrecd.live.capture import Capture
from devrecd.live.recorder import SegmentRecorder
from devrecd.live.ring import SampleRing
from devrecd.live.smoothing import RunningFeatures, RunningVerdict
from devrecd.live.windower import LiveWindow, Windower
from devrecd.metrics import Metrics
from devrecd.stages import frontend_for, hop_samples

log = logging.getLogger("devrecd.live")

OnVerdict = Callable[[dict], None]


def window_sizes(cfg: Config) -> tuple[int, int]:
    """(window, hop) in model-rate samples from ``[live]``; a window is at least one clip."""
    rate, clip = cfg.frontend.sample_rate, cfg.frontend.clip_samples
    window = clip if cfg.live.window_seconds == 0 else int(round(cfg.live.window_seconds * rate))
    if window < clip:
        raise ConfigError(f"live.window_seconds {cfg.live.window_seconds} is shorter than the model's clip "
                          f"({cfg.frontend.clip_seconds} s); use 0 for one clip")
    if cfg.live.hop_seconds <= 0:
        raise ConfigError("live.hop_seconds must be > 0")
    return window, hop_samples(cfg.live.hop_seconds, rate)


class LiveSource:
    """One live input feeding ``batcher``; see the module docstring.

    ``start(on_verdict)`` opens the input (and reopens it when lost) and starts the window worker;
    ``stop()`` stops both and waits for windows already queued for inference to be delivered.
    """

    def __init__(self, cfg: Config, batcher: Batcher | None, *, labels: Sequence[str], backend_info: dict,
                 metrics: Metrics, device: str = "cpu", judge: Judge | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (batcher is None) == (judge is None):
            raise ValueError("a live source feeds either a batcher (closed-set model) or a registry judge")
        self.cfg = cfg
        self.batcher = batcher
        # Open set only (a device registry, no closed-set model): each window's features go to the
        # registry's judge, here in the window worker, as a file's go to it in the pipeline's workers.
        self.judge = judge
        self.running_features = RunningFeatures(cfg.live.smoothing) if judge is not None else None
        self.labels = tuple(labels)
        self.backend_info = backend_info
        # Closed set: what the model was validated on; each window's verdict is held to it (with_comparison).
        self.validation = model_validation(cfg.backend, backend_info)
        self._conditions: dict[int, dict] = {}  # window index -> its measured condition, while it is in flight
        self.metrics = metrics
        self.device = device
        self.clock = clock  # the capture's too: a window's arrival time and its latency read one clock
        self.window, self.hop = window_sizes(cfg)
        live = cfg.live
        rate = cfg.frontend.sample_rate
        # The ring is sized in capture frames; a card at up to 4x the model's rate still gets
        # ring_seconds of room (more memory is cheap next to dropped audio).
        self.ring = SampleRing(max(int(live.ring_seconds * rate * 4), 4 * self.window), live.channels)
        self.capture = Capture(self.ring, device=live.device, model_rate=rate, channels=live.channels,
                               missing_after=live.missing_after, backoff_max=live.reopen_max_seconds, clock=clock)
        self.recorder = SegmentRecorder(live.record_dir, segment_seconds=live.record_segment_seconds) \
            if live.record_dir else None
        self.windower = Windower(self.ring, model_rate=rate, window=self.window, hop=self.hop, mix=cfg.audio.mix,
                                 quality=cfg.audio.resample_quality, silence_dbfs=live.silence_dbfs,
                                 clip_fraction=live.clip_fraction, recorder=self.recorder)
        self.running = RunningVerdict(self.labels, live.smoothing)
        self._on_verdict: OnVerdict = lambda record: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # in-flight count
        # The running verdict's history: windows finish on several inference threads at once.
        self._running_lock = threading.Lock()
        self._out_lock = threading.Lock()  # record ordering
        self._in_flight = 0
        self._started = 0.0
        self._last_sound = 0.0  # monotonic time of the last window that was not silent
        self._synced = {"input_overflow": 0, "ring_overflow": 0}
        # Records leave in window order: a silent window's record waits for the verdicts before it.
        self._held: dict[int, dict] = {}
        self._next_out = 0
        self.windows_cut = 0
        self.windows_judged = 0
        self.windows_skipped = 0  # silent or clipped
        self.errors = 0

    # --- public --------------------------------------------------------------------------------

    def start(self, on_verdict: OnVerdict | None = None, *, feed_rate: int | None = None) -> None:
        """Start capturing. ``feed_rate``: no PortAudio stream; the caller pushes audio at that rate
        through ``self.capture.callback`` (same signature as sounddevice's)."""
        if on_verdict is not None:
            self._on_verdict = on_verdict
        self._started = self._last_sound = self.clock()
        if feed_rate is not None:
            self.capture.feed(feed_rate)
        else:
            self.capture.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="devrecd-live-windows", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capture and the worker; wait (up to ``timeout``) for queued windows' verdicts."""
        self.capture.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        end = time.monotonic() + timeout  # a real wait (it sleeps), not a reading of the source's clock
        while self.in_flight() and time.monotonic() < end:
            time.sleep(0.01)
        self.windower.close()
        self.metrics.live_input_up.set(0)

    def in_flight(self) -> int:
        """Windows queued for inference whose verdict has not been delivered yet."""
        with self._lock:
            return self._in_flight

    def ready(self) -> tuple[bool, str]:
        """For ``/readyz``: false while the input is missing, or silent longer than ``live.missing_after``."""
        cap = self.capture
        if not cap.up:
            return False, f"live input missing: {cap.last_error or 'not open yet'}"
        quiet = self.clock() - self._last_sound
        if quiet > self.cfg.live.missing_after:
            return False, f"live input silent for {quiet:.0f} s"
        return True, "live input up"

    def stats(self) -> dict[str, Any]:
        """Counters for the CLI's summary line and for tests."""
        info = self.capture.info
        return {"windows": self.windows_cut, "judged": self.windows_judged, "skipped": self.windows_skipped,
                "errors": self.errors, "input_overflows": self.capture.input_overflows,
                "ring_overflows": self.ring.overflows, "dropped_frames": self.ring.dropped_frames,
                "discontinuities": self.windower.discontinuities, "reopens": max(0, self.capture.opens - 1),
                "input": info.name if info else None, "capture_rate": info.capture_rate if info else None,
                "segments": list(self.recorder.closed) if self.recorder else []}

    # --- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        frontend = frontend_for(self.cfg.frontend)
        # An empty pump costs microseconds; polling often keeps the wait out of the window's latency.
        poll = min(0.01, self.hop / self.cfg.frontend.sample_rate / 4)
        while True:
            stopping = self._stop.is_set()
            try:
                windows = self.windower.pump()
            except Exception:  # noqa: BLE001 - a bad block must not end live capture
                log.exception("live window worker failed on a block; continuing")
                self.errors += 1
                windows = []
            for w in windows:
                self._window(w, frontend)
            self._sync_metrics()
            if stopping:
                return
            self._stop.wait(poll)

    def _window(self, w: LiveWindow, frontend) -> None:
        self.windows_cut += 1
        self.metrics.live_level_dbfs.set(max(w.level.dbfs, -200.0))  # -inf is not a useful gauge value
        if w.level.status != "silent":
            self._last_sound = self.clock()
        if w.level.status != "ok":
            self.windows_skipped += 1
            self._emit(self._record(w, None))
            return
        clip, rate = self.cfg.frontend.clip_samples, self.cfg.frontend.sample_rate
        clips = w.samples[None] if self.window == clip else cut_windows(
            w.samples, clip, hop_samples(self.cfg.audio.hop_seconds, rate))
        t0 = time.perf_counter()
        feats = extract(clips, frontend, device=self.device)
        if self.judge is not None:
            self._judge_open_set(w, feats, time.perf_counter() - t0)
            return
        assert self.batcher is not None
        # The window's condition (codec/band, SNR), measured here rather than on an inference thread:
        # its verdict is held to what the model was validated on, as a file's is.
        try:
            condition = live_condition(w, self.cfg.live.channels).to_json()
        except Exception as exc:  # noqa: BLE001 - one window's measurement must not end the capture
            log.error("live window condition not measured", extra={"window": w.index, "error": str(exc)})
            condition = None  # judged with its condition unmeasured: the verdict says so (snr_status)
        with self._lock:
            self._in_flight += 1
            self._conditions[w.index] = condition
        unit = Unit(key=w, features=feats, on_done=self._judged, on_error=self._failed)
        # Blocks while inference is behind: the ring then fills and drops (counted), the callback never waits.
        if not self.batcher.put(unit, self._stop):
            with self._lock:
                self._in_flight -= 1
                self._conditions.pop(w.index, None)
            self._emit(self._record(w, None, outcome="failed", reason="stopped"))

    def _judge_open_set(self, w: LiveWindow, feats: Any, features_s: float) -> None:
        """The registry's verdict on one window, and on the last ``live.smoothing`` judged windows
        together (the running verdict: the scorer pools their frames as it pools a file's)."""
        assert self.judge is not None and self.running_features is not None
        feats = feats.cpu().numpy() if hasattr(feats, "cpu") else np.asarray(feats)
        recording = self._record(w, None, outcome="judged")
        recording["condition"] = live_condition(w, self.cfg.live.channels).to_json()
        # The length judged decides the calibration (a window is a short recording: "/short"); the
        # running verdict pools the frames of its windows, so its length is theirs together.
        recording["duration"] = recording["seconds"]
        t0 = time.perf_counter()
        try:
            fields = self.judge(feats, recording)
            both = self.running_features.add(feats)
            pooled = {**recording, "duration": recording["seconds"] * self.running_features.windows}
            running = fields if both is feats else self.judge(both, pooled)
        except Exception as exc:  # noqa: BLE001 - a failing window must not stop capture
            self.errors += 1
            self.metrics.errors.labels(reason="inference").inc()
            log.error("live window scoring failed", extra={"window": w.index, "error": str(exc)})
            self._emit(self._record(w, None, outcome="failed", reason=f"scoring: {type(exc).__name__}: {exc}"))
            return
        timings = {"features": features_s, "scoring": time.perf_counter() - t0}
        live = {k: recording.pop(k) for k in ("latency", "software_version", "judged_at")}
        record = open_set_record(recording, fields, serving=self.backend_info, timings=timings)
        record["running"] = {"device": running["device"], "score": running["score"], "log10_lr": running.get("log10_lr"),
                             "accepted": running["open_set"]["accepted"], "windows": self.running_features.windows}
        record["latency"] = None if w.ended is None else round(self.clock() - w.ended, 6)
        del live
        self.windows_judged += 1
        self.metrics.live_windows.inc()
        if record["latency"] is not None:
            self.metrics.live_latency.observe(record["latency"])
        self._emit(record)

    def _judged(self, unit: Unit) -> None:
        # Runs on an inference thread (one of several where batches run in parallel); _emit restores window order.
        w: LiveWindow = unit.key
        try:
            assert unit.probs is not None
            with self._lock:
                condition = self._conditions.pop(w.index, None)
            score = aggregate(unit.probs, self.labels)
            record = {**self._record(w, score, infer_s=unit.infer_seconds), "condition": condition}
            record = with_comparison(record, {"condition": condition}, None, self.validation)
            # The running verdict names a device only while every window it pools was validated.
            with self._running_lock:
                running = self.running.add(score.probs, validated=record["condition_status"] == "validated")
            record["running"] = _running_fields(running)
            self.windows_judged += 1
            self.metrics.live_windows.inc()
            if record.get("latency") is not None:
                self.metrics.live_latency.observe(record["latency"])
            self._emit(record)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _failed(self, unit: Unit, exc: Exception) -> None:
        with self._lock:
            self._conditions.pop(unit.key.index, None)
        self.errors += 1
        self.metrics.errors.labels(reason="inference").inc()
        log.error("live window inference failed", extra={"window": unit.key.index, "error": str(exc)})
        try:
            self._emit(self._record(unit.key, None, outcome="failed", reason=f"inference: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _emit(self, record: dict) -> None:
        """Hand records to the sink in window order (called from the worker and the inference threads)."""
        with self._out_lock:
            self._held[record["window"]] = record
            ready = []
            while self._next_out in self._held:
                ready.append(self._held.pop(self._next_out))
                self._next_out += 1
            # One sink call at a time, in order: the lock is held while it runs (sinks are quick: a print).
            # It is not the in-flight lock, so an inference thread never waits on a sink for that.
            for r in ready:
                try:
                    self._on_verdict(r)
                except Exception:  # noqa: BLE001 - a failing sink must not stop capture
                    log.exception("live verdict sink failed")

    def _record(self, w: LiveWindow, score, *, infer_s: float = 0.0, outcome: str | None = None,
                reason: str | None = None) -> dict[str, Any]:
        info = self.capture.info
        rec: dict[str, Any] = {
            "outcome": outcome or ("judged" if score is not None else w.level.status),
            "source": "live",
            "input": info.name if info else None,
            "window": w.index,
            "start": round(w.start, 6),
            "seconds": round(len(w.samples) / w.model_rate, 6),
            "sample_rate": w.model_rate,
            "capture_rate": w.capture_rate,
            "resampled": w.resampled,
            "level_dbfs": None if math.isinf(w.level.dbfs) else round(w.level.dbfs, 2),
            "peak": round(w.level.peak, 6),
            "clip_fraction": round(w.level.clip_fraction, 6),
        }
        if reason is not None:
            rec["reason"] = reason
        if score is not None:
            rec.update({
                "device": score.label, "score": round(score.score, 6),
                "top_k": top_k(score, self.labels, self.cfg.watch.top_k),
                "backend": self.backend_info.get("name"), "model_sha256": self.backend_info.get("model_sha256"),
                "contract_sha256": self.backend_info.get("contract_sha256"),
                "inference_s": round(infer_s, 6),
            })
        rec["latency"] = None if w.ended is None else round(self.clock() - w.ended, 6)
        rec["software_version"] = __version__
        rec["judged_at"] = utc_timestamp()
        return rec

    def _sync_metrics(self) -> None:
        # Counts are kept as plain ints in the callback (no locks there) and copied here.
        now = {"input_overflow": self.capture.input_overflows, "ring_overflow": self.ring.overflows}
        for kind, value in now.items():
            if value > self._synced[kind]:
                self.metrics.live_overruns.labels(kind=kind).inc(value - self._synced[kind])
                self._synced[kind] = value
        self.metrics.live_input_up.set(1 if self.capture.up else 0)


class Listener:
    """``devrecd listen``: a :class:`LiveSource` with its own batcher and inference thread; or, serving
    a device registry alone (:class:`~devrecd.pipeline.serving.OpenSetOnly`), the registry's judge on
    the scorer's own frontend (no batcher, no network)."""

    def __init__(self, cfg: Config, backend, metrics: Metrics, *, device: str = "cpu") -> None:
        from devrecd.pipeline.serving import OpenSetOnly

        self.batcher: Batcher | None = None
        if isinstance(backend, OpenSetOnly):
            cfg = replace(cfg, frontend=backend.frontend)  # what the registry's profiles were made with
            self.source = LiveSource(cfg, None, labels=(), backend_info=backend.describe(), metrics=metrics,
                                     device=device, judge=backend.judge)
        else:
            self.batcher = Batcher(backend.infer, max_batch=cfg.batcher.max_batch,
                                   max_wait_s=cfg.batcher.max_wait_ms / 1000, queue_size=cfg.watch.queue_size,
                                   on_batch=lambda n, s: (metrics.batch_size.observe(n), metrics.clips.inc(n)))
            self.source = LiveSource(cfg, self.batcher, labels=backend.labels, backend_info=backend.describe(),
                                     metrics=metrics, device=device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_verdict: OnVerdict, *, feed_rate: int | None = None) -> None:
        """Start inference, then capture."""
        if self.batcher is not None:
            self._thread = threading.Thread(target=self.batcher.run, name="devrecd-live-infer", daemon=True,
                                            args=(self._stop, lambda unit: None, lambda unit, exc: None))
            self._thread.start()
        self.source.start(on_verdict, feed_rate=feed_rate)

    def stop(self) -> None:
        """Stop capture, deliver what is queued, stop inference."""
        self.source.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


def _running_fields(running: Any) -> dict[str, Any]:
    """A closed-set window record's ``running`` verdict (:class:`~devrecd.live.smoothing.Running`): it
    names no device while a window it pools was outside the model's validation."""
    out = {"device": running.device, "confidence": round(running.confidence, 6),
           "agreement": round(running.agreement, 6), "windows": running.windows}
    return out if running.validated else naming_no_device(out)


class _Window:
    """A live window as :func:`~devrecd.audio.condition.measure_condition` reads a decoded recording:
    uncompressed float samples from the card (lossless), its band measured on the window."""

    def __init__(self, w: LiveWindow, channels: int) -> None:
        self.samples = w.samples
        self.excerpt = None
        self.sample_rate = w.model_rate
        self.native_rate = w.capture_rate
        self.channels = channels
        self.size = int(len(w.samples) * 4 * channels * w.capture_rate / w.model_rate)  # float32 as captured
        self.codec = "pcm_f32le"
        self.container = "live"
        self.decoder = "portaudio"


def live_condition(w: LiveWindow, channels: int) -> Any:
    """The condition of a live window (a line input that carries a telephone call is band-limited:
    the registry's references are then matched to that band, as for a file)."""
    from devrecd.audio.condition import measure_condition

    return measure_condition(_Window(w, channels))
