"""The ``devrecd`` command line. Each concern registers its commands from its own module."""

from __future__ import annotations

from devrecd.cli.app import app, main

# Command modules (each adds its commands to ``app`` on import).
from devrecd.cli import basics  # noqa: F401,E402  doctor, features, config

__all__ = ["app", "main"]
