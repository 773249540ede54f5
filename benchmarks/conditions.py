"""Open-set verdicts under case conditions (level, noise, length, codecs), through the CLI, two code versions side by side.

What is measured: the shipped GSV recipe, retrained per fold on development phones only, driven
through the documented workflow (``devrecd train-gsv`` -> ``enroll`` -> ``identify``, and
``calibrate`` -> ``identify``) of a given code checkout. The same run measures two checkouts
(``--baseline``, ``--new``) on the same folds, the same registries' inputs and the same questioned
files, and prints them side by side.

Protocol (the leave-phones-out protocol of ``docs/openset.md``, scaled to the 15 shared CCNU phones):

* Folds: ``devrecd.openset.protocol.phone_folds(devices, n_folds=3, seeds=(0, 1, 2))``: per seed
  the phones are shuffled into 3 test groups of 5; each fold trains on the other 10.
* Per fold: ``devrecd train-gsv DEV --mixtures 16 --nap 16 --seed 0`` (and ``--threshold-rule llr0``
  where the checkout has that option: the shipped recipe before the Bayes decision; ``--babble``
  LibriSpeech train-clean-100, other talkers than the questioned babble's, where it has that) on the
  10 development phones only (a folder of symlinks + manifest.csv). Then each of the 5 test phones
  in turn is the never-enrolled one: a registry enrols the other 4 test phones from segments 1-2
  (``devrecd enroll --gsv FOLD.npz``).
* Questioned: segments 4-5 of the 5 test phones under each condition, all in ONE ``devrecd identify
  --registry R --format json`` call per registry (``DEVRECD_WATCH__TOP_K=10``: every profile's score
  is in ``top_k``). Per fold and condition: 2 x 4 x 5 = 40 enrolled verdicts, 2 x 1 x 5 = 10
  never-enrolled verdicts (360 + 90 over 9 folds).
* Two decisions: ``as enrolled`` (the scorer's development calibration) and ``after calibrate``
  (``devrecd calibrate`` on segment 3 of the 4 enrolled phones, in a copy of the registry; no
  ``--condition``: the case calibrates on its clean references), then the same identify.
* Conditions (questioned recordings only; references stay as recorded), generated once under
  ``--work`` and shared by both checkouts:

  - ``wav``: the file as recorded.
  - ``level<g>dB`` (-30, -20, -10, +6): samples times 10^(g/20), re-quantised to 16-bit PCM WAV.
    A recording whose result would clip (|x| > 1 after the gain) is EXCLUDED from that condition
    (counted in the output), not clipped.
  - ``white<s>dB`` / ``babble<s>dB`` (10, 20, 30): noise added at SNR s, 16-bit PCM WAV.
    SNR = 10 log10(active speech level / noise power). Active speech level: the mean power of
    the recording's 20 ms frames (non-overlapping) whose power is within 30 dB of its loudest
    frames (the 99th percentile of frame power, so a click does not set it). Noise power: the
    mean power of the added noise over the whole recording (white: Gaussian; babble: the sum of
    4-6 LibriSpeech test-other speakers, each speaker's stream levelled to the same active level,
    resampled 16 -> 32 kHz). Noise is seeded by the recording's name: the same noise at every SNR.
  - ``first<t>s`` (2, 3, 5): the first t seconds, 16-bit PCM WAV (bit-exact samples).
  - channels of ``devrecd/audio/channel.py`` (Ogg files differ in their random stream serial
    number between generations, the encoded audio does not) (``aac64``, ``opus32``, ``amrnb``, ``mp3_64``;
    ``opus16``, ``tel`` on request): encoded to a real file in the channel's container (ADTS
    .aac, Ogg .opus, .amr, .mp3; ``tel`` as a 16-bit WAV), decoded by the product's intake.
  - combinations joined by ``+``, applied left to right, a codec last:
    ``level-10dB+white20dB+amrnb`` (a quiet, noisy call recording; the SNR is set on the
    levelled signal).

Figures per condition, decision and checkout (trial counts beside every rate):

* named + accepted: the verdict's device is the true phone (of the enrolled verdicts);
* rank-1: ``top_k[0]`` is the true phone (of the enrolled verdicts);
* never-enrolled rejected: the verdict names no enrolled phone ("unknown device", and any answer
  that is not a phone name, e.g. "inconclusive", counts as rejected);
* EER over the pairwise trials: every questioned recording x every enrolled profile of each
  registry, scores from ``top_k`` (each (recording, profile) pair occurs in 4 of the 5 rotation
  registries, target and non-target alike, so the EER is that of the distinct pairs);
* Cllr (bits) of the LRs in ``top_k`` where reported: ``llr`` (natural log, baseline) or
  ``log10_lr``; rows whose LR is null (withheld) are counted and left out of the Cllr.

A verdict that failed (e.g. ``too_short``) counts as not named, not rank-1 and, for a
never-enrolled phone, as rejected (it names no phone); failures are counted in the JSON.

Each checkout runs in ONE subprocess (``PYTHONPATH=<checkout>``, cwd = ``--work``, no DEVRECD_*
variables but ``DEVRECD_WATCH__TOP_K=10`` and a feature cache under ``--work``) that calls the
checkout's typer app in-process (``devrecd.cli.app``), so no step depends on the code's internals.

Cost: ~14 CPU-minutes for --quick (both checkouts), ~43 for the full grid (both checkouts: ~22 min
wall on 2 idle cores, they run side by side); far longer on a loaded machine. Folds finished by a
run of the same code (the git tree of devrecd/) are kept when a run is repeated or widened (e.g.
--quick, then the full grid in the same --work); --report-only prints what the --work holds.

Run:  nice .venv/bin/python benchmarks/conditions.py --work /tmp/cond [--quick] [--json out.json]
      [--baseline ../wt-base] [--new .] [--conditions wav,amrnb,...] [--seeds 0,1,2] [--folds 3]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CONDITIONS = (
    "wav", "level-30dB", "level-20dB", "level-10dB", "level+6dB",
    "white10dB", "white20dB", "white30dB", "babble10dB", "babble20dB", "babble30dB",
    "first2s", "first3s", "first5s", "aac64", "opus32", "amrnb", "mp3_64", "level-10dB+white20dB+amrnb")
REFERENCE_SEGMENTS = ("1", "2")
CALIBRATION_SEGMENT = "3"
QUESTIONED_SEGMENTS = ("4", "5")
RECIPE = ("--mixtures", "16", "--nap", "16", "--seed", "0")


def recipe() -> tuple[str, ...]:
    """The shipped recipe in the checkout being driven: with ``--threshold-rule llr0`` where train-gsv
    still has that option (before one calibration and the Bayes decision, which is the default since)."""
    import inspect

    from devrecd.cli import openset as commands

    params = inspect.signature(commands.train_gsv).parameters
    if "threshold_rule" in params:
        return (*RECIPE, "--threshold-rule", "llr0")
    talkers = SHARED / "librispeech" / "librispeech_train-clean-100"  # other talkers than the test-other babble
    out = (*RECIPE, "--babble", str(talkers)) if "babble" in params and talkers.is_dir() else RECIPE
    # Channel models (train-gsv --channel-models): those the checkout's shipped scorer carries (what
    # its file records they were trained on), or DEVRECD_BENCH_CHANNEL_MODELS (e.g.
    # "amrnb=clean+amrnb,tel=clean+tel"; "none": without) in their place; a checkout without the
    # option is driven with its shipped recipe.
    models = os.environ.get(CHANNEL_MODELS_ENV, "") or shipped_channel_models()
    if models == "none" or "channel_models" not in params:
        return out
    return (*out, "--channel-models", models) if models else out


def shipped_channel_models() -> str:
    """The channel models of the driven checkout's shipped GSV scorer as ``--channel-models`` takes
    them ("" when it carries none)."""
    try:
        from devrecd.openset.scorers import default_gsv_path, load_gsv

        scorer, _ = load_gsv(default_gsv_path())
    except Exception:  # noqa: BLE001  an older checkout (other API, no such file): no channel models to drive
        return ""
    models = getattr(scorer, "channel_models", None) or {}
    return ",".join(f"{name}={'+'.join(getattr(m, 'trained_on', ()) or (name,))}" for name, m in models.items())


CHANNEL_MODELS_ENV = "DEVRECD_BENCH_CHANNEL_MODELS"
SUFFIX = {"adts": ".aac", "ogg": ".opus", "amr": ".amr", "mp3": ".mp3"}
FRAME_SECONDS = 0.02
ACTIVE_RANGE_DB = 30.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- conditions --------------------------------------------------------------------------------------------

def active_level(x: np.ndarray, rate: int) -> float:
    """Active speech level (mean power, linear): the mean power of the 20 ms frames whose power is
    within 30 dB of the 99th percentile of frame power."""
    n = max(1, int(round(FRAME_SECONDS * rate)))
    frames = np.asarray(x, dtype=np.float64)[: len(x) // n * n].reshape(-1, n)
    if len(frames) == 0:
        return float(np.mean(np.square(x, dtype=np.float64)))
    power = np.mean(frames ** 2, axis=1)
    top = np.percentile(power, 99)
    active = power[power >= top * 10 ** (-ACTIVE_RANGE_DB / 10)]
    return float(np.mean(active)) if len(active) else float(np.mean(power))


def snr_db(speech: np.ndarray, noise: np.ndarray, rate: int) -> float:
    """SNR as defined here: active speech level of ``speech`` over the mean power of ``noise``."""
    return 10 * math.log10(active_level(speech, rate) / float(np.mean(np.square(noise, dtype=np.float64))))


def seeded(*parts: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("|".join(parts).encode()))


class Babble:
    """Babble noise: the sum of 4-6 LibriSpeech speakers, each levelled to the same active level."""

    def __init__(self, root: Path, rate: int) -> None:
        self.rate = rate
        self.speakers = sorted(p for p in root.iterdir() if p.is_dir() and any(p.rglob("*.flac")))
        if len(self.speakers) < 6:
            raise SystemExit(f"{root}: babble needs >= 6 LibriSpeech speakers, found {len(self.speakers)}")
        self._streams: dict[Path, np.ndarray] = {}

    def _stream(self, speaker: Path) -> np.ndarray:
        if speaker not in self._streams:
            import soundfile as sf
            import soxr

            parts = []
            for f in sorted(speaker.rglob("*.flac")):
                y, r = sf.read(f, dtype="float64")
                parts.append(soxr.resample(y, r, self.rate, quality="VHQ") if r != self.rate else y)
            s = np.concatenate(parts)
            self._streams[speaker] = s / math.sqrt(active_level(s, self.rate))
        return self._streams[speaker]

    def noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.integers(4, 7))
        out = np.zeros(n)
        for i in rng.choice(len(self.speakers), size=k, replace=False):
            s = self._stream(self.speakers[i])
            while len(s) < n:
                s = np.concatenate([s, s])
            start = int(rng.integers(0, len(s) - n + 1))
            out += s[start:start + n]
        return out


def parse_condition(name: str) -> list[tuple[str, float | str]]:
    """``level-10dB+white20dB+amrnb`` -> [("level", -10), ("white", 20), ("codec", "amrnb")]."""
    from devrecd.audio.channel import CHANNELS

    ops: list[tuple[str, float | str]] = []
    if name == "wav":
        return ops
    parts, buf = [], ""
    for tok in name.split("+"):  # "level+6dB" keeps its sign: a part starting with a digit joins the previous one
        if buf and tok[:1].isdigit():
            buf += "+" + tok
        else:
            if buf:
                parts.append(buf)
            buf = tok
    parts.append(buf)
    for i, part in enumerate(parts):
        if part.startswith("level") and part.endswith("dB"):
            ops.append(("level", float(part[5:-2])))
        elif part.startswith("white") and part.endswith("dB"):
            ops.append(("white", float(part[5:-2])))
        elif part.startswith("babble") and part.endswith("dB"):
            ops.append(("babble", float(part[6:-2])))
        elif part.startswith("first") and part.endswith("s"):
            ops.append(("first", float(part[5:-1])))
        elif part in CHANNELS:
            if i != len(parts) - 1:
                raise SystemExit(f"condition {name!r}: a channel ({part}) must come last")
            ops.append(("codec", part))
        else:
            raise SystemExit(f"unknown condition part {part!r} in {name!r} (level<g>dB, white<s>dB, babble<s>dB, "
                             f"first<t>s, or a channel: {', '.join(CHANNELS)})")
    return ops


class Excluded(Exception):
    """The condition cannot be made from this recording without changing it otherwise (clipping)."""


def render(name: str, x: np.ndarray, rate: int, key: str, babble: Babble | None) -> tuple[bytes, str, dict]:
    """The questioned file (bytes, suffix) of recording ``x`` (float in [-1, 1], at ``rate``) under
    condition ``name``, and what was done (measured SNR etc.). Raises :class:`Excluded`."""
    import io

    import soundfile as sf

    from devrecd.audio.channel import CHANNELS

    y = np.asarray(x, dtype=np.float64)
    info: dict[str, Any] = {}
    codec = None
    for op, arg in parse_condition(name):
        if op == "level":
            y = y * 10 ** (float(arg) / 20)
        elif op in ("white", "babble"):
            rng = seeded(op, key)
            if op == "white":
                noise = rng.standard_normal(len(y))
            else:
                if babble is None:
                    raise SystemExit("babble noise needs LibriSpeech test-other (--librispeech)")
                noise = babble.noise(len(y), rng)
            gain = math.sqrt(active_level(y, rate) / (np.mean(noise ** 2) * 10 ** (float(arg) / 10)))
            info[f"{op}_snr_db"] = round(snr_db(y, gain * noise, rate), 3)
            y = y + gain * noise
        elif op == "first":
            y = y[: int(round(float(arg) * rate))]
        else:
            codec = CHANNELS[str(arg)]
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 1.0:
        raise Excluded(f"would clip (peak {peak:.3f} full scale)")
    info["seconds"] = round(len(y) / rate, 4)
    if codec is not None and codec.encoder:
        from devrecd.audio.transmit import encode_file

        return encode_file(y.astype(np.float32), rate, codec), SUFFIX[codec.container], info
    if codec is not None:  # a band limit (tel): a 16-bit WAV of the filtered signal
        from devrecd.audio.transmit import apply_channel

        y = np.clip(apply_channel(codec, y.astype(np.float32), rate), -1.0, 32767 / 32768)
    buf = io.BytesIO()
    pcm = np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue(), ".wav", info


def read_ccnu(root: Path) -> list[dict]:
    """The rows of a CCNU-style manifest (path, device, segment): ``root/manifest.csv``, or ``root``
    itself when it is a manifest file (a simulated corpus's, benchmarks/simulator_fit.py); paths
    relative to the manifest's folder."""
    manifest = root if root.is_file() else root / "manifest.csv"
    with open(manifest, newline="") as fh:
        return [{"path": manifest.parent / r["path"], "device": r["device"], "segment": str(r["segment"])}
                for r in csv.DictReader(fh)]


def generate(rows: list[dict], conditions: Sequence[str], out: Path, librispeech: Path | None) -> dict:
    """Every questioned recording under every condition, written once under ``out`` (reused when
    present: the index records what was made). Returns the index."""
    import soundfile as sf

    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"files": {}, "excluded": {}}
    babble = None
    questioned = [r for r in rows if r["segment"] in QUESTIONED_SEGMENTS]
    for cond in conditions:
        if cond in index["files"]:
            continue
        t0 = time.perf_counter()
        if "babble" in cond and babble is None:
            babble = Babble(librispeech, 32000) if librispeech else None
        folder = out / cond
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        files, excluded = [], []
        for r in questioned:
            stem = Path(r["path"]).stem
            entry = {"device": r["device"], "segment": r["segment"], "source": str(r["path"])}
            if cond == "wav":
                dest = folder / Path(r["path"]).name
                shutil.copyfile(r["path"], dest)
                files.append({**entry, "path": str(dest.resolve())})
                continue
            x, rate = sf.read(r["path"], dtype="float64")
            if x.ndim > 1:
                x = x.mean(axis=1)
            try:
                data, suffix, info = render(cond, x, rate, stem, babble)
            except Excluded as exc:
                excluded.append({**entry, "why": str(exc)})
                continue
            dest = folder / f"{stem}{suffix}"
            dest.write_bytes(data)
            files.append({**entry, "path": str(dest.resolve()), **info})
        index["files"][cond] = files
        index["excluded"][cond] = excluded
        index_path.write_text(json.dumps(index, indent=1))
        log(f"condition {cond}: {len(files)} files, {len(excluded)} excluded ({time.perf_counter() - t0:.1f} s)")
    return index


# --- folds and their datasets (shared by both checkouts) ------------------------------------------------------

def write_dataset(folder: Path, rows: Iterable[dict], split: str) -> Path:
    """A dataset folder the loader reads: symlinks + manifest.csv (path, device, segment, split)."""
    rows = list(rows)
    text = io.StringIO()
    csv.writer(text).writerows([["path", "device", "segment", "split"]] + [
        [Path(r["path"]).name, r["device"], r["segment"], split] for r in rows])
    if (folder / "manifest.csv").exists() and (folder / "manifest.csv").read_text() == text.getvalue():
        return folder  # as made before (a run may be using it)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "device", "segment", "split"])
        for r in rows:
            name = Path(r["path"]).name
            os.symlink(Path(r["path"]).resolve(), folder / name)
            w.writerow([name, r["device"], r["segment"], split])
    return folder


def make_plan(rows: list[dict], index: dict, conditions: Sequence[str], folds_n: int, seeds: Sequence[int],
              work: Path) -> dict:
    from devrecd.openset.protocol import phone_folds

    folds = phone_folds([r["device"] for r in rows], n_folds=folds_n, seeds=seeds)
    plan: dict[str, Any] = {"folds": [], "conditions": list(conditions)}
    for fold in folds:
        root = work / "folds" / fold.name
        dev = write_dataset(root / "dev", [r for r in rows if r["device"] in fold.dev], "train")
        rotations = []
        for k, left in enumerate(fold.test):
            enrolled = [p for p in fold.test if p != left]
            refs = {p: [str(r["path"]) for r in rows if r["device"] == p and r["segment"] in REFERENCE_SEGMENTS]
                    for p in enrolled}
            cal = write_dataset(root / f"calibrate-{k}", [r for r in rows if r["device"] in enrolled
                                                          and r["segment"] == CALIBRATION_SEGMENT], "test")
            rotations.append({"left_out": left, "enrolled": enrolled, "references": refs, "calibrate": str(cal)})
        questioned = [{**f, "condition": c} for c in conditions for f in index["files"][c] if f["device"] in fold.test]
        plan["folds"].append({"name": fold.name, "dev_phones": list(fold.dev), "test_phones": list(fold.test),
                              "dev": str(dev), "rotations": rotations, "questioned": questioned})
    return plan


# --- the driver: runs INSIDE a checkout (PYTHONPATH=<checkout>), through its CLI only ------------------------

def drive(plan_path: Path, label: str, out_path: Path) -> int:
    import contextlib
    import io

    import devrecd
    from devrecd.cli import app

    plan = json.loads(plan_path.read_text())
    work = plan_path.parent / "runs" / label
    work.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    steps: dict[str, int] = {}

    def cli(args: list[str], step: str) -> tuple[int, str]:
        t0 = time.perf_counter()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = app([str(a) for a in args], prog_name="devrecd", standalone_mode=False)
            except SystemExit as exc:
                rc = exc.code
            except Exception as exc:  # noqa: BLE001  an uncaught error is a finding, not a crash of the benchmark
                rc = f"{type(exc).__name__}: {exc}"
        timing[step] = round(timing.get(step, 0.0) + time.perf_counter() - t0, 2)
        steps[step] = steps.get(step, 0) + 1
        rc = 0 if rc is None else rc
        if rc not in (0,) and step != "identify":
            raise SystemExit(f"[{label}] devrecd {' '.join(map(str, args[:3]))}... failed ({rc}):\n"
                             f"{out.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}")
        if err.getvalue().strip() and step != "identify":
            fold_notes[-1].append(f"{step}: {err.getvalue().strip()[-500:]}")
        return rc, out.getvalue() + ("\n" + err.getvalue() if step == "identify" and rc else "")

    fold_notes: list[list[str]] = [[]]
    meta = {"label": label, "devrecd": str(Path(devrecd.__file__).resolve().parent),
            "version": getattr(devrecd, "__version__", "?"), "code": code_id(Path(devrecd.__file__).resolve().parents[1]),
            "recipe": list(recipe())}  # folds of another recipe (e.g. channel models) are not reused
    log(f"[{label}] devrecd from {meta['devrecd']} ({meta['code']})")
    kept = resumable(out_path, meta, plan)
    with open(out_path, "w") as sink:
        sink.write(json.dumps({"meta": meta}) + "\n")
        for fold in plan["folds"]:
            if fold["name"] in kept:
                sink.writelines(kept[fold["name"]])
                log(f"[{label}] {fold['name']}: kept from the previous run (same code, same conditions)")
                continue
            before, calls_before, cpu_fold = dict(timing), dict(steps), time.process_time()
            notes: list[str] = []
            fold_notes.append(notes)
            t_fold = time.perf_counter()
            fdir = work / fold["name"]
            fdir.mkdir(parents=True, exist_ok=True)
            gsv = fdir / "gsv.npz"
            _, text = cli(["train-gsv", fold["dev"], "--out", gsv, *recipe()], "train-gsv")
            if True:  # its development calibration (threshold), per fold
                notes.append("train-gsv: " + " | ".join(text.strip().splitlines()[-2:]))
            by_path = {q["path"]: q for q in fold["questioned"]}
            files = [q["path"] for q in fold["questioned"]]
            for k, rot in enumerate(fold["rotations"]):
                reg_dir = fdir / f"rotation-{k}" / "enrolled"
                if reg_dir.parent.exists():
                    shutil.rmtree(reg_dir.parent)
                reg_dir.mkdir(parents=True)
                reg = reg_dir / "registry.json"
                for phone, refs in rot["references"].items():
                    cli(["enroll", "--gsv", gsv, "--profile", phone, *refs, "--registry", reg], "enroll")
                cal_dir = fdir / f"rotation-{k}" / "calibrated"
                for decision in ("as_enrolled", "after_calibrate"):
                    if decision == "after_calibrate":
                        shutil.copytree(reg_dir, cal_dir)
                        reg = cal_dir / "registry.json"
                        rc, text = cli(["calibrate", rot["calibrate"], "--registry", reg, "--format", "json",
                                        "--plots", cal_dir / "plots"], "calibrate")
                    rc, text = cli(["identify", *files, "--registry", reg, "--format", "json"], "identify")
                    got = 0
                    for line in text.splitlines():
                        if not line.startswith("{"):
                            continue
                        rec = json.loads(line)
                        q = by_path.get(rec.get("path"))
                        if q is None:
                            continue
                        got += 1
                        sink.write(json.dumps(verdict_record(fold, k, rot, decision, q, rec)) + "\n")
                    if got != len(files):
                        notes.append(f"{fold['name']} rotation {k} {decision}: {got} of {len(files)} verdicts "
                                     f"(identify rc {rc})")
                sink.flush()
            spent = {k: round(v - before.get(k, 0.0), 2) for k, v in timing.items()}
            sink.write(json.dumps({"fold_done": fold["name"], "conditions": plan["conditions"],
                                   "n_questioned": len(files), "seconds": spent,
                                   "wall": round(time.perf_counter() - t_fold, 1),
                                   "cpu": round(time.process_time() - cpu_fold, 1),
                                   "calls": {k: v - calls_before.get(k, 0) for k, v in steps.items()},
                                   "notes": notes}) + "\n")
            sink.flush()
            log(f"[{label}] {fold['name']}: {time.perf_counter() - t_fold:.0f} s "
                f"({', '.join(f'{s} {t:.0f} s' for s, t in spent.items())})")
    return 0


def verdict_record(fold: dict, k: int, rot: dict, decision: str, q: dict, rec: dict) -> dict:
    """One verdict of ``identify --format json`` as a results record: questioned file ``q`` judged
    against rotation ``k`` of ``fold`` (also ``conditions_rejudge.py``'s records)."""
    return {"fold": fold["name"], "rotation": k, "decision": decision, "condition": q["condition"],
            "true": q["device"], "segment": q["segment"], "enrolled": q["device"] in rot["enrolled"],
            "profiles": rot["enrolled"], "outcome": rec.get("outcome"), "reason": rec.get("reason"),
            "device": rec.get("device"), "condition_status": rec.get("condition_status"),
            "compared_under": (rec.get("comparison") or {}).get("compared_under"),
            "llr": rec.get("llr"), "log10_lr": rec.get("log10_lr"),
            "lr_fields": [f for f in ("llr", "log10_lr") if f in rec],
            "top_k": [{kk: t.get(kk) for kk in ("device", "score", "llr", "log10_lr") if kk in t}
                      for t in rec.get("top_k") or []]}


def code_id(repo: Path) -> str:
    """The git tree of the checkout's devrecd/ ("+dirty" when it has uncommitted changes: then nothing is
    resumed): the same for every commit that leaves the package alone."""
    try:
        tree = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD:devrecd"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "devrecd"], capture_output=True,
                           text=True).stdout.strip()
    return f"devrecd-tree {tree}" + ("+dirty" if dirty else "")


def resumable(out_path: Path, meta: dict, plan: dict) -> dict[str, list[str]]:
    """Lines of the folds a previous run of the same code finished with the same conditions and files."""
    if not out_path.exists() or meta["code"].endswith("+dirty") or meta["code"] == "?":
        return {}
    lines = out_path.read_text().splitlines(keepends=True)
    prev = json.loads(lines[0]).get("meta", {}) if lines else {}
    if prev.get("code") != meta["code"] or prev.get("recipe", meta["recipe"]) != meta["recipe"]:
        return {}
    wanted = {f["name"]: len(f["questioned"]) for f in plan["folds"]}
    by_fold: dict[str, list[str]] = {}
    done = set()
    for line in lines[1:]:
        d = json.loads(line)
        if "fold_done" in d:
            if d["conditions"] == plan["conditions"] and d["n_questioned"] == wanted.get(d["fold_done"]):
                done.add(d["fold_done"])
            by_fold.setdefault(d["fold_done"], []).append(line)
        elif "fold" in d:
            by_fold.setdefault(d["fold"], []).append(line)
    return {f: ls for f, ls in by_fold.items() if f in done}


# --- figures ----------------------------------------------------------------------------------------------

def eer(tar: np.ndarray, non: np.ndarray) -> float:
    """Equal error rate, linear interpolation between operating points."""
    if not len(tar) or not len(non):
        return float("nan")
    th = np.unique(np.concatenate([tar, non]))
    frr = np.array([np.mean(tar < t) for t in th])
    far = np.array([np.mean(non >= t) for t in th])
    d = far - frr
    i = int(np.argmax(d <= 0)) if np.any(d <= 0) else len(d) - 1
    if i == 0 or d[i] == 0:
        return float((far[i] + frr[i]) / 2)
    w = d[i - 1] / (d[i - 1] - d[i])
    return float((1 - w) * (far[i - 1] + frr[i - 1]) / 2 + w * (far[i] + frr[i]) / 2)


def cllr_bits(tar_ln: np.ndarray, non_ln: np.ndarray) -> float:
    """Cllr (bits) of natural-log LRs."""
    if not len(tar_ln) or not len(non_ln):
        return float("nan")
    return float(0.5 * (np.mean(np.logaddexp(0, -tar_ln)) + np.mean(np.logaddexp(0, non_ln))) / math.log(2))


def ln_lr(row: dict, record: dict) -> tuple[bool, float | None]:
    """(the verdict reports an LR field for this row, its natural log or None when withheld). A row
    without an LR key counts as withheld when its verdict carries an LR key set to null."""
    if "log10_lr" not in row and "llr" not in row:
        return bool(record.get("lr_fields")) and all(record.get(f) is None for f in record["lr_fields"]), None
    if "log10_lr" in row:
        v = row["log10_lr"]
        return True, None if v is None else float(v) * math.log(10)
    if "llr" in row:
        v = row["llr"]
        return True, None if v is None else float(v)
    return False, None


def figures(records: list[dict]) -> dict:
    enrolled = [r for r in records if r["enrolled"]]
    never = [r for r in records if not r["enrolled"]]
    named = sum(r["device"] == r["true"] for r in enrolled)
    rank1 = sum(bool(r["top_k"]) and r["top_k"][0]["device"] == r["true"] for r in enrolled)
    rejected = sum(r["device"] not in r["profiles"] for r in never)
    tar, non, tar_lr, non_lr = [], [], [], []
    withheld = lr_rows = 0
    for r in records:
        for t in r["top_k"]:
            if t["device"] not in r["profiles"]:
                continue
            is_t = t["device"] == r["true"]
            (tar if is_t else non).append(float(t["score"]))
            present, v = ln_lr(t, r)
            if present:
                lr_rows += 1
                if v is None:
                    withheld += 1
                else:
                    (tar_lr if is_t else non_lr).append(v)
    answers: dict[str, int] = {}
    for r in records:
        a = r["device"] if r["device"] in ("unknown device", None) or r["device"] not in r["profiles"] else "(a phone)"
        answers[str(a)] = answers.get(str(a), 0) + 1
    expected_trials = sum(len(r["profiles"]) for r in records)
    return {
        "named_accepted": [int(named), len(enrolled)], "rank1": [int(rank1), len(enrolled)],
        "unknown_rejected": [int(rejected), len(never)],
        "eer": eer(np.array(tar), np.array(non)), "n_target": len(tar), "n_nontarget": len(non),
        "missing_trials": expected_trials - len(tar) - len(non),
        "cllr": cllr_bits(np.array(tar_lr), np.array(non_lr)), "lr_trials": [len(tar_lr), len(non_lr)],
        "lr_withheld": [withheld, lr_rows], "failed": sum(r["outcome"] != "judged" for r in records),
        "answers": answers,
        "condition_status": _count(r["condition_status"] for r in records),
        "compared_under": _count(r["compared_under"] for r in records),
    }


def _count(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def read_results(path: Path) -> tuple[dict, dict[str, list[dict]], dict[str, dict]]:
    """(meta, records per finished fold, fold_done line per finished fold); unfinished folds are left out."""
    meta: dict = {}
    recs: dict[str, list[dict]] = {}
    done: dict[str, dict] = {}
    if not path.exists():
        return meta, recs, done
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if "meta" in d:
            meta = d["meta"]
        elif "fold_done" in d:
            done[d["fold_done"]] = d
        else:
            recs.setdefault(d["fold"], []).append(d)
    return meta, {f: r for f, r in recs.items() if f in done}, done


def _sum(dicts: Iterable[dict]) -> dict:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = round(out.get(k, 0) + v, 1)
    return out


def frac(p: Sequence[int]) -> str:
    return f"{p[0]}/{p[1]} {100 * p[0] / p[1]:.0f}%" if p[1] else "-"


def print_table(report: dict, labels: Sequence[str]) -> None:
    cols = [("named+acc", lambda f: frac(f["named_accepted"])), ("rank-1", lambda f: frac(f["rank1"])),
            ("unknown rej.", lambda f: frac(f["unknown_rejected"])),
            ("EER", lambda f: "-" if math.isnan(f["eer"]) else f"{100 * f['eer']:.1f}%"),
            ("Cllr", lambda f: "-" if math.isnan(f["cllr"]) else f"{f['cllr']:.3f}"),
            ("LR withheld", lambda f: f"{f['lr_withheld'][0]}/{f['lr_withheld'][1]}")]
    for decision in ("as_enrolled", "after_calibrate"):
        print(f"\n== decision: {decision.replace('_', ' ')}  (each cell: {' | '.join(labels)})")
        print(f"{'condition':<27}" + "".join(f"{name:>30}" for name, _ in cols) + "   trials tar/non; failed")
        for cond, per in report["figures"].items():
            fs = [per[lb][decision] for lb in labels if lb in per]
            cells = "".join(f"{' | '.join(fn(f) for f in fs):>30}" for _, fn in cols)
            f0 = fs[0]
            print(f"{cond:<27}{cells}   {f0['n_target']}/{f0['n_nontarget']}; " + "/".join(str(f['failed']) for f in fs))


# --- main -----------------------------------------------------------------------------------------------

def git_head(path: Path, *under: str) -> str:
    """Short commit of the checkout at ``path``, "+dirty" when it (or ``under`` in it) has uncommitted changes."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() + (
            "+dirty" if subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no",
                                        "--", *under], capture_output=True, text=True).stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=REPO.parent / "wt-base", help="baseline checkout")
    ap.add_argument("--new", type=Path, default=REPO, help="new checkout (default: this one)")
    ap.add_argument("--only", choices=("baseline", "new"), default=None, help="measure one checkout only")
    ap.add_argument("--ccnu", type=Path, default=SHARED / "ccnu_mobile_sample")
    ap.add_argument("--librispeech", type=Path, default=SHARED / "librispeech" / "librispeech_test-other")
    ap.add_argument("--work", type=Path, default=Path("/tmp/devrecd-conditions"))
    ap.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="seed 0 only (3 folds)")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="run the two checkouts at the same time (one process each)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: the figures of the folds the --work results already hold (all checkouts' common folds)")
    ap.add_argument("--drive", type=Path, default=None, help=argparse.SUPPRESS)  # internal: plan.json
    ap.add_argument("--label", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        return drive(args.drive, args.label, args.out)

    sys.path.insert(0, str(REPO))  # generation helpers (encoders, folds) from this checkout
    t_all = time.perf_counter()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    for c in conditions:
        parse_condition(c)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = read_ccnu(args.ccnu)
    t0 = time.perf_counter()
    index = generate(rows, conditions, work / "questioned", args.librispeech if args.librispeech.is_dir() else None)
    t_gen = time.perf_counter() - t0
    plan_path = work / "plan.json"
    if args.report_only:
        plan = json.loads(plan_path.read_text())
        conditions = [c for c in conditions if c in plan["conditions"]]
    else:
        plan = make_plan(rows, index, conditions, args.folds, seeds, work)
        plan_path.write_text(json.dumps(plan, indent=1))
    checkouts = {"baseline": args.baseline.resolve(), "new": args.new.resolve()}
    if args.only:
        checkouts = {args.only: checkouts[args.only]}
    procs: dict[str, Any] = {}
    walls: dict[str, float] = {}
    t_run = time.perf_counter()
    if not args.report_only:
        # No DEVRECD_* setting reaches the checkouts, but the benchmark's own recipe switch.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVRECD_") or k == CHANNEL_MODELS_ENV}
        for label, path in checkouts.items():
            penv = {**env, "PYTHONPATH": str(path), "DEVRECD_WATCH__TOP_K": "10",
                    "DEVRECD_TRAIN__CACHE_DIR": str(work / "cache" / label), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--drive", str(plan_path), "--label", label,
                   "--out", str(work / f"results-{label}.jsonl")]
            log(f"{label}: {path} ({git_head(path)})")
            procs[label] = (subprocess.Popen(cmd, env=penv, cwd=work), time.perf_counter())
            if not args.parallel:
                procs[label][0].wait()
        for label, (p, t) in procs.items():
            if p.wait() != 0:
                raise SystemExit(f"{label}: the driver failed (exit {p.returncode})")
            walls[label] = round(time.perf_counter() - t, 1)
    report: dict[str, Any] = {
        "protocol": {"corpus": str(args.ccnu), "folds": args.folds, "seeds": seeds, "n_folds": len(plan["folds"]),
                     "recipe": " ".join(RECIPE), "references": REFERENCE_SEGMENTS,
                     "calibration_segment": CALIBRATION_SEGMENT, "questioned": QUESTIONED_SEGMENTS,
                     "top_k": 10, "snr": "active speech level (20 ms frames within 30 dB of the 99th-percentile "
                                         "frame power) / mean noise power"},
        "checkouts": {}, "excluded": {c: index["excluded"][c] for c in conditions if index["excluded"][c]},
        "seconds": {"generate": round(t_gen, 1), "drivers_wall": round(time.perf_counter() - t_run, 1)},
        "figures": {}}
    loaded = {label: read_results(work / f"results-{label}.jsonl") for label in checkouts}
    planned = [f["name"] for f in plan["folds"]]
    common = [f for f in planned if all(f in recs for _, recs, _ in loaded.values())]  # the same folds for all
    report["protocol"]["folds_reported"] = common
    by_label = {}
    for label, (meta, recs, done) in loaded.items():
        report["checkouts"][label] = {
            "path": str(checkouts[label]), "commit": git_head(checkouts[label]), **meta,
            "driver_wall_seconds": walls.get(label),
            "fold_wall_seconds": round(sum(done[f]["wall"] for f in common), 1),
            "fold_cpu_seconds": round(sum(done[f].get("cpu", float("nan")) for f in common), 1),
            "step_seconds": _sum(done[f]["seconds"] for f in common),
            "step_calls": _sum(done[f]["calls"] for f in common),
            "notes": [n for f in common for n in done[f]["notes"]]}
        by_label[label] = [r for f in common for r in recs[f]]
    for cond in conditions:
        report["figures"][cond] = {
            label: {d: figures([r for r in recs if r["condition"] == cond and r["decision"] == d])
                    for d in ("as_enrolled", "after_calibrate")} for label, recs in by_label.items()}
    report["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    labels = list(by_label)
    print(f"\nProtocol: {len(common)} of {len(plan['folds'])} folds reported (seeds {seeds}, {args.folds} folds of 5 test phones), per fold 5 "
          f"rotation registries of 4 enrolled test phones (segments 1-2), questioned segments 4-5; GSV {' '.join(RECIPE)}")
    for label in labels:
        c = report["checkouts"][label]
        print(f"  {label}: {c['path']} @ {c['commit']} (devrecd from {c.get('devrecd')}); folds' wall "
              f"{c['fold_wall_seconds']:.0f} s, CPU {c['fold_cpu_seconds']:.0f} s; per step {c['step_seconds']} s, calls {c['step_calls']}")
    for cond, ex in report["excluded"].items():
        print(f"  excluded from {cond}: {len(ex)} of {len(ex) + len(index['files'][cond])} recordings ({ex[0]['why']}, ...)")
    print_table(report, labels)
    print(f"\ngenerate {t_gen:.0f} s; drivers {report['seconds']['drivers_wall']:.0f} s; total {report['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
