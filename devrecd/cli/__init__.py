"""The ``devrecd`` command line. Each concern registers its commands from its own module."""

from __future__ import annotations

from devrecd.cli.app import app, main

# Command modules (each adds its commands to ``app`` on import).
from devrecd.cli import basics  # noqa: F401,E402  doctor, features, config
from devrecd.cli import serve  # noqa: F401,E402  watch, identify, verdicts
from devrecd.cli import synth  # noqa: F401,E402  synth
from devrecd.cli import ops  # noqa: F401,E402  install-service
from devrecd.cli import registry  # noqa: F401,E402  enroll, devices, calibrate
from devrecd.cli import openset  # noqa: F401,E402  train-gsv, train-fusion
from devrecd.cli import live  # noqa: F401,E402  listen
from devrecd.cli import export  # noqa: F401,E402  export, build-engine
from devrecd.cli import training  # noqa: F401,E402  train, train-embedder, evaluate, finetune, baseline
from devrecd.cli import demo  # noqa: F401,E402  demo
from devrecd.cli import batch  # noqa: F401,E402  batch (Ray)
from devrecd.cli import forensic  # noqa: F401,E402  compare, report

__all__ = ["app", "main"]
