"""One-shot judgement of named files (``devrecd identify``): the runner with an in-memory journal."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from devrecd.backends.base import Backend
from devrecd.config import Config
from devrecd.contract import check_frontend
from devrecd.metrics import Metrics
from devrecd.pipeline.journal import Journal
from devrecd.pipeline.runner import Pipeline
from devrecd.pipeline.serving import OpenSetOnly, load_served, registry_judge
from devrecd.pipeline.verdict import failed_record
from devrecd.stages import resolve_device


def identify_files(cfg: Config, paths: Sequence[str | os.PathLike], *, backend: Backend | None = None,
                   metrics: Metrics | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Judge files once through the same pipeline (no state kept); one record per file, in order.
    With ``registry.path`` and no model, open set only (:func:`load_served`). ``on_record(record)`` is
    called (from the writer thread) as each verdict is made, in the order they finish."""
    metrics = metrics or Metrics()
    device = resolve_device(cfg.backend.device)
    own = backend is None
    served: Backend | OpenSetOnly
    if backend is None:
        served = load_served(cfg, metrics, device=device, warmup=False)  # one shot: a warm-up run is pure cost
    else:
        check_frontend(backend.frontend, cfg.frontend, model=backend.describe().get("model", backend.name))
        served = backend
    journal = Journal(":memory:")
    records: dict[int, dict] = {}

    def keep(record: dict) -> None:
        records[record["id"]] = record
        if on_record is not None:
            on_record(record)

    pipeline = Pipeline(cfg, served, journal=journal, verdict_log=None, metrics=metrics,
                        device=device, rejudge_duplicates=True, on_record=keep,
                        judge=None if isinstance(served, OpenSetOnly) else registry_judge(cfg, device))
    pipeline.start()
    try:
        ids = [pipeline.submit(os.path.abspath(p)) for p in paths]
        pipeline.drain(float("inf"))
    finally:
        pipeline.stop()
        journal.close()
        if own:
            served.close()  # type: ignore[union-attr]
    out = []
    for path, i in zip(paths, ids):
        if i is None:
            continue  # the same file named twice: one verdict
        out.append(records.get(i) or failed_record(str(path), "internal", "no verdict was recorded (see the log)",
                                                    timings={}))
    return out
