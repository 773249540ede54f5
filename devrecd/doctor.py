"""What this machine can run, and whether the configuration it was given can serve.

:func:`run_checks` checks the installed capabilities (GPU, TensorRT, ONNX Runtime, PortAudio,
decoders); :func:`configured_checks` loads what the configuration names (model and its contract,
engine, registry) and checks the state folder and the metrics port, for real. A capability that is
missing is information; a configured thing that does not work is a failure (``Check.required``).
"""

from __future__ import annotations

import errno
import importlib
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from devrecd.errors import DevrecdError

if TYPE_CHECKING:
    from devrecd.config import Config

MIN_FREE_BYTES = 1024**3  # the journal and verdict log grow with every file; less than this is a warning


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = False  # failing it means the configured service cannot run

    @property
    def failed(self) -> bool:
        return self.required and not self.ok

    def to_dict(self) -> dict:
        return {**asdict(self), "failed": self.failed}


def _try_import(module: str):
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # any import failure (missing, broken .so) is what we report
        return None, f"{type(exc).__name__}: {exc}"


def run_checks() -> list[Check]:
    """Every check, in a stable order."""
    checks: list[Check] = []

    torch, err = _try_import("torch")
    if torch is None:
        checks.append(Check("torch", False, err, "pip install torch==2.13.0 (CPU) or a CUDA build"))
        checks.append(Check("cuda", False, "torch missing", "install torch with CUDA on a GPU machine"))
    else:
        checks.append(Check("torch", True, f"{torch.__version__} (threads {torch.get_num_threads()})"))
        if torch.cuda.is_available():
            gpus = [f"{i}: {torch.cuda.get_device_name(i)} sm{''.join(map(str, torch.cuda.get_device_capability(i)))}"
                    for i in range(torch.cuda.device_count())]
            checks.append(Check("cuda", True, f"CUDA {torch.version.cuda}; " + "; ".join(gpus)))
        else:
            why = "torch is a CPU build" if not torch.version.cuda else "no CUDA device visible"
            checks.append(Check("cuda", False, f"no GPU ({why})", "a CUDA GPU and a CUDA build of torch enable the GPU path"))

    trt, err = _try_import("tensorrt")
    checks.append(Check("tensorrt", True, trt.__version__) if trt else
                  Check("tensorrt", False, "not installed" if "No module" in err else err, "pip install 'devrecd[gpu]' (needs an NVIDIA GPU)"))
    cuda_py, err = _try_import("pycuda")
    checks.append(Check("pycuda", True, getattr(cuda_py, "VERSION_TEXT", "installed")) if cuda_py else
                  Check("pycuda", False, "not installed" if "No module" in err else err, "pip install 'devrecd[gpu]'"))

    ort, err = _try_import("onnxruntime")
    if ort:
        checks.append(Check("onnxruntime", True, f"{ort.__version__}; providers: {', '.join(ort.get_available_providers())}"))
    else:
        checks.append(Check("onnxruntime", False, err, "pip install onnxruntime"))

    sd, err = _try_import("sounddevice")
    if sd:
        try:
            n_in = sum(1 for d in sd.query_devices() if d["max_input_channels"] > 0)
            checks.append(Check("sounddevice", True, f"{sd.__version__}; {sd.get_portaudio_version()[1]}; {n_in} input device(s)"))
        except Exception as exc:
            checks.append(Check("sounddevice", False, f"PortAudio error: {exc}", "apt install libportaudio2"))
    else:
        hint = "apt install libportaudio2" if "PortAudio" in err else "pip install 'devrecd[live]'"
        checks.append(Check("sounddevice", False, "not installed" if "No module" in err else err, hint))

    sf, err = _try_import("soundfile")
    if sf:
        formats = ", ".join(f for f in ("WAV", "FLAC", "OGG", "MP3") if f in sf.available_formats())
        checks.append(Check("decoder:soundfile", True, f"libsndfile {sf.__libsndfile_version__}: {formats}"))
    else:
        checks.append(Check("decoder:soundfile", False, err, "pip install soundfile"))
    av, err = _try_import("av")
    if av:
        wanted = ("aac", "amrnb", "amrwb", "opus", "mp3", "flac")
        have = [c for c in wanted if c in av.codecs_available]
        missing = [c for c in wanted if c not in av.codecs_available]
        detail = f"PyAV {av.__version__} (FFmpeg {getattr(av, 'ffmpeg_version_info', '?')}): {', '.join(have)}"
        checks.append(Check("decoder:pyav", not missing, detail + (f"; missing {', '.join(missing)}" if missing else "")))
    else:
        checks.append(Check("decoder:pyav", False, err, "pip install av (m4a/AAC, AMR, 3gp)"))
    es = shutil.which("espeak-ng")
    checks.append(Check("espeak-ng", bool(es), es or "not on PATH",
                        "" if es else "apt install espeak-ng (speech for `devrecd demo` when no LibriSpeech is at hand)"))
    return checks


def configured_checks(cfg: Config, *, source: str = "defaults") -> list[Check]:
    """What the configuration names, checked for real: the model (loaded, its contract and frontend
    against the configuration's), the engine, the registry, the state folder and the metrics port."""
    checks = [Check("config", True, f"loaded ({source})")]
    checks += _model_checks(cfg)
    checks.append(_registry_check(cfg))
    checks.append(_state_dir_check(cfg))
    checks.append(_port_check(cfg))
    return checks


def _model_checks(cfg: Config) -> list[Check]:
    b = cfg.backend
    if not b.model and not b.engine:
        if cfg.registry.path:
            return [Check("model", True, "none configured: open-set verdicts from the registry only")]
        return [Check("model", False, "none configured (backend.model): watch and identify need one",
                      "set backend.model = export/NAME.onnx or pass --model")]
    for key, value in (("backend.model", b.model), ("backend.engine", b.engine), ("backend.checkpoint", b.checkpoint)):
        if value and not Path(value).expanduser().exists():
            return [Check("model", False, f"{key} = {value!r} does not exist", required=True)]
    from devrecd.backends import load_backend

    # Any exception is the finding here (a runtime's own error for a corrupt file included).
    try:
        backend = load_backend(b, cfg.frontend)  # contract, hashes, frontend vs this configuration
    except Exception as exc:
        return [Check("model", False, f"{b.model or b.engine}: {_message(exc)}", required=True)]
    try:
        backend.warmup()
        d = backend.describe()
    except Exception as exc:
        return [Check("model", False, f"{b.model or b.engine} loads but does not run: {_message(exc)}", required=True)]
    finally:
        backend.close()
    labels = len(getattr(backend, "labels", ()) or ())
    detail = f"{b.model or b.engine}: {labels} labels, frontend matches; backend {d.get('name', backend.name)}"
    engine = d.get("engine") or b.engine
    checks = [Check("model", True, detail),
              Check("engine", True, str(engine) if engine else f"none (backend.kind = {b.kind}: {backend.name} serves)")]
    if d.get("name") == "onnxruntime":  # the ORT-format file beside the export, which starts ~3x faster
        problem = getattr(backend, "ort_problem", "")
        served = f"serving {d.get('served_file')}" + (f", not the .ort: {problem}" if problem else "")
        checks.append(Check("ort", not problem, served,
                            "re-export the model (devrecd export) to write a matching NAME.ort" if problem else ""))
    return checks


def _message(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DevrecdError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _registry_check(cfg: Config) -> Check:
    if not cfg.registry.path:
        return Check("registry", True, "none configured (closed-set verdicts)")
    from devrecd.openset.registry import open_registry

    try:
        reg = open_registry(cfg.registry.path)
    except Exception as exc:
        return Check("registry", False, _message(exc), required=True)
    calibrated = ("calibrated: " + ", ".join(sorted(reg.calibrations))) if reg.calibrations else "not calibrated"
    detail = f"{reg.path}: {len(reg.profiles)} profile(s), {calibrated}"
    if reg.kind not in ("embedder", "fusion"):
        return Check("registry", True, detail)
    # The network of an embedder/fusion registry, loaded for real: this machine may lack torch (then
    # registry.embedder_model must name the network's embedder export) or the path it was enrolled from.
    from devrecd.openset.scorers import registry_scorer

    try:
        scorer = registry_scorer(reg, configured=cfg.registry.embedder_model, threads=cfg.backend.threads)
    except Exception as exc:
        return Check("registry", False, f"{detail}; its {reg.kind} network does not load: {_message(exc)}",
                     "set registry.embedder_model to the network's checkpoint or `devrecd export-embedder` .onnx",
                     required=True)
    return Check("registry", True, f"{detail}; {reg.kind} network {scorer.describe().get('source', '?')}")


def _state_dir_check(cfg: Config) -> Check:
    path = Path(cfg.watch.state_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return Check("state_dir", False, f"{existing} is not a folder (watch.state_dir)", required=True)
    try:  # really write: permissions, read-only mounts and ACLs all show here
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".devrecd-doctor-"):
            pass
    except OSError as exc:
        return Check("state_dir", False, f"{existing} is not writable: {exc.strerror}", required=True)
    free = shutil.disk_usage(existing).free
    where = str(path) if existing == path else f"{path} (will be created in {existing})"
    detail = f"{where}: writable, {free / 1024**3:.1f} GiB free"
    if free < MIN_FREE_BYTES:
        return Check("state_dir", False, detail, "free space: the journal and verdict log grow with every file",
                     required=True)
    return Check("state_dir", True, detail)


def _port_check(cfg: Config) -> Check:
    m = cfg.metrics
    if not m.enabled:
        return Check("metrics_port", True, "metrics disabled (metrics.enabled = false)")
    if m.port == 0:
        return Check("metrics_port", True, f"{m.address}: any free port (metrics.port = 0)")
    try:
        infos = socket.getaddrinfo(m.address, m.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return Check("metrics_port", False, f"metrics.address {m.address!r}: {exc}", required=True)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(addr)
        except OSError as exc:
            why = "in use (a running daemon?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            return Check("metrics_port", False, f"{m.address}:{m.port} {why}", "choose another metrics.port",
                         required=True)
    return Check("metrics_port", True, f"{m.address}:{m.port} free")
