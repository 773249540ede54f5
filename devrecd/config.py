"""Configuration: ``config.toml`` -> frozen dataclasses, one per section.

Precedence (lowest to highest): built-in defaults, the TOML file, environment variables
``DEVRECD_<SECTION>__<KEY>`` (values parsed as TOML literals, else taken as strings; a string
field takes the value as written unless it is a quoted TOML string), then
explicit overrides passed by the CLI. Every field declares what it accepts in its annotation:
its type, ``Literal[...]`` for a set of values, ``Annotated[T, Range(...)]`` / ``Pattern(...)``
for bounds (:mod:`devrecd.validation`, the one mechanism). A value outside that is a
:class:`~devrecd.errors.ConfigError` naming ``section.key`` and where the value came from (file,
environment variable, command line), raised when the configuration is loaded, never later.
Two sections are declared by the layers that read them, below this module: ``[frontend]``
(:class:`~devrecd.features.FrontendConfig`, also made from artifacts) and ``[audio]``
(:class:`~devrecd.audio.settings.AudioConfig`); they are checked the same way.

The repository's ``config.toml`` documents every key with its default; a test keeps the two in
step with the dataclasses below.
"""

from __future__ import annotations

import math
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping

from devrecd.audio.channel import CHANNELS
from devrecd.audio.settings import AudioConfig
from devrecd.errors import ConfigError
from devrecd.features import FrontendConfig
from devrecd.validation import (
    FRACTION,
    NOT_EMPTY,
    Count,
    Dbfs,
    Fraction,
    NonNegFloat,
    NonNegInt,
    Pattern,
    PositiveFloat,
    Range,
    Section,
    coerce,
    constraint_problem,
    field_hints,
    snr_range_problem,
)

ENV_PREFIX = "DEVRECD_"


SplitFractions = Annotated[tuple[float, float, float], FRACTION]


def _check_split(section: str, split: tuple[float, ...]) -> list[str]:
    return [] if abs(sum(split) - 1.0) < 1e-6 else [f"{section}.split: the three fractions must add up to 1, got {sum(split):g}"]


def _check_channels(name: str, values: tuple[str, ...], what: str, also: tuple[str, ...] = ()) -> list[str]:
    bad = [c for c in values if c not in also and c not in CHANNELS]
    return [f"{name}: unknown {what} {', '.join(map(repr, bad))} (known: {', '.join((*also, *CHANNELS))})"] if bad else []


@dataclass(frozen=True)
class BackendConfig(Section):
    """Which inference backend runs the network, and with what artifact."""

    section: ClassVar[str] = "backend"
    kind: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    model: str = ""  # export/NAME.onnx (its contract JSON beside it), or a checkpoint for kind=torch
    engine: str = ""  # engine/X.plan; empty = look in engine_dir for one matching this GPU
    engine_dir: Annotated[str, NOT_EMPTY] = "engine"
    threads: Count = 1  # ONNX Runtime intra-op threads per inference stream (CPU)
    # torch device for the frontend / torch backend
    device: Annotated[str, Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")] = "auto"
    labels: tuple[str, ...] = ()  # expected model labels (in order); empty = accept the model's own
    checkpoint: str = ""  # the checkpoint `model` was exported from: `auto` serves it with torch on a CUDA GPU
    autocast: Literal["none", "fp16", "bf16"] = "none"  # torch backend: network in half precision, normalisation FP32
    cuda_graphs: bool = False  # torch backend on CUDA: replay captured CUDA graphs (per power-of-two batch)
    # Comparison conditions the served model was validated under ("clean" = broadband recordings as
    # recorded; channel names of devrecd.audio.channel, e.g. "aac64"); other conditions are flagged.
    validated_conditions: tuple[str, ...] = ("clean",)
    # [low, high] measured SNR (dB) the served model was validated on, for a lab that validated it
    # itself; empty = the range its contract (or checkpoint) records from training. Below it, a
    # closed-set verdict names no device (docs/conditions.md, "Honesty outside validation").
    validated_snr_db: tuple[float, ...] = ()

    def relations(self) -> list[str]:
        problems = []
        if self.cuda_graphs and self.device == "cpu":
            problems.append("backend.cuda_graphs needs a CUDA device (backend.device = auto or cuda)")
        if self.validated_conditions != ("clean",):
            problems += _check_channels("backend.validated_conditions", self.validated_conditions, "condition(s)",
                                       also=("clean",))
        if self.validated_snr_db and (problem := snr_range_problem("backend.validated_snr_db", self.validated_snr_db)):
            problems.append(problem)
        return problems


@dataclass(frozen=True)
class BatcherConfig(Section):
    section: ClassVar[str] = "batcher"
    max_batch: Count = 32  # flush a batch at this many clips
    max_wait_ms: NonNegFloat = 50.0  # or when the oldest clip has waited this long
    streams: NonNegInt = 0  # batches inferred at once; 0 = auto (CPU: cores // backend.threads; GPU: 1)
    max_queued_clips: Count = 4096  # clips waiting for inference at most (~37 KB each): bounds the daemon's memory


@dataclass(frozen=True)
class WatchConfig(Section):
    """Directory watching and the daemon's own state."""

    section: ClassVar[str] = "watch"
    dirs: tuple[str, ...] = ()
    state_dir: Annotated[str, NOT_EMPTY] = "state"  # journal, verdict log; never inside an evidence folder
    extensions: tuple[Annotated[str, Pattern(r"\.[^./\\]+", "an extension starting with '.', e.g. '.wav'")], ...] = (
        ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".amr", ".3gp", ".3ga", ".mp4",
    )
    ignore_patterns: tuple[str, ...] = (".*", "*.part", "*.partial", "*.tmp", "*.crdownload", "~*", "*~")
    stable_seconds: NonNegFloat = 2.0  # size and mtime unchanged this long before a file is taken
    polling: Literal["auto", "always", "never"] = "auto"  # auto = poll on network file systems
    poll_interval: PositiveFloat = 5.0
    workers: Count = 2  # decode + feature threads (at most WORKERS_PER_CORE per usable core)
    # Each worker's files judged in its own child process (decode, features, condition, open-set
    # score), pipeline/procs.py: "auto" = where a registry judges, on the CPU; "always"; "never" (threads).
    # "auto" by default: on 2 idle cores the open-set daemon judged 1.41x the files/s of its worker threads,
    # whose numpy calls take turns at the GIL (docs/daemon.md); a crashing decoder takes one file down.
    processes: Literal["auto", "always", "never"] = "auto"
    queue_size: Count = 64  # bounded queues between stages (backpressure)
    rejudge_duplicates: bool = False  # judge identical content again under a new name
    shutdown_timeout: NonNegFloat = 30.0  # SIGTERM: seconds to drain in-flight work
    stall_seconds: PositiveFloat = 120.0  # no progress this long with files in flight: /healthz fails, no WATCHDOG ping
    top_k: Count = 5
    follow_external_links: bool = False  # judge files that symbolic links outside the watched folders lead to

    def relations(self) -> list[str]:
        cap = max_workers()
        return [] if self.workers <= cap else [
            f"watch.workers must be <= {cap} on this machine ({WORKERS_PER_CORE} per usable core: decode threads "
            f"are CPU-bound, more only hold more files in memory), got {self.workers}"]


WORKERS_PER_CORE = 4


def max_workers() -> int:
    """The most decode threads (``watch.workers``) this machine can usefully run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(8, WORKERS_PER_CORE * cores)


@dataclass(frozen=True)
class MetricsConfig(Section):
    section: ClassVar[str] = "metrics"
    enabled: bool = True
    address: Annotated[str, NOT_EMPTY] = "127.0.0.1"
    port: Annotated[int, Range(ge=0, le=65535)] = 9464  # 0 = any free port


@dataclass(frozen=True)
class TrainConfig(Section):
    """The paper's recipe (section V-E) as defaults. The one definition of a training run's options:
    ``devrecd train``/``finetune``/``train-embedder`` and the benchmarks override fields of this section
    (``finetune``/``train-embedder`` start from its ``finetune_*``/``embedder_*`` keys)."""

    section: ClassVar[str] = "train"
    arch: Annotated[str, NOT_EMPTY] = "paper"  # checked against the architectures when the network is built
    epochs: Count = 100
    batch_size: Annotated[int, Range(ge=2)] = 64  # batch normalisation needs two clips
    lr: PositiveFloat = 1e-4
    lr_step_epochs: Count = 30
    lr_gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    patience: NonNegInt = 20  # early stopping: epochs without validation improvement (0 = off)
    seed: NonNegInt = 0
    hop_seconds: PositiveFloat = 1.0  # window hop when cutting training recordings
    split: SplitFractions = (0.64, 0.16, 0.20)  # train / val / test
    cache_dir: Annotated[str, NOT_EMPTY] = "~/.cache/devrecd/features"
    threads: NonNegInt = 0  # torch intra-op threads (0 = torch's default)
    on_unusable: Literal["skip", "fail"] = "skip"  # a recording that cannot be used: skip it (listed in the run) or fail
    augment: bool = False  # random crop offset, gain and light noise on the waveform, each epoch
    channel_augment: tuple[str, ...] = ()  # codec / band-limit channels to train through, e.g. ("aac64", "amrnb", "tel")
    channel_augment_p: Fraction = 0.5  # per recording and epoch: probability of passing through one of them
    noise_augment_p: Fraction = 0.0  # per recording and epoch: probability of noise added (white, or babble below; 0 = off)
    noise_augment_snr_db: tuple[float, float] = (5.0, 35.0)  # ... at an SNR drawn uniformly in this range (dB)
    # A folder of single-talker recordings (LibriSpeech-style, other talkers than any questioned babble):
    # when set, half the noisy copies carry babble of 4-6 of its talkers instead of white noise.
    noise_augment_babble: str = ""
    # "softmax": cross-entropy on model(x) | "aam": additive angular margin (embedders such as asp)
    loss: Literal["softmax", "aam"] = "softmax"
    finetune_epochs: Count = 300  # `devrecd finetune`: the paper's Table IX
    finetune_batch_size: Annotated[int, Range(ge=2)] = 32
    finetune_lr: PositiveFloat = 1e-5  # constant while fine-tuning (Table IX)
    # what fine-tuning trains: softmax (new head) | mlp (Dense(128) + head) | all
    finetune_trainable: Literal["softmax", "mlp", "all"] = "softmax"
    # `devrecd train-embedder` (arch asp, AAM-softmax, no early stopping): the recipe of docs/openset.md
    embedder_epochs: Count = 30
    embedder_batch_size: Annotated[int, Range(ge=2)] = 32
    embedder_lr: PositiveFloat = 1e-3  # multiplied by lr_gamma every embedder_lr_step_epochs
    embedder_lr_step_epochs: Count = 20
    embedder_hop_seconds: PositiveFloat = 0.5  # window hop when cutting the embedder's training recordings

    def relations(self) -> list[str]:
        problems = _check_split("train", self.split)
        lo, hi = self.noise_augment_snr_db
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            problems.append(f"train.noise_augment_snr_db: {[lo, hi]} is not a range [low, high] of finite SNRs in dB")
        if self.noise_augment_babble and not self.noise_augment_p:
            problems.append("train.noise_augment_babble is set but train.noise_augment_p is 0: no noise is added")
        if self.channel_augment:
            problems += _check_channels("train.channel_augment", self.channel_augment, "channel")
        return problems


@dataclass(frozen=True)
class LiveConfig(Section):
    """Live capture through sounddevice (PortAudio)."""

    section: ClassVar[str] = "live"
    enabled: bool = False
    device: str = ""  # name or index; empty = system default input
    window_seconds: NonNegFloat = 0.0  # 0 = the model's clip length
    hop_seconds: PositiveFloat = 1.0
    smoothing: Count = 5  # running verdict over the last N windows
    silence_dbfs: Dbfs = -60.0
    clip_fraction: Fraction = 0.01  # fraction of samples at full scale that counts as clipping
    ring_seconds: PositiveFloat = 30.0
    record_dir: str = ""  # empty = do not keep captured audio
    missing_after: PositiveFloat = 10.0  # readyz false after this long without input
    channels: Count = 1  # capture channels; more than one are mixed to mono as audio.mix says
    record_segment_seconds: PositiveFloat = 300.0  # length of each recorded WAV segment
    reopen_max_seconds: PositiveFloat = 30.0  # cap of the exponential backoff between reopen attempts


@dataclass(frozen=True)
class RegistryConfig(Section):
    """Open-set identification against enrolled device profiles."""

    section: ClassVar[str] = "registry"
    path: str = ""  # empty = closed-set labels of the model
    use_calibration: bool = True  # off: no likelihood ratio and no named device ("inconclusive") for any verdict
    # The decision from the calibrated LR (devrecd.openset.calibration.Decision), shared by every verdict,
    # `calibrate`, `train-gsv` and `train-fusion`: "bayes" accepts the best candidate when
    # LR >= (cost_false_alarm / cost_miss) * (1 - prior) / prior; "far" at the open-set FAR target_far.
    decision: Literal["bayes", "far"] = "bayes"
    prior: Annotated[float, Range(gt=0, lt=1)] = 0.5  # prior that one of the N enrolled devices made it (p = prior / N each)
    cost_miss: Annotated[float, Range(gt=0)] = 1.0  # cost of rejecting the device that made the recording
    cost_false_alarm: Annotated[float, Range(gt=0)] = 1.0  # cost of naming a device that did not
    target_far: Annotated[float, Range(gt=0, lt=1)] = 0.01  # decision = "far": open-set false-acceptance rate
    keep_references: bool = True  # `devrecd enroll` keeps the references' audio (by sha256) next to the registry
    match_conditions: bool = True  # bring references to a questioned recording's codec / band (and its noise, when noisier) before scoring
    # The network an `embedder`/`fusion` registry is served with: its checkpoint (.pt or run directory)
    # or embedder export (.onnx, no torch needed); "" = the checkpoint path the registry recorded.
    embedder_model: str = ""

    # registry.embedder_model is not checked by its name: a run directory may be called anything
    # (runs/emb.v2); loading it says clearly what it is not.


@dataclass(frozen=True)
class SynthConfig(Section):
    """The device simulator (``devrecd synth``)."""

    section: ClassVar[str] = "synth"
    sample_rate: Annotated[int, Range(ge=8000)] = 32000  # corpus rate (CCNU_Mobile's)
    recording_seconds: PositiveFloat = 10.0  # length of each simulated recording
    split: SplitFractions = (0.64, 0.16, 0.20)  # train / val / test recordings per device
    same_model_fraction: Fraction = 0.3  # share of devices that are a second unit of another device's model
    speakers_per_recording: Count = 3  # speaker turns per recording (speakers never cross splits)
    parallel: bool = True  # one playback session: clip k of every device is the same speech (as in CCNU)
    spread: PositiveFloat = 2.5  # scale of model-to-model differences; 2.5 makes 15 devices about as hard as CCNU
    unit_tolerance: PositiveFloat = 4.0  # scale of unit-to-unit differences (manufacturing tolerances), fitted to real phones
    jobs: Count = 1  # worker processes

    def relations(self) -> list[str]:
        return _check_split("synth", self.split)


@dataclass(frozen=True)
class ClusterConfig(Section):
    """``devrecd batch``: an archive judged by a Ray Data job (local instance or a cluster)."""

    section: ClassVar[str] = "cluster"
    address: str = ""  # empty = start a local Ray instance; "auto" | "HOST:PORT" | "ray://HOST:PORT" = join a cluster
    num_cpus: NonNegInt = 0  # CPUs of the local instance; 0 = the cores this process may use
    block_files: Count = 64  # files per block: one decode task, one inference call, one Parquet part
    inference_actors: NonNegInt = 0  # 0 = auto: one per GPU, else as many as the CPUs left by one decode task allow
    actor_cpus: PositiveFloat = 1.0  # logical CPUs each inference actor reserves
    decode_cpus: PositiveFloat = 1.0  # logical CPUs each read + hash + decode + features task reserves
    ship_model: bool = False  # send the model through the object store instead of reading its path on every node


@dataclass(frozen=True)
class ReportConfig(Section):
    """The case header of ``devrecd report`` (flags override)."""

    section: ClassVar[str] = "report"
    case_id: str = ""  # the laboratory's case reference
    examiner: str = ""  # who is responsible for the examination
    laboratory: str = ""  # organisation / unit


@dataclass(frozen=True)
class LogConfig(Section):
    section: ClassVar[str] = "log"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        problems = self.relations()
        if problems:
            raise ConfigError("; ".join(problems))

    def relations(self) -> list[str]:
        """Problems between sections (each names its keys)."""
        fe = self.frontend
        frame_hop = fe.hop_length / fe.sample_rate
        if self.audio.hop_seconds < frame_hop:
            return [f"audio.hop_seconds must be >= the frontend's frame hop ({frame_hop:g} s: frontend.clip_seconds / "
                    f"{fe.n_frames}), got {self.audio.hop_seconds:g}"]
        return []

    def with_overrides(self, overrides: Mapping[str, Any], *, source: str = "command line") -> Config:
        """Return a copy with ``{"section.key": value}`` applied (values checked like the file's)."""
        return _apply(self, _nest(overrides, source=source), lambda section, key: source)


# --- loading ---------------------------------------------------------------------------------

def load_config(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the configuration: defaults < file < environment < overrides, each value checked as it is applied."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        cfg = _apply(cfg, data, lambda section, key: f"file {p}")
    env_values = _env_values(os.environ if env is None else env)
    cfg = _apply(cfg, _nest(env_values, source="environment"), lambda section, key: f"environment {_env_name(section, key or '*')}")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue
        section, key = name[len(ENV_PREFIX):].lower().split("__", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        if not isinstance(value, str) and _is_str_field(section, key):
            value = raw  # DEVRECD_LIVE__DEVICE=1 names device "1", not the integer 1
        out[f"{section}.{key}"] = value
    return out


def _is_str_field(section: str, key: str) -> bool:
    """Whether ``section.key`` is a plain string field (unknown keys are refused later, by :func:`_apply`)."""
    section_type = field_hints(Config).get(section)
    if section_type is None:
        return False
    hint = field_hints(section_type).get(key)
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint is str


def _nest(flat: Mapping[str, Any], *, source: str) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        if "." not in dotted:
            raise ConfigError(f"{source}: {dotted!r} is not of the form section.key")
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def _apply(cfg: Config, data: Mapping[str, Any], source: Callable[[str, str], str]) -> Config:
    """``cfg`` with ``{section: {key: value}}`` applied; ``source(section, key)`` says where a value came from."""
    sections = {f.name: f for f in fields(cfg)}
    updates: dict[str, Any] = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(sections)}) "
                              f"(from {source(section, '')})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table of keys (from {source(section, '')})")
        current = getattr(cfg, section)
        hints = field_hints(type(current))
        changes = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(hints))}) "
                                  f"(from {source(section, key)})")
            name = f"{section}.{key}"
            changed = coerce(name, value, hints[key], source(section, key))
            if problem := constraint_problem(name, changed, hints[key]):
                raise ConfigError(f"{problem} (from {source(section, key)})")
            changes[key] = changed
        try:
            updates[section] = replace(current, **changes)  # relations between keys
        except ConfigError as exc:
            where = sorted({source(section, k) for k in changes})
            raise ConfigError(f"{exc} (from {', '.join(where)})") from None
    if not updates:
        return cfg
    try:
        return replace(cfg, **updates)  # relations between sections
    except ConfigError as exc:
        where = sorted({source(section, k) for section, values in data.items() for k in values})
        raise ConfigError(f"{exc} (from {', '.join(where)})") from None


def config_to_toml_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configuration as plain data (for ``devrecd config`` and tests)."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        out[f.name] = {k.name: getattr(section, k.name) for k in fields(section)}
    return out
