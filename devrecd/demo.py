"""``devrecd demo``: the shipped default on simulated phones, with no user data and no training.

Every step is one of the project's own commands, run as a subprocess and printed as it runs, so
the demo doubles as a worked example of what a lab does with a fresh install:

1. speech: LibriSpeech from ``../shared`` when present, else sentences spoken by espeak-ng;
2. ``devrecd synth``: a small corpus of simulated phones (speakers split disjointly; one phone is a
   second unit of another one's model);
3. ``devrecd enroll``: the shipped GSV scorer (no model, no training) enrols two thirds of the
   phones from their training recordings;
4. ``devrecd identify --registry``: the test recordings of enrolled phones and of phones never
   enrolled (which should come out as "unknown device"), verdicts kept as JSON lines;
5. ``devrecd report``: the case report (HTML + JSON) on those verdicts.

Simulated phones are not evidence: the figures it prints say how the tool behaves, not how
accurate it is on real casework (see docs/simulator.md for how simulated and real phones compare).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
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
    references: int = 4  # training recordings per enrolled phone
    recording_seconds: float = 6.0
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


def _run(args: list[str], say: Callable[[str], None], **kw) -> subprocess.CompletedProcess:
    say("$ devrecd " + " ".join(args))
    proc = subprocess.run([sys.executable, "-m", "devrecd", *args], **kw)
    if proc.returncode != 0:
        raise DemoError(f"`devrecd {args[0]}` failed with exit code {proc.returncode}")
    return proc


def run_demo(settings: DemoSettings, say: Callable[[str], None] = print) -> dict:
    """Run every step; returns a summary (counts, report path, timings)."""
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
    rows = list(csv.DictReader((corpus / "manifest.csv").open()))
    if not any(r["split"] == "test" for r in rows):
        raise DemoError("the simulated corpus has no test recordings")
    open_set = step("open_set", lambda: _open_set(corpus, rows, work, settings.references, timings, say))
    report = step("report", lambda: _report(work, say))
    total = time.monotonic() - t0
    say("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {total:.0f}")
    return {"open_set": open_set, "report": str(report), "timings": timings, "total_seconds": round(total, 1)}


def _open_set(corpus: Path, rows: list[dict], work: Path, references: int, timings: dict[str, float],
              say: Callable[[str], None]) -> dict:
    """Enrol all phones but a third of them (at least one) with the shipped GSV scorer, no model;
    then judge every test recording against the registry: enrolled phones should be named, the
    others called "unknown device". The verdicts are kept in ``work/verdicts.jsonl``."""
    registry = work / "registry.json"
    t0 = time.monotonic()
    devices = sorted({r["device"] for r in rows})
    held_out = devices[len(devices) - max(1, len(devices) // 3):]
    enrolled = [d for d in devices if d not in held_out]
    say(f"the shipped GSV scorer (no model, no training): enrolling {', '.join(enrolled)}; "
        f"never enrolled: {', '.join(held_out)}")
    for device in enrolled:
        refs = [str(corpus / r["path"]) for r in rows if r["device"] == device and r["split"] == "train"][:references]
        _run(["enroll", "--registry", str(registry), "--profile", device, *refs], say, stdout=subprocess.DEVNULL)
    timings["enroll"] = round(time.monotonic() - t0, 1)
    test = [r for r in rows if r["split"] == "test"]
    t0 = time.monotonic()
    proc = _run(["identify", "--registry", str(registry), "--format", "json", *(str(corpus / r["path"]) for r in test)], say,
                stdout=subprocess.PIPE, text=True)
    timings["identify"] = round(time.monotonic() - t0, 1)
    (work / "verdicts.jsonl").write_text(proc.stdout)
    say(f"verdicts: {work / 'verdicts.jsonl'}")
    records = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines()) if r.get("outcome") == "judged"}
    say(f"{'test recording':<28} {'true device':<16} {'verdict':<16} {'score':>6} {'log10 LR':>8}")
    counts = {"enrolled": 0, "named_right": 0, "not_enrolled": 0, "called_unknown": 0, "not_judged": 0,
              "inconclusive": 0}
    for row in test:
        rec = records.get(str(corpus / row["path"]))
        truth = row["device"]
        if rec is None:
            counts["not_judged"] += 1
            say(f"{row['path'][-28:]:<28} {truth:<16} (not judged)")
            continue
        known = truth in enrolled
        counts["enrolled" if known else "not_enrolled"] += 1
        ok = rec["device"] == truth if known else rec["device"] not in enrolled  # unknown or inconclusive: not named
        counts["named_right" if known else "called_unknown"] += ok
        llr = "-" if rec.get("log10_lr") is None else f"{rec['log10_lr']:+.2f}"
        undecided = rec["device"] == "inconclusive"  # outside what the calibration validates: no decision
        counts["inconclusive"] += undecided
        mark = "  (no decision: outside validation)" if undecided else "" if ok else "  <- wrong"
        say(f"{row['path'][-28:]:<28} {truth + ('' if known else ' *'):<16} {rec['device']:<16} {rec['score']:6.3f} "
            f"{llr:>8}{mark}")
    say(f"* never enrolled. Enrolled phones named right: {counts['named_right']} of {counts['enrolled']}; "
        f"recordings of phones never enrolled not named: {counts['called_unknown']} of {counts['not_enrolled']}; "
        f"{counts['inconclusive']} verdict(s) inconclusive (the recording is outside the conditions the shipped "
        "calibration was validated on, e.g. noisier than its recordings after matching: no device named, none excluded)")
    say("(mNN_uK = unit K of simulated model NN. Simulated phones, not real ones: these counts show how the tool "
        "behaves, they say nothing about its accuracy in real casework. On real phones see docs/openset.md; how "
        "simulated phones compare with real ones for this scorer: docs/simulator.md.)")
    return {"enrolled_devices": enrolled, "held_out_devices": held_out, **counts}


def _report(work: Path, say: Callable[[str], None]) -> Path:
    """``devrecd report`` on the demo's verdicts: one HTML page (+ JSON); its path."""
    out = work / "report"
    _run(["report", str(work / "verdicts.jsonl"), "--out", str(out), "--case-id", "DEMO (simulated phones)",
          "--examiner", "devrecd demo"], say)
    html = out / "report.html"
    if not html.is_file():
        raise DemoError(f"`devrecd report` wrote no {html}")
    say(f"case report: {html}")
    return html
