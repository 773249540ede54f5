"""``devrecd identify`` and ``devrecd verdicts`` on real recordings with the exported model."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.cli.serve import parse_since
from devrecd.config import Config, load_config
from devrecd.daemon.service import Daemon
from devrecd.pipeline.identify import identify_files
from devrecd.pipeline.serving import load_serving_backend
from devrecd.pipeline.verdict import aggregate
from devrecd.errors import ArtifactError
from devrecd.stages import features_for_file

runner = CliRunner()


def _recordings(ccnu_dir: Path, n: int) -> list[Path]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["segment"] == "4"]
    return [ccnu_dir / r["path"] for r in rows[:n]]


@pytest.fixture(scope="module")
def cfg(exported_model) -> Config:
    return load_config(None, env={}, overrides={"backend.model": str(exported_model), "backend.threads": 1,
                                                "batcher.max_batch": 4})


def test_identify_matches_the_naive_loop(cfg: Config, ccnu_dir: Path) -> None:
    """Batching windows across files must give each file exactly its own windows' verdict."""
    files = _recordings(ccnu_dir, 4)
    records = identify_files(cfg, files)
    assert [r["path"] for r in records] == [str(p) for p in files]
    backend = load_serving_backend(cfg)
    try:
        for path, rec in zip(files, records):
            recording, feats = features_for_file(path, cfg)
            expected = aggregate(backend.infer(feats), backend.labels)
            assert rec["outcome"] == "judged" and rec["sha256"] == recording.sha256
            assert rec["device"] == expected.label and rec["score"] == pytest.approx(expected.score, abs=1e-5)
            assert len(rec["windows"]) == len(feats)
            assert [c["device"] for c in rec["top_k"]] == [backend.labels[i] for i in
                                                           np.argsort(-expected.mean_log_prob, kind="stable")[:5]]
    finally:
        backend.close()


def _five_segments(ccnu_dir: Path, tmp_path: Path) -> Path:
    """One phone's five segments as one WAV (~45 s: several chunks of features, many batches)."""
    import soundfile as sf

    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["device"] == "Apple_air1"]
    x = np.concatenate([sf.read(ccnu_dir / r["path"], dtype="float32")[0] for r in rows])
    long = tmp_path / "five segments.wav"
    sf.write(long, x, 32000, subtype="PCM_16")
    return long


def test_a_long_file_inferred_chunk_by_chunk_gets_exactly_the_naive_verdict(cfg: Config, ccnu_dir: Path,
                                                                            tmp_path: Path) -> None:
    """A file's features go to the batcher in chunks as they are computed (never held whole); the
    window probabilities gathered back from several chunks and batches give the naive loop's verdict."""
    from devrecd.stages import _CLIPS_PER_EXTRACT

    long = _five_segments(ccnu_dir, tmp_path)
    dense = cfg.with_overrides({"audio.hop_seconds": 0.5})
    [rec] = identify_files(dense, [long])
    backend = load_serving_backend(dense)
    try:
        _, feats = features_for_file(long, dense)
        expected = aggregate(backend.infer(feats), backend.labels)
    finally:
        backend.close()
    assert len(feats) > 4 * _CLIPS_PER_EXTRACT, "the file must span several chunks"
    assert rec["outcome"] == "judged" and len(rec["windows"]) == len(feats)
    assert rec["device"] == expected.label and rec["score"] == pytest.approx(expected.score, abs=1e-5)
    assert [w["device"] for w in rec["windows"]] == [backend.labels[i] for i in expected.window_labels]


def test_a_chunked_file_whose_batch_fails_gets_one_failed_record(cfg: Config, ccnu_dir: Path, tmp_path: Path) -> None:
    """One batch of a file sent in chunks fails: the file is recorded once as failed (inference),
    the chunks still in flight or still coming are dropped, and the runner drains."""
    from devrecd.backends.base import InferenceError

    class FailsOnThirdBatch:
        def __init__(self, inner) -> None:
            self.inner, self.name, self.labels, self.frontend = inner, inner.name, inner.labels, inner.frontend
            self.concurrency, self.batches = 1, 0

        def infer(self, x):
            self.batches += 1
            if self.batches == 3:
                raise InferenceError("injected failure of the third batch")
            return self.inner.infer(x)

        def describe(self) -> dict:
            return self.inner.describe()

    long = _five_segments(ccnu_dir, tmp_path)
    backend = load_serving_backend(cfg)
    failing = FailsOnThirdBatch(backend)
    seen: list[dict] = []
    out: list[list[dict]] = []
    try:
        t = threading.Thread(target=lambda: out.append(identify_files(cfg, [long], backend=failing, on_record=seen.append)))
        t.start()
        t.join(300)
        assert not t.is_alive(), "the runner did not drain after a chunk's batch failed"
    finally:
        backend.close()
    [[rec]] = out
    assert (rec["outcome"], rec["reason"]) == ("failed", "inference") and "third batch" in rec["detail"]
    assert [r["id"] for r in seen] == [rec["id"]], "one record for the file"
    assert failing.batches > 3, "the file spans batches after the failing one"


def test_a_failure_after_hashing_keeps_the_files_hash(cfg: Config, ccnu_dir: Path, monkeypatch) -> None:
    """A surprise after the file was opened and hashed (here the frontend stage raising) is a failed
    record that still carries the file's sha256 and size: the evidence was read."""
    def broken(*_a, **_k):
        raise RuntimeError("frontend exploded")

    monkeypatch.setattr("devrecd.pipeline.runner.stream_features", broken)
    [path] = _recordings(ccnu_dir, 1)
    [rec] = identify_files(cfg, [path])
    assert rec["outcome"] == "failed" and rec["reason"] == "internal" and "frontend exploded" in rec["detail"]
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and rec["size"] == path.stat().st_size


def test_identify_cli_json_table_and_failures(cfg: Config, ccnu_dir: Path, tmp_path: Path) -> None:
    good = _recordings(ccnu_dir, 2)
    bad = tmp_path / "broken recording.wav"
    bad.write_bytes(good[0].read_bytes()[:3000])
    model = cfg.backend.model
    result = runner.invoke(app, ["identify", str(good[0]), str(bad), str(good[1]), "--model", model, "--format", "json"])
    assert result.exit_code == 1, result.output
    # One verdict per file, printed as each is made (in the order they finish).
    by_name = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert {n: r["outcome"] for n, r in by_name.items()} == {
        good[0].name: "judged", bad.name: "failed", good[1].name: "judged"}
    assert by_name[bad.name]["reason"] == "corrupt"
    lines = [by_name[good[0].name]]
    assert "broken recording.wav: corrupt" in result.stderr
    # A folder expands to its audio files; the table has one row per file.
    shutil.copy(good[0], tmp_path / "copy.wav")
    result = runner.invoke(app, ["identify", str(tmp_path), "--model", model])
    assert result.exit_code == 1
    rows = result.stdout.splitlines()
    assert rows[0].split()[:3] == ["FILE", "DEVICE", "SCORE"] and len(rows) == 3
    assert any("copy.wav" in r and lines[0]["device"] in r for r in rows)
    assert any("(failed: corrupt)" in r for r in rows)


def test_frontend_mismatch_is_refused(cfg: Config, ccnu_dir: Path) -> None:
    other = replace(cfg, frontend=replace(cfg.frontend, preemphasis=0.9))
    with pytest.raises(ArtifactError) as exc:
        identify_files(other, _recordings(ccnu_dir, 1))
    assert exc.value.reason == "frontend_mismatch" and "preemphasis" in str(exc.value)
    result = runner.invoke(app, ["identify", str(_recordings(ccnu_dir, 1)[0]), "--model", cfg.backend.model],
                           env={"DEVRECD_FRONTEND__PREEMPHASIS": "0.9"})
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "preemphasis" in result.stderr


def test_verdicts_export_from_a_daemon_journal(cfg: Config, ccnu_dir: Path, tmp_path: Path) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    for p in _recordings(ccnu_dir, 2):
        shutil.copy(p, ev / p.name)
    shutil.copy(_recordings(ccnu_dir, 1)[0], ev / "same content.wav")
    state = tmp_path / "state"
    dcfg = cfg.with_overrides({"watch.state_dir": str(state), "watch.stable_seconds": 0.2, "metrics.enabled": False})
    daemon = Daemon(dcfg, [str(ev)])
    t = threading.Thread(target=daemon.run)  # in-process: no signal handlers, stopped by request_stop()
    t.start()
    try:
        deadline = time.time() + 120
        log = state / "verdicts.jsonl"
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) == 3):
            time.sleep(0.1)
    finally:
        daemon.request_stop()
        t.join(timeout=60)
    assert not t.is_alive()
    result = runner.invoke(app, ["verdicts", "--state-dir", str(state), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sorted(r["outcome"] for r in rows) == ["duplicate", "judged", "judged"]
    assert all(r["sha256"] and r["device"] for r in rows)
    result = runner.invoke(app, ["verdicts", "--state-dir", str(state), "--since", "1h"])
    assert len(result.stdout.splitlines()) == 3 and json.loads(result.stdout.splitlines()[0])["id"]
    result = runner.invoke(app, ["verdicts", "--state-dir", str(state), "--since", "2999-01-01"])
    assert result.exit_code == 0 and result.stdout == ""
    result = runner.invoke(app, ["verdicts", "--state-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no journal" in result.stderr


def test_parse_since() -> None:
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 172_800
    assert parse_since("1970-01-02T00:00:00Z") == 86_400
    assert parse_since("1970-01-01T01:00:00+01:00") == 0
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday")
