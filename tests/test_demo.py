"""``devrecd demo`` end to end (small settings): every step runs and the daemon judges the evidence."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devrecd.audio import read_evidence
from devrecd.demo import DemoSettings, find_speech, run_demo


def test_demo_shows_the_shipped_default_enrol_judge_report(tmp_path: Path, shared_dir: Path) -> None:
    import json

    lines: list[str] = []
    summary = run_demo(DemoSettings(workdir=tmp_path / "demo", devices=3, recordings=6, shared=shared_dir),
                       say=lines.append)
    assert set(summary["timings"]) == {"speech", "synth", "enroll", "identify", "open_set", "report"}
    text = "\n".join(lines)
    for command in ("$ devrecd synth", "$ devrecd enroll --registry", "$ devrecd identify --registry", "$ devrecd report"):
        assert command in text
    assert "$ devrecd train" not in text and "$ devrecd export" not in text  # the shipped default needs no model
    # open set with the shipped scorer and no model: every test recording judged, enrolled or not
    op = summary["open_set"]
    assert len(op["enrolled_devices"]) == 2 and len(op["held_out_devices"]) == 1 and op["not_judged"] == 0
    assert op["enrolled"] >= 2 and op["not_enrolled"] >= 1
    assert f"Enrolled phones named right: {op['named_right']} of {op['enrolled']}" in text
    assert "say nothing about its accuracy in real casework" in text  # simulated phones are not evidence
    verdicts = [json.loads(x) for x in (tmp_path / "demo" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == op["enrolled"] + op["not_enrolled"] and all(v["closed_set"] is None for v in verdicts)
    html = Path(summary["report"])
    assert html.is_file() and f"case report: {html}" in text
    report = json.loads((html.parent / "report.json").read_text())
    assert "DEMO" in json.dumps(report)


def test_demo_speaks_its_own_speech_when_no_librispeech_is_at_hand(tmp_path: Path, monkeypatch) -> None:
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (apt install espeak-ng; .ci/setup installs it)")
    monkeypatch.setenv("DEVRECD_SHARED", str(tmp_path / "no-shared-here"))
    speech = find_speech(DemoSettings(workdir=tmp_path, shared=tmp_path / "nothing"), say=lambda _: None)
    voices = sorted(p for p in speech.iterdir() if p.is_dir())
    assert len(voices) >= 6  # enough speakers to split disjointly into train/val/test
    rec = read_evidence(next(voices[0].glob("*.wav")), 16000)
    assert rec.duration > 1.5  # a spoken sentence, not silence (read_evidence rejects silence)


def test_demo_never_replaces_a_users_folder_without_force(tmp_path: Path) -> None:
    from devrecd.cli import app
    from devrecd.demo import DEMO_MARKER, DemoError, prepare_workdir
    from typer.testing import CliRunner

    mine = tmp_path / "my case files"
    mine.mkdir()
    (mine / "statement.txt").write_text("irreplaceable")
    with pytest.raises(DemoError, match="not a demo folder.*--force"):
        prepare_workdir(mine)
    result = CliRunner().invoke(app, ["demo", "--workdir", str(mine)])
    assert result.exit_code != 0 and "--force" in result.output
    assert (mine / "statement.txt").read_text() == "irreplaceable", "the folder must be left as it was"
    # An empty folder, a previous demo folder, or --force: replaced.
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    (empty / "corpus").mkdir()
    prepare_workdir(empty)  # a demo folder now (marker): replaced without asking
    assert (empty / DEMO_MARKER).is_file() and not (empty / "corpus").exists()
    prepare_workdir(mine, force=True)
    assert not (mine / "statement.txt").exists()
