"""How many threads the pipeline's libraries run: numpy's BLAS held to one (:func:`one_blas_thread`)
and the inference streams (:func:`inference_streams`)."""

from __future__ import annotations

import os
from typing import Any

from devrecd.backends.base import Backend
from devrecd.config import Config


def one_blas_thread() -> Any:
    """Hold numpy's BLAS (OpenBLAS, MKL, ...) to one thread, process-wide; returns the handle whose
    ``restore_original_limits()`` undoes it (None without threadpoolctl).

    The pipeline parallelises across files: its workers run the frontend's matmuls and the GSV
    scorer's at once, in threads. A multi-threaded OpenBLAS called from two threads serialises them
    on its one thread pool, and its spinning helper threads take the cores from the other worker
    and from ONNX Runtime: measured on 2 cores, 2 workers x the frontend of 2 s clips took 4-5x the
    CPU with OpenBLAS's default 2 threads than with 1 (py-spy on the open-set daemon: the frontend's
    mel matmul was the largest stack, above the FFT)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a base install has it
        return None
    return threadpool_limits(limits=1, user_api="blas")


def inference_streams(cfg: Config, backend: Backend) -> int:
    """How many inference threads run batches at once: ``batcher.streams``, or when 0 (auto) one
    per available core / ``backend.threads``; never more than the backend allows at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = cfg.batcher.streams or max(1, cores // max(1, cfg.backend.threads))
    limit = getattr(backend, "concurrency", 1)
    return max(1, want if limit is None else min(want, limit))
