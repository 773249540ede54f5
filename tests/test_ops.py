"""Operations: the systemd unit, install-service, Prometheus alert rules, the Grafana dashboard.

Real tools throughout: systemd-analyze, systemd-sysusers, systemd-tmpfiles, promtool, and a real
Prometheus server scraping the real daemon for the dashboard's queries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devrecd import service_install as si
from devrecd.cli import app
from devrecd.config import load_config
from devrecd.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "devrecd.service"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "ops" / "grafana" / "devrecd-dashboard.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/setup installs systemd and prometheus with apt)")
    return path


def _directives(text: str) -> dict[str, list[str]]:
    """A unit file's ``Key=value`` lines (keys may repeat, as systemd allows)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=120)


# --- the unit ----------------------------------------------------------------------------------------

def test_unit_declares_notify_watchdog_user_dirs_and_gpu_device_policy() -> None:
    d = _directives(UNIT.read_text())
    expected = {"Type": ["notify"], "NotifyAccess": ["main"], "Restart": ["on-failure"], "User": ["devrecd"],
                "StateDirectory": ["devrecd"], "ConfigurationDirectory": ["devrecd"], "DevicePolicy": ["closed"],
                "PrivateDevices": ["no"], "MemoryDenyWriteExecute": ["no"], "ProtectSystem": ["strict"],
                "NoNewPrivileges": ["yes"], "CapabilityBoundingSet": [""]}
    for key, value in expected.items():
        assert d.get(key) == value, key
    assert int(d["WatchdogSec"][0]) > 0
    assert d["ExecStart"] == ["/usr/bin/env devrecd watch --config /etc/devrecd/config.toml"]
    assert any(v.startswith("char-nvidia-frontend") for v in d["DeviceAllow"])
    assert any(v.startswith("char-nvidia-uvm") for v in d["DeviceAllow"])
    assert d["ReadOnlyPaths"], "evidence must be mounted read-only"
    # SIGTERM drains for watch.shutdown_timeout: systemd must wait longer before it kills.
    assert int(d["TimeoutStopSec"][0]) > load_config(REPO / "config.toml", env={}).watch.shutdown_timeout


def test_shipped_unit_passes_systemd_analyze_verify() -> None:
    done = _verify(UNIT)  # ExecStart is /usr/bin/env, which exists everywhere
    assert done.returncode == 0, done.stderr
    assert "devrecd.service" not in done.stderr, done.stderr  # warnings about our unit (unknown keys, ...)


def test_security_exposure_is_ok() -> None:
    done = subprocess.run([_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for devrecd\.service: (\d+\.\d+) (\w+)", done.stdout)
    assert m, done.stdout[-2000:] + done.stderr
    score = float(m.group(1))
    assert score <= 2.0 and m.group(2) == "OK", f"exposure {score} {m.group(2)}"
    # The score docs/operations.md states must be the one the unit gets.
    assert f"{score:.1f}" in (REPO / "docs" / "operations.md").read_text()


# --- install-service ---------------------------------------------------------------------------------

def test_set_toml_values_keeps_comments_and_refuses_unknown_keys() -> None:
    text = '[watch]\ndirs = []                  # folders\nname = "a # b"  # not a comment inside\n[x]\ndirs = [1]\n'
    out = si.set_toml_values(text, {("watch", "dirs"): ["/srv/ev one"], ("watch", "name"): "c"})
    assert out.splitlines() == ['[watch]', 'dirs = ["/srv/ev one"]     # folders', 'name = "c"      # not a comment inside',
                                '[x]', 'dirs = [1]']
    with pytest.raises(si.InstallError) as exc:
        si.set_toml_values(text, {("watch", "nope"): 1})
    assert exc.value.reason == "install_template"


def test_install_service_into_a_temp_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    runner = CliRunner()
    exe = tmp_path / "opt" / "devrecd" / "bin" / "devrecd"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    args = ["install-service", "--prefix", str(root), "--devrecd-bin", str(exe), "--no-activate",
            "--evidence", "/srv/evidence", "--evidence", "/mnt/case 42%"]

    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would write" in dry.output and not root.exists(), "--dry-run changes nothing"

    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    unit = root / "etc/systemd/system/devrecd.service"
    d = _directives(unit.read_text())
    assert d["ExecStart"] == [f"{exe} watch --config /etc/devrecd/config.toml"]
    assert d["ReadOnlyPaths"] == ["-/srv/evidence", '"-/mnt/case 42%%"']
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "etc/devrecd/devrecd.env").stat().st_mode) == 0o640
    assert (root / "etc/sysusers.d/devrecd.conf").read_text() == (REPO / "systemd/devrecd.sysusers").read_text()
    assert (root / "etc/tmpfiles.d/devrecd.conf").is_file()
    # The installed unit with its real ExecStart (the fake executable exists) still verifies.
    verified = _verify(unit)
    assert verified.returncode == 0 and "devrecd.service" not in verified.stderr, verified.stderr

    # The default config is the shipped one, commented, pointed at the service's folders; the daemon's
    # own loader accepts it.
    config = root / "etc/devrecd/config.toml"
    cfg = load_config(config, env={})
    assert cfg.watch.dirs == ("/srv/evidence", "/mnt/case 42%")
    assert cfg.watch.state_dir == "/var/lib/devrecd/state" and cfg.backend.engine_dir == "/var/lib/devrecd/engine"
    assert "# loopback by default" in config.read_text()

    # Operator edits survive a re-install (upgrade); --force replaces them.
    config.write_text(config.read_text().replace("max_batch = 32", "max_batch = 64"))
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "keep" in again.output
    assert load_config(config, env={}).batcher.max_batch == 64
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert load_config(config, env={}).batcher.max_batch == 32


def test_install_service_creates_the_user_and_folders(tmp_path: Path) -> None:
    _tool("systemd-sysusers")
    _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles can only chown to the new user as root")
    root = tmp_path / "root"
    plan = si.plan_install(root, devrecd_bin="/usr/bin/env")
    si.apply_plan(plan)
    ran = si.activate(plan)
    assert [c.split()[0] for c in ran] == ["systemd-sysusers", "systemd-tmpfiles"]
    user = [l for l in (root / "etc/passwd").read_text().splitlines() if l.startswith("devrecd:")]
    assert len(user) == 1
    _, _, uid, gid, _, home, shell = user[0].split(":")
    assert int(uid) != 0 and home == "/var/lib/devrecd" and shell.endswith("nologin")
    for sub in ("models", "engine", "state"):
        st = (root / "var/lib/devrecd" / sub).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (int(uid), int(gid), 0o750)


def test_install_service_errors_are_one_line(tmp_path: Path) -> None:
    home_exe = Path("/home/someone/.venv/bin/devrecd")
    with pytest.raises(si.InstallError) as exc:
        si.plan_install(tmp_path, devrecd_bin=home_exe)
    assert exc.value.reason == "install_home" and "ProtectHome" in str(exc.value)
    r = CliRunner().invoke(app, ["install-service", "--prefix", str(tmp_path), "--source", str(tmp_path)])
    assert r.exit_code == 1 and "service files not found" in r.output
    with pytest.raises(si.InstallError, match="overlaps"):
        si.plan_install(tmp_path, evidence=["/var/lib/devrecd/evidence"], devrecd_bin="/usr/bin/env")


# --- Prometheus rules --------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_check() -> None:
    done = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 10 rules found" in done.stdout


def test_example_prometheus_config_is_valid() -> None:
    done = subprocess.run([_tool("promtool"), "check", "config", str(REPO / "ops/prometheus/prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    done = subprocess.run([_tool("promtool"), "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    names = set(re.findall(r"- alert: (\w+)", ALERTS.read_text()))
    tested = ALERTS_TEST.read_text()
    for name in names:
        fired = re.findall(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tested)
        quiet = re.findall(rf"alertname: {name}\n\s+exp_alerts: \[\]", tested)
        assert fired and quiet, f"{name} needs a test where it fires and one where it stays quiet"


@pytest.mark.parametrize("weaken", [
    ("          sum by (job, instance) (increase(devrecd_files_total{job=\"devrecd\"}[15m])) >= 10",
     "          sum by (job, instance) (increase(devrecd_files_total{job=\"devrecd\"}[15m])) >= 0"),
    ("          devrecd_live_windows_total{job=\"devrecd\"} > 0", "          devrecd_live_windows_total{job=\"devrecd\"} >= 0"),
    ("min_over_time(devrecd_queue_depth{job=\"devrecd\"}[10m]) > 0", "min_over_time(devrecd_queue_depth{job=\"devrecd\"}[10m]) >= 0"),
    ("stage=\"end_to_end\"}[10m])", "}[10m])"),
], ids=["failure-ratio-volume-guard", "live-configured-guard", "queue-guard", "end-to-end-stage"])
def test_rule_unit_tests_catch_a_weakened_rule(tmp_path: Path, weaken: tuple[str, str]) -> None:
    """The quiet cases have teeth: dropping a guard from a rule makes promtool's tests fail."""
    text = ALERTS.read_text()
    assert weaken[0] in text
    (tmp_path / "alerts.yml").write_text(text.replace(weaken[0], weaken[1]))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = subprocess.run([_tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


# --- the dashboard -----------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


# Panels that read the live input's latency histogram: without a live input it has no observations,
# so the quantile is NaN (the series exist: the daemon registers them at start).
LIVE_NAN_OK = {"Live latency"}


def test_dashboard_is_provisionable_and_covers_every_topic() -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"]), p["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = " ".join(e for _, e in _targets(dash))
    for needle in ("devrecd_files_total", "devrecd_verdicts_total", "histogram_quantile(0.5, sum by (stage, le)",
                   "histogram_quantile(0.99, sum by (stage, le)", "devrecd_batch_size_bucket", "devrecd_queue_depth",
                   "devrecd_oldest_pending_age_seconds", "devrecd_errors_total", "devrecd_backend_info",
                   "devrecd_live_level_dbfs", "devrecd_live_overruns_total"):
        assert needle in exprs, needle


def test_dashboard_and_rules_use_only_metrics_the_daemon_registers() -> None:
    """Static check against devrecd.metrics (the live test below checks the scraped daemon)."""
    metrics = Metrics()
    metrics.verdicts.labels(device="phone-a").inc()  # label children appear with their first sample
    metrics.errors.labels(reason="corrupt").inc()
    names = set()
    for family in metrics.registry.collect():
        names.update(s.name for s in family.samples)
    names |= {"up"}
    used = set(re.findall(r"\b(devrecd_\w+|up)\s*[{\[]", " ".join(e for _, e in _targets(_dashboard())) + ALERTS.read_text()))
    assert used and used <= names, used - names


# --- the real daemon scraped by a real Prometheus ----------------------------------------------------

def _query_range(port: int, expr: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 1})
    doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query_range?{q}", timeout=30).read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.mark.slow  # waits for scrapes: Prometheus start, a second per file, 12 s of rate windows
def test_every_dashboard_panel_returns_data_from_the_daemon(tmp_path: Path, ccnu_dir: Path, exported_model) -> None:
    """``devrecd watch`` with a real exported model, real phone recordings and one corrupt file, scraped
    by ``/usr/bin/prometheus`` with alerts.yml loaded; every panel query must return data."""
    from tests.helpers import DaemonProc, ccnu_recordings, free_port

    prometheus = _tool("prometheus")
    ev = tmp_path / "evidence"
    ev.mkdir()
    daemon = DaemonProc(tmp_path, ev, Path(exported_model)).start()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n"
                      "scrape_configs:\n  - job_name: devrecd\n    static_configs:\n"
                      f"      - targets: ['{daemon.url.split('//', 1)[1]}']\n")
    prom_log = tmp_path / "prometheus.log"
    with open(prom_log, "wb") as log:
        prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        # Files arrive only once Prometheus scrapes the idle daemon, so every counter is seen rising
        # (a rate needs two samples around the change).
        start, deadline, scraped = time.time(), time.time() + 90, False
        while time.time() < deadline and not scraped:
            try:
                scraped = bool(_query_range(port, 'up{job="devrecd"} == 1', start, time.time()))
            except (urllib.error.URLError, ConnectionError):
                pass  # Prometheus still starting
            time.sleep(1)
        assert scraped, prom_log.read_text()[-2000:]
        for src in ccnu_recordings(ccnu_dir, 3):
            shutil.copy(src, ev / src.name)
            time.sleep(1)
        (ev / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + os.urandom(4000))
        records = daemon.wait_records(4)
        assert {r["outcome"] for r in records} == {"judged", "failed"}
        time.sleep(12)  # a few scrapes after the last verdict; the rate windows are 10 s
        end = time.time()
        substitutions = {"$job": "devrecd", "$instance": ".*", "$__rate_interval": "10s",
                         "$__range": f"{int(end - start) + 1}s"}
        empty, nan_only = [], []
        for title, expr in _targets(_dashboard()):
            for var, value in substitutions.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{title}: unsubstituted variable in {expr}"
            result = _query_range(port, expr, start, end)
            values = [float(v) for s in result for _, v in s["values"]]
            if not result:
                empty.append(f"{title}: {expr}")
            elif not any(v == v and abs(v) != float("inf") for v in values) and title not in LIVE_NAN_OK:
                nan_only.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert not nan_only, "panels with only NaN/Inf:\n" + "\n".join(nan_only)

        # Every alert rule evaluates cleanly on the real series, and none fires on a healthy daemon.
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=30).read())
        evaluated = [r for g in rules["data"]["groups"] for r in g["rules"]]
        assert len(evaluated) == 10
        assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
        assert not [r["name"] for r in evaluated if r["state"] != "inactive"]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        assert daemon.stop() == 0
