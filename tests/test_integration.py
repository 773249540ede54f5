"""Parts that meet inside the daemon: the device registry (open set) in ``identify``/``watch``,
and a live input judged by ``devrecd watch`` alongside its folders. Real model, real audio."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devrecd.cli import app
from tests.helpers import DaemonProc, ccnu_recordings
from tests.test_live import ALSA_CONF, _read

runner = CliRunner()


def _by_segment(ccnu_dir: Path, devices: list[str], segments: set[int]) -> dict[str, list[Path]]:
    import csv

    rows = list(csv.DictReader((ccnu_dir / "manifest.csv").open()))
    return {d: [ccnu_dir / r["path"] for r in rows if r["device"] == d and int(r["segment"]) in segments] for d in devices}


@pytest.mark.slow
def test_enroll_then_identify_gives_open_set_verdicts(tmp_path: Path, ccnu_dir: Path, exported_model) -> None:
    devices = ["Apple_air1", "huawei_p20"]
    registry = tmp_path / "registry.json"
    for name, refs in _by_segment(ccnu_dir, devices, {1, 2, 3}).items():
        result = runner.invoke(app, ["enroll", "--model", str(exported_model.checkpoint), "--profile", name,
                                     "--registry", str(registry), *map(str, refs)])
        assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["devices", "list", "--registry", str(registry), "--format", "json"])
    assert listed.exit_code == 0 and {d["name"] for d in json.loads(listed.output)["devices"]} == set(devices)

    questioned = [p for refs in _by_segment(ccnu_dir, devices, {4}).values() for p in refs]
    result = runner.invoke(app, ["identify", "--model", str(exported_model), "--format", "json", *map(str, questioned)],
                           env={"DEVRECD_REGISTRY__PATH": str(registry)})
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(records) == len(questioned)
    for r in records:
        assert r["outcome"] == "judged"
        assert {c["device"] for c in r["top_k"]} <= set(devices)  # ranked against enrolled profiles only
        # A network registry that was never calibrated gives no LR and names no device: the candidates stay.
        assert r["device"] == "inconclusive" and r["candidate"] in devices and r["log10_lr"] is None
        assert "no calibration for condition 'clean'" in r["open_set"]["calibration_source"]
        # the model's own verdict kept beside it, held to the model's validation (condition and SNR)
        assert {"device", "score", "top_k", "condition_status", "comparison"} <= set(r["closed_set"])
        assert -1.0 <= r["score"] <= 1.0  # a cosine score, not a probability

    off = runner.invoke(app, ["identify", "--model", str(exported_model), "--format", "json", str(questioned[0])],
                        env={"DEVRECD_REGISTRY__PATH": str(registry), "DEVRECD_REGISTRY__USE_CALIBRATION": "false"})
    assert off.exit_code == 0, off.output
    rec = json.loads(off.output.splitlines()[0])
    assert rec["device"] == "inconclusive" and rec["candidate"] in devices
    assert rec["open_set"]["calibration_source"] == "registry.use_calibration is off"


@pytest.mark.slow
def test_watch_judges_a_live_input_beside_its_folders(tmp_path: Path, ccnu_dir: Path, exported_model) -> None:
    pytest.importorskip("sounddevice", reason="sounddevice not installed (pip install 'devrecd[live]')")
    if not Path("/usr/share/alsa/alsa.conf").is_file():
        pytest.skip("ALSA configuration not installed (apt install libasound2)")
    wav = ccnu_recordings(ccnu_dir, 1)[0]
    infile = tmp_path / "line-in.f32"
    _read(wav).tofile(infile)
    conf = tmp_path / "asound.conf"
    conf.write_text(ALSA_CONF.format(infile=infile))
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    daemon = DaemonProc(tmp_path, evidence, Path(exported_model))
    daemon.start(env={"ALSA_CONFIG_PATH": str(conf), "DEVRECD_LIVE__ENABLED": "true", "DEVRECD_LIVE__DEVICE": "evidence",
                      "DEVRECD_LIVE__HOP_SECONDS": "1.0"})
    try:
        (evidence / "dropped.wav").write_bytes(wav.read_bytes())
        records = daemon.wait_records(1)
        assert records[0]["outcome"] == "judged"
        live_log = daemon.state / "live.jsonl"
        deadline = time.time() + 120
        live: list[dict] = []
        while time.time() < deadline:
            live = [json.loads(x) for x in live_log.read_text().splitlines()] if live_log.is_file() else []
            if sum(r["outcome"] == "judged" for r in live) >= 3:
                break
            time.sleep(0.2)
        judged = [r for r in live if r["outcome"] == "judged"]
        assert len(judged) >= 3, daemon.log_path.read_text()[-3000:]
        assert all(r["input"] == "evidence" and r["running"]["device"] for r in judged)
        # The live windows are the same audio as the dropped file: the first window's verdict agrees.
        first = min(judged, key=lambda r: r["window"])
        assert first["start"] == 0.0 and first["device"] == records[0]["windows"][0]["device"]
        status, metrics = daemon.get("/metrics")
        assert status == 200
        value = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("devrecd_live_windows_total"))
        assert value >= 3
    finally:
        assert daemon.stop() == 0, daemon.log_path.read_text()[-3000:]
