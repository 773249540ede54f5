"""What serves verdicts: the closed-set backend, the open-set registry judge, or the registry alone.

:func:`load_served` is what the daemon and ``identify`` load; :func:`load_serving_backend` loads and
warms a closed-set backend (also for the cluster job and ``listen``); :func:`registry_judge` adds the
open-set verdict beside a closed-set one; :class:`OpenSetOnly` serves the registry without a network.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import numpy as np

from devrecd.backends.base import Backend
from devrecd.config import Config
from devrecd.errors import ConfigError
from devrecd.features import FrontendConfig
from devrecd.metrics import Metrics

log = logging.getLogger("devrecd.pipeline")

Judge = Callable[[np.ndarray, dict], dict]  # (one recording's raw features, its description) -> verdict fields


class RegistryJudging(Protocol):
    """What the pipeline needs of a registry judge (:class:`~devrecd.openset.workflow.RegistryJudge`)."""

    def judge(self, features: Any, recording: dict | None = None) -> dict: ...
    def accumulator(self) -> Any: ...


class OpenSetOnly:
    """What serves when there is a device registry and no closed-set model: the registry's scorer
    (:class:`~devrecd.openset.workflow.RegistryJudge`) judges each recording's features directly.
    Not a backend: nothing runs on batches, so the pipeline skips the batcher; the frontend is the
    scorer's own (the one its profiles were made with)."""

    name = "open-set-only"
    labels: tuple[str, ...] = ()

    def __init__(self, cfg: Config, *, device: str = "cpu") -> None:
        from devrecd.openset.workflow import RegistryJudge

        self.registry_judge = RegistryJudge(cfg, device=device, adopt_frontend=True)
        self.frontend: FrontendConfig = self.registry_judge.frontend
        self.device = device
        desc = self.registry_judge.scorer.describe()
        # A network served from its export: the served file's sha256 (a fusion's is in its network part).
        onnx_sha256 = desc.get("onnx_sha256") or next(
            (p["onnx_sha256"] for p in desc.get("parts", ()) if p.get("onnx_sha256")), None)
        self.scorer = {"kind": desc.get("kind"), "fingerprint": desc.get("fingerprint"), "source": desc.get("source"),
                       "frontend_sha256": desc.get("frontend_sha256"), "registry": str(self.registry_judge.registry.path),
                       "onnx_sha256": onnx_sha256}
        self.judge: Judge = self.registry_judge.judge  # thread-safe: the pipeline's workers share it
        # A scorer computed on a GPU (the GSV scorer in torch: devrecd.supervector_torch) takes the
        # CUDA frontend's output where it is: the pipeline then keeps the features on that device.
        self.input_device = getattr(self.registry_judge.scorer, "input_device", None)

    def describe(self) -> dict:
        return {"name": self.name, "closed_set_model": None, "device": self.device,
                "version": f"{self.scorer['kind']} scorer {str(self.scorer['fingerprint'] or '')[:16]}",
                "model_sha256": None, "contract_sha256": None, "scorer": dict(self.scorer)}

    def close(self) -> None:
        """Nothing to release (the registry is read once)."""


def load_serving_backend(cfg: Config, metrics: Metrics | None = None, *, warmup: bool = True) -> Backend:
    """Load the configured backend, refuse a frontend mismatch, warm it up, record its identity.

    ``warmup=False`` (one-shot ``identify``): the warm-up run only moves the first batch's one-time
    costs earlier, which a process that runs one batch and exits pays either way."""
    if not cfg.backend.model and not cfg.backend.engine:
        raise ConfigError("no model given: pass --model export/NAME.onnx (or set backend.model)")
    from devrecd.backends import load_backend

    backend = load_backend(cfg.backend, cfg.frontend)  # refuses a model trained with another frontend
    try:
        if warmup:
            backend.warmup()
    except BaseException:
        backend.close()
        raise
    if metrics is not None:
        metrics.set_backend(backend.describe())
    return backend


def load_served(cfg: Config, metrics: Metrics | None = None, *, device: str = "cpu",
                warmup: bool = True) -> Backend | OpenSetOnly:
    """What the daemon and ``identify`` serve: the configured closed-set backend
    (:func:`load_serving_backend`, warmed up unless ``warmup=False``), or, with a device registry and
    no model, :class:`OpenSetOnly`."""
    if not cfg.backend.model and not cfg.backend.engine and not cfg.registry.path:
        raise ConfigError("no model given: pass --model export/NAME.onnx (or set backend.model), "
                          "or --registry R (registry.path) for open-set verdicts only")
    if cfg.backend.model or cfg.backend.engine:
        return load_serving_backend(cfg, metrics, warmup=warmup)
    served = OpenSetOnly(cfg, device=device)
    why = f"no backend.model or backend.engine: open-set verdicts from registry {cfg.registry.path} only"
    if served.frontend.fingerprint() != cfg.frontend.fingerprint():
        why += "; frontend.* replaced by the frontend the registry's scorer was made with"
    # Under the backends' logger, beside the line each closed-set backend choice writes.
    logging.getLogger("devrecd.backends").info("backend selected", extra={"backend": "none", "closed_set_model": "none", "why": why,
                                        "scorer": served.scorer["kind"], "scorer_fingerprint": served.scorer["fingerprint"]})
    j = served.registry_judge
    log.info("open-set verdicts from the device registry",
             extra={"registry": cfg.registry.path, "decision": j.describe_decision()})
    if metrics is not None:
        metrics.set_backend(served.describe())
    return served


def registry_judge(cfg: Config, device: str) -> RegistryJudging | None:
    """The open-set judge when ``registry.path`` is configured (closed-set labels otherwise): its
    ``judge(features, recording)`` and its scorer's ``accumulator()`` (features chunk by chunk)."""
    if not cfg.registry.path:
        return None
    from devrecd.openset.workflow import RegistryJudge

    judge = RegistryJudge(cfg, device=device)
    log.info("open-set verdicts from the device registry",
             extra={"registry": cfg.registry.path, "decision": judge.describe_decision()})
    return judge  # thread-safe (a new condition is matched outside its lock): the pipeline's workers share it
