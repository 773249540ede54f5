"""The ``devrecd`` command line. Each concern registers its commands from its own module."""

from __future__ import annotations

from devrecd.cli.app import app, main

# Command modules (each adds its commands to ``app`` on import).
from devrecd.cli import basics  # noqa: F401,E402  doctor, features, config
from devrecd.cli import serve  # noqa: F401,E402  watch, identify, verdicts
from devrecd.cli import data  # noqa: F401,E402  synth

__all__ = ["app", "main"]
