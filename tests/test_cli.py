"""The CLI through typer's CliRunner: help, version, doctor, features on real recordings, the shared
option grammar (enums, exit codes, -v, completion, folders), identify streaming, the .onnx enroll error."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from devrecd import __version__
from devrecd.cli import app
from tests.media import encode, speech

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("doctor", "features", "config"):
        assert cmd in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"devrecd {__version__}"


def test_doctor_is_truthful_about_this_machine():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip()}
    assert lines["config"].startswith("ok") and lines["state_dir"].startswith("ok")
    assert lines["torch"].startswith("ok")
    assert lines["onnxruntime"].startswith("ok") and "CPUExecutionProvider" in lines["onnxruntime"]
    assert lines["cuda"].startswith("ok" if torch.cuda.is_available() else "no")
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    assert lines["tensorrt"].startswith("ok" if has_trt else "no")
    if not has_trt:
        assert "pip install 'devrecd[gpu]'" in lines["tensorrt"]
    assert lines["decoder:soundfile"].startswith("ok") and "FLAC" in lines["decoder:soundfile"]
    assert "aac" in lines["decoder:pyav"] and "amrnb" in lines["decoder:pyav"]


def test_features_on_every_real_phone_recording(ccnu_dir, tmp_path):
    files = sorted(ccnu_dir.glob("*.wav"))
    assert len(files) == 75
    result = runner.invoke(app, ["features", *map(str, files), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for path in files:
        feats = np.load(tmp_path / f"{path.name}.npy")
        meta = json.loads((tmp_path / f"{path.name}.json").read_text())
        assert feats.ndim == 3 and feats.shape[1:] == (128, 73) and feats.shape[0] >= 4
        assert np.isfinite(feats).all()
        assert meta["shape"] == list(feats.shape)
        assert meta["input"]["sha256"] and meta["frontend"]["clip_seconds"] == 2.0
        assert len(meta["frontend_sha256"]) == 64


def test_features_on_m4a_and_amr_and_bad_files(librispeech_dir, tmp_path):
    x, sr = speech(librispeech_dir)
    m4a = encode(x, sr, tmp_path / "q.m4a", codec="aac", fmt="ipod", out_rate=48000)
    amr = encode(x, sr, tmp_path / "q.amr", codec="libopencore_amrnb", fmt="amr", out_rate=8000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00")
    out = tmp_path / "out"
    result = runner.invoke(app, ["features", str(m4a), str(amr), str(bad), "--out", str(out), "--hop-seconds", "1.0"])
    assert result.exit_code == 1
    assert "bad.wav" in result.output and "1 of 3 file(s) failed" in result.output
    for name, rate in (("q.m4a", 48000), ("q.amr", 8000)):
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["input"]["native_rate"] == rate and meta["input"]["resampled"] is True
        assert np.load(out / f"{name}.npy").shape[0] == meta["shape"][0] >= 10  # 15 s at hop 1 s


def test_config_errors_are_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[batcher]\nmax_batch = 'x'\n")
    result = runner.invoke(app, ["config", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: batcher.max_batch: expected int, got str 'x' (from file {path})"
    result = runner.invoke(app, ["config"], env={"DEVRECD_LOG__LEVEL": "LOUD"})
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "log.level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD' (from environment DEVRECD_LOG__LEVEL)" in result.output
    # a flag is checked like the file: the CLI's own override of metrics.port
    result = runner.invoke(app, ["watch", "--port", "99999"])
    assert result.exit_code == 2 and "metrics.port must be in [0, 65535], got 99999 (from command line)" in result.output


# --- doctor: the configured model, registry, state dir and port ---------------------------------

def test_doctor_checks_a_good_configuration_and_names_what_is_broken(exported_model, tmp_path):
    import socket

    good = tmp_path / "good.toml"
    good.write_text(f'[backend]\nmodel = "{exported_model}"\n[watch]\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[metrics]\nport = 0\n')
    result = runner.invoke(app, ["doctor", "--config", str(good), "--format", "json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["model"]["ok"] and "15 labels, frontend matches; backend onnxruntime" in checks["model"]["detail"]
    assert checks["state_dir"]["ok"] and "GiB free" in checks["state_dir"]["detail"]
    assert checks["config"]["ok"] and str(good) in checks["config"]["detail"]
    assert not (tmp_path / "state").exists()  # doctor creates nothing

    # A model whose contract says another frontend, a registry that is not one, a port in use, a
    # state dir that is a file: each one is a failed check naming the thing, exit code 1.
    occupied = socket.socket()
    occupied.bind(("127.0.0.1", 0))
    occupied.listen()
    (tmp_path / "not-a-registry.json").write_text("{nope")
    (tmp_path / "statefile").write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[frontend]\npreemphasis = 0.5\n[backend]\nmodel = "{exported_model}"\n'
                   f'[registry]\npath = "{tmp_path / "not-a-registry.json"}"\n'
                   f'[watch]\nstate_dir = "{tmp_path / "statefile" / "state"}"\n'
                   f'[metrics]\nport = {occupied.getsockname()[1]}\n')
    try:
        result = runner.invoke(app, ["doctor", "--config", str(bad)])
    finally:
        occupied.close()
    assert result.exit_code == 1, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.strip()}
    assert lines["model"].startswith("FAIL") and "preemphasis" in lines["model"]
    assert lines["registry"].startswith("FAIL") and "not-a-registry.json" in lines["registry"]
    assert lines["state_dir"].startswith("FAIL") and "is not a folder" in lines["state_dir"]
    assert lines["metrics_port"].startswith("FAIL") and "in use" in lines["metrics_port"]
    assert lines["torch"].startswith("ok")  # capabilities are still reported

    # An invalid configuration: reported as the config check, exit code 2.
    result = runner.invoke(app, ["doctor", "--format", "json"], env={"DEVRECD_WATCH__WORKERS": "-3"})
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [c["detail"] for c in report["checks"] if c["name"] == "config"] == [
        "watch.workers must be >= 1, got -3 (from environment DEVRECD_WATCH__WORKERS)"]


# --- one grammar -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["identify", "x.wav", "--format", "xml"],
    ["identify", "x.wav", "--backend", "cuda"],
    ["verdicts", "--format", "yaml"],
    ["doctor", "--format", "csv"],
    ["train", ".", "--out", "r", "--arch", "resnet"],
    ["evaluate", ".", ".", "--out", "r", "--split", "dev"],
    ["baseline", "svm", ".", "--out", "r"],
    ["finetune", ".", ".", "--out", "r", "--trainable", "head"],
    ["export", ".", "--out", "x.onnx", "--parity-audio", ".", "--exporter", "jit"],
    ["enroll", "x.wav", "--profile", "p", "--scorer", "cosine"],
    ["compare", "x.wav", "--scorer", "cosine"],
    ["calibrate", ".", "--split", "dev"],
    ["devices", "rename"],
    ["listen", "--format", "csv"],
])
def test_a_bad_choice_is_a_usage_error(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "{d}", "--out", "{d}/r", "--lr", "-1"], "train.lr must be > 0"),
    (["train", "{d}", "--out", "{d}/r", "--hop-seconds", "0"], "train.hop_seconds must be > 0"),
    (["finetune", "{d}", "{d}", "--out", "{d}/r", "--lr", "0"], "train.lr must be > 0"),
    (["train", "{d}", "--out", "{d}/r", "--epochs", "0"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--mixtures", "0"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--nap", "-1"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--inner", "1"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--channel-models", "amrnb,gsm"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--channel-models", "amrnb=clean+gsm"], "Invalid value"),
    (["train-gsv", "{d}", "--out", "{d}/g.npz", "--channel-models", "amrnb", "--no-channels"], "Invalid value"),
])
def test_a_bad_option_value_is_a_usage_error_before_any_work(tmp_path, args, message):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    result = runner.invoke(app, [a.format(d=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "r").exists()


def test_train_fusion_refuses_an_onnx_model_in_one_line(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    result = runner.invoke(app, ["train-fusion", str(tmp_path), "--model", str(onnx), "--out", str(tmp_path / "f.npz")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert "an ONNX export cannot embed recordings" in result.output
    assert not (tmp_path / "f.npz").exists()


def test_renamed_options_are_gone():
    for args in (["identify", "x.wav", "--json"], ["identify", "x.wav", "--device", "cpu"],
                 ["enroll", "x.wav", "--device", "p"], ["evaluate", ".", ".", "--report", "r"],
                 ["listen", "--hop", "1"], ["calibrate", ".", "--groups", "4,5"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "No such option" in result.output, (args, result.output)


def test_scorer_choices_are_the_scorers_the_library_has():
    from devrecd.cli.registry import ScorerKind
    from devrecd.openset.scorers import KINDS

    assert {s.value for s in ScorerKind} <= set(KINDS)


def test_arch_choices_are_the_architectures_the_model_has():
    from devrecd.cli.training import Arch
    from devrecd.model import ARCHITECTURES

    assert [a.value for a in Arch] == list(ARCHITECTURES)


def test_verbose_before_the_command_reaches_logging(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    logger = logging.getLogger("devrecd")
    result = runner.invoke(app, ["identify", str(empty)])
    assert result.exit_code == 2 and "no audio files found" in result.output
    assert logger.level == logging.ERROR  # identify's results are its output: only errors are logged
    result = runner.invoke(app, ["-v", "identify", str(empty)])
    assert result.exit_code == 2
    assert logger.level == logging.DEBUG


def test_shell_completion_is_available():
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def complete(words: str) -> list[str]:
        """What bash completion offers for the last word (the protocol the installed script speaks)."""
        proc = subprocess.run([sys.executable, "-m", "devrecd"], capture_output=True, text=True, timeout=120,
                              env={**env, "_DEVRECD_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                   "COMP_CWORD": str(len(words.split(" ")) - 1)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("devrecd identi") == ["identify"]
    assert complete("devrecd identify --format ") == ["table", "json", "csv"]
    assert complete("devrecd train . --arch group") == [f"group{i}" for i in range(1, 8)]


def test_a_folder_is_expanded_to_its_audio_files(ccnu_dir, tmp_path):
    src = sorted(ccnu_dir.glob("*.wav"))[:2]
    folder = tmp_path / "case"
    (folder / "sub").mkdir(parents=True)
    (folder / src[0].name).symlink_to(src[0])
    (folder / "sub" / src[1].name).symlink_to(src[1])
    (folder / "notes.txt").write_text("not audio")
    (folder / ".hidden.wav").write_text("ignored by watch.ignore_patterns")
    out = tmp_path / "out"
    result = runner.invoke(app, ["features", str(folder), "--out", str(out), "--hop-seconds", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"{p.name}.npy" for p in src)
    result = runner.invoke(app, ["features", str(folder / "sub" / "nothing-here"), "--out", str(out)])
    assert result.exit_code == 1
    (folder / "empty").mkdir()
    result = runner.invoke(app, ["enroll", str(folder / "empty"), "--profile", "p", "--registry", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "no reference files found" in result.output


def test_enroll_with_an_onnx_model_says_what_is_expected(tmp_path, exported_model):
    registry = tmp_path / "reg.json"
    result = runner.invoke(app, ["enroll", str(tmp_path), "--profile", "p", "--registry", str(registry),
                                 "-m", str(exported_model)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "an ONNX export cannot embed recordings" in result.output and "train-embedder" in result.output
    assert "weights_only" not in result.output
    assert not registry.exists()
    # Not a checkpoint at all: one line naming the file, no torch advice.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    wav = tmp_path / "ref.wav"
    wav.write_bytes(b"")
    result = runner.invoke(app, ["enroll", str(wav), "--profile", "p", "--registry", str(registry), "-m", str(junk)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "junk.pt: not a readable checkpoint" in result.output and "weights_only" not in result.output


# --- identify streams its verdicts -----------------------------------------------------------

def test_identify_prints_each_verdict_as_it_is_made_and_ctrl_c_keeps_them(exported_model, ccnu_dir):
    """Read the first verdict while the rest are still being judged, then Ctrl-C: what was printed
    stays, every line is a whole record, and the exit code says "interrupted". If identify printed
    only at the end, the first line would arrive after the last verdict and the exit code would be 0."""
    files = sorted(ccnu_dir.glob("*.wav"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DEVRECD_WATCH__WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "devrecd", "identify", "--model", str(exported_model),
                             "--format", "json", *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            # Ctrl-C as at a terminal even when the test runner itself ignores SIGINT (a
                            # background job of a non-interactive shell), which a child would inherit.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        # Read through the same buffered streams: readline() may already hold the next lines, which
        # communicate() (reading the raw pipe) would never see. stderr is one line: no deadlock.
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first["outcome"] == "judged" and Path(first["path"]).name in {f.name for f in files}
    records = [first, *map(json.loads, rest.splitlines())]
    assert proc.returncode == 130, err
    assert 1 <= len(records) < len(files)
    assert f"interrupted: {len(records)} of {len(files)} verdict(s) printed" in err
    assert "Traceback" not in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def test_identify_table_and_csv_stream_through_one_printer(tmp_path):
    from devrecd.cli.app import Format
    from devrecd.cli.serve import CSV_FIELDS, VerdictPrinter
    import csv
    import io

    judged = {"outcome": "judged", "path": "/e/a.wav", "device": "phone A", "score": 0.91, "duration": 12.0,
              "top_k": [{"device": "phone A", "score": 0.91}, {"device": "phone B", "score": 0.05}], "sha256": "ab"}
    failed = {"outcome": "failed", "path": "/e/b.wav", "reason": "corrupt", "detail": "x", "sha256": "cd"}
    out = io.StringIO()
    printer = VerdictPrinter(Format.table, out, path_width=8)
    assert out.getvalue() == ""  # nothing before the first verdict (a model that fails to load prints no header)
    printer.add(judged)
    assert out.getvalue().splitlines() == ["FILE      DEVICE                    SCORE  RUNNER-UP                       SECONDS",
                                           "/e/a.wav  phone A                   0.910  phone B 0.050                   12.0"]
    printer.add(failed)
    assert out.getvalue().splitlines()[-1] == "/e/b.wav  (failed: corrupt)"
    out = io.StringIO()
    printer = VerdictPrinter(Format.csv, out)
    printer.close()
    assert out.getvalue().strip() == ",".join(CSV_FIELDS)  # an empty export still names its columns
    printer.add(judged)
    row = list(csv.DictReader(io.StringIO(out.getvalue())))[0]
    assert row["device"] == "phone A" and row["top_k"] == "phone A:0.91;phone B:0.05"


def test_progress_bar_only_when_stderr_is_a_terminal(monkeypatch):
    import io

    from devrecd.cli.app import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress(3, "calibrate", unit="recording") as bar:
            bar.update(3)
        assert ("calibrate:" in stream.getvalue() and "/3 " in stream.getvalue()) is drawn


def _on_a_terminal(args: list[str], cwd: Path) -> str:
    """Run ``devrecd ARGS`` with stdout and stderr on a pseudo-terminal 120 columns wide; what it drew."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing at 0 columns
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "devrecd", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, cwd=cwd)
    import select

    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break  # nothing more within the time allowed: the wait below fails
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    try:
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    return out.decode(errors="replace")


def test_identify_and_export_draw_a_progress_bar_on_a_terminal(exported_model, trained_checkpoint, ccnu_dir, tmp_path):
    """At a real terminal: identify's bar counts files, export's counts its steps (each parity
    recording, each graph exported) and names the last one; the results are printed as ever."""
    files = [ccnu_dir / "xiaomi8se_4.wav", ccnu_dir / "Apple_air1_4.wav"]
    drawn = _on_a_terminal(["identify", "--model", str(exported_model), *map(str, files)], tmp_path)
    assert "identify:   0%|" in drawn and "0/2 [" in drawn  # (later draws may fall within tqdm's 0.1 s)
    assert sum(line.startswith(str(f)) for line in drawn.replace("\r", "\n").splitlines() for f in files) == 2
    drawn = _on_a_terminal(["export", str(trained_checkpoint), "--out", str(tmp_path / "m.onnx"),
                            *(a for f in files for a in ("--parity-audio", str(f)))], tmp_path)
    assert "export: 100%" in drawn and "3/3" in drawn and "exported m.onnx" in drawn  # seconds after the 2nd
    assert "served by onnxruntime: m.ort" in drawn and (tmp_path / "m.ort").is_file()
