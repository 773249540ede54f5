"""What this machine can run: each capability checked for real, with an install hint when missing."""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


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
