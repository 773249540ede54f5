"""Prometheus metrics of the daemon and live input, all created against a passed-in registry.

Names follow Prometheus conventions (``devrecd_`` prefix, base units, ``_total`` for counters).
Other parts of devrecd (live input, the Grafana dashboard, alert rules) depend on these names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from devrecd import __version__

STAGES = ("decode", "features", "queue", "inference", "end_to_end", "writer")  # + "h2d", "frontend" on a GPU
OUTCOMES = ("judged", "failed", "duplicate")
OVERRUN_KINDS = ("input_overflow", "ring_overflow")

# Seconds: from a few ms (one batch on a GPU) to minutes (a long file behind a backlog).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every devrecd metric, registered on ``registry`` (a fresh one per daemon and per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.files = Counter("devrecd_files", "Files finished, by outcome.", ["outcome"], registry=r)
        self.verdicts = Counter("devrecd_verdicts", "File verdicts, by predicted device.", ["device"], registry=r)
        self.stage_seconds = Histogram("devrecd_stage_seconds", "Latency of each pipeline stage per file.",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("devrecd_batch_size", "Clips per inference batch.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.clips = Counter("devrecd_clips", "Clips (network inputs) inferred.", registry=r)
        self.audio_seconds = Counter("devrecd_audio_seconds", "Seconds of audio judged.", registry=r)
        self.queue_depth = Gauge("devrecd_queue_depth", "Files waiting or in flight in the pipeline.", registry=r)
        self.oldest_pending_age = Gauge("devrecd_oldest_pending_age_seconds",
                                        "Age of the oldest file waiting or in flight (0 when none).", registry=r)
        self.errors = Counter("devrecd_errors", "Files that could not be judged, by reason.", ["reason"], registry=r)
        self.backend_info = Info("devrecd_backend", "The inference backend and model in use.", registry=r)
        self.ready = Gauge("devrecd_ready", "1 when the model is loaded, warm and the sources are running.", registry=r)
        self.storage_writable = Gauge("devrecd_storage_writable", "0 while the journal or verdict log cannot be "
                                      "written (full disk, read-only file system): files wait, retried with backoff.",
                                      registry=r)
        self.storage_writable.set(1)
        self.build_info = Info("devrecd_build", "devrecd software version.", registry=r)
        # The live input (devrecd.live) records into these.
        self.live_windows = Counter("devrecd_live_windows", "Live-input windows judged.", registry=r)
        self.live_overruns = Counter("devrecd_live_overruns", "Live-input overruns, by kind.", ["kind"], registry=r)
        self.live_level_dbfs = Gauge("devrecd_live_level_dbfs", "Live-input RMS level of the last window (dBFS).",
                                     registry=r)
        self.live_latency = Histogram("devrecd_live_latency_seconds",
                                      "Latency from the last sample of a live window to its verdict.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.live_input_up = Gauge("devrecd_live_input_up", "1 while the live input device delivers audio.",
                                   registry=r)

        self.build_info.info({"version": __version__})
        # Pre-create the label values so every series exists from the first scrape (rate() and
        # dashboards then see 0 instead of "no data").
        for outcome in OUTCOMES:
            self.files.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for kind in OVERRUN_KINDS:
            self.live_overruns.labels(kind=kind)
        self.ready.set(0)

    def set_backend(self, describe: dict) -> None:
        """Record the backend's identity (from ``Backend.describe()``)."""
        keys = ("backend", "version", "device", "model_sha256", "contract_sha256")
        aliases = {"backend": "name"}
        self.backend_info.info({k: str(describe.get(k, describe.get(aliases.get(k, k), "")) or "") for k in keys})
