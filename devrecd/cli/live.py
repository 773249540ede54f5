"""``devrecd listen``: judge a sound card's input window by window."""

from __future__ import annotations

import json
import math
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from devrecd.cli.app import (BackendKind, BackendOption, ConfigOption, EngineOption, ModelOption, TextFormat,
                             TorchDeviceOption, cli_logging, command, load_cli_config)
from devrecd.cli.serve import RegistryOption


@command()
def listen(
    input_device: Optional[str] = typer.Option(None, "--input-device", "-i",
                                               help="Sound card: input device name (or part of it) or index (live.device)."),
    list_devices: bool = typer.Option(False, "--list-input-devices", help="List the input devices PortAudio sees and exit."),
    config: Optional[Path] = ConfigOption,
    model: Optional[str] = ModelOption,
    engine: Optional[str] = EngineOption,
    backend: Optional[BackendKind] = BackendOption,
    torch_device: Optional[str] = TorchDeviceOption,
    window_seconds: Optional[float] = typer.Option(None, "--window-seconds", help="Window length in seconds; 0 = the model's clip (live.window_seconds)."),
    hop_seconds: Optional[float] = typer.Option(None, "--hop-seconds", help="Seconds between windows (live.hop_seconds)."),
    smoothing: Optional[int] = typer.Option(None, "--smoothing", help="Running verdict over the last N windows (live.smoothing)."),
    record_dir: Optional[str] = typer.Option(None, "--record-dir", help="Keep the captured audio as WAV segments here (live.record_dir)."),
    port: Optional[int] = typer.Option(None, "--port", help="Serve /metrics, /healthz, /readyz on metrics.address:PORT (0 = any free port)."),
    fmt: TextFormat = typer.Option(TextFormat.table, "--format", case_sensitive=False,
                                   help="table (a line of text per window) or json (one JSON record per window)."),
    max_windows: int = typer.Option(0, "--max-windows", help="Stop after this many windows (0 = until Ctrl-C / SIGTERM)."),
    registry: Optional[Path] = RegistryOption,
) -> None:
    """Listen to a sound-card input and print a verdict per window plus a running verdict.

    With --registry and no --model: the registry's open-set verdicts alone, as `identify --registry`."""
    cfg = load_cli_config(config, {"live.device": input_device, "backend.model": model, "backend.engine": engine,
                                   "backend.kind": backend, "backend.device": torch_device, "live.window_seconds": window_seconds,
                                   "live.hop_seconds": hop_seconds, "live.smoothing": smoothing,
                                   "live.record_dir": record_dir, "registry.path": str(registry) if registry else None})
    cli_logging(cfg)
    if list_devices:
        _print_input_devices()
        return

    from dataclasses import replace

    from devrecd.pipeline.serving import OpenSetOnly, load_served
    from devrecd.live import Listener, window_sizes
    from devrecd.live.capture import sounddevice
    from devrecd.metrics import Metrics
    from devrecd.stages import resolve_device

    window_sizes(cfg)  # refuse a bad window/hop before loading anything
    sounddevice()  # the install hint now, not after the model has loaded
    metrics = Metrics()
    device = resolve_device(cfg.backend.device)
    be = load_served(cfg, metrics, device=device)  # the closed-set model, or the registry alone (no model)
    if isinstance(be, OpenSetOnly):
        window_sizes(replace(cfg, frontend=be.frontend))  # the scorer's clip: a window is at least one
    listener = Listener(cfg, be, metrics, device=device)
    done = threading.Event()
    seen = [0]
    lock = threading.Lock()

    def show(record: dict) -> None:
        with lock:
            if done.is_set():
                return
            typer.echo(json.dumps(record, ensure_ascii=False) if fmt is TextFormat.json else format_window(record))
            seen[0] += 1
            if max_windows and seen[0] >= max_windows:
                done.set()

    _run_listener(listener, be, metrics, show, done, address=cfg.metrics.address, port=port)


def _print_input_devices() -> None:
    from devrecd.live import list_input_devices

    for d in list_input_devices():
        mark = "*" if d["default"] else " "
        typer.echo(f"{mark} {d['index']:>3}  {d['name']}  ({d['hostapi']}, {d['channels']} ch, "
                   f"{d['default_samplerate']:.0f} Hz)")


def _run_listener(listener: Any, be: Any, metrics: Any, show: Callable[[dict], None], done: threading.Event, *,
                  address: str, port: int | None) -> None:
    """Listen, ``show`` each window record, until ``done`` (or SIGTERM / SIGINT); the endpoints on
    ``address:port`` meanwhile when a port is given; then the listener's counts on stderr."""
    server = None
    if port is not None:
        from devrecd.daemon.http import StatusServer

        server = StatusServer(metrics.registry, address, port, healthy=lambda: (True, "ok"),
                              ready=listener.source.ready)
        server.start()
        typer.echo(f"metrics: {server.url}/metrics", err=True)
    from devrecd.daemon.signals import SignalRelay

    relay = SignalRelay({signal.SIGTERM: done, signal.SIGINT: done})  # never done.set() in a handler: see there
    relay.install()
    try:
        listener.start(show)
        metrics.ready.set(1)
        while not done.wait(0.2):
            pass
    finally:
        try:
            listener.stop()
            be.close()
            if server is not None:
                server.stop()
            stats = listener.source.stats()
            typer.echo(f"listened: {stats['windows']} windows, {stats['judged']} judged, {stats['skipped']} silent/clipped, "
                       f"{stats['input_overflows']} input overflows, {stats['ring_overflows']} ring overflows, "
                       f"{stats['reopens']} reopens", err=True)
        finally:
            relay.restore()  # last: a second signal meanwhile is relayed (ignored), not a KeyboardInterrupt mid-cleanup


def format_window(r: dict) -> str:
    """One line per window: time, level, verdict (or why none), running verdict."""
    level = "  -inf" if r.get("level_dbfs") is None else f"{r['level_dbfs']:6.1f}"
    head = f"{r['start']:9.2f}s {level} dBFS"
    if r["outcome"] != "judged":
        return f"{head}  ({r['outcome']}: not judged)"
    run = r["running"]
    rate = f"  [{r['capture_rate']} Hz resampled]" if r["resampled"] else ""
    lat = "" if r.get("latency") is None or math.isnan(r["latency"]) else f"  {r['latency'] * 1000:.0f} ms"
    if "open_set" in r:  # the registry's verdict (no closed-set model): score and LLR, as identify prints them
        llr = lambda v: "" if v is None else f" llr {v:.2f}"  # noqa: E731
        return (f"{head}  {r['device']} {r['score']:.3f}{llr(r.get('llr'))}  | running {run['device']} "
                f"{run['score']:.3f}{llr(run.get('llr'))} ({run['windows']} windows){lat}{rate}")
    return (f"{head}  {r['device']} {r['score']:.3f}  | running {run['device']} {run['confidence']:.3f} "
            f"({run['agreement'] * run['windows']:.0f}/{run['windows']}){lat}{rate}")
