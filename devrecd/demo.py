"""``devrecd demo``: the whole product on an embedded default, with no user data.

Every step is one of the project's own commands, run as a subprocess and printed as it runs, so
the demo doubles as a worked example:

1. speech: LibriSpeech from ``../shared`` when present, else sentences spoken by espeak-ng;
2. ``devrecd synth``: a small corpus of simulated phones (speakers split disjointly);
3. ``devrecd train``: the paper's network on the corpus's train split;
4. ``devrecd export``: ONNX + contract, parity-checked against torch on real windows;
5. ``devrecd watch``: the daemon on an empty evidence folder, with Prometheus metrics;
6. the test split's recordings are dropped into the evidence folder (one copied slowly, as a
   share would deliver it, and one damaged file), the verdicts are read back from the
   daemon's verdict log and compared with the truth, ``/metrics`` is scraped;
7. the daemon is stopped with SIGTERM (it drains and exits);
8. open set, no network: ``devrecd enroll`` (the shipped GSV scorer) enrols some of the phones
   from their training recordings, ``devrecd identify --registry`` judges the test recordings of
   enrolled phones and of phones never enrolled, which should come out as "unknown device".
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from devrecd.errors import DevrecdError

SENTENCES = (
    "The examiner compared the questioned recording with the reference files.",
    "Every phone leaves a faint trace of its microphone and its encoder in the sound.",
    "Please state your name and the date for the record before we begin.",
    "The weather turned cold in the evening and the wind came from the north.",
    "She read the numbers slowly: four, seven, nine, two, and then six.",
    "A quiet room makes the device, not the speaker, the loudest witness.",
    "They drove along the river until the bridge appeared through the fog.",
    "Recording devices differ in their filters, their noise, and their clocks.",
)
VOICES = ("en+m1", "en+m3", "en+m5", "en+f1", "en+f3", "en+f4", "en-us+m2", "en-us+f2", "en-gb+m4", "en-gb+f5")


class DemoError(DevrecdError):
    reason = "demo"


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    devices: int = 6
    recordings: int = 24  # per device
    references: int = 4  # training recordings per enrolled phone in the open-set step
    recording_seconds: float = 6.0
    epochs: int = 12
    seed: int = 1
    shared: Path | None = None
    keep: bool = False
    force: bool = False  # replace a non-empty folder that is not a demo folder


DEMO_MARKER = ".devrecd-demo"  # written into every demo folder: only such a folder is replaced unasked


def prepare_workdir(work: Path, *, force: bool = False, keep: bool = False) -> None:
    """Make ``work`` an empty demo folder. An existing folder is replaced only when it is empty, a
    demo folder (it holds :data:`DEMO_MARKER`) or ``force`` is given: never a user's folder by mistake."""
    if work.exists() and not work.is_dir():
        raise DemoError(f"--workdir {work} exists and is not a folder")
    if work.is_dir() and not keep:
        if any(work.iterdir()) and not (work / DEMO_MARKER).is_file() and not force:
            raise DemoError(f"--workdir {work} exists, is not empty and is not a demo folder; "
                            "choose a new folder, or pass --force to replace it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / DEMO_MARKER).write_text("made by devrecd demo; the next demo run may replace this folder\n")


def find_speech(settings: DemoSettings, say: Callable[[str], None]) -> Path:
    """LibriSpeech from ../shared when it is there; otherwise speech made with espeak-ng."""
    candidates = [settings.shared] if settings.shared else []
    candidates.append(Path(os.environ.get("DEVRECD_SHARED", Path(__file__).resolve().parents[2] / "shared")))
    for shared in candidates:
        libri = shared / "data" / "librispeech" / "librispeech_train-clean-100"
        if libri.is_dir():
            say(f"speech: LibriSpeech at {libri}")
            return libri
    espeak = shutil.which("espeak-ng")
    if not espeak:
        raise DemoError("the demo needs speech: LibriSpeech in ../shared/data, or espeak-ng (apt install espeak-ng)")
    out = settings.workdir / "speech"
    say(f"speech: no LibriSpeech found; speaking {len(VOICES)} voices x {len(SENTENCES)} sentences with espeak-ng")
    for v, voice in enumerate(VOICES):
        folder = out / f"voice{v:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for s, text in enumerate(SENTENCES):
            wav = folder / f"{s:02d}.wav"
            if not wav.exists():
                subprocess.run([espeak, "-v", voice, "-s", str(140 + 7 * s), "-w", str(wav), text],
                               check=True, capture_output=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], say: Callable[[str], None], **kw) -> subprocess.CompletedProcess:
    say("$ devrecd " + " ".join(args))
    proc = subprocess.run([sys.executable, "-m", "devrecd", *args], **kw)
    if proc.returncode != 0:
        raise DemoError(f"`devrecd {args[0]}` failed with exit code {proc.returncode}")
    return proc


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print) -> dict:
    """Run every step; returns a summary (accuracy, counts, metrics URL, timings)."""
    t0 = time.monotonic()
    work = settings.workdir.resolve()
    prepare_workdir(work, force=settings.force, keep=settings.keep)
    timings: dict[str, float] = {}

    def step(name: str, fn: Callable[[], object]) -> object:
        start = time.monotonic()
        result = fn()
        timings[name] = round(time.monotonic() - start, 1)
        return result

    speech = step("speech", lambda: find_speech(settings, say))
    corpus = work / "corpus"
    step("synth", lambda: _run(["synth", "--speech", str(speech), "--devices", str(settings.devices),
                                "--recordings-per-device", str(settings.recordings), "--recording-seconds", str(settings.recording_seconds),
                                "--seed", str(settings.seed), "--jobs", "2", "--out", str(corpus)], say))
    run_dir = work / "run"
    # lr 1e-3 (the paper's 1e-4 needs its 100 epochs); hop = clip length keeps an epoch short.
    step("train", lambda: _run(["train", str(corpus), "--out", str(run_dir), "--epochs", str(settings.epochs),
                                "--lr", "1e-3", "--batch-size", "32", "--hop-seconds", "2.0", "--augment",
                                "--patience", "0", "--seed", str(settings.seed)], say))
    rows = list(csv.DictReader((corpus / "manifest.csv").open()))
    test = [r for r in rows if r["split"] == "test"]
    if not test:
        raise DemoError("the simulated corpus has no test recordings")
    onnx = work / "export" / "demo.onnx"
    parity = [str(corpus / r["path"]) for r in rows if r["split"] == "val"][:4] or [str(corpus / test[0]["path"])]
    parity_args = [arg for path in parity for arg in ("--parity-audio", path)]
    step("export", lambda: _run(["export", str(run_dir), "--out", str(onnx), *parity_args], say))

    evidence, state = work / "evidence", work / "state"
    evidence.mkdir()
    port = _free_port()
    args = ["watch", str(evidence), "--model", str(onnx), "--state-dir", str(state), "--port", str(port)]
    say("$ devrecd " + " ".join(args) + "   (in the background)")
    env = {**os.environ, "DEVRECD_WATCH__STABLE_SECONDS": "1.0", "DEVRECD_WATCH__POLL_INTERVAL": "1.0"}
    daemon = subprocess.Popen([sys.executable, "-m", "devrecd", *args], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        step("daemon_ready", lambda: _wait_ready(url, daemon))
        say(f"daemon ready; metrics at {url}/metrics, health at {url}/healthz and {url}/readyz")
        expected = step("drop", lambda: _drop_evidence(corpus, test, evidence, say))
        verdicts = step("judge", lambda: _wait_verdicts(state / "verdicts.jsonl", len(expected), daemon))
        metrics = _scrape(url)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
    say(f"daemon stopped (exit code {daemon.returncode})")
    open_set = step("open_set", lambda: _open_set(corpus, rows, work / "registry", settings.references, say))
    return {**_report(verdicts, expected, metrics, url, timings, time.monotonic() - t0, say), "open_set": open_set}


def _open_set(corpus: Path, rows: list[dict], registry: Path, references: int, say: Callable[[str], None]) -> dict:
    """Enrol all phones but a third of them (at least one) with the shipped GSV scorer, no model;
    then judge every test recording against the registry: enrolled phones should be named, the
    others called "unknown device"."""
    devices = sorted({r["device"] for r in rows})
    held_out = devices[len(devices) - max(1, len(devices) // 3):]
    enrolled = [d for d in devices if d not in held_out]
    say("")
    say(f"open set with the shipped GSV scorer (no network): enrolling {', '.join(enrolled)}; "
        f"never enrolled: {', '.join(held_out)}")
    for device in enrolled:
        refs = [str(corpus / r["path"]) for r in rows if r["device"] == device and r["split"] == "train"][:references]
        _run(["enroll", "--registry", str(registry), "--profile", device, *refs], say, stdout=subprocess.DEVNULL)
    test = [r for r in rows if r["split"] == "test"]
    proc = _run(["identify", "--registry", str(registry), "--format", "json", *(str(corpus / r["path"]) for r in test)], say,
                stdout=subprocess.PIPE, text=True)
    records = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines()) if r.get("outcome") == "judged"}
    say(f"{'test recording':<28} {'true device':<16} {'verdict':<16} {'score':>6} {'llr':>8}")
    counts = {"enrolled": 0, "named_right": 0, "not_enrolled": 0, "called_unknown": 0, "not_judged": 0}
    for row in test:
        rec = records.get(str(corpus / row["path"]))
        truth = row["device"]
        if rec is None:
            counts["not_judged"] += 1
            say(f"{row['path'][-28:]:<28} {truth:<16} (not judged)")
            continue
        known = truth in enrolled
        counts["enrolled" if known else "not_enrolled"] += 1
        ok = rec["device"] == (truth if known else "unknown device")
        counts["named_right" if known else "called_unknown"] += ok
        llr = "-" if rec.get("llr") is None else f"{rec['llr']:.1f}"
        say(f"{row['path'][-28:]:<28} {truth + ('' if known else ' *'):<16} {rec['device']:<16} {rec['score']:6.3f} "
            f"{llr:>8}{'' if ok else '  <- wrong'}")
    say(f"* never enrolled. Enrolled phones named right: {counts['named_right']} of {counts['enrolled']}; "
        f"recordings of phones never enrolled called unknown: {counts['called_unknown']} of {counts['not_enrolled']}"
        " (mNN_uK = unit K of simulated model NN, units of one model are the hardest to tell apart; simulated "
        "phones, not real ones: these figures say nothing about real casework)")
    return {"enrolled_devices": enrolled, "held_out_devices": held_out, **counts}


def _wait_ready(url: str, daemon: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise DemoError(f"the daemon exited with code {daemon.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise DemoError("the daemon did not become ready in time")


def _drop_evidence(corpus: Path, test: list[dict], evidence: Path, say: Callable[[str], None]) -> dict[str, str]:
    """Copy the test recordings in (the first one slowly, as over a share) plus one damaged file."""
    expected: dict[str, str] = {}
    for i, row in enumerate(test):
        src = corpus / row["path"]
        dst = evidence / f"case 0042 - item {i:03d} ({row['device']}).wav"  # spaces and parentheses, as real names
        if i == 0:
            data = src.read_bytes()
            with open(dst, "wb") as fh:  # a copy in progress: the daemon must wait until it is stable
                for k in range(0, len(data), len(data) // 4 + 1):
                    fh.write(data[k : k + len(data) // 4 + 1])
                    fh.flush()
                    time.sleep(0.4)
        else:
            shutil.copyfile(src, dst)
        expected[str(dst)] = row["device"]
    damaged = evidence / "case 0042 - damaged.wav"
    damaged.write_bytes((corpus / test[0]["path"]).read_bytes()[:2000])
    expected[str(damaged)] = "(damaged file)"
    say(f"dropped {len(expected) - 1} test recordings (speakers never heard in training) and 1 damaged file into {evidence}")
    return expected


def _wait_verdicts(log: Path, n: int, daemon: subprocess.Popen, timeout: float = 600.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise DemoError(f"the daemon exited with code {daemon.returncode} while judging")
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        if len(records) >= n:
            return records
        time.sleep(0.5)
    raise DemoError(f"only {len(records)} of {n} verdicts arrived in time")


def _scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("devrecd_"):
                key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
    return out


def _report(verdicts: list[dict], expected: dict[str, str], metrics: dict[str, float], url: str,
            timings: dict[str, float], total: float, say: Callable[[str], None]) -> dict:
    say("")
    say(f"{'evidence file':<44} {'true device':<16} {'verdict':<16} {'score':>6}")
    right = judged = 0
    for v in sorted(verdicts, key=lambda r: r["path"]):
        truth = expected.get(v["path"], "?")
        name = Path(v["path"]).name
        if v["outcome"] == "failed":
            say(f"{name[:44]:<44} {truth:<16} {'failed: ' + v['reason']:<16}")
            continue
        judged += 1
        right += v["device"] == truth
        mark = "" if v["device"] == truth else "  <- wrong"
        say(f"{name[:44]:<44} {truth:<16} {v['device']:<16} {v['score']:6.3f}{mark}")
    accuracy = right / judged if judged else 0.0
    say("")
    say(f"recordings judged: {judged}, right: {right} ({accuracy:.0%}); failures: {len(verdicts) - judged}")
    for key in ('devrecd_files_total{outcome="judged"}', 'devrecd_files_total{outcome="failed"}',
                'devrecd_stage_seconds_count{stage="end_to_end"}', 'devrecd_stage_seconds_sum{stage="end_to_end"}',
                'devrecd_clips_total'):
        if key in metrics:
            say(f"  {key} = {metrics[key]:g}")
    say(f"metrics were served at {url}/metrics (the daemon has stopped)")
    say("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {total:.0f}")
    return {"judged": judged, "right": right, "accuracy": accuracy, "failed": len(verdicts) - judged,
            "timings": timings, "total_seconds": round(total, 1), "metrics_url": url + "/metrics"}
