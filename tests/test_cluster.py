"""``devrecd batch`` on a real local Ray instance: same verdicts as ``devrecd identify``, exactly once
across reruns and a driver killed with SIGKILL; the output folder's recovery at every crash point."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from devrecd.cluster.output import COMMITS, PARTS, VERDICTS, BatchOutput, OutputError
from devrecd.cluster.sources import list_recordings
from devrecd.config import Config, WatchConfig, load_config
from devrecd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# Fields that differ between two runs of the same verdict by nature (ids, clocks, stage timings).
VOLATILE = {"id", "judged_at", "timings"}


def _ccnu(ccnu_dir: Path, n: int, segment: str = "2") -> list[Path]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["segment"] == segment]
    return [ccnu_dir / r["path"] for r in rows[:n]]


def _parts(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for p in sorted((out / PARTS).glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def _close(a, b, tol: float = 2e-6) -> bool:
    """Equal, floats to ``tol`` (nested lists and dicts alike)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / VERDICTS).read_text().splitlines()]


# --- the output folder alone (no Ray): every crash point of a commit ---------------------------------

def _row(path: str, i: int) -> dict:
    return {"path": path, "file_size": 100 + i, "file_mtime_ns": 10 * i,
            "record": {"outcome": "failed", "path": path, "sha256": f"{i:064x}", "size": 100 + i, "reason": "corrupt",
                       "detail": "test", "software_version": "0", "timings": {}, "judged_at": "t"}}


def test_output_recovers_from_every_crash_point(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    with BatchOutput(out) as o:
        o.commit([_row("/e/a.wav", 1), _row("/e/b.wav", 2)])
        o.commit([_row("/e/c.wav", 3)])
        with pytest.raises(OutputError, match="another devrecd batch"):
            BatchOutput(out)  # one driver at a time
    good_lines = (out / VERDICTS).read_bytes()
    # Crash after a part was renamed but before its commit line, with a temp file of the next one,
    # a torn commit line, and the last committed part's verdict lines half appended.
    shutil.copy(out / PARTS / "part-000000000003.parquet", out / PARTS / "part-000000000004.parquet")
    (out / PARTS / ".part-000000000005.parquet.x.tmp").write_bytes(b"PAR1")
    with open(out / COMMITS, "ab") as fh:
        fh.write(b'{"part": "part-000000000004.parq')
    os.truncate(out / VERDICTS, len(good_lines) - 40)
    with BatchOutput(out) as o:
        assert o.repaired == {"parts_removed": 2, "commit_tail_cut": 1, "verdict_lines_rewritten": 1}
        assert sorted(p.name for p in (out / PARTS).iterdir()) == ["part-000000000001.parquet",
                                                                   "part-000000000003.parquet"]
        assert (out / VERDICTS).read_bytes() == good_lines
        assert o.next_id == 4 and o.totals()["records"] == 3
        assert o.is_recorded("/e/b.wav", 102, 20) and not o.is_recorded("/e/b.wav", 102, 21)
        assert o.recorded_hashes("/e/c.wav") == {f"{3:064x}"}
        o.commit([_row("/e/d.wav", 4)])
    # Lines past the last commit (none can be, but a hand edit or a torn write) are cut.
    with open(out / VERDICTS, "ab") as fh:
        fh.write(b'{"id": 99}\n')
    with BatchOutput(out):
        pass
    lines = _lines(out)
    assert [r["id"] for r in lines] == [1, 2, 3, 4] and [r["path"] for r in lines][-1] == "/e/d.wav"
    assert [r["record"] for r in _parts(out)] == (out / VERDICTS).read_text().splitlines()
    # A committed part that vanished is damage a restart cannot repair: said, not papered over.
    (out / PARTS / "part-000000000001.parquet").unlink()
    with pytest.raises(OutputError, match="committed part part-000000000001.parquet is missing"):
        BatchOutput(out)


def test_sources_folders_manifests_and_lists(tmp_path: Path, ccnu_dir: Path) -> None:
    ev = tmp_path / "ev"
    (ev / "sub").mkdir(parents=True)
    a, b = _ccnu(ccnu_dir, 2)
    shutil.copy(a, ev / "a.wav")
    shutil.copy(b, ev / "sub" / "b.wav")
    (ev / "notes.txt").write_text("not a recording\n")
    (ev / ".hidden.wav").write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"# evidence\nev/a.wav\n\n{ev / 'sub' / 'b.wav'}\n")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "device"], ["ev/sub/b.wav", "x"], [str(a), "y"]])
    cfg = WatchConfig()
    assert list_recordings([ev], cfg) == [str(ev / "a.wav"), str(ev / "sub" / "b.wav")]
    assert list_recordings([tmp_path / "list.txt", ev], cfg) == [str(ev / "a.wav"), str(ev / "sub" / "b.wav")]
    assert list_recordings([tmp_path / "m.csv"], cfg) == [str(ev / "sub" / "b.wav"), str(a)]
    assert list_recordings([ev], cfg, exclude=[ev / "sub"]) == [str(ev / "a.wav")]
    (tmp_path / "bad.csv").write_text("file,device\nx.wav,y\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        list_recordings([tmp_path / "bad.csv"], cfg)
    with pytest.raises(ConfigError, match="source not found"):
        list_recordings([tmp_path / "nope.wav"], cfg)


class _Resources:
    """What plan() asks of Ray: the cluster's resources (a GPU cluster cannot exist here)."""

    def __init__(self, **res: float) -> None:
        self.res = res

    def cluster_resources(self) -> dict:
        return self.res


def test_plan_sizes_the_actor_pool() -> None:
    from devrecd.cluster.job import plan

    cfg = load_config(None, env={})
    p = plan(_Resources(CPU=64.0, GPU=4.0), cfg)
    assert (p.actors, p.actor_gpus, p.actor_cpus) == (4, 1.0, 1.0)  # one engine per GPU
    ort = cfg.with_overrides({"backend.kind": "onnxruntime"})
    assert (plan(_Resources(CPU=64.0, GPU=4.0), ort).actors, plan(_Resources(CPU=64.0, GPU=4.0), ort).actor_gpus) == (63, 0.0)
    assert plan(_Resources(CPU=2.0), cfg).actors == 1
    small = cfg.with_overrides({"cluster.actor_cpus": 0.75, "cluster.decode_cpus": 0.5})
    assert plan(_Resources(CPU=2.0), small).actors == 2
    assert plan(_Resources(CPU=2.0), cfg.with_overrides({"cluster.inference_actors": 3})).actors == 3
    with pytest.raises(ConfigError, match="decode_cpus"):
        plan(_Resources(CPU=2.0), cfg.with_overrides({"cluster.decode_cpus": 4.0}))
    with pytest.raises(ConfigError, match="block_files must be >= 1"):
        cfg.with_overrides({"cluster.block_files": 0})


def test_batch_cli_refuses_bad_setups_in_one_line(tmp_path: Path, exported_model) -> None:
    from typer.testing import CliRunner

    from devrecd.cli import app

    pytest.importorskip("ray")
    ev = tmp_path / "ev"
    ev.mkdir()
    runner = CliRunner()
    result = runner.invoke(app, ["batch", str(ev), "--out", str(tmp_path / "out")], env={"DEVRECD_BACKEND__MODEL": ""})
    assert result.exit_code == 1 and "no model given" in result.output
    result = runner.invoke(app, ["batch", str(ev), "--out", str(ev / "results"), "--model", str(exported_model)])
    assert result.exit_code == 1 and "inside the evidence folder" in result.output
    result = runner.invoke(app, ["batch", str(ev), "--out", str(tmp_path / "out"), "--model", str(exported_model)])
    assert result.exit_code == 1 and "no recordings found" in result.output


# --- on a real local Ray instance ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster() -> dict:
    """A local Ray instance of 2 CPUs for this module (started once: it takes ~10 s on 2 cores), with
    its Prometheus endpoint on a free port."""
    import socket

    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield {"address": ray.get_runtime_context().gcs_address,
               "metrics": f"http://{ray.nodes()[0]['NodeManagerAddress']}:{port}/metrics"}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_address(ray_cluster: dict) -> str:
    return ray_cluster["address"]


def _scrape(url: str, want: str, timeout: float = 60.0) -> list[str]:
    """The endpoint's sample lines once one starts with ``want`` (Ray reports metrics every few seconds)."""
    import urllib.request

    end = time.time() + timeout
    while True:
        try:
            lines = [x for x in urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
                     if not x.startswith("#")]
        except OSError:
            lines = []
        if any(x.startswith(want) for x in lines) or time.time() > end:
            return lines
        time.sleep(1)


@pytest.fixture(scope="module")
def cfg(exported_model) -> Config:
    return load_config(None, env={}, overrides={"backend.model": str(exported_model), "backend.threads": 1,
                                                "batcher.max_batch": 8, "cluster.block_files": 3})


def _evidence(folder: Path, ccnu_dir: Path) -> list[Path]:
    """Real phone recordings (6 phones), one re-encoded as AAC at 44.1 kHz, and damaged files."""
    from tests.media import encode

    folder.mkdir()
    files = [Path(shutil.copy(p, folder / p.name)) for p in _ccnu(ccnu_dir, 6)]
    x, sr = sf.read(files[0], dtype="float32")
    files.append(encode(x, sr, folder / "reencoded.m4a", codec="aac", fmt="ipod", out_rate=44100))
    (folder / "truncated.wav").write_bytes(files[1].read_bytes()[:4000])
    (folder / "not audio.mp3").write_text("meeting notes, not a recording\n")
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "silent.wav", np.zeros(3 * 32000, np.float32), 32000)
    sf.write(folder / "short.wav", (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 32000)
    return files + [folder / n for n in ("truncated.wav", "not audio.mp3", "empty.wav", "silent.wav", "short.wav")]


@pytest.mark.slow
def test_batch_gives_identifys_verdicts_once(ray_cluster: dict, cfg: Config, ccnu_dir: Path, tmp_path: Path) -> None:
    from devrecd.cluster.job import run_batch
    from devrecd.pipeline.identify import identify_files

    files = _evidence(tmp_path / "evidence", ccnu_dir)
    out = tmp_path / "out"
    summary = run_batch(cfg, [tmp_path / "evidence"], out)
    expected = {r["path"]: r for r in identify_files(cfg, files)}
    assert summary["submitted"] == len(files) and summary["this_run"]["judged"] == 7
    assert summary["this_run"]["failed_by_reason"] == {"corrupt": 1, "unsupported": 1, "empty": 1, "silent": 1,
                                                       "too_short": 1}
    assert summary["plan"]["actors"] == 1 and summary["ray"]["started_here"] is False
    lines, parts = _lines(out), _parts(out)
    assert sorted(r["path"] for r in lines) == sorted(expected) and len(lines) == len(files)
    assert sorted(r["id"] for r in lines) == list(range(1, len(files) + 1))
    assert [p["record"] for p in parts] == (out / VERDICTS).read_text().splitlines()
    assert len(list((out / PARTS).glob("*.parquet"))) >= 4  # one part per block of 3 files
    for got in lines:
        want = expected[got["path"]]
        assert set(got) == set(want), got["path"]
        for k in set(got) - VOLATILE - {"score", "top_k", "windows"}:
            assert got[k] == want[k], (got["path"], k)
        if want["outcome"] == "judged":
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert [c["device"] for c in got["top_k"]] == [c["device"] for c in want["top_k"]]
            assert np.allclose([c["score"] for c in got["top_k"]], [c["score"] for c in want["top_k"]], atol=1e-5)
            assert [(w["start"], w["device"]) for w in got["windows"]] == [(w["start"], w["device"]) for w in want["windows"]]
            assert set(got["timings"]) == {"decode", "features", "inference"}
    assert next(r for r in lines if r["path"].endswith(".m4a"))["resampled"] is True
    # devrecd's counters, beside Ray's own metrics, on the node's Prometheus endpoint.
    scraped = _scrape(ray_cluster["metrics"], "ray_devrecd_batch_files_total{")
    assert any(x.startswith("ray_devrecd_batch_files_total{") and 'outcome="judged"' in x for x in scraped)
    assert any(x.startswith("ray_devrecd_batch_errors_total{") and 'reason="too_short"' in x for x in scraped)
    assert any(x.startswith("ray_") and "devrecd" not in x for x in scraped)
    # A rerun on the same folder finds everything recorded and judges nothing again.
    before = (out / VERDICTS).read_bytes()
    again = run_batch(cfg, [tmp_path / "evidence"], out)
    assert again["already_recorded"] == len(files) and again["submitted"] == 0 and again["ray"] is None
    assert (out / VERDICTS).read_bytes() == before
    # A touched file (new mtime, same content) is read again but not recorded twice; a new one is judged,
    # this time by actors that got the model through the object store (same model and contract hashes).
    os.utime(files[2], ns=(time.time_ns(), time.time_ns()))
    shutil.copy(_ccnu(ccnu_dir, 7)[6], tmp_path / "evidence" / "new.wav")
    shipped = replace(cfg, cluster=replace(cfg.cluster, ship_model=True))
    third = run_batch(shipped, [tmp_path / "evidence"], out)
    assert (third["submitted"], third["this_run"]["unchanged"], third["this_run"]["judged"]) == (2, 1, 1)
    lines = _lines(out)
    assert len(lines) == len(files) + 1 and lines[-1]["path"].endswith("new.wav")
    provenance = {(r["model_sha256"], r["contract_sha256"]) for r in expected.values() if r["outcome"] == "judged"}
    assert len(provenance) == 1 and (lines[-1]["model_sha256"], lines[-1]["contract_sha256"]) in provenance


def test_serving_never_imports_ray() -> None:
    code = ("import sys, devrecd.cli, devrecd.cluster.job, devrecd.daemon.service, devrecd.pipeline.identify; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyarrow', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_exactly_once(ray_address: str, cfg: Config, ccnu_dir: Path,
                                                    tmp_path: Path) -> None:
    """SIGKILL the driver (a `devrecd batch` subprocess on this Ray cluster) after its first commit,
    rerun: every file exactly once in the parts and in verdicts.jsonl."""
    from typer.testing import CliRunner

    from devrecd.cli import app

    ev = tmp_path / "evidence"
    ev.mkdir()
    for p in _ccnu(ccnu_dir, 15, segment="3"):
        for k in range(2):  # the same content under two names: two files, two verdicts
            shutil.copy(p, ev / f"{k}-{p.name}")
    n = 30
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "DEVRECD_CLUSTER__BLOCK_FILES": "1", "DEVRECD_BACKEND__THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "devrecd", "batch", str(ev), "--out", str(out),
                             "--model", cfg.backend.model, "--address", ray_address],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "wb"))
    try:
        deadline = time.time() + 240
        while not ((out / COMMITS).is_file() and (out / COMMITS).read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no commit within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    committed = (out / COMMITS).read_bytes().count(b"\n")
    assert 2 <= committed < n, "the driver finished before it was killed: nothing to resume"
    result = CliRunner().invoke(app, ["batch", str(ev), "--out", str(out), "--model", cfg.backend.model],
                                env={"DEVRECD_CLUSTER__BLOCK_FILES": "4"})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_recorded"] >= committed and summary["already_recorded"] + summary["submitted"] == n
    lines, parts = _lines(out), _parts(out)
    assert sorted(r["path"] for r in lines) == sorted(str(p) for p in ev.iterdir())
    assert sorted(r["id"] for r in lines) == list(range(1, n + 1))
    assert sorted(p["path"] for p in parts) == sorted(r["path"] for r in lines)
    assert [p["record"] for p in parts] == (out / VERDICTS).read_text().splitlines()
    assert all(r["outcome"] == "judged" for r in lines)
    # Both copies of a recording got the same verdict, whichever run judged them.
    by_name = {Path(r["path"]).name: r for r in lines}
    for p in _ccnu(ccnu_dir, 15, segment="3"):
        a, b = by_name[f"0-{p.name}"], by_name[f"1-{p.name}"]
        assert a["sha256"] == b["sha256"] and a["device"] == b["device"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


@pytest.mark.slow
def test_batch_without_a_model_gives_identifys_registry_verdicts(ray_cluster: dict, ccnu_dir: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    """``batch --registry R`` without a model: the shipped GSV scorer's open-set verdicts, field for field
    those of ``identify --registry`` (condition matching included: one file re-encoded as AAC), whether
    the workers read the registry where it lies or get it (JSON, arrays, kept references) through Ray."""
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.cluster.job import run_batch
    from devrecd.pipeline.identify import identify_files
    from tests.media import encode
    from tests.test_openset_serving import ENROLLED, NOT_ENROLLED, _segment

    registry = tmp_path / "case" / "registry"
    for device in ENROLLED:
        result = CliRunner().invoke(app, ["enroll", "--registry", str(registry), "--profile", device,
                                          *(str(_segment(ccnu_dir, device, s)) for s in (1, 2))])
        assert result.exit_code == 0, result.output
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    files = [Path(shutil.copy(_segment(ccnu_dir, d, 4), evidence / f"{d}.wav")) for d in (*ENROLLED[:2], NOT_ENROLLED)]
    x, sr = sf.read(files[0], dtype="float32")
    files.append(encode(x, sr, evidence / "reencoded.m4a", codec="aac", fmt="ipod", out_rate=44100))
    (evidence / "truncated.wav").write_bytes(files[1].read_bytes()[:4000])
    files.append(evidence / "truncated.wav")

    def refuse(*_a, **_k):
        raise AssertionError("a closed-set backend was loaded")

    monkeypatch.setattr("devrecd.backends.load_backend", refuse)  # the driver (and identify) load no network
    cfg = load_config(None, env={}, overrides={"registry.path": str(registry), "cluster.block_files": 2})
    expected = {r["path"]: r for r in identify_files(cfg, files)}
    judged = {p: r for p, r in expected.items() if r["outcome"] == "judged"}
    assert len(judged) == 4 and expected[str(files[-1])]["reason"] == "corrupt"
    assert expected[str(files[0])]["device"] == ENROLLED[0] and expected[str(files[2])]["device"] == "unknown device"
    assert expected[str(files[3])]["comparison"]["compared_under"] != "clean"  # references matched to AAC

    def check(out: Path) -> None:
        lines = _lines(out)
        assert sorted(r["path"] for r in lines) == sorted(expected)
        for got in lines:
            want = expected[got["path"]]
            assert set(got) - {"id"} == set(want) - {"id"}, got["path"]
            for k in set(want) - VOLATILE:  # scores to the last rounded digit (AAC decoded in another process)
                assert _close(got[k], want[k]), (got["path"], k, got[k], want[k])
            if want["outcome"] == "judged":
                assert got["backend"] == "open-set-only" and got["closed_set"] is None
                assert "scoring" in got["timings"]

    summary = run_batch(cfg, [evidence], tmp_path / "out")
    assert summary["this_run"]["judged"] == 4 and summary["backend"]["closed_set_model"] is None
    check(tmp_path / "out")
    shipped = replace(cfg, cluster=replace(cfg.cluster, ship_model=True))
    run_batch(shipped, [evidence], tmp_path / "out-shipped")
    check(tmp_path / "out-shipped")
