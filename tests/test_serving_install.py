"""The serving install: numpy frontend = torch frontend on real phones, no training stack imported
while serving, and a wheel that carries what ``install-service`` installs."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The training stack, and the report's template engine (the `report` extra): serving imports none of them.
TRAINING_STACK = ("torch", "sklearn", "scipy", "matplotlib", "onnx", "onnxscript", "jinja2")

# Runs the devrecd CLI with the training stack made unimportable; every attempt to import it is
# reported on stderr (an ImportError caught by the code under test would otherwise go unseen).
BLOCKED_CLI = f"""
import sys
BLOCKED = {TRAINING_STACK!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            print("BLOCKED IMPORT", name, file=sys.stderr)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from devrecd.cli import main
sys.argv = ["devrecd", *sys.argv[1:]]
main()
"""


def _segment(ccnu_dir: Path, segment: str) -> list[Path]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        return [ccnu_dir / r["path"] for r in csv.DictReader(fh) if r["segment"] == segment]


def _table_verdict(output: str, path: Path) -> tuple[str, float]:
    """(device, score) of ``path``'s row in identify's table."""
    row = next(line for line in output.splitlines() if line.startswith(str(path)))
    words = row[len(str(path)):].split()
    return words[0], float(words[1])


def test_numpy_frontend_gives_the_torch_frontends_verdicts_on_real_phones(exported_model, ccnu_dir) -> None:
    """The frontend on numpy (serving) and on torch (training): features equal to float32 tolerance
    and the exported model's probabilities within 1e-4 on every window of one recording of each of
    the 15 CCNU phones, with the same recording-level verdict."""
    torch = pytest.importorskip("torch")
    from devrecd.audio import cut_windows, read_evidence
    from devrecd.backends.onnxrt import OnnxRuntimeBackend
    from devrecd.features import SLICE_FBANK, Frontend

    backend = OnnxRuntimeBackend(exported_model)
    cfg = backend.frontend
    frontend = Frontend(cfg)
    files = _segment(ccnu_dir, "4")
    assert len(files) == 15
    worst, windows = 0.0, 0
    for path in files:
        clips = cut_windows(read_evidence(path, cfg.sample_rate).samples, cfg.clip_samples, cfg.clip_samples // 2)
        on_numpy = frontend(clips)
        on_torch = frontend(torch.from_numpy(clips)).numpy()
        np.testing.assert_allclose(on_numpy[..., :SLICE_FBANK.start], on_torch[..., :SLICE_FBANK.start], atol=5e-4)
        np.testing.assert_allclose(on_numpy[..., SLICE_FBANK], on_torch[..., SLICE_FBANK], rtol=2e-4,
                                   atol=1e-6 * float(on_torch[..., SLICE_FBANK].max()))
        p_numpy, p_torch = backend.infer(on_numpy), backend.infer(on_torch)
        worst = max(worst, float(np.abs(p_numpy - p_torch).max()))
        windows += len(clips)
        assert np.log(p_numpy).mean(0).argmax() == np.log(p_torch).mean(0).argmax(), path.name
    backend.close()
    assert windows >= 60
    assert worst <= 1e-4, f"max abs probability difference {worst:.2e} over {windows} windows"


def test_identify_serves_without_the_training_stack(exported_model, ccnu_dir, tmp_path) -> None:
    """``devrecd identify FILE --model M.onnx`` with torch, scikit-learn, scipy, matplotlib and onnx
    unimportable gives the verdict that the same command gives with all of them installed."""
    path = _segment(ccnu_dir, "5")[3]
    assert_identify_without_training_stack(["--model", str(exported_model)], path, tmp_path)


def assert_identify_without_training_stack(options: list[str], path: Path, cwd: Path, env: dict | None = None) -> None:
    """``devrecd identify PATH OPTIONS`` in a subprocess where the training stack cannot be imported
    (``env`` added to its environment) gives the verdict the same command gives in this process."""
    from typer.testing import CliRunner

    from devrecd.cli import app

    args = ["identify", str(path), *options]
    in_process = CliRunner().invoke(app, args)
    assert in_process.exit_code == 0, in_process.output
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEVRECD_BACKEND__DEVICE": "cpu", "DEVRECD_BACKEND__THREADS": "1",
           **(env or {})}
    done = subprocess.run([sys.executable, "-c", BLOCKED_CLI, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    assert "BLOCKED IMPORT" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    device, score = _table_verdict(done.stdout, path)
    want_device, want_score = _table_verdict(in_process.output, path)
    assert device == want_device and score == pytest.approx(want_score, abs=1e-3)


def test_a_command_that_needs_an_extra_says_which(trained_checkpoint, ccnu_dir, tmp_path) -> None:
    """Without the training stack, ``devrecd export`` ends with one line naming the extra to install."""
    args = ["export", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"), "--parity-audio",
            str(_segment(ccnu_dir, "4")[0])]
    done = subprocess.run([sys.executable, "-c", BLOCKED_CLI, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("BLOCKED IMPORT")]
    assert len(errors) == 1 and "pip install 'devrecd[train]'" in errors[0], done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_wheel_ships_the_service_files_and_installs_the_service(tmp_path) -> None:
    """A built wheel holds the systemd files, config.toml and the operations guide (the checkout's
    bytes), and ``install-service`` run from that wheel (not the checkout) installs them."""
    src = tmp_path / "src"  # a copy of what the build reads: the build writes build/ and *.egg-info into it
    for part in ("devrecd", "systemd", "docs"):
        shutil.copytree(REPO / part, src / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md", "config.toml"):
        shutil.copy2(REPO / part, src / part)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("devrecd-*.whl")
    shipped = {"devrecd.service": REPO / "systemd/devrecd.service", "devrecd.sysusers": REPO / "systemd/devrecd.sysusers",
               "devrecd.tmpfiles": REPO / "systemd/devrecd.tmpfiles", "devrecd.env": REPO / "systemd/devrecd.env",
               "config.toml": REPO / "config.toml", "operations.md": REPO / "docs/operations.md"}
    with zipfile.ZipFile(wheel) as z:
        for name, source in shipped.items():
            assert z.read(f"devrecd/service_files/{name}") == source.read_bytes(), name
        template = "devrecd/report/templates/report.html.j2"  # the report page (package data)
        assert z.read(template) == (REPO / template).read_bytes()
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        z.extractall(tmp_path / "site")  # a pure-Python wheel installed is its files on sys.path
    assert "License-Expression: Apache-2.0" in metadata
    base = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not {b.split(">")[0].split("=")[0].split("[")[0] for b in base} & {
        "torch", "scikit-learn", "scipy", "matplotlib", "onnx", "onnxscript"}, base

    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", "import sys, devrecd; from devrecd.cli import main; "
                          "print(devrecd.__file__, file=sys.stderr); sys.argv = ['devrecd', *sys.argv[1:]]; main()",
                          "install-service", "--prefix", str(root), "--no-activate", "--devrecd-bin", "/opt/devrecd/bin/devrecd",
                          "--evidence", "/srv/cases"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert str(tmp_path / "site") in run.stderr  # devrecd came from the wheel, not the checkout
    unit = (root / "etc/systemd/system/devrecd.service").read_text()
    assert "ExecStart=/opt/devrecd/bin/devrecd watch --config /etc/devrecd/config.toml" in unit
    assert "ReadOnlyPaths=-/srv/cases" in unit
    assert (root / "etc/sysusers.d/devrecd.conf").read_bytes() == shipped["devrecd.sysusers"].read_bytes()
    assert '"/srv/cases"' in (root / "etc/devrecd/config.toml").read_text()
    assert (root / "usr/share/doc/devrecd/operations.md").read_bytes() == shipped["operations.md"].read_bytes()


def test_calibration_fit_is_sklearns_logistic_regression() -> None:
    """``calibrate``'s two-parameter fit (numpy, so the base install can calibrate a registry) gives
    sklearn's balanced, nearly unregularised logistic regression, separable trials included."""
    LogisticRegression = pytest.importorskip("sklearn.linear_model").LogisticRegression
    from devrecd.openset.measures import fit_balanced

    rng = np.random.default_rng(0)
    for n_tar, n_non, separation in ((50, 2000, 1.0), (300, 300, 3.0), (20, 5000, 0.3), (10, 10, 50.0)):
        tar, non = rng.normal(separation, 1.0, n_tar), rng.normal(0.0, 1.0, n_non)
        (slope,), offset = fit_balanced(tar[:, None], non[:, None])
        x = np.concatenate([tar, non])[:, None]
        y = np.concatenate([np.ones(n_tar), np.zeros(n_non)])
        ref = LogisticRegression(C=1e6, class_weight="balanced", max_iter=1000, tol=1e-10).fit(x, y)
        assert slope == pytest.approx(ref.coef_[0, 0], rel=1e-4)
        assert offset == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-6)


def test_pav_is_sklearns_isotonic_regression() -> None:
    """``cllr_min``'s pool-adjacent-violators fit (numpy) equals sklearn's IsotonicRegression,
    tied scores and unequal class weights included."""
    IsotonicRegression = pytest.importorskip("sklearn.isotonic").IsotonicRegression
    from devrecd.openset.measures import isotonic_fit

    rng = np.random.default_rng(3)
    for n_tar, n_non in ((40, 900), (500, 500), (3, 7)):
        x = np.round(np.concatenate([rng.normal(1.5, 1.0, n_tar), rng.normal(0.0, 1.0, n_non)]), 1)  # ties
        y = np.concatenate([np.ones(n_tar), np.zeros(n_non)])
        w = np.concatenate([np.full(n_tar, 0.5 / n_tar), np.full(n_non, 0.5 / n_non)])
        want = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y, sample_weight=w).predict(x)
        np.testing.assert_allclose(isotonic_fit(x, y, w), want, rtol=1e-10, atol=1e-12)
