"""Configuration: ``config.toml`` -> frozen dataclasses, one per section.

Precedence (lowest to highest): built-in defaults, the TOML file, environment variables
``DEVRECD_<SECTION>__<KEY>`` (values parsed as TOML literals, else taken as strings), then
explicit overrides passed by the CLI. An unknown section or key, or a value of the wrong type,
is a :class:`~devrecd.errors.ConfigError` naming ``section.key``.

The repository's ``config.toml`` documents every key with its default; a test keeps the two in
step with the dataclasses below.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from devrecd.errors import ConfigError
from devrecd.features import FrontendConfig

ENV_PREFIX = "DEVRECD_"


@dataclass(frozen=True)
class AudioConfig:
    """Decoding and windowing of recordings (serving and training)."""

    hop_seconds: float = 2.0  # window hop when cutting recordings into clips (serving)
    min_seconds: float = 2.0  # shorter recordings are rejected (between this and one clip: wrap-padded)
    max_seconds: float = 4 * 3600.0  # longer recordings are rejected before decoding
    max_bytes: int = 2 * 1024**3  # larger files are rejected before reading
    silence_dbfs: float = -70.0  # a recording whose RMS level is below this is "silent"
    mix: str = "mean"  # how channels become mono: "mean" (average) or "first"
    resample_quality: str = "VHQ"  # soxr quality when the rate differs from the model's
    max_decoded_samples: int = 4 * 3600 * 48000 * 2  # frames x channels; larger is refused before decoding
    clip_fraction: float = 0.01  # verdict flag "clipping": this share of samples at full scale
    dc_offset: float = 0.1  # verdict flag "dc_offset": |mean sample| at or above this
    loud_dbfs: float = -6.0  # verdict flag "loud": RMS level above this (e.g. full-scale noise)

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.mix not in ("mean", "first"), "mix must be 'mean' or 'first'"),
            (self.max_decoded_samples < 1, "max_decoded_samples must be >= 1"),
            (not 0.0 <= self.clip_fraction <= 1.0, "clip_fraction must be in [0, 1]"),
            (self.dc_offset < 0, "dc_offset must be >= 0"),
        ) if bad]
        if problems:
            raise ConfigError("audio: " + "; ".join(problems))


@dataclass(frozen=True)
class BackendConfig:
    """Which inference backend runs the network, and with what artifact."""

    kind: str = "auto"  # auto | onnxruntime | tensorrt | torch
    model: str = ""  # export/NAME.onnx (its contract JSON beside it), or a checkpoint for kind=torch
    engine: str = ""  # engine/X.plan; empty = look in engine_dir for one matching this GPU
    engine_dir: str = "engine"
    threads: int = 1  # ONNX Runtime intra-op threads per inference stream (CPU)
    device: str = "auto"  # torch device for the frontend / torch backend: auto | cpu | cuda[:N]
    labels: tuple[str, ...] = ()  # expected model labels (in order); empty = accept the model's own
    checkpoint: str = ""  # the checkpoint `model` was exported from: `auto` serves it with torch on a CUDA GPU
    autocast: str = "none"  # torch backend: none | fp16 | bf16 (network in half precision, normalisation FP32)
    cuda_graphs: bool = False  # torch backend on CUDA: replay captured CUDA graphs (per power-of-two batch)
    # Comparison conditions the served model was validated under ("clean" = broadband recordings as
    # recorded; channel names of devrecd.audio.channel, e.g. "aac64"); other conditions are flagged.
    validated_conditions: tuple[str, ...] = ("clean",)

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.autocast not in ("none", "fp16", "bf16"), f"backend.autocast must be none, fp16 or bf16, not {self.autocast!r}"),
            (self.threads < 1, "backend.threads must be >= 1"),
            (self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"),
             f"backend.device must be auto, cpu, cuda or cuda:N, not {self.device!r}"),
            (self.cuda_graphs and self.device == "cpu", "backend.cuda_graphs needs a CUDA device (device = auto or cuda)"),
        ) if bad]
        if self.validated_conditions != ("clean",):
            from devrecd.audio.channel import CHANNELS  # lazily: the audio package imports this module

            bad = [c for c in self.validated_conditions if c != "clean" and c not in CHANNELS]
            if bad:
                problems.append(f"backend.validated_conditions: unknown condition(s) {', '.join(map(repr, bad))} "
                                f"(known: clean, {', '.join(CHANNELS)})")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32  # flush a batch at this many clips
    max_wait_ms: float = 50.0  # or when the oldest clip has waited this long
    streams: int = 0  # batches inferred at once; 0 = auto (CPU: cores // backend.threads; GPU: 1)
    max_queued_clips: int = 4096  # clips waiting for inference at most (~37 KB each): bounds the daemon's memory

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.max_batch < 1, "max_batch must be >= 1"),
            (self.max_wait_ms < 0, "max_wait_ms must be >= 0"),
            (self.streams < 0, "streams must be >= 0 (0 = auto)"),
            (self.max_queued_clips < 1, "max_queued_clips must be >= 1"),
        ) if bad]
        if problems:
            raise ConfigError("batcher: " + "; ".join(problems))


@dataclass(frozen=True)
class WatchConfig:
    """Directory watching and the daemon's own state."""

    dirs: tuple[str, ...] = ()
    state_dir: str = "state"  # journal, verdict log; never inside an evidence folder
    extensions: tuple[str, ...] = (
        ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".amr", ".3gp", ".3ga", ".mp4",
    )
    ignore_patterns: tuple[str, ...] = (".*", "*.part", "*.partial", "*.tmp", "*.crdownload", "~*", "*~")
    stable_seconds: float = 2.0  # size and mtime unchanged this long before a file is taken
    polling: str = "auto"  # auto (poll on network file systems) | always | never
    poll_interval: float = 5.0
    workers: int = 2  # decode + feature threads
    queue_size: int = 64  # bounded queues between stages (backpressure)
    rejudge_duplicates: bool = False  # judge identical content again under a new name
    shutdown_timeout: float = 30.0  # SIGTERM: seconds to drain in-flight work
    stall_seconds: float = 120.0  # no progress this long with files in flight: /healthz fails, no WATCHDOG ping
    top_k: int = 5
    follow_external_links: bool = False  # judge files that symbolic links outside the watched folders lead to


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9464


TRAIN_LOSSES = ("softmax", "aam")  # cross-entropy on model(x) | additive angular margin (model.margin_logits)
FINETUNE_TRAINABLE = ("softmax", "mlp", "all")  # fine-tuning: which part of the network learns (Table IX)


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe (section V-E) as defaults. The one definition of a training run's options:
    ``devrecd train``/``finetune``/``train-embedder`` and the benchmarks override fields of this section."""

    arch: str = "paper"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    lr_step_epochs: int = 30
    lr_gamma: float = 0.1
    patience: int = 20  # early stopping: epochs without validation improvement (0 = off)
    seed: int = 0
    hop_seconds: float = 1.0  # window hop when cutting training recordings
    split: tuple[float, float, float] = (0.64, 0.16, 0.20)  # train / val / test
    cache_dir: str = "~/.cache/devrecd/features"
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    on_unusable: str = "skip"  # a recording that cannot be used: "skip" it (listed in the run) or "fail" the run
    augment: bool = False  # random crop offset, gain and light noise on the waveform, each epoch
    channel_augment: tuple[str, ...] = ()  # codec / band-limit channels to train through, e.g. ("aac64", "amrnb", "tel")
    channel_augment_p: float = 0.5  # per recording and epoch: probability of passing through one of them
    loss: str = "softmax"  # "softmax": cross-entropy | "aam": additive angular margin (embedders such as asp)
    finetune_epochs: int = 300  # `devrecd finetune`: the paper's Table IX
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-5  # constant while fine-tuning (Table IX)
    finetune_trainable: str = "softmax"  # what fine-tuning trains: softmax (new head) | mlp (Dense(128) + head) | all

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.epochs < 1, "epochs must be >= 1"),
            (self.batch_size < 2, "batch_size must be >= 2 (BatchNorm)"),
            (not self.lr > 0, "lr must be > 0"),
            (self.lr_step_epochs < 1, "lr_step_epochs must be >= 1"),
            (not 0 < self.lr_gamma <= 1, "lr_gamma must be in (0, 1]"),
            (self.patience < 0, "patience must be >= 0"),
            (not self.hop_seconds > 0, "hop_seconds must be > 0"),
            (self.on_unusable not in ("skip", "fail"), f"on_unusable must be 'skip' or 'fail', not {self.on_unusable!r}"),
            (not 0.0 <= self.channel_augment_p <= 1.0, "channel_augment_p must be in [0, 1]"),
            (self.loss not in TRAIN_LOSSES, f"loss must be one of {', '.join(TRAIN_LOSSES)}, not {self.loss!r}"),
            (self.finetune_epochs < 1, "finetune_epochs must be >= 1"),
            (self.finetune_batch_size < 2, "finetune_batch_size must be >= 2 (BatchNorm)"),
            (not self.finetune_lr > 0, "finetune_lr must be > 0"),
            (self.finetune_trainable not in FINETUNE_TRAINABLE,
             f"finetune_trainable must be one of {', '.join(FINETUNE_TRAINABLE)}, not {self.finetune_trainable!r}"),
        ) if bad]
        if self.channel_augment:
            from devrecd.audio.channel import CHANNELS  # lazily: the audio package imports this module

            problems += [f"channel_augment: unknown channel {n!r} (known: {', '.join(CHANNELS)})"
                         for n in self.channel_augment if n not in CHANNELS]
        if problems:
            raise ConfigError("train: " + "; ".join(problems))


@dataclass(frozen=True)
class LiveConfig:
    """Live capture through sounddevice (PortAudio)."""

    enabled: bool = False
    device: str = ""  # name or index; empty = system default input
    window_seconds: float = 0.0  # 0 = the model's clip length
    hop_seconds: float = 1.0
    smoothing: int = 5  # running verdict over the last N windows
    silence_dbfs: float = -60.0
    clip_fraction: float = 0.01  # fraction of samples at full scale that counts as clipping
    ring_seconds: float = 30.0
    record_dir: str = ""  # empty = do not keep captured audio
    missing_after: float = 10.0  # readyz false after this long without input
    channels: int = 1  # capture channels; more than one are mixed to mono as audio.mix says
    record_segment_seconds: float = 300.0  # length of each recorded WAV segment
    reopen_max_seconds: float = 30.0  # cap of the exponential backoff between reopen attempts


@dataclass(frozen=True)
class RegistryConfig:
    """Open-set identification against enrolled device profiles."""

    path: str = ""  # empty = closed-set labels of the model
    threshold: float = 0.5  # cosine score below which the verdict is "unknown device"
    use_calibration: bool = True  # use the threshold `devrecd calibrate` stored in the registry, when it has one
    target_far: float = 0.01  # `devrecd calibrate`: false-acceptance rate the threshold is chosen for
    keep_references: bool = True  # `devrecd enroll` keeps the references' audio (by sha256) next to the registry
    match_conditions: bool = True  # bring references to a questioned recording's codec / band before scoring


@dataclass(frozen=True)
class SynthConfig:
    """The device simulator (``devrecd synth``)."""

    sample_rate: int = 32000  # corpus rate (CCNU_Mobile's)
    clip_seconds: float = 10.0  # length of each simulated recording
    split: tuple[float, float, float] = (0.64, 0.16, 0.20)  # train / val / test recordings per device
    same_model_fraction: float = 0.3  # share of devices that are a second unit of another device's model
    speakers_per_clip: int = 3  # speaker turns per recording (speakers never cross splits)
    parallel: bool = True  # one playback session: clip k of every device is the same speech (as in CCNU)
    spread: float = 2.5  # scale of model-to-model differences; 2.5 makes 15 devices about as hard as CCNU
    jobs: int = 1  # worker processes

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.sample_rate < 8000, "sample_rate must be >= 8000"),
            (self.clip_seconds <= 0, "clip_seconds must be > 0"),
            (not 0.0 <= self.same_model_fraction <= 1.0, "same_model_fraction must be in [0, 1]"),
            (self.speakers_per_clip < 1, "speakers_per_clip must be >= 1"),
            (self.spread <= 0, "spread must be > 0"),
            (self.jobs < 1, "jobs must be >= 1"),
        ) if bad]
        if problems:
            raise ConfigError("synth: " + "; ".join(problems))


@dataclass(frozen=True)
class ClusterConfig:
    """``devrecd batch``: an archive judged by a Ray Data job (local instance or a cluster)."""

    address: str = ""  # empty = start a local Ray instance; "auto" | "HOST:PORT" | "ray://HOST:PORT" = join a cluster
    num_cpus: int = 0  # CPUs of the local instance; 0 = the cores this process may use
    block_files: int = 64  # files per block: one decode task, one inference call, one Parquet part
    inference_actors: int = 0  # 0 = auto: one per GPU, else as many as the CPUs left by one decode task allow
    actor_cpus: float = 1.0  # logical CPUs each inference actor reserves
    decode_cpus: float = 1.0  # logical CPUs each read + hash + decode + features task reserves
    ship_model: bool = False  # send the model through the object store instead of reading its path on every node

    def __post_init__(self) -> None:
        problems = [msg for bad, msg in (
            (self.num_cpus < 0, "num_cpus must be >= 0 (0 = all cores)"),
            (self.block_files < 1, "block_files must be >= 1"),
            (self.inference_actors < 0, "inference_actors must be >= 0 (0 = auto)"),
            (self.actor_cpus <= 0, "actor_cpus must be > 0"),
            (self.decode_cpus <= 0, "decode_cpus must be > 0"),
        ) if bad]
        if problems:
            raise ConfigError("cluster: " + "; ".join(problems))


@dataclass(frozen=True)
class ReportConfig:
    """The case header of ``devrecd report`` (flags override)."""

    case_id: str = ""  # the laboratory's case reference
    examiner: str = ""  # who is responsible for the examination
    laboratory: str = ""  # organisation / unit


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"  # text | json


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

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """Return a copy with ``{"section.key": value}`` applied (values type-checked)."""
        return _apply(self, _nest(overrides, source="override"))


# --- loading ---------------------------------------------------------------------------------

def load_config(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the configuration: defaults < file < environment < overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        cfg = _apply(cfg, data)
    cfg = _apply(cfg, _nest(_env_values(os.environ if env is None else env), source="environment"))
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg


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
        out[f"{section}.{key}"] = value
    return out


def _nest(flat: Mapping[str, Any], *, source: str) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        if "." not in dotted:
            raise ConfigError(f"{source}: {dotted!r} is not of the form section.key")
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def _apply(cfg: Config, data: Mapping[str, Any]) -> Config:
    sections = {f.name: f for f in fields(cfg)}
    updates: dict[str, Any] = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(sections)})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table of keys")
        current = getattr(cfg, section)
        hints = typing.get_type_hints(type(current))
        known = {f.name for f in fields(current)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(known))})")
            changes[key] = _coerce(f"{section}.{key}", value, hints[key])
        updates[section] = replace(current, **changes)  # section validation raises ConfigError
    return replace(cfg, **updates) if updates else cfg


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type, converting only where lossless (int -> float)."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
    elif is_dataclass(hint):
        pass
    raise ConfigError(f"{name}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    return getattr(hint, "__name__", str(hint))


def config_to_toml_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configuration as plain data (for ``devrecd config`` and tests)."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        out[f.name] = {k.name: getattr(section, k.name) for k in fields(section)}
    return out
