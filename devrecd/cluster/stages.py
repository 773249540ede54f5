"""What runs inside the Ray job: a decode task per block of files, and the inference actor.

Both call the daemon's stages: :func:`devrecd.audio.open_stream` (read-only, hashed, bounded
block-wise decode, typed errors) and :func:`devrecd.stages.stream_features` (the one frontend) in
the CPU task, with
:func:`devrecd.stages.failure_of` naming why a file failed; :func:`load_serving_backend` (one
ONNX Runtime session or TensorRT engine per actor), :func:`judged_record` / :func:`failed_record`
and the registry's open-set judge in the actor. Features travel between them as float32 bytes
(a fixed Arrow type, whatever the number of windows).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from devrecd.config import Config
from devrecd.errors import DevrecdError
from devrecd.features import FEATURE_DIM, N_FRAMES

log = logging.getLogger("devrecd.cluster")

# Outcomes of a file in the job; "unchanged" = touched since it was recorded, same content: not recorded again.
UNCHANGED = "unchanged"


class ClusterError(DevrecdError):
    """The Ray job cannot start or failed (Ray missing, cluster unreachable, a worker error)."""

    reason = "cluster"


def _strings(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def prepare_block(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """Read + hash + decode + features of a block of files (a Ray Data CPU task).

    In: ``path``, ``file_size``, ``file_mtime_ns``, ``known`` (sha256s already recorded under the
    path, comma-separated). Out: per file its status (``ok`` | ``failed`` | ``unchanged``), the
    recording's description, window starts and features as bytes, or the failure, and timings.
    """
    from devrecd.audio import open_stream
    from devrecd.stages import failure_of, stream_features

    out: dict[str, list] = {k: [] for k in ("path", "file_size", "file_mtime_ns", "status", "recording", "reason",
                                            "detail", "sha256", "size", "starts", "features", "timings")}
    for path, size, mtime, known in zip(_strings(batch["path"]), batch["file_size"], batch["file_mtime_ns"],
                                        _strings(batch["known"])):
        timings: dict[str, float] = {}
        row = {"status": "ok", "recording": "", "reason": "", "detail": "", "sha256": "", "size": -1,
               "starts": b"", "features": b""}
        t0 = time.perf_counter()
        try:
            with open_stream(path, cfg.frontend.sample_rate, cfg.audio) as stream:
                row.update(sha256=stream.sha256 or "", size=-1 if stream.size is None else stream.size)
                if known and stream.sha256 in known.split(","):
                    row["status"] = UNCHANGED
                else:
                    feats, starts = stream_features(stream, cfg, device="cpu", timings=timings)
                    row.update(recording=json.dumps(stream.describe()),
                               starts=np.asarray(starts, np.float64).tobytes(),
                               features=np.ascontiguousarray(feats, np.float32).tobytes())
            timings["decode"] = time.perf_counter() - t0 - timings.get("features", 0.0)
        except Exception as exc:  # noqa: BLE001 - one bad file is a failed record, never a failed job
            if not isinstance(exc, DevrecdError):
                log.exception("internal error on a file", extra={"path": path})
            f = failure_of(exc)
            row.update(status="failed", reason=f.reason, detail=f.detail)
            if f.sha256 is not None:  # else keep what was hashed before the failure
                row.update(sha256=f.sha256, size=-1 if f.size is None else f.size)
        row.update(path=path, file_size=int(size), file_mtime_ns=int(mtime), timings=json.dumps(timings))
        for k, v in row.items():
            out[k].append(v)
    return {k: (np.asarray(v, dtype=np.int64) if k in ("file_size", "file_mtime_ns", "size") else _column(v))
            for k, v in out.items()}


def materialize_model(blobs: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """Write a model sent through the object store to this node's temp folder (one copy per content,
    shared by the actors and runs on the node; written atomically); its paths by role."""
    import hashlib

    from devrecd.fsutil import atomic_write

    digest = hashlib.sha256(b"".join(hashlib.sha256(name.encode() + b"\0" + data).digest()
                                     for name, data in sorted(blobs.values()))).hexdigest()
    folder = Path(tempfile.gettempdir()) / "devrecd-models" / digest[:16]
    paths = {}
    for role, (name, data) in blobs.items():
        target = folder / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            atomic_write(target, data)
        paths[role] = str(target)
    return paths


class Judge:
    """The inference actor: what serves for its lifetime, loaded as the daemon and ``identify`` load
    it (:func:`~devrecd.pipeline.serving.load_served`): one backend (ONNX Runtime session / TensorRT
    engine), each call judging a block of prepared files with their windows batched
    ``batcher.max_batch`` at a time; or, with a device registry and no model, the registry alone
    (:class:`~devrecd.pipeline.serving.OpenSetOnly`: its scorer judges each file's features, and the
    records are ``identify --registry``'s)."""

    def __init__(self, cfg: Config, version: str, model_ref: list | None = None) -> None:
        from devrecd import __version__
        from devrecd.pipeline.serving import OpenSetOnly, load_served, registry_judge
        from devrecd.pipeline.verdict import model_validation
        from devrecd.stages import resolve_device

        if version != __version__:
            raise ClusterError(f"devrecd {__version__} on this node, {version} on the driver: install the same "
                               "version on every node (verdicts name the software version)")
        registry_path = cfg.registry.path  # as the driver named it: the path the verdicts name
        if model_ref:  # the model (or the registry) came through the object store
            import ray

            paths = materialize_model(ray.get(model_ref[0]))
            cfg = replace(cfg, backend=replace(cfg.backend, model=paths.get("model", cfg.backend.model),
                                               engine=paths.get("engine", cfg.backend.engine)),
                          registry=replace(cfg.registry, path=paths.get("registry", cfg.registry.path)))
        self.cfg = cfg
        device = resolve_device(cfg.backend.device)
        # frontend checked against the contract (or the registry's scorer's), warmed up
        self.backend = load_served(cfg, device=device)
        self.open_set_only = isinstance(self.backend, OpenSetOnly)
        self.labels = tuple(self.backend.labels)
        self.info = self.backend.describe()
        self.validation = model_validation(cfg.backend, self.info)  # what the model was validated on
        if self.open_set_only:
            self.judge = self.backend.judge
            if registry_path != cfg.registry.path:  # a shipped copy: verdicts name the registry as given
                relabel_registry(self.backend, registry_path)
                self.info = self.backend.describe()
        else:
            judge = registry_judge(cfg, device)
            self.judge = judge.judge if judge is not None else None
        self.metrics = _metrics()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from devrecd.pipeline.verdict import failed_record, judged_record, open_set_record, with_comparison

        n = len(batch["path"])
        paths, status, shas = _strings(batch["path"]), _strings(batch["status"]), _strings(batch["sha256"])
        described, reasons, details = (_strings(batch[k]) for k in ("recording", "reason", "detail"))
        timings = [json.loads(t) for t in _strings(batch["timings"])]
        feats: dict[int, np.ndarray] = {}
        for i in range(n):
            if status[i] == "ok":
                feats[i] = np.frombuffer(batch["features"][i], np.float32).reshape(-1, N_FRAMES, FEATURE_DIM)
        probs: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for group in [] if self.open_set_only else _groups(feats, self.cfg.batcher.max_batch):
            x = np.concatenate([feats[i] for i in group])
            t0 = time.perf_counter()
            try:
                p = self.backend.infer(x)
            except Exception as exc:  # noqa: BLE001 - as in the daemon: the batch's files fail, the job goes on
                for i in group:
                    errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            dt = time.perf_counter() - t0
            self.metrics["inference"].observe(dt)
            self.metrics["clips"].inc(len(x))
            lo = 0
            for i in group:
                k = len(feats[i])
                probs[i] = p[lo:lo + k]
                timings[i]["inference"] = dt * k / len(x)
                lo += k
        records, outcomes = [], []
        for i in range(n):
            size = int(batch["size"][i])
            if status[i] == "ok" and self.open_set_only:
                recording = json.loads(described[i])
                t0 = time.perf_counter()
                try:
                    fields = self.judge(feats[i], recording)
                except Exception as exc:  # noqa: BLE001 - as in the daemon: the file fails, the job goes on
                    record = failed_record(paths[i], "inference", f"{type(exc).__name__}: {exc}", timings=timings[i],
                                           sha256=shas[i] or None, size=None if size < 0 else size)
                    outcome = "failed"
                    self.metrics["errors"].inc(tags={"reason": "inference"})
                else:
                    timings[i]["scoring"] = time.perf_counter() - t0
                    record = open_set_record(recording, fields, serving=self.info, timings=timings[i])
                    outcome = "judged"
                    self.metrics["verdicts"].inc(tags={"device": str(record["device"])})
            elif status[i] == "ok" and i in probs:
                starts = np.frombuffer(batch["starts"][i], np.float64)
                recording = json.loads(described[i])
                record = judged_record(recording, probs[i], self.labels, starts,
                                       k=self.cfg.watch.top_k, backend=self.info, timings=timings[i])
                open_set = self.judge(feats[i], recording) if self.judge is not None else None
                record = with_comparison(record, recording, open_set, self.validation)
                outcome = "judged"
                self.metrics["verdicts"].inc(tags={"device": str(record["device"])})
            elif status[i] == UNCHANGED:
                record, outcome = None, UNCHANGED
            else:
                reason, detail = ("inference", errors[i]) if i in errors else (reasons[i], details[i])
                record = failed_record(paths[i], reason, detail, timings=timings[i], sha256=shas[i] or None,
                                       size=None if size < 0 else size)
                outcome = "failed"
                self.metrics["errors"].inc(tags={"reason": reason})
            self.metrics["files"].inc(tags={"outcome": outcome})
            for stage, seconds in timings[i].items():
                self.metrics["stage"].observe(seconds, tags={"stage": stage})
            records.append("" if record is None else json.dumps(record, ensure_ascii=False))
            outcomes.append(outcome)
        return {"path": _column(paths), "file_size": np.asarray(batch["file_size"], np.int64),
                "file_mtime_ns": np.asarray(batch["file_mtime_ns"], np.int64), "outcome": _column(outcomes),
                "record": _column(records)}


def relabel_registry(served: Any, path: str) -> None:
    """A registry served from a copy the object store brought (:func:`materialize_model`): its
    verdicts name the registry by the path the driver was given, as ``identify`` and the shared-path
    job do (the copy's content is the same; its temporary folder means nothing to a reader)."""
    served.registry_judge.registry.path = Path(path)
    served.scorer["registry"] = str(path)


def _groups(feats: dict[int, np.ndarray], max_batch: int) -> list[list[int]]:
    """Files packed in order into groups of at most ``max_batch`` windows (a longer file alone:
    backends split what they cannot take at once)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, f in feats.items():
        if cur and n + len(f) > max_batch:
            groups.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += len(f)
    if cur:
        groups.append(cur)
    return groups


def _metrics() -> dict[str, Any]:
    """devrecd's counters as Ray application metrics, served by each node's metrics agent with Ray's
    ``ray_`` prefix (and ``_total`` added to counters): ``ray_devrecd_batch_files_total{outcome}`` ..."""
    from ray.util.metrics import Counter, Histogram

    seconds = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]
    return {
        "files": Counter("devrecd_batch_files", "Files finished by the batch job, by outcome.", ("outcome",)),
        "errors": Counter("devrecd_batch_errors", "Files that could not be judged, by reason.", ("reason",)),
        "verdicts": Counter("devrecd_batch_verdicts", "Judged files by device verdict.", ("device",)),
        "clips": Counter("devrecd_batch_clips", "Windows run through the network."),
        "inference": Histogram("devrecd_batch_inference_seconds", "Seconds per inference batch.", seconds),
        "stage": Histogram("devrecd_batch_stage_seconds", "Seconds per file and stage.", seconds, ("stage",)),
    }
