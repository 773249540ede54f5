"""Helpers shared by the test files: the daemon as a subprocess, real phone recordings, a free port,
synthetic development features of a few phones."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from prometheus_client.parser import text_string_to_metric_families


class DaemonProc:
    """``devrecd watch`` in a subprocess, with its state folder and endpoint."""

    def __init__(self, tmp: Path, evidence: Path, model: Path, **watch: object) -> None:
        self.state = tmp / "state"
        self.config = tmp / "daemon.toml"
        settings = {"stable_seconds": 0.5, "poll_interval": 0.5, "workers": 2, "queue_size": 8, "shutdown_timeout": 20.0,
                    **watch}
        lines = ["[watch]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[batcher]", "max_batch = 8", "max_wait_ms = 20.0", "[metrics]", "port = 0",
                  "[backend]", f"model = {json.dumps(str(model))}", "threads = 1", "[log]", "format = \"json\""]
        self.config.write_text("\n".join(lines) + "\n")
        self.evidence = evidence
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None) -> DaemonProc:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from devrecd.cli import main; main()", "watch", str(self.evidence), "--config", str(self.config),
             "--state-dir", str(self.state)], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"daemon exited: {self.log_path.read_text()[-3000:]}"
            status = self.state / "daemon.json"
            if status.is_file():
                doc = json.loads(status.read_text())
                if doc["pid"] == self.proc.pid:
                    self.url = doc["url"]
                    return self
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready: {self.log_path.read_text()[-3000:]}")

    def records(self) -> list[dict]:
        p = self.state / "verdicts.jsonl"
        # Only whole lines: the daemon appends a group of records in one write, which a reader may
        # catch half done (the line without its newline is not written yet).
        text = p.read_text() if p.is_file() else ""
        return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]

    def wait_records(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            recs = self.records()
            if len(recs) >= n:
                return recs
            assert self.proc.poll() is None, f"daemon exited: {self.log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"{len(self.records())} of {n} verdicts after {timeout} s: {self.log_path.read_text()[-3000:]}")

    def wait_drained(self, timeout: float = 120) -> dict[str, float]:
        """Wait until nothing is waiting or in flight (devrecd_queue_depth counts the watcher's
        candidates and the pipeline's files); -> the daemon's non-zero file and error counters then."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, text = self.get("/metrics")
            assert status == 200, text
            if metric_sample(text, "devrecd_queue_depth") == 0:
                return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
                        for f in text_string_to_metric_families(text) for s in f.samples
                        if s.name in ("devrecd_files_total", "devrecd_errors_total") and s.value}
            assert self.proc is not None and self.proc.poll() is None, f"daemon exited: {self.log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"queue not drained after {timeout} s: {self.log_path.read_text()[-3000:]}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()


def ccnu_recordings(ccnu_dir: Path, n: int) -> list[Path]:
    """The first n test-segment recordings (segments 4-5), real phone audio."""
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["segment"]) >= 4]
    return [ccnu_dir / r["path"] for r in rows[:n]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_sample(text: str, name: str) -> float:
    """The value of the first sample called ``name`` in a Prometheus text exposition."""
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def shipped_registry(ccnu_dir: Path, tmp_path: Path, phones: Sequence[str]):
    """A case registry of the shipped GSV scorer with ``phones`` enrolled from CCNU segments 1-2;
    returns the configuration that serves it."""
    from devrecd.config import Config
    from devrecd.openset.registry import open_registry
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.openset.workflow import enrol_files

    reg_path = tmp_path / "case" / "registry.json"
    cfg = Config().with_overrides({"registry.path": str(reg_path)})
    scorer, _ = load_gsv(default_gsv_path())
    reg = open_registry(reg_path, create=True)
    for p in phones:
        enrol_files(reg, scorer, p, [ccnu_dir / f"{p}_{s}.wav" for s in (1, 2)], cfg)
    reg.save()
    return cfg


DEV_PHONES = [f"p{k}" for k in range(6)]
DEV_PER_PHONE = 4


def synthetic_dev_features():
    """``(feats, devices, order)`` of ``DEV_PER_PHONE`` synthetic recordings (2 windows of 128 x 73
    features) of each of ``DEV_PHONES``: a device offset in every dim, so the phones are told apart
    and the GSV fits do not degenerate (training-recipe tests that need no audio)."""
    import numpy as np

    rng = np.random.default_rng(0)
    devices = [p for p in DEV_PHONES for _ in range(DEV_PER_PHONE)]
    order = [(str(s), f"{p}_{s}") for p in DEV_PHONES for s in range(DEV_PER_PHONE)]
    offsets = {p: rng.normal(0, 1, 73).astype(np.float32) for p in DEV_PHONES}
    feats = [(rng.normal(0, 1, (2, 128, 73)) + offsets[d]).astype(np.float32) for d in devices]
    return feats, devices, order
