"""Source comparison and the case report on real phone recordings: enrol, calibrate (LR + plots),
a daemon run with open-set verdicts, a tampered evidence file, ``devrecd compare``, ``devrecd report``
(JSON against the schema; HTML in headless Chromium: screenshot, no network, PDF page count)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.config import load_config

pytestmark = pytest.mark.slow  # one enrolment + calibration of 15 real phones shared by the module
runner = CliRunner()
HOP = {"DEVRECD_AUDIO__HOP_SECONDS": "1.0"}  # fewer windows per recording: fast on 2 cores
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-extensions"]


def _rows(ccnu_dir: Path) -> list[dict]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def case(ccnu_dir: Path, asp_embedder_checkpoint: Path, exported_model, tmp_path_factory: pytest.TempPathFactory):
    """15 real phones enrolled (segments 1-2) with the session's open-set embedder, calibrated by
    ``devrecd calibrate`` on segments 3-4; segment 5 is the evidence a daemon judges."""
    import torch

    from devrecd.openset.embedder import Embedder
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import enrol_files

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("case")
    # The dataset loader writes its split file beside the data: give it a folder of links, not ../shared.
    data = root / "data"
    data.mkdir()
    for p in ccnu_dir.iterdir():
        if p.suffix in (".wav", ".csv"):
            (data / p.name).symlink_to(p)
    rows = _rows(ccnu_dir)
    cfg = load_config(env={}, overrides={"audio.hop_seconds": 1.0})
    embedder = Embedder.load(asp_embedder_checkpoint)
    reg = open_registry(root / "registry.json", create=True)
    for device in sorted({r["device"] for r in rows}):
        refs = [ccnu_dir / r["path"] for r in rows if r["device"] == device and r["segment"] in ("1", "2")]
        enrol_files(reg, embedder, device, refs, cfg)
    reg.save()
    result = runner.invoke(app, ["calibrate", str(data), "--model", str(asp_embedder_checkpoint), "--registry",
                                 str(reg.path), "--split-groups", "test=3,4", "--plots", str(root / "cal")], env=HOP)
    assert result.exit_code == 0, result.output
    return {"root": root, "cfg": cfg, "rows": rows, "registry": reg.path, "checkpoint": asp_embedder_checkpoint,
            "model": exported_model, "ccnu": ccnu_dir, "calibration_output": result.output}


def test_calibrate_stores_a_bounded_lr_calibration_and_writes_plots(case) -> None:
    from devrecd.forensic.lr import load_calibration
    from devrecd.openset.registry import open_registry

    out = case["calibration_output"]
    assert "[clean] 30 target / 420 non-target trials" in out and "(ELUB)" in out
    cal = open_registry(case["registry"]).calibrations["clean"]
    assert cal == load_calibration(case["root"] / "cal" / "lr-calibration.json")
    assert cal.basis == "case trials" and cal.metrics["folds"] == 5  # a network embedder has no development calibration
    m = cal.metrics
    assert (m["n_target"], m["n_nontarget"]) == (30, 30 * 14)  # 30 recordings x 15 enrolled phones
    assert cal.conditions["native_rates"] == [32000] and cal.conditions["recordings"] == 30
    assert cal.population["trial_devices"] == sorted({r["device"] for r in case["rows"]})
    # ELUB never exceeds what the trial counts support.
    assert -np.log10(m["n_target"] + 1) <= cal.lower <= 0 <= cal.upper <= np.log10(m["n_nontarget"] + 1)
    for name in ("tippett.png", "det.png"):
        png = (case["root"] / "cal" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_held_out_lrs_on_real_phones(case) -> None:
    """Segment 5 was in neither the enrolment nor the calibration: compare it with every phone."""
    from devrecd.forensic.compare import Comparer, compare
    from devrecd.openset.embedder import Embedder
    from devrecd.openset.registry import open_registry

    reg = open_registry(case["registry"])
    cal = reg.calibrations["clean"]
    scorer = Comparer(Embedder.load(case["checkpoint"]), case["cfg"])
    questioned = [case["ccnu"] / r["path"] for r in case["rows"] if r["segment"] == "5"]
    truth = [r["device"] for r in case["rows"] if r["segment"] == "5"]
    tar, non = [], []
    for device in reg.names:
        for rec, dev in zip(compare(scorer, questioned, scorer.references_from_profile(reg.get(device), "r"), cal), truth):
            assert rec["outcome"] == "compared" and cal.lower <= rec["log10_lr"] <= cal.upper
            (tar if dev == device else non).append(rec["log10_lr"])
    tar, non = np.array(tar), np.array(non)
    assert tar.size == 15 and non.size == 15 * 14
    assert np.mean(tar > 0) >= 0.6 and np.mean(non < 0) >= 0.8, (np.mean(tar > 0), np.mean(non < 0))


def _run_daemon(cfg, evidence: Path, state: Path, expect: int) -> None:
    from devrecd.daemon.service import Daemon

    daemon = Daemon(cfg, [str(evidence)])
    t = threading.Thread(target=daemon.run)  # in-process: stopped by request_stop()
    t.start()
    try:
        deadline = time.time() + 240
        log = state / "verdicts.jsonl"
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= expect):
            time.sleep(0.2)
    finally:
        daemon.request_stop()
        t.join(timeout=60)
    assert not t.is_alive()


@pytest.fixture(scope="module")
def daemon_report(case):
    """A daemon judges 4 real recordings + a damaged file; one recording is then tampered with; report."""
    root = case["root"]
    evidence, state = root / "evidence", root / "state"
    evidence.mkdir()
    seg5 = [r for r in case["rows"] if r["segment"] == "5"][:4]
    for r in seg5:
        shutil.copy(case["ccnu"] / r["path"], evidence / r["path"])
    (evidence / "damaged.wav").write_bytes((case["ccnu"] / seg5[0]["path"]).read_bytes()[:2000])
    cfg = case["cfg"].with_overrides({"backend.model": str(case["model"]), "backend.threads": 1, "watch.state_dir": str(state),
                                      "watch.stable_seconds": 0.2, "metrics.enabled": False,
                                      "registry.path": str(case["registry"])})
    _run_daemon(cfg, evidence, state, expect=5)
    tampered = evidence / seg5[1]["path"]
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one sample byte
    tampered.write_bytes(bytes(data))
    out = root / "report"
    result = runner.invoke(app, ["report", str(state), "--out", str(out), "--model", str(case["model"]),
                                 "--case-id", "CASE-2026-042", "--examiner", "A. Examiner"], env=HOP)
    assert result.exit_code == 0, result.output
    return {"out": out, "tampered": tampered, "seg5": seg5, "evidence": evidence}


def test_report_json_matches_the_schema_and_flags_tampering(daemon_report) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from devrecd.report import SCHEMA_PATH

    doc = json.loads((daemon_report["out"] / "report.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["case"]["case_id"] == "CASE-2026-042" and doc["case"]["examiner"] == "A. Examiner"
    inv = {Path(e["path"]).name: e for e in doc["inventory"]}
    assert len(inv) == 5 and doc["summary"]["judged"] == 4 and doc["summary"]["failed"] == 1
    assert inv["damaged.wav"]["outcome"] == "failed" and inv["damaged.wav"]["reason"] == "corrupt"
    # A failed file is hashed too (at intake where the record carries it, at report time in any case).
    assert inv["damaged.wav"]["integrity"]["status"] in ("verified", "no hash recorded")
    assert re.fullmatch(r"[0-9a-f]{64}", inv["damaged.wav"]["integrity"]["sha256_now"])
    bad = inv[daemon_report["tampered"].name]
    assert bad["integrity"]["status"] == "CHANGED since intake" and bad["integrity"]["sha256_now"] != bad["sha256"]
    assert doc["summary"]["changed"] == 1
    assert all(e["integrity"]["status"] == "verified" for n, e in inv.items()
               if n not in (daemon_report["tampered"].name, "damaged.wav"))
    sections = {Path(r["path"]).name: r for r in doc["recordings"]}
    # An LR for the best open-set candidate, from the registry's calibration; none for the changed file.
    assert sections[daemon_report["tampered"].name]["lr"]["lr_withheld"].startswith("evidence file CHANGED")
    good = [s for n, s in sections.items() if n != daemon_report["tampered"].name]
    assert all(s["lr"]["log10_lr"] is not None and s["lr"]["verbal"] for s in good)
    assert all((daemon_report["out"] / s["timeline"]["file"]).is_file() for s in sections.values())
    assert doc["validation"]["metrics"]["n_target"] == 30 and (daemon_report["out"] / "calibration-tippett.png").is_file()
    assert doc["method"]["model"]["matches_verdicts"] is True and doc["method"]["model"]["arch"] == "paper"
    assert any("changed after intake" in x for x in doc["limitations"])
    html = (daemon_report["out"] / "report.html").read_text()
    assert "CHANGED since intake" in html and "CASE-2026-042" in html


def test_report_html_is_self_contained(daemon_report) -> None:
    html = (daemon_report["out"] / "report.html").read_text()
    assert not re.search(r"(?i)(https?:|//[a-z0-9.-]+\.[a-z]{2,}/|<link|<script|@import|url\()", html)
    assert html.count("data:image/png;base64,") == 4 + 2  # 4 timelines, Tippett, DET


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/setup installs it)")
def test_report_in_headless_chromium(daemon_report, tmp_path: Path) -> None:
    html = daemon_report["out"] / "report.html"
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "page.png"
    r = subprocess.run([*common, "--window-size=1200,1600", f"--screenshot={shot}", html.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[:2] == (1600, 1200) and img.std() > 20 and (img < 100).mean() > 0.005  # text on a white page
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    # The DOM as rendered: every section is there and nothing was fetched from the network.
    r = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert "5. Limitations" in r.stdout and "Evidence inventory" in r.stdout
    assert not re.search(r"(?i)net::ERR|Failed to load resource", r.stderr), r.stderr[-2000:]
    pdf = tmp_path / "report.pdf"
    r = subprocess.run([*common, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", html.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert pdf.is_file(), r.stderr[-2000:]
    pages = _pdf_pages(pdf)
    assert 3 <= pages <= 12, pages


def _pdf_pages(pdf: Path) -> int:
    if shutil.which("pdfinfo"):
        out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
        return int(re.search(r"^Pages:\s+(\d+)", out, re.M).group(1))
    return len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))


def test_compare_cli_with_files_and_registry_profile(case, tmp_path: Path) -> None:
    q = [r for r in case["rows"] if r["segment"] == "5"][:2]
    device = q[0]["device"]
    refs_dir = tmp_path / "refs"
    refs_dir.mkdir()
    for r in case["rows"]:
        if r["device"] == device and r["segment"] in ("1", "2"):
            (refs_dir / r["path"]).symlink_to(case["ccnu"] / r["path"])
    args = ["compare", *(str(case["ccnu"] / r["path"]) for r in q), "--reference", str(refs_dir),
            "--reference-device", device, "--registry", str(case["registry"]), "--format", "json"]
    result = runner.invoke(app, args, env=HOP)
    assert result.exit_code == 0, result.output
    recs = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["outcome"] for r in recs] == ["compared", "compared"] and len(recs[0]["references"]) == 2
    assert all(r["calibration"]["sha256"] and r["scorer"]["fingerprint"] and r["sha256"] for r in recs)
    # The same references taken from the registry profile give the same score.
    by_profile = runner.invoke(app, [*args[:2], "--reference-device", device, "--registry", str(case["registry"]),
                                     "--format", "json"], env=HOP)
    assert by_profile.exit_code == 0, by_profile.output
    assert json.loads(by_profile.stdout.splitlines()[0])["score"] == pytest.approx(recs[0]["score"], abs=1e-5)
    # Without a calibration there is a score and no LR.
    from devrecd.openset.registry import open_registry

    bare = open_registry(case["registry"])
    bare.path = tmp_path / "bare.json"
    bare.calibrations, bare.calibration_info = {}, {}
    bare.save()
    result = runner.invoke(app, ["compare", str(case["ccnu"] / q[0]["path"]), "--reference-device", device,
                                 "--registry", str(bare.path)], env=HOP)
    assert result.exit_code == 0, result.output
    assert "NO LR calibration" in result.stdout and "no LR" in result.stdout
    # A questioned file that cannot be read is a failed record with its hash and reason, exit code 1.
    damaged = tmp_path / "damaged.wav"
    damaged.write_bytes((case["ccnu"] / q[0]["path"]).read_bytes()[:3000])
    result = runner.invoke(app, ["compare", str(damaged), "--reference-device", device, "--registry",
                                 str(case["registry"]), "--format", "json"], env=HOP)
    assert result.exit_code == 1
    (failed,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert failed["outcome"] == "failed" and failed["reason"] == "corrupt" and re.fullmatch(r"[0-9a-f]{64}", failed["sha256"])
    # compare output feeds the report.
    (tmp_path / "cmp.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = runner.invoke(app, ["report", str(tmp_path / "cmp.jsonl"), "--out", str(tmp_path / "rep"),
                              "--calibration", str(case["root"] / "cal" / "lr-calibration.json")], env=HOP)
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["summary"]["compared"] == 2 and doc["recordings"][0]["comparison"]["verbal"]


def test_compare_on_a_gsv_registry_before_and_after_calibrate(ccnu_dir: Path, tmp_path: Path) -> None:
    """A registry of the shipped GSV scorer (15 real phones, segments 1-2): its development
    calibration of the condition gives a bounded LR; after ``devrecd calibrate`` (segments 3-4) a
    comparison of segment 5 with a profile has a bounded LR from the case calibration, regularised
    toward the development one."""
    from devrecd.openset.registry import open_registry

    data = tmp_path / "data"
    data.mkdir()
    for p in ccnu_dir.iterdir():
        if p.suffix in (".wav", ".csv"):
            (data / p.name).symlink_to(p)
    rows = _rows(ccnu_dir)
    reg_path = tmp_path / "gsv.json"
    for device in sorted({r["device"] for r in rows}):
        refs = [str(ccnu_dir / r["path"]) for r in rows if r["device"] == device and r["segment"] in ("1", "2")]
        result = runner.invoke(app, ["enroll", *refs, "--profile", device, "--registry", str(reg_path)], env=HOP)
        assert result.exit_code == 0, result.output
    reg = open_registry(reg_path)
    assert reg.kind == "gsv" and "clean" in reg.embedder.get("dev_calibrations") and not reg.calibrations
    device = "Apple_air1"
    q = [str(ccnu_dir / r["path"]) for r in rows if r["segment"] == "5"]
    own = q.index(str(ccnu_dir / f"{device}_5.wav"))
    args = ["compare", *q, "--reference-device", device, "--registry", str(reg_path), "--format", "json"]
    before = runner.invoke(app, args, env=HOP)
    assert before.exit_code == 0, before.output
    recs = [json.loads(x) for x in before.stdout.splitlines()]
    assert all(r["calibration"]["basis"].startswith("development") and r["log10_lr"] is not None for r in recs)
    scores = [r["score"] for r in recs]
    assert scores[own] == max(scores), scores
    assert recs[own]["log10_lr"] > 0
    # --scorer naming another kind than the registry's is refused.
    wrong = runner.invoke(app, [*args[:2], "--reference-device", device, "--registry", str(reg_path), "--scorer", "embedder"])
    assert wrong.exit_code != 0 and "enrolled with scorer 'gsv'" in wrong.output

    result = runner.invoke(app, ["calibrate", str(data), "--registry", str(reg_path), "--split-groups", "test=3,4",
                                 "--plots", str(tmp_path / "cal")], env=HOP)
    assert result.exit_code == 0, result.output
    cal = open_registry(reg_path).calibrations["clean"]
    assert cal.scorer["kind"] == "gsv" and cal.scorer["fingerprint"] == reg.embedder["fingerprint"]
    assert cal.basis.startswith("case trials, regularised toward")
    after = runner.invoke(app, args, env=HOP)
    assert after.exit_code == 0, after.output
    recs = [json.loads(x) for x in after.stdout.splitlines()]
    assert [r["score"] for r in recs] == pytest.approx(scores, abs=1e-6)
    for r in recs:
        if r["comparison"].get("noise_matched"):  # references brought to its noise: the development noise class
            assert r["calibration"]["basis"].startswith("development") and "/snr" in r["calibration"]["conditions"]["condition"]
            continue
        assert r["calibration"]["sha256"] == cal.sha256 and r["lr_withheld"] is None
        assert cal.lower <= r["log10_lr"] <= cal.upper and r["verbal"]
    assert recs[own]["log10_lr"] > 0 and np.mean([r["log10_lr"] < 0 for i, r in enumerate(recs) if i != own]) >= 0.8
