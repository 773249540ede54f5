"""Simulated device corpora: speech from real speakers, recorded on many simulated devices.

Layout written to ``out``::

    out/<device>/<device>_<nnnn>.wav   16-bit PCM at the corpus rate (32 kHz by default)
    out/manifest.csv                   path,device,group,split (group: see :func:`group_of`)
    out/devices.json                   every device's chain, the settings and the speech source

Speakers are split disjointly between train/val/test, so a model cannot learn speaker identity in
place of device identity. By default a corpus is one *parallel session*, as real device corpora are
recorded (CCNU_Mobile plays the same speech to all phones at once): clip k of every device carries
the same source speech, so content is balanced across devices and cannot stand in for the device.
Every recording is rendered from generators seeded by ``(seed, clip)`` (speech) and
``(seed, device, clip)`` (device and room), so the output is identical whatever ``jobs`` is.
"""

from __future__ import annotations

import csv
import io
import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from devrecd.audio import AudioError, read_evidence
from devrecd.config import AudioConfig, SynthConfig
from devrecd.audio.files import wanted
from devrecd.data import RECORDINGS, SPLITS, ratio_split
from devrecd.errors import DatasetError
from devrecd.synth.chain import DeviceChain, Variation, render, sample_model, sample_unit
from devrecd.fsutil import atomic_write

_LIBRISPEECH_NAME = re.compile(r"^(\d+)-\d+-\d+$")  # <speaker>-<chapter>-<utterance>
# Speech may be shorter than a model clip; it only has to be long enough to be speech.
_SPEECH_AUDIO = AudioConfig(min_seconds=0.5, silence_dbfs=-60.0)


@dataclass(frozen=True)
class SynthSettings:
    """What to generate."""

    devices: int
    recordings_per_device: int
    seed: int = 0
    sample_rate: int = 32000
    recording_seconds: float = 10.0
    split: tuple[float, float, float] = (0.64, 0.16, 0.20)
    same_model_fraction: float = 0.3  # share of devices that are a second unit of another device's model
    speakers_per_recording: int = 3  # a recording strings together turns of this many speakers (of its split)
    parallel: bool = True  # clip k of every device is the same speech (one playback session, as in CCNU_Mobile)
    spread: float = 2.5  # scale of model-to-model differences (see SynthConfig.spread)
    unit_tolerance: float = 4.0  # scale of unit-to-unit differences (see SynthConfig.unit_tolerance)
    variation: Variation = field(default_factory=Variation)

    @classmethod
    def from_config(cls, cfg: SynthConfig, *, devices: int, recordings_per_device: int, seed: int = 0) -> SynthSettings:
        """Settings from the ``[synth]`` config section plus the per-run numbers."""
        return cls(devices=devices, recordings_per_device=recordings_per_device, seed=seed, sample_rate=cfg.sample_rate,
                   recording_seconds=cfg.recording_seconds, split=cfg.split, same_model_fraction=cfg.same_model_fraction,
                   speakers_per_recording=cfg.speakers_per_recording, parallel=cfg.parallel, spread=cfg.spread,
                   unit_tolerance=cfg.unit_tolerance)


@dataclass(frozen=True)
class _Job:
    index: int
    device: DeviceChain
    clip: int
    split: str
    speakers: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]  # each speaker's utterances
    seed: int
    rate: int
    recording_seconds: float
    variation: Variation
    parallel: bool
    out: str


def speaker_of(path: Path, root: Path) -> str:
    """LibriSpeech names give the speaker (``19-198-0001`` -> ``19``); else the first folder below root."""
    m = _LIBRISPEECH_NAME.match(path.stem)
    if m:
        return m.group(1)
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


def scan_speech(speech_dir: Path) -> dict[str, list[Path]]:
    """``{speaker: [files]}`` of every audio file below ``speech_dir``; checks each one decodes."""
    speech_dir = Path(speech_dir)
    if not speech_dir.is_dir():
        raise DatasetError(f"speech folder not found: {speech_dir}", reason="synth_speech")
    files = sorted(p for p in speech_dir.rglob("*") if p.is_file() and wanted(p.name, RECORDINGS))
    if not files:
        raise DatasetError(f"speech folder {speech_dir} holds no audio files "
                           f"({', '.join(RECORDINGS.extensions)})", reason="synth_speech_empty")
    speakers: dict[str, list[Path]] = {}
    for f in files:
        try:
            read_evidence(f, 16000, _SPEECH_AUDIO)  # fail before hours of work, naming the file
        except AudioError as exc:
            raise DatasetError(f"speech file cannot be used: {exc} ({exc.reason})", reason="synth_speech_unreadable") from None
        speakers.setdefault(speaker_of(f, speech_dir), []).append(f)
    return speakers


def split_speakers(speakers: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Disjoint speaker pools per split (a seeded permutation cut by the ratios)."""
    names = sorted(speakers)
    needed = [s for s, r in zip(SPLITS, ratios) if r > 0]
    if len(names) < len(needed):
        raise DatasetError(f"{len(names)} speaker(s) cannot be split disjointly into {', '.join(needed)}: "
                           f"need at least {len(needed)} speakers", reason="synth_speakers")
    order = [names[i] for i in np.random.default_rng([seed, 7]).permutation(len(names))]
    counts = {s: (max(1, round(len(names) * r)) if r > 0 else 0) for s, r in zip(SPLITS, ratios)}
    counts["train"] = len(names) - counts["val"] - counts["test"]
    while counts["train"] < 1:  # small speaker sets: give train at least one speaker
        big = max(("val", "test"), key=lambda s: counts[s])
        counts[big] -= 1
        counts["train"] += 1
    pools, start = {}, 0
    for s in SPLITS:
        pools[s] = order[start : start + counts[s]]
        start += counts[s]
    return pools


def make_devices(settings: SynthSettings) -> list[DeviceChain]:
    """The corpus's devices: models, and second units for ``same_model_fraction`` of them."""
    n = settings.devices
    if n < 1:
        raise DatasetError("at least one device is needed", reason="synth_settings")
    pairs = min(n // 2, int(n * settings.same_model_fraction / 2.0 + 0.5))
    models = [sample_model(np.random.default_rng([settings.seed, 1, m]), m, settings.spread) for m in range(n - pairs)]
    devices = list(models)
    for m in range(pairs):
        devices.append(sample_unit(models[m], np.random.default_rng([settings.seed, 2, m]), unit=2,
                                   tolerance=settings.unit_tolerance))
    return sorted(devices, key=lambda d: d.name)


def plan(settings: SynthSettings, speakers: dict[str, list[Path]], out: Path) -> tuple[list[DeviceChain], list[_Job]]:
    """Every recording to render, with its device, split, speaker and seed."""
    if settings.recordings_per_device < 1:
        raise DatasetError("clips per device must be >= 1", reason="synth_settings")
    devices = make_devices(settings)
    pools = split_speakers(list(speakers), settings.split, settings.seed)
    clip_ids = [f"{i:04d}" for i in range(settings.recordings_per_device)]
    splits = ratio_split({d.name: clip_ids for d in devices}, settings.split, settings.seed)
    rng = np.random.default_rng([settings.seed, 3])
    cursor = {s: int(rng.integers(0, max(1, len(p)))) for s, p in pools.items()}
    def pick(split: str) -> tuple[str, ...]:
        pool, chosen = pools[split], []
        for _ in range(min(settings.speakers_per_recording, len(pool))):
            chosen.append(pool[cursor[split] % len(pool)])  # round-robin: many speakers per device
            cursor[split] += 1
        return tuple(chosen)

    # ratio_split orders clip ids globally, so clip k has the same split on every device.
    session = {cid: pick(splits[(devices[0].name, cid)]) for cid in clip_ids} if settings.parallel else {}
    jobs = []
    for dev in devices:
        for c, cid in enumerate(clip_ids):
            split = splits[(dev.name, cid)]
            chosen = session[cid] if settings.parallel else pick(split)
            jobs.append(_Job(
                index=len(jobs), device=dev, clip=c, split=split, speakers=chosen,
                files=tuple(tuple(str(p) for p in speakers[spk]) for spk in chosen), seed=settings.seed,
                rate=settings.sample_rate, recording_seconds=settings.recording_seconds, variation=settings.variation,
                parallel=settings.parallel, out=str(out / dev.name / f"{dev.name}_{cid}.wav"),
            ))
    return devices, jobs


def group_of(job: _Job) -> str:
    """Manifest group: the session clip (parallel), else the lone speaker, else the recording."""
    if job.parallel:
        return f"clip{job.clip:04d}"  # same speech on every device, like a CCNU segment
    return f"spk{job.speakers[0]}" if len(job.speakers) == 1 else Path(job.out).stem


def _speech_for(job: _Job, rng: np.random.Generator) -> np.ndarray:
    """``recording_seconds`` of speech: one equal turn per speaker, each from that speaker's utterances."""
    need = int(round(job.recording_seconds * job.rate))
    bounds = np.linspace(0, need, len(job.speakers) + 1).astype(int)
    turns = [_turn(files, int(b - a), job.rate, rng) for files, a, b in zip(job.files, bounds[:-1], bounds[1:])]
    return np.concatenate(turns)


def _turn(files: tuple[str, ...], need: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """``need`` samples of one speaker: utterances in a random order from a random start, looped if short."""
    order = rng.permutation(len(files))
    parts, have = [], 0
    while have < need:
        for i in order:
            x = read_evidence(files[i], rate, _SPEECH_AUDIO).samples
            if have == 0 and len(x) > need:
                x = x[int(rng.integers(0, len(x) - need + 1)):]
            parts.append(x)
            have += len(x)
            if have >= need:
                break
    return np.concatenate(parts)[:need]


def _render_job(job: _Job) -> tuple[int, str, str]:
    """Render one recording to its WAV; returns (index, path, sha256)."""
    import hashlib

    import soundfile as sf

    # Parallel sessions draw the speech from the clip's generator (same on every device) and
    # everything the device and the room do from the recording's own.
    speech_rng = np.random.default_rng([job.seed, 5, job.clip] if job.parallel else
                                       [job.seed, 6, job.device.model, job.device.unit, job.clip])
    rng = np.random.default_rng([job.seed, 4, job.device.model, job.device.unit, job.clip])
    room_rng = np.random.default_rng([job.seed, 7, job.device.model, job.device.unit]) if job.variation.fixed_place else None
    y = render(_speech_for(job, speech_rng), job.rate, job.device, rng, job.variation, room_rng=room_rng)
    buf = io.BytesIO()
    sf.write(buf, y, job.rate, subtype="PCM_16", format="WAV")
    data = buf.getvalue()
    atomic_write(job.out, data, fsync=False)
    return job.index, job.out, hashlib.sha256(data).hexdigest()


def generate(speech_dir: Path, out: Path, settings: SynthSettings, *, jobs: int = 1,
             progress: Callable[[int], None] | None = None) -> Path:
    """Generate a corpus into ``out`` (which must be empty or absent); returns the manifest path.

    ``progress(n)`` is called as recordings finish (the CLI drives a progress bar with it).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"output folder {out} exists and is not empty; choose a new one", reason="synth_output")
    speakers = scan_speech(Path(speech_dir))
    devices, todo = plan(settings, speakers, out)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0)  # checks passed: rendering starts
    hashes: dict[int, str] = {}
    for index, _, digest in _run(todo, jobs):
        hashes[index] = digest
        if progress:
            progress(1)
    rows = [(Path(j.out).relative_to(out).as_posix(), j.device.name, group_of(j), j.split) for j in todo]
    _write_atomic(out / "manifest.csv", _csv(rows))
    description = {
        "generator": "devrecd synth",
        "seed": settings.seed,
        "sample_rate": settings.sample_rate,
        "recording_seconds": settings.recording_seconds,
        "split": list(settings.split),
        "same_model_fraction": settings.same_model_fraction,
        "speakers_per_recording": settings.speakers_per_recording,
        "parallel": settings.parallel,
        "spread": settings.spread,
        "unit_tolerance": settings.unit_tolerance,
        "variation": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.variation.__dict__.items()},
        "speech": {"dir": str(Path(speech_dir).resolve()), "speakers": len(speakers),
                   "files": sum(len(v) for v in speakers.values())},
        "speakers_per_split": {s: sorted({k for j in todo if j.split == s for k in j.speakers}) for s in SPLITS},
        "devices": [d.to_dict() for d in devices],
        "recordings_sha256": {Path(j.out).relative_to(out).as_posix(): hashes[j.index] for j in todo},
    }
    _write_atomic(out / "devices.json", json.dumps(description, indent=1).encode())
    return out / "manifest.csv"


def _run(todo: list[_Job], jobs: int) -> Iterator[tuple[int, str, str]]:
    if jobs <= 1:
        for job in todo:
            yield _render_job(job)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_render_job, todo, chunksize=4)


def _csv(rows: list[tuple[str, str, str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "device", "group", "split"])
    writer.writerows(rows)
    return buf.getvalue().encode()


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, data)  # a manifest appears only when the corpus is complete
