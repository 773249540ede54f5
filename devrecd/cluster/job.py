"""``devrecd batch``: list the recordings, run the Ray Data job, commit its blocks exactly once.

::

    listing (driver) -> from_items -> map_batches(prepare_block)   CPU tasks: read, hash, decode, features
                     -> map_batches(Judge, concurrency=N)          actor pool: inference + verdict records
                     -> iter_batches (driver)                     one Parquet part + verdict lines per block

The driver keeps only the output: features stay in the object store between the tasks and the actors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from devrecd import __version__
from devrecd.cluster.output import BatchOutput
from devrecd.cluster.sources import list_recordings
from devrecd.cluster.stages import UNCHANGED, ClusterError, Judge, prepare_block
from devrecd.config import Config
from devrecd.errors import ConfigError, DevrecdError, MissingDependency

log = logging.getLogger("devrecd.cluster")

INSTALL_HINT = "pip install 'devrecd[cluster]' (Ray Data)"
DECODE_CALLS = 256  # blocks a decode worker process handles before Ray replaces it


@dataclass(frozen=True)
class Plan:
    """How the job uses the cluster it found."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    block_files: int
    cpus: float
    gpus: float


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or :class:`MissingDependency` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(f"Ray is not installed ({exc}): {INSTALL_HINT}") from None
    return ray


def connect(ray: Any, address: str, cfg: Config) -> bool:
    """Join ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or start a local instance of
    ``cluster.num_cpus`` CPUs without a dashboard. True when this call started Ray (and must stop it);
    an already initialised Ray (a host program, tests) is used as it is."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            ray.init(num_cpus=cfg.cluster.num_cpus or cores, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot {'join the Ray cluster at ' + address if address else 'start a local Ray instance'}: "
                           f"{exc}") from None
    return True


def plan(ray: Any, cfg: Config) -> Plan:
    """Actor pool size and per-actor resources: one actor per GPU when the cluster has GPUs (and the
    backend can use one), else as many as the CPUs left by one decode task allow."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    cc = cfg.cluster
    use_gpu = gpus >= 1 and cfg.backend.kind in ("auto", "tensorrt", "torch") and cfg.backend.device != "cpu"
    if cc.decode_cpus > cpus or cc.actor_cpus > cpus:
        raise ConfigError(f"the cluster has {cpus:g} CPUs: cluster.decode_cpus ({cc.decode_cpus:g}) and "
                          f"cluster.actor_cpus ({cc.actor_cpus:g}) must each fit in it")
    auto = int(gpus) if use_gpu else max(1, math.floor((cpus - cc.decode_cpus) / cc.actor_cpus + 1e-9))
    actors = cc.inference_actors or auto
    return Plan(actors=actors, actor_cpus=cc.actor_cpus, actor_gpus=1.0 if use_gpu else 0.0,
                decode_cpus=cc.decode_cpus, block_files=cc.block_files, cpus=cpus, gpus=gpus)


def check_model(cfg: Config) -> tuple[dict, Config]:
    """Load what serves once on the driver (no warm-up) so that a wrong path or frontend is one clear
    error before the cluster is used; returns its description and the configuration the job runs
    with. TensorRT engines are only checked for existence (the driver may have no GPU).

    With a device registry and no model, the registry is opened as ``identify`` serves it
    (:func:`~devrecd.pipeline.serving.load_served`: :class:`~devrecd.pipeline.serving.OpenSetOnly`),
    and the job computes the frontend of the registry's scorer. The registry's path is made absolute
    (workers may start in another folder)."""
    from dataclasses import replace

    if not cfg.backend.model and not cfg.backend.engine and not cfg.registry.path:
        raise ConfigError("no model given: pass --model export/NAME.onnx (or --engine, or set backend.model), "
                          "or --registry R (registry.path) for open-set verdicts only")
    if cfg.registry.path:
        cfg = replace(cfg, registry=replace(cfg.registry, path=os.path.abspath(cfg.registry.path)))
    if cfg.backend.kind == "tensorrt" or cfg.backend.engine:
        for p in filter(None, (cfg.backend.model, cfg.backend.engine)):
            if not Path(p).exists():
                raise ConfigError(f"not found: {p}")
        return {"name": "tensorrt", "engine": cfg.backend.engine, "model": cfg.backend.model}, cfg
    from devrecd.pipeline.serving import OpenSetOnly, load_served

    served = load_served(cfg, device="cpu", warmup=False)  # a closed-set backend, or the registry alone
    try:
        if isinstance(served, OpenSetOnly):
            cfg = replace(cfg, frontend=served.frontend)
        return served.describe(), cfg
    finally:
        served.close()


def model_blobs(cfg: Config) -> dict[str, tuple[str, bytes]]:
    """The model files by role (model + its contract, engine) to send through the object store;
    serving a registry alone, the registry's files (:func:`registry_blobs`)."""
    from devrecd.contract import contract_path_for

    out = {}
    if cfg.backend.model:
        model = Path(cfg.backend.model)
        if model.is_dir():
            raise ConfigError("cluster.ship_model sends an exported model (NAME.onnx + NAME.json), not a run folder")
        out["model"] = (model.name, model.read_bytes())
        if model.suffix == ".onnx":
            contract = contract_path_for(model)
            out["contract"] = (contract.name, contract.read_bytes())
    if cfg.backend.engine:
        out["engine"] = (Path(cfg.backend.engine).name, Path(cfg.backend.engine).read_bytes())
    if cfg.registry.path:
        out.update(registry_blobs(cfg.registry.path))
    return out


def registry_blobs(path: str | os.PathLike) -> dict[str, tuple[str, bytes]]:
    """A registry's files by role: its JSON, its array file, and the kept references' audio
    (``<stem>.refs/<sha256>``, for condition matching); the names are relative to the JSON's folder."""
    from devrecd.openset.matching import ReferenceStore
    from devrecd.openset.registry import open_registry

    registry = open_registry(path)  # a damaged or missing registry fails here, on the driver
    json_path = Path(registry.path)
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    out = {"registry": (json_path.name, json_path.read_bytes())}
    arrays = (meta.get("arrays") or {}).get("file")
    if arrays:
        out["registry_arrays"] = (arrays, (json_path.parent / arrays).read_bytes())
    store = ReferenceStore.for_registry(json_path)
    for p in registry.profiles.values():
        for ref in p.references:
            if store.has(ref.sha256):
                out[f"reference:{ref.sha256}"] = (f"{store.root.name}/{ref.sha256}", store.path(ref.sha256).read_bytes())
    return out


def run_batch(cfg: Config, sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              address: str | None = None) -> dict:
    """Judge every recording the sources name that ``out`` does not hold yet; returns the summary
    (also written to ``out/summary.json``)."""
    started_at = time.time()
    address = cfg.cluster.address if address is None else address
    out_dir = Path(out).resolve()
    for s in map(Path, sources):
        if s.is_dir() and (out_dir == s.resolve() or s.resolve() in out_dir.parents):
            raise ConfigError(f"--out {out_dir} is inside the evidence folder {s}; devrecd never writes into evidence")
    ray = import_ray()  # also brings pyarrow, which the output folder needs
    backend_info, cfg = check_model(cfg)
    with BatchOutput(out_dir) as output:
        files = list_recordings(sources, cfg.watch, exclude=[out_dir])
        if not files:
            raise ConfigError("no recordings found in the given sources")
        todo = _not_recorded(files, output)
        already = len(files) - len(todo)
        this_run: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        started = connect(ray, address, cfg) if todo else False  # nothing to do: no cluster needed
        t_job = time.time()
        p = ray_info = t_first = None
        n_first = 0
        try:
            if todo:
                p = plan(ray, cfg)
                ds = _dataset(ray, cfg, todo, p)
                try:
                    t_first, n_first = _commit_blocks(ds, output, this_run, reasons)
                except DevrecdError:
                    raise
                except Exception as exc:  # Ray's task/actor errors: what was committed stays; a rerun resumes
                    raise ClusterError(f"the Ray job failed after {sum(this_run.values())} of {len(todo)} files "
                                       f"(a rerun on the same --out resumes): {_short(exc)}") from None
                ray_info = _ray_info(ray, started)
            job_s = time.time() - t_job
        finally:
            if started:
                ray.shutdown()
        done = sum(v for k, v in this_run.items() if k != UNCHANGED)
        summary = {
            "out": str(output.dir), "run": output.run, "sources": [str(s) for s in sources],
            "listed": len(files), "already_recorded": already, "submitted": len(todo),
            "this_run": {"judged": this_run["judged"], "failed": this_run["failed"], UNCHANGED: this_run[UNCHANGED],
                         "failed_by_reason": dict(reasons)},
            "in_folder": output.totals(), "repaired_at_start": output.repaired,
            "job_seconds": round(job_s, 3), "files_per_second": round(len(todo) / job_s, 3) if todo and job_s > 0 else None,
            # Ray's start-up inside the job (actors loading the model, first tasks) is mostly before the
            # first block; the steady rate is what the pipeline sustains after it.
            "first_block_seconds": round(t_first - t_job, 3) if t_first else None,
            "steady_files_per_second": (round((len(todo) - n_first) / (t_job + job_s - t_first), 3)
                                        if t_first and len(todo) > n_first and t_job + job_s > t_first else None),
            "wall_seconds": round(time.time() - started_at, 3), "recorded_this_run": done,
            "plan": asdict(p) if p else None, "ray": ray_info, "backend": backend_info, "software_version": __version__,
        }
        output.write_summary(summary)
        return summary


def _not_recorded(files: Sequence[str], output: BatchOutput) -> list[dict]:
    """The rows of the files ``output`` does not hold yet as they are now (size, mtime), with the
    hashes recorded under their path before."""
    todo = []
    for path in files:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0  # judged as missing/unreadable by the task, with the reason
        if not output.is_recorded(path, size, mtime):
            todo.append({"path": path, "file_size": size, "file_mtime_ns": mtime,
                         "known": ",".join(sorted(output.recorded_hashes(path)))})
    return todo


def _commit_blocks(ds: Any, output: BatchOutput, this_run: Counter[str], reasons: Counter[str]) -> tuple[float | None, int]:
    """Commit the job's records block by block as they come, counting outcomes and failure reasons;
    -> (when the first block came, its size)."""
    t_first, n_first = None, 0
    for block in ds.iter_batches(batch_size=None, batch_format="pandas"):
        rows = []
        for r in block.to_dict("records"):
            if r["outcome"] == UNCHANGED:
                this_run[UNCHANGED] += 1
                continue
            rows.append({"path": r["path"], "file_size": r["file_size"],
                         "file_mtime_ns": r["file_mtime_ns"], "record": _loads(r["record"])})
        if t_first is None:
            t_first, n_first = time.time(), len(block)
        for rec in output.commit(rows):
            this_run[rec["outcome"]] += 1
            if rec.get("reason"):
                reasons[rec["reason"]] += 1
    return t_first, n_first


def _dataset(ray: Any, cfg: Config, todo: list[dict], p: Plan) -> Any:
    blocks = max(1, math.ceil(len(todo) / p.block_files))
    model_ref = [ray.put(model_blobs(cfg))] if cfg.cluster.ship_model else None
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    # Ray Data spreads tasks over the nodes by default (read bandwidth adds up). A decode worker process
    # is recycled after DECODE_CALLS blocks (decoder libraries' memory stays bounded over a long
    # archive); that differing argument also keeps Ray Data from fusing the decode tasks into the
    # actors, so decoding scales with the cluster's CPUs and inference with the pool.
    ds = ds.map_batches(prepare_block, batch_size=p.block_files, batch_format="numpy", fn_kwargs={"cfg": cfg},
                        num_cpus=p.decode_cpus, max_calls=DECODE_CALLS)
    return ds.map_batches(Judge, batch_size=p.block_files, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=p.actors),
                          num_cpus=p.actor_cpus, num_gpus=p.actor_gpus or None,
                          fn_constructor_kwargs={"cfg": cfg, "version": __version__, "model_ref": model_ref})


def _loads(text: str) -> dict:
    import json

    return json.loads(text)


def _short(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _ray_info(ray: Any, started: bool) -> dict:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - Ray Client has no GCS address to report
        address = None
    return {"version": ray.__version__, "address": address, "started_here": started, "nodes": len(nodes),
            "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
