"""devrecd: which recording device made this audio recording.

Importing the package is cheap: torch, onnxruntime and the GPU stack are imported by the
modules that need them.
"""

__version__ = "0.1.0"

from devrecd.errors import DevrecdError  # noqa: E402

__all__ = ["__version__", "DevrecdError"]
