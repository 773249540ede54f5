"""Worker processes (``watch.processes``, devrecd/pipeline/procs.py): the per-file stage in child
processes gives the records the worker threads give, on real CCNU phones with the shipped GSV
scorer; a child killed in the middle of a file fails that file alone; the daemon stops cleanly."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.config import load_config
from devrecd.metrics import Metrics
from devrecd.pipeline.journal import Journal
from devrecd.pipeline.procs import CRASHED
from devrecd.pipeline.runner import Pipeline
from devrecd.pipeline.serving import load_served

ENROLLED = ["Apple_air1", "IPHONEX", "xiaomi8se"]
VOLATILE = ("timings", "judged_at")  # the only fields allowed to differ between two runs


def _rows(ccnu_dir: Path) -> list[dict]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def registry(ccnu_dir: Path, tmp_path_factory) -> Path:
    """Three phones enrolled with ``devrecd enroll`` (the shipped GSV scorer), segments 1-2."""
    path = tmp_path_factory.mktemp("procreg") / "registry"
    rows = _rows(ccnu_dir)
    for device in ENROLLED:
        refs = [str(ccnu_dir / r["path"]) for r in rows if r["device"] == device and int(r["segment"]) <= 2]
        result = CliRunner().invoke(app, ["enroll", "--registry", str(path), "--profile", device, *refs])
        assert result.exit_code == 0, result.output
    return path


def _run(cfg, paths: list[Path], *, processes: bool, during=None) -> dict[str, dict]:
    served = load_served(cfg, Metrics())
    journal = Journal(":memory:")
    records: list[dict] = []
    pipeline = Pipeline(cfg, served, journal=journal, verdict_log=None, metrics=Metrics(),
                        on_record=records.append, processes=processes)
    pipeline.start()
    try:
        ids = [pipeline.submit(str(p)) for p in paths]
        if during is not None:
            during(pipeline, journal, ids)
        assert pipeline.drain(180), "not drained"
    finally:
        pipeline.stop()
        journal.close()
    assert not any(c._proc is not None and c._proc.is_alive() for c in pipeline._children)  # all stopped
    return {r["path"]: r for r in records}


def test_the_default_uses_worker_processes_where_a_registry_judges_on_the_cpu() -> None:
    """``watch.processes`` defaults to ``auto``: processes where a registry judges on the CPU (the
    open-set daemon's threads took turns at the GIL, docs/daemon.md), threads for a closed-set model
    alone and on a GPU; ``always`` adds the model alone, ``never`` keeps threads everywhere."""
    from devrecd.pipeline.procs import use_processes

    cfg = load_config(None, env={})
    assert cfg.watch.processes == "auto"
    assert use_processes(cfg, "cpu", judging=True) and not use_processes(cfg, "cpu", judging=False)
    assert not use_processes(cfg, "cuda:0", judging=True)
    always = cfg.with_overrides({"watch.processes": "always"})
    assert use_processes(always, "cpu", judging=False) and not use_processes(always, "cuda", judging=True)
    never = cfg.with_overrides({"watch.processes": "never"})
    assert not use_processes(never, "cpu", judging=True)


def test_processes_give_the_records_of_the_threads(registry, ccnu_dir, tmp_path) -> None:
    rows = _rows(ccnu_dir)
    paths = [ccnu_dir / r["path"] for r in rows if int(r["segment"]) in (3, 4)][:10]
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" * 10)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(3200, np.int16) + 100, 32000, subtype="PCM_16")
    paths += [bad, short]
    cfg = load_config(None, env={}, overrides={"registry.path": str(registry), "watch.workers": 2})
    threads = _run(cfg, paths, processes=False)
    procs = _run(cfg, paths, processes=True)
    assert set(threads) == set(procs) == {str(p) for p in paths}
    for path, a in threads.items():
        b = procs[path]
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}, path
        if a["outcome"] == "judged":
            assert {"decode", "features", "scoring", "end_to_end"} <= set(b["timings"]), b["timings"]
    outcomes = [r["outcome"] for r in procs.values()]
    assert outcomes.count("judged") == 10 and outcomes.count("failed") == 2
    assert procs[str(bad)]["reason"] == "corrupt" and procs[str(short)]["reason"] in ("too_short", "silent")


def test_a_worker_process_killed_mid_file_fails_that_file_alone(registry, ccnu_dir, tmp_path) -> None:
    rows = _rows(ccnu_dir)
    audio = np.concatenate([sf.read(ccnu_dir / r["path"], dtype="int16")[0] for r in rows[:30]])
    long = tmp_path / "long.wav"  # minutes of audio: its child is still decoding when it is killed
    sf.write(long, np.tile(audio, max(1, int(600 * 32000 / len(audio)))), 32000, subtype="PCM_16")
    others = [ccnu_dir / r["path"] for r in rows if int(r["segment"]) == 4][:3]
    cfg = load_config(None, env={}, overrides={"registry.path": str(registry), "watch.workers": 1})
    killed: list[int] = []

    def kill_while_hashed(pipeline, journal, ids) -> None:
        deadline = time.monotonic() + 60
        while journal.get(ids[0]).state != "hashed":
            assert time.monotonic() < deadline, "the long file was never hashed"
            time.sleep(0.01)
        child = pipeline._children[0]._proc
        killed.append(child.pid)
        os.kill(child.pid, signal.SIGKILL)

    records = _run(cfg, [long, *others], processes=True, during=kill_while_hashed)
    assert killed
    r = records[str(long)]
    assert r["outcome"] == "failed" and r["reason"] == CRASHED, r
    assert "killed by signal 9" in r["detail"] and r["sha256"]  # hashed before it died: the record says so
    for p in others:  # judged by the new child
        assert records[str(p)]["outcome"] == "judged", records[str(p)]


def test_the_daemon_with_worker_processes_stops_cleanly(registry, ccnu_dir, tmp_path) -> None:
    evidence, state = tmp_path / "evidence", tmp_path / "state"
    evidence.mkdir()
    env = {**os.environ, "DEVRECD_WATCH__STABLE_SECONDS": "0.3", "DEVRECD_WATCH__POLL_INTERVAL": "0.3",
           "DEVRECD_WATCH__PROCESSES": "always", "DEVRECD_LOG__FORMAT": "json"}
    with open(tmp_path / "daemon.log", "wb") as log:  # the child holds its own copy
        proc = subprocess.Popen([sys.executable, "-c", "from devrecd.cli import main; main()", "watch", str(evidence),
                                 "--registry", str(registry), "--state-dir", str(state), "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (state / "daemon.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.1)
        children = _children(proc.pid)
        assert len(children) >= 2, children  # the two workers' processes (and multiprocessing's helper)
        for r in [r for r in _rows(ccnu_dir) if int(r["segment"]) == 5][:3]:
            (evidence / Path(r["path"]).name).write_bytes((ccnu_dir / r["path"]).read_bytes())
        log_path = state / "verdicts.jsonl"
        while not log_path.is_file() or len(log_path.read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(json.loads(x)["outcome"] == "judged" for x in log_path.read_text().splitlines())
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends when it sees the daemon gone
    while (left := [c for c in children if Path(f"/proc/{c}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{c}/cmdline").read_bytes() for c in left]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_kept_matched_vectors_give_the_same_verdicts(registry, ccnu_dir, tmp_path) -> None:
    """References brought to a questioned noise are kept on disk (their vectors and SNRs): a new
    judge (a restart, another worker process) reads them instead of matching again, with the same
    verdict fields, to the last digit."""
    import shutil
    from dataclasses import replace

    from devrecd.openset.workflow import RegistryJudge
    from devrecd.stages import features_for_file

    copy = tmp_path / "reg"
    shutil.copytree(registry.parent, copy)
    for kept in (copy / f"{registry.name}.refs").rglob("noise"):  # kept by the tests before: start without
        shutil.rmtree(kept)
    cfg = load_config(None, env={}, overrides={"registry.path": str(copy / registry.name)})
    rows = _rows(ccnu_dir)
    paths = [ccnu_dir / r["path"] for r in rows if int(r["segment"]) in (3, 5)][:12]

    def verdicts() -> tuple[list[dict], int]:
        judge = RegistryJudge(cfg, adopt_frontend=True)
        built: list[int] = []
        real = judge.matcher.noise_matched
        judge.matcher.noise_matched = lambda *a, **k: (built.append(1), real(*a, **k))[1]
        fe = replace(cfg, frontend=judge.frontend)
        out = []
        for p in paths:
            rec, feats = features_for_file(p, fe)
            out.append(judge.judge(feats, rec.describe()))
        return out, len(built)

    first, matched_first = verdicts()
    kept = list((copy / f"{registry.name}.refs").rglob("noise/*.npz"))
    assert matched_first and len(kept) == matched_first  # every matched reference kept once
    again, matched_again = verdicts()
    assert matched_again == 0  # all read back
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert any("matched_references_snr_db" in v["comparison"] for v in again)
