"""``identify`` and ``watch`` with a device registry and no closed-set model: open-set verdicts only,
from the shipped GSV scorer, on real CCNU phones (enrolled from segments 1-2, questioned with segment 4)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.config import load_config
from devrecd.pipeline.identify import identify_files
from devrecd.errors import ConfigError
from devrecd.metrics import Metrics
from tests.helpers import DaemonProc

runner = CliRunner()
ENROLLED = ["Apple_air1", "IPHONEX", "xiaomi8se"]
NOT_ENROLLED = "huawei_p20"


def _segment(ccnu_dir: Path, device: str, segment: int) -> Path:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["device"] == device and int(r["segment"]) == segment]
    assert rows, (device, segment)
    return ccnu_dir / rows[0]["path"]


@pytest.fixture(scope="module")
def registry(ccnu_dir: Path, tmp_path_factory) -> Path:
    """Three phones enrolled with `devrecd enroll` and no model (the shipped GSV scorer)."""
    path = tmp_path_factory.mktemp("gsvserve") / "registry"
    for device in ENROLLED:
        refs = [str(_segment(ccnu_dir, device, s)) for s in (1, 2)]
        result = runner.invoke(app, ["enroll", "--registry", str(path), "--profile", device, *refs])
        assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def no_backend(monkeypatch):
    """Fails the test if any closed-set backend is loaded."""
    def refuse(*_a, **_k):
        raise AssertionError("a closed-set backend was loaded")

    monkeypatch.setattr("devrecd.backends.load_backend", refuse)


def _cfg(registry: Path, **overrides):
    return load_config(None, env={}, overrides={"registry.path": str(registry), **overrides})


def test_identify_without_a_model_gives_the_registrys_verdicts(registry, ccnu_dir, no_backend, caplog) -> None:
    known, other = _segment(ccnu_dir, "IPHONEX", 4), _segment(ccnu_dir, NOT_ENROLLED, 4)
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        records = identify_files(_cfg(registry), [known, other], metrics=metrics)
    selected = [r for r in caplog.records if r.getMessage() == "backend selected"]
    assert selected and selected[-1].backend == "none" and "open-set verdicts" in selected[-1].why
    info = metrics.backend_info.collect()[0].samples[0].labels
    assert info["backend"] == "open-set-only" and info["model_sha256"] == ""

    by_path = {r["path"]: r for r in records}
    hit, miss = by_path[str(known)], by_path[str(other)]
    for r, path in ((hit, known), (miss, other)):
        assert r["outcome"] == "judged"
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert r["condition"]["codec"] == "PCM_16" and "rms_dbfs" in r["levels"] and r["software_version"]
        assert r["backend"] == "open-set-only" and r["closed_set"] is None and "model_sha256" not in r
        assert r["scorer"]["kind"] == "gsv" and r["scorer"]["fingerprint"] == r["open_set"]["embedder"]
        assert r["open_set"]["registry"] == str(registry) and r["open_set"]["profiles"] == len(ENROLLED)
        # the registry JSON the decision came from (its content hash, as written in it)
        assert r["open_set"]["registry_sha256"] == json.loads(Path(registry).read_text())["content_sha256"]
        assert {c["device"] for c in r["top_k"]} == set(ENROLLED)
        assert r["condition_status"] == "validated" and r["comparison"]["status"] == "validated"
        assert {"decode", "features", "scoring", "end_to_end"} <= set(r["timings"])
    assert hit["device"] == "IPHONEX" and hit["open_set"]["accepted"] and hit["log10_lr"] > 0
    assert miss["device"] == "unknown device" and not miss["open_set"]["accepted"]
    assert miss["log10_lr"] < miss["open_set"]["log10_threshold"] <= hit["log10_lr"]  # the decision follows the LR
    assert miss["score"] < miss["open_set"]["threshold"] <= hit["score"]


def test_with_a_model_the_registry_scores_in_the_workers_not_the_writer(registry, ccnu_dir, exported_model,
                                                                         monkeypatch) -> None:
    """A closed-set model and a registry together: the registry's verdict in front, the model's
    beside it; the registry scores in the parallel decode workers, so the writer thread only writes."""
    from devrecd.openset.workflow import RegistryJudge

    scored_on: list[str] = []
    real_judge = RegistryJudge.judge

    def spy(self, features, recording=None):
        scored_on.append(threading.current_thread().name)
        return real_judge(self, features, recording)

    monkeypatch.setattr(RegistryJudge, "judge", spy)
    known, other = _segment(ccnu_dir, "IPHONEX", 4), _segment(ccnu_dir, NOT_ENROLLED, 4)
    written_on: list[str] = []
    cfg = _cfg(registry, **{"backend.model": str(exported_model), "backend.threads": 1})
    records = identify_files(cfg, [known, other], on_record=lambda r: written_on.append(threading.current_thread().name))
    assert len(scored_on) == 2 and all(name.startswith("devrecd-decode-") for name in scored_on), scored_on
    assert written_on == ["devrecd-writer"] * 2
    hit, miss = records
    for r in records:
        assert r["outcome"] == "judged" and r["model_sha256"] == hashlib.sha256(Path(exported_model).read_bytes()).hexdigest()
        assert r["closed_set"]["device"] in {c["device"] for c in r["closed_set"]["top_k"]}
        assert {"decode", "features", "scoring", "queue", "inference", "end_to_end"} <= set(r["timings"])
        assert {c["device"] for c in r["top_k"]} == set(ENROLLED)
    assert hit["device"] == "IPHONEX" and hit["open_set"]["accepted"]
    assert miss["device"] == "unknown device" and not miss["open_set"]["accepted"]


def test_an_idle_open_set_only_pipeline_stays_alive(registry, no_backend) -> None:
    """Without a model there is no batcher to tick; idle workers with nothing in flight keep the
    liveness clock (which feeds the systemd watchdog pings) fresh, so an idle daemon is not killed."""
    from devrecd.pipeline.journal import Journal
    from devrecd.pipeline.runner import Pipeline
    from devrecd.pipeline.serving import OpenSetOnly, load_served

    cfg = _cfg(registry)
    served = load_served(cfg, Metrics())
    assert isinstance(served, OpenSetOnly)
    journal = Journal(":memory:")
    pipeline = Pipeline(cfg, served, journal=journal, verdict_log=None, metrics=Metrics())
    pipeline.start()
    try:
        time.sleep(1.5)  # idleness itself is what is tested: no event to wait for
        assert pipeline.liveness.age() < 1.0
    finally:
        pipeline.stop()
        journal.close()


def test_the_served_frontend_is_the_scorers_without_a_model(registry, ccnu_dir, no_backend, caplog) -> None:
    path = _segment(ccnu_dir, "xiaomi8se", 4)
    plain = identify_files(_cfg(registry), [path])[0]
    with caplog.at_level(logging.INFO, logger="devrecd.backends"):
        other = identify_files(_cfg(registry, **{"frontend.preemphasis": 0.5}), [path])[0]
    assert "frontend.* replaced" in [r for r in caplog.records if r.getMessage() == "backend selected"][-1].why
    assert other["device"] == plain["device"] == "xiaomi8se" and other["score"] == plain["score"]


def test_without_a_registry_or_a_model_the_error_names_both(ccnu_dir) -> None:
    with pytest.raises(ConfigError, match="no model given.*--registry"):
        identify_files(load_config(None, env={}), [_segment(ccnu_dir, "IPHONEX", 4)])


def test_identify_cli_without_a_model(registry, ccnu_dir, tmp_path) -> None:
    result = runner.invoke(app, ["identify", "--registry", str(registry), "--format", "json",
                                 str(_segment(ccnu_dir, "Apple_air1", 4)), str(_segment(ccnu_dir, NOT_ENROLLED, 4))])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("{")]
    # Verdicts stream in the order they finish: matched by file.
    by_file = {Path(json.loads(x)["path"]).name: json.loads(x)["device"] for x in lines}
    assert by_file == {_segment(ccnu_dir, "Apple_air1", 4).name: "Apple_air1",
                       _segment(ccnu_dir, NOT_ENROLLED, 4).name: "unknown device"}
    # The case report of these verdicts shows the registry's verdict and no closed-set section.
    (tmp_path / "identify.jsonl").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["report", str(tmp_path / "identify.jsonl"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    recordings = json.loads((tmp_path / "report" / "report.json").read_text())["recordings"]
    assert len(recordings) == 2 and all("closed_set" not in r and "open_set" in r for r in recordings)
    assert sorted(r["open_set"]["device"] for r in recordings) == ["Apple_air1", "unknown device"]


def test_watch_without_a_model_serves_open_set_verdicts(registry, ccnu_dir, tmp_path) -> None:
    ev = tmp_path / "evidence"
    ev.mkdir()
    no_model = ""  # backend.model empty in the daemon's config
    d = DaemonProc(tmp_path, ev, no_model, workers=1)  # type: ignore[arg-type]
    d.start(env={"DEVRECD_REGISTRY__PATH": str(registry)})
    try:
        shutil.copy(_segment(ccnu_dir, "xiaomi8se", 4), ev / "a.wav")
        shutil.copy(_segment(ccnu_dir, NOT_ENROLLED, 4), ev / "b.wav")
        recs = {Path(r["path"]).name: r for r in d.wait_records(2)}
        status, body = d.get("/metrics")
        assert status == 200 and 'backend="open-set-only"' in body
    finally:
        assert d.stop() == 0
    assert recs["a.wav"]["device"] == "xiaomi8se" and recs["b.wav"]["device"] == "unknown device"
    assert all(r["backend"] == "open-set-only" and r["closed_set"] is None for r in recs.values())
    log = d.log_path.read_text()
    assert '"backend selected"' in log and '"closed_set_model": "none"' in log


def test_watch_refuses_a_live_input_without_a_model(registry, tmp_path) -> None:
    from devrecd.daemon.service import Daemon

    (tmp_path / "evidence").mkdir()
    cfg = load_config(None, env={}, overrides={"registry.path": str(registry), "live.enabled": True,
                                               "metrics.enabled": False, "watch.state_dir": str(tmp_path / "state")})
    with pytest.raises(ConfigError, match="live.enabled needs a closed-set model"):
        Daemon(cfg, [str(tmp_path / "evidence")]).run()
    assert not (tmp_path / "state" / "daemon.json").exists()


def test_beside_a_model_the_registry_and_the_batcher_take_a_files_features_chunk_by_chunk(
        registry, ccnu_dir, exported_model, tmp_path, monkeypatch) -> None:
    """A registry served beside a closed-set model: the file's features go to the batcher and to the
    registry scorer's accumulator in chunks as they are computed (never one unit of the whole file),
    and the verdict is the one of the features held whole (open set) and of the model alone (closed set)."""
    import numpy as np
    import soundfile as sf

    from devrecd.openset.workflow import RegistryJudge, recording_features
    from devrecd.pipeline.batcher import Batcher
    from devrecd.stages import _CLIPS_PER_EXTRACT

    parts = [sf.read(_segment(ccnu_dir, "IPHONEX", s), dtype="float32") for s in (4, 5)]
    path = tmp_path / "two-segments.wav"
    sf.write(path, np.concatenate([x for x, _ in parts]), parts[0][1], subtype="PCM_16")
    units: list[int] = []
    real_put = Batcher.put
    monkeypatch.setattr(Batcher, "put", lambda self, unit, stop=None: (units.append(len(unit)), real_put(self, unit, stop))[1])
    added: list[int] = []
    judged_with: list[str] = []
    real_accumulator, real_judge = RegistryJudge.accumulator, RegistryJudge.judge

    def accumulator(self):
        acc = real_accumulator(self)
        real_add = acc.add
        acc.add = lambda feats: (added.append(len(feats)), real_add(feats))[1]
        return acc

    def judge(self, features, recording=None):
        judged_with.append(type(features).__name__)
        return real_judge(self, features, recording)

    monkeypatch.setattr(RegistryJudge, "accumulator", accumulator)
    monkeypatch.setattr(RegistryJudge, "judge", judge)
    cfg = _cfg(registry, **{"backend.model": str(exported_model), "backend.threads": 1, "audio.hop_seconds": 0.5})
    both = identify_files(cfg, [path])[0]
    assert both["outcome"] == "judged", both
    windows = len(both["windows_best"])
    assert windows > 2 * _CLIPS_PER_EXTRACT  # several chunks
    assert sum(units) == sum(added) == windows
    # never the whole file in one unit: chunks of the frontend's calls (16 clips and the rest of a block)
    assert len(units) >= 3 and max(units) < 2 * _CLIPS_PER_EXTRACT, units
    assert added == units, added
    assert judged_with == ["ChannelAccumulators"]  # the shipped scorer's: it feeds the main and the AMR-NB model
    # the same verdicts as the features held whole (open set) and as the model alone (closed set)
    monkeypatch.setattr(RegistryJudge, "judge", real_judge)
    whole_judge = RegistryJudge(cfg)
    rec, feats = recording_features(whole_judge.scorer, path, cfg)
    whole = whole_judge.judge(feats, rec.describe())
    assert (both["device"], both["candidate"], both["windows_best"]) == (whole["device"], whole["candidate"],
                                                                       whole["windows_best"])
    np.testing.assert_allclose([t["score"] for t in both["top_k"]], [t["score"] for t in whole["top_k"]], rtol=1e-9)
    alone = identify_files(load_config(None, env={}, overrides={"backend.model": str(exported_model),
                                                                "backend.threads": 1, "audio.hop_seconds": 0.5}), [path])[0]
    assert both["closed_set"]["device"] == alone["device"]
    assert [t["device"] for t in both["closed_set"]["top_k"]] == [t["device"] for t in alone["top_k"]]
