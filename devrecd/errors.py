"""Typed errors. The library raises these; only the CLI turns them into a message and an exit code.

Every error carries a short machine-readable ``reason`` (used as a metric label and stored in the
journal) and a human message that says what is wrong and, where useful, what to do.
"""

from __future__ import annotations


class DevrecdError(Exception):
    """Base class of every error devrecd raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(DevrecdError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""

    reason = "config"


class UsageError(ConfigError):
    """A command was given something it cannot use (the wrong kind of file for an option, say)."""

    reason = "usage"


class MissingDependency(DevrecdError):
    """An optional dependency (TensorRT, pycuda, sounddevice, ...) is not installed."""

    reason = "missing_dependency"


class ArtifactError(DevrecdError):
    """A checkpoint, ONNX model, engine or contract is missing, corrupt or does not match."""

    reason = "artifact"


class DatasetError(DevrecdError):
    """A dataset cannot be loaded or split as asked."""

    reason = "dataset"


# Top-level modules of optional dependencies -> the extra that installs them.
EXTRA_FOR_MODULE = {"torch": "train", "sklearn": "train", "scipy": "train", "tqdm": "train", "matplotlib": "report",
                    "lir": "report", "jinja2": "report", "onnx": "export", "onnxscript": "export", "tensorrt": "gpu",
                    "pycuda": "gpu", "sounddevice": "live", "ray": "cluster"}


def missing_extra(exc: ModuleNotFoundError) -> MissingDependency | None:
    """The one-line error for an optional dependency that is not installed (the base install serves
    only), naming the extra to install; None for any other missing module (a real bug)."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    hint = ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu, then " if top == "torch"
            else "")
    return MissingDependency(f"this needs {top}, which the serving install leaves out: {hint}"
                             f"pip install 'devrecd[{extra}]'")
