"""Open-set scorers: one interface for the network embedder, the GMM supervector and their fusion.

A scorer turns a recording's (n_windows, 128, 73) raw features (the one frontend) into a vector,
and scores questioned vectors against profile vectors. The registry stores one vector per
reference; a profile is the unit-length mean of its references' vectors (:mod:`.registry`).

* ``embedder`` (:class:`EmbedderScorer`): a trained network's window embeddings, each scaled to
  unit length, averaged, scaled to unit length again. Score: cosine.
* ``gsv`` (:class:`~devrecd.openset.gsv.GsvScorer`, :mod:`devrecd.openset.gsv`): the MAP-adapted mean supervector of ALL the recording's frames
  under a GMM-UBM trained on development recordings (:mod:`devrecd.supervector`), with the
  development data's within-device variability projected out (nuisance attribute projection,
  NAP: the directions in which recordings of ONE device differ, i.e. speech content and level),
  unit length. Score: cosine.
* ``fusion`` (:class:`FusionScorer`): the parts' unit vectors side by side; the score is
  ``sum_i w_i * cosine_i + b``, weights by logistic regression on development trials
  (:func:`fit_fusion`), so the fused score is a log-likelihood ratio on the development data.

Every scorer's :meth:`describe` carries a ``fingerprint`` of everything that shapes its vectors
(a registry is bound to ONE scorer) and its ``kind``. GSV and fusion scorers keep their arrays in
:meth:`arrays` so that a registry can store them beside its profiles (see :mod:`.registry`).
"""

from __future__ import annotations

import json
from typing import Any, Protocol, Sequence

import numpy as np

from devrecd.errors import ArtifactError, DatasetError
from devrecd.features import FrontendConfig
from devrecd.openset.gsv import GsvScorer
from devrecd.openset.measures import fit_balanced
from devrecd.openset.vectors import digest, unit

KINDS = ("embedder", "gsv", "fusion")


class VectorScorer(Protocol):
    """What the registry, calibration, identify and the benchmark need from a scorer: recordings to
    vectors, vectors to scores (EmbedderScorer, GsvScorer, FusionScorer)."""

    kind: str
    frontend: FrontendConfig

    def describe(self) -> dict[str, Any]:
        """``kind``, ``fingerprint``, ``dim``, ``frontend_sha256``, ``source`` and kind-specific facts."""

    def recording_vector(self, feats: np.ndarray) -> np.ndarray:
        """(n_windows, 128, 73) raw features of one recording -> (dim,) unit vector."""

    def window_vectors(self, feats: np.ndarray) -> np.ndarray:
        """(n_windows, 128, 73) -> (n_windows, dim) unit vectors, one per window (the per-window view)."""

    def score(self, queries: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        """(q, dim) query vectors x (P, dim) profile vectors -> (q, P) scores (higher = same device)."""


class EmbedderScorer:
    """A network embedder (torch :class:`~devrecd.openset.embedder.Embedder` or its ONNX Runtime
    :class:`~devrecd.openset.embedder.OnnxEmbedder`) as a scorer."""

    kind = "embedder"

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.frontend = embedder.frontend

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.embedder.describe()}

    def window_vectors(self, feats: np.ndarray) -> np.ndarray:
        return unit(self.embedder.embed_features(feats))

    def accumulator(self) -> EmbeddingAccumulator:
        """:meth:`recording_vector` and :meth:`window_vectors` of features fed chunk by chunk (as
        :meth:`GsvScorer.accumulator`): the sum of the unit window embeddings."""
        return EmbeddingAccumulator(self)

    def recording_vector(self, feats: np.ndarray) -> np.ndarray:
        w = self.window_vectors(feats)
        if w.shape[0] == 0:
            raise DatasetError("a recording without windows has no embedding", reason="no_windows")
        return unit(w.mean(axis=0))

    def score(self, queries: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        return unit(np.atleast_2d(queries)) @ unit(np.atleast_2d(profiles)).T


class EmbeddingAccumulator:
    """An :class:`EmbedderScorer`'s vectors from features fed chunk by chunk (``add``, then
    ``result() -> (recording vector, window vectors in chunks)``). The network sees the batches of
    :data:`~devrecd.openset.embedder.EMBED_BATCH` windows it sees when given the features whole (a
    batch's numerics may depend on its size), so at most one batch of features is held, and the
    recording vector is the unit-length mean of the unit window embeddings, summed as they come."""

    def __init__(self, scorer: EmbedderScorer) -> None:
        from devrecd.openset.embedder import EMBED_BATCH

        self.scorer, self.batch = scorer, EMBED_BATCH
        self.pending: list[np.ndarray] = []  # features not embedded yet (less than one batch)
        self.total: np.ndarray | None = None  # sum of the unit window embeddings
        self.windows: list[np.ndarray] = []
        self.n_windows = 0

    def add(self, feats: np.ndarray) -> None:
        self.pending.append(np.asarray(feats))
        while sum(map(len, self.pending)) >= self.batch:
            held = np.concatenate(self.pending)
            self._embed(held[:self.batch])
            self.pending = [held[self.batch:]] if len(held) > self.batch else []

    def _embed(self, feats: np.ndarray) -> None:
        w = self.scorer.window_vectors(feats)
        self.total = w.sum(axis=0) if self.total is None else self.total + w.sum(axis=0)
        self.windows.append(w)
        self.n_windows += len(w)

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.pending and sum(map(len, self.pending)):
            self._embed(np.concatenate(self.pending))
        self.pending = []
        if self.total is None:
            raise DatasetError("a recording without windows has no embedding", reason="no_windows")
        return unit(self.total / self.n_windows), list(self.windows)


class FusionScorer:
    """Linear fusion of several scorers' cosines: ``sum_i w_i * s_i + b`` (see :func:`fit_fusion`)."""

    kind = "fusion"

    def __init__(self, parts: Sequence[Any], weights: Sequence[float] | None = None, bias: float = 0.0) -> None:
        if len(parts) < 2:
            raise ArtifactError("a fusion needs at least two scorers", reason="scorer_format")
        frontends = {p.frontend.fingerprint() for p in parts}
        if len(frontends) != 1:
            raise ArtifactError("fused scorers must share one frontend (their features are computed once)",
                                reason="scorer_format")
        self.parts = list(parts)
        self.frontend = parts[0].frontend
        self.weights = np.full(len(parts), 1.0 / len(parts)) if weights is None else np.asarray(weights, float)
        if self.weights.shape != (len(parts),):
            raise ArtifactError(f"{len(parts)} scorers but {self.weights.size} weights", reason="scorer_format")
        self.bias = float(bias)
        # The development calibrations of the fused score (devrecd.openset.fusion), as for GsvScorer.
        self.calibrations: dict[str, dict[str, Any]] = {}
        self.dims = [p.describe()["dim"] for p in parts]
        # The vector space depends on the parts only; the weights are a back-end (they may be refitted).
        self.fingerprint = digest({"kind": self.kind, "parts": [p.describe()["fingerprint"] for p in parts]}, [])

    def _split(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.atleast_2d(x)
        return np.split(x, np.cumsum(self.dims)[:-1], axis=1)

    def part_scores(self, queries: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        """(q, P, n_parts) each part's own score."""
        return np.stack([p.score(q, r) for p, q, r in zip(self.parts, self._split(queries), self._split(profiles))],
                        axis=-1)

    def score(self, queries: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        return self.part_scores(queries, profiles) @ self.weights + self.bias

    def recording_vector(self, feats: np.ndarray) -> np.ndarray:
        # Each part unit length, scaled by 1/sqrt(n): the whole is unit length and a registry's
        # unit-length mean of such vectors keeps every part's direction.
        return np.concatenate([p.recording_vector(feats) for p in self.parts]) / np.sqrt(len(self.parts))

    def window_vectors(self, feats: np.ndarray) -> np.ndarray:
        return np.concatenate([p.window_vectors(feats) for p in self.parts], axis=1) / np.sqrt(len(self.parts))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "dim": int(sum(self.dims)),
                "weights": [float(w) for w in self.weights], "bias": self.bias,
                "parts": [p.describe() for p in self.parts], "frontend_sha256": self.frontend.fingerprint(),
                "frontend": self.frontend.to_dict(),
                "source": " + ".join(str(p.describe().get("source", "")) for p in self.parts),
                **({"dev_calibrations": self.calibrations} if self.calibrations else {})}

    def accumulator(self) -> FusionAccumulator:
        """Each part's accumulator (see :meth:`GsvScorer.accumulator`), their vectors side by side."""
        return FusionAccumulator([p.accumulator() for p in self.parts])


class FusionAccumulator:
    """A :class:`FusionScorer`'s vectors from its parts' accumulators: the parts' recording vectors
    side by side, and their window vectors side by side in chunks (the parts' chunks need not
    coincide: each fused chunk is a run of windows within one chunk of every part). One ``result()``."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)

    def add(self, feats: Any) -> None:
        for p in self.parts:
            p.add(feats)

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        scale = np.sqrt(len(self.parts))
        vectors, chunks = zip(*(p.result() for p in self.parts))
        for p in self.parts:  # the chunks below are the only references left: freed as they are fused
            p.windows = []
        chunks = [list(c) for c in chunks]
        at = [0] * len(chunks)  # position within each part's first chunk
        out = []
        while all(chunks):
            run = min(len(c[0]) - a for c, a in zip(chunks, at))
            out.append(np.concatenate([c[0][a:a + run] for c, a in zip(chunks, at)], axis=1) / scale)
            for i, c in enumerate(chunks):
                at[i] += run
                if at[i] == len(c[0]):
                    c.pop(0)
                    at[i] = 0
        return np.concatenate(vectors) / scale, out


def fit_fusion(part_target: np.ndarray, part_nontarget: np.ndarray) -> tuple[np.ndarray, float]:
    """Logistic-regression fusion weights and bias on development trials.

    ``part_target`` (n_t, n_parts) and ``part_nontarget`` (n_n, n_parts): each part's score of the
    same trials. Classes weighted equally, so ``w . s + b`` is a log-likelihood ratio (natural log)
    at prior 0.5 on these trials (Brummer's linear fusion). Nearly unregularised, as the score
    calibration (:func:`~.calibration.fit_calibration`), by the same fit (:func:`~.measures.fit_balanced`).
    """
    tar, non = np.atleast_2d(part_target), np.atleast_2d(part_nontarget)
    if len(tar) == 0 or len(non) == 0 or tar.shape[1] != non.shape[1]:
        raise DatasetError("fusion needs target and non-target trials with the same parts", reason="fusion_data")
    return fit_balanced(np.asarray(tar, np.float64), np.asarray(non, np.float64))


# --- files and registries ---------------------------------------------------------------------

GSV_FORMAT = "devrecd-gsv/1"
# A GSV scorer with channel models (GsvScorer.channel_models): readers of format 1 refuse it rather
# than serve it without them. A scorer without channel models is still written as format 1.
GSV_FORMAT_CHANNELS = "devrecd-gsv/2"
FUSION_FORMAT = "devrecd-fusion/1"
DEFAULT_GSV = "gsv-ccnu15.npz"  # the shipped scorer, package data under devrecd/assets/


def default_gsv_path() -> Any:
    """The shipped GSV scorer (:file:`devrecd/assets/gsv-ccnu15.npz`, see docs/openset-model.md)."""
    from importlib.resources import files

    return files("devrecd.assets").joinpath(DEFAULT_GSV)


def _save_scorer_file(path: Any, fmt: str, scorer: Any, extra: dict[str, Any] | None) -> None:
    """npz of the scorer's arrays + its JSON description under ``meta``, written atomically."""
    import io

    from devrecd.fsutil import atomic_write

    meta = {"format": fmt, "scorer": scorer.describe(), **(extra or {})}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8), **scorer_arrays(scorer))
    atomic_write(path, buf.getvalue())


def _load_scorer_file(path: Any, fmt: str | tuple[str, ...], what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a :func:`_save_scorer_file` file of format ``fmt`` (or one of them); ArtifactError otherwise."""
    import io
    import zipfile

    try:
        blob = path.read_bytes() if hasattr(path, "read_bytes") else open(path, "rb").read()
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode())
            arrays = {k: np.asarray(npz[k]) for k in npz.files if k != "meta"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: not a readable {what} file ({exc})", reason="scorer_format") from None
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not isinstance(meta, dict) or meta.get("format") not in formats or not isinstance(meta.get("scorer"), dict):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"{path}: not a devrecd {what} (format {' or '.join(map(repr, formats))} expected, found {found!r})",
                            reason="scorer_format")
    return meta, arrays


def scorer_file_description(path: Any, *, fusion: bool = False) -> dict[str, Any]:
    """The :meth:`describe` stored in a GSV (or, with ``fusion``, a fusion) scorer file, loading nothing
    it names (e.g. to compare the file with a registry's scorer)."""
    fmt, what = (FUSION_FORMAT, "fusion scorer") if fusion else ((GSV_FORMAT, GSV_FORMAT_CHANNELS), "GSV scorer")
    return dict(_load_scorer_file(path, fmt, what)[0]["scorer"])


def save_gsv(path: Any, scorer: GsvScorer, *, extra: dict[str, Any] | None = None) -> None:
    """Write a GSV scorer file (npz: arrays + JSON description), atomically; format 2 with channel models."""
    _save_scorer_file(path, GSV_FORMAT_CHANNELS if scorer.channel_models else GSV_FORMAT, scorer, extra)


def load_gsv(path: Any) -> tuple[GsvScorer, dict[str, Any]]:
    """Read :func:`save_gsv`'s file; returns the scorer and the file's metadata (e.g. its calibration)."""
    meta, arrays = _load_scorer_file(path, (GSV_FORMAT, GSV_FORMAT_CHANNELS), "GSV scorer")
    info = dict(meta["scorer"])
    info["source"] = str(path)
    try:
        return GsvScorer.from_arrays(arrays, info), meta
    except ArtifactError as exc:  # the file named, as a checkpoint's or a contract's reader names it
        raise ArtifactError(f"{path}: {exc}", reason=exc.reason) from None


def save_fusion(path: Any, scorer: FusionScorer, *, extra: dict[str, Any] | None = None) -> None:
    """Write a fusion scorer file (``devrecd train-fusion``): the weights, the development calibration,
    every part's description and the GSV part's arrays; a network part is named by its checkpoint
    (path and fingerprint), so the file is used beside that checkpoint (or its embedder export)."""
    _save_scorer_file(path, FUSION_FORMAT, scorer, extra)


def load_fusion(path: Any, *, model: Any = None, device: str = "cpu", threads: int = 1
                ) -> tuple[FusionScorer, dict[str, Any]]:
    """Read :func:`save_fusion`'s file; the network part is loaded from the checkpoint it names (or
    ``model``: a checkpoint or its embedder export) and must be the one the fusion was trained with
    (same fingerprint)."""
    meta, arrays = _load_scorer_file(path, FUSION_FORMAT, "fusion scorer")
    scorer = fusion_from(meta["scorer"], arrays, model=model, device=device, threads=threads)
    if scorer.fingerprint != meta["scorer"].get("fingerprint"):
        raise ArtifactError(f"{path}: its parts are not the scorers it was trained with (the network checkpoint "
                            "changed, or --model names another one)", reason="model_mismatch")
    return scorer, meta


def scorer_arrays(scorer: Any) -> dict[str, np.ndarray]:
    """The arrays a registry stores for ``scorer`` (none for a network: its checkpoint is named instead)."""
    if isinstance(scorer, GsvScorer):
        return scorer.arrays()
    if isinstance(scorer, FusionScorer):
        return {f"part{i}_{k}": v for i, p in enumerate(scorer.parts) for k, v in scorer_arrays(p).items()}
    return {}


def scorer_for_channel(scorer: Any, channel: Any) -> Any:
    """The scorer a comparison under ``channel`` (a :class:`~devrecd.audio.channel.Channel`, its name,
    or None: as recorded) is vectorised with: a GSV scorer's channel model for it
    (:meth:`GsvScorer.for_channel`), else ``scorer`` itself."""
    name = getattr(channel, "name", channel)
    pick = getattr(scorer, "for_channel", None)
    return pick(name) if name and callable(pick) else scorer


def scorer_accumulator(scorer: Any) -> Any:
    """A fresh accumulator of ``scorer`` (None where it has none); with channel models, one that feeds
    every model (:class:`~devrecd.openset.gsv.ChannelAccumulators`)."""
    from devrecd.openset.gsv import ChannelAccumulators

    make = getattr(scorer, "accumulator", None)
    if not callable(make):
        return None
    channels = getattr(scorer, "channel_models", None) or {}
    if not channels:
        return make()
    return ChannelAccumulators(make(), {n: scorer.for_channel(n).accumulator() for n in channels})


def as_scorer(obj: Any) -> Any:
    """A scorer as is; a network embedder (:func:`~devrecd.openset.embedder.load_embedder`) wrapped as one."""
    return obj if callable(getattr(obj, "recording_vector", None)) else EmbedderScorer(obj)


def _part_from(info: dict[str, Any], arrays: dict[str, np.ndarray], model: Any, device: str, threads: int = 1) -> Any:
    kind = info.get("kind", "embedder")
    if kind == "gsv":
        gsv = GsvScorer.from_arrays(arrays, info)
        if str(device).startswith("cuda"):  # the same scorer computed with torch on the GPU
            from devrecd.supervector_torch import on_device

            return on_device(gsv, device)
        return gsv
    if kind == "embedder":
        from devrecd.openset.embedder import load_embedder

        source = model or info.get("source")
        if not source:
            raise ArtifactError("the registry does not name its embedder's checkpoint; pass --model "
                                "(or set registry.embedder_model)", reason="no_model")
        return EmbedderScorer(load_embedder(source, device=device, threads=threads))
    raise ArtifactError(f"unknown scorer kind {kind!r} (known: {', '.join(KINDS)})", reason="scorer_format")


def fusion_from(info: dict[str, Any], arrays: dict[str, np.ndarray], *, model: Any = None,
                device: str = "cpu", threads: int = 1) -> FusionScorer:
    """A :class:`FusionScorer` from its :meth:`~FusionScorer.describe` and :func:`scorer_arrays`
    (a registry's or a fusion file's); ``model`` overrides the network part's checkpoint path (a
    checkpoint, run directory or embedder export)."""
    try:
        parts = [_part_from(p, {k.split("_", 1)[1]: v for k, v in arrays.items() if k.startswith(f"part{i}_")},
                            model, device, threads) for i, p in enumerate(info["parts"])]
        scorer = FusionScorer(parts, info.get("weights"), float(info.get("bias", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"fusion scorer description is malformed: {exc!r}", reason="scorer_format") from None
    scorer.calibrations = dict(info.get("dev_calibrations") or {})
    return scorer


def registry_scorer(registry: Any, *, model: Any = None, configured: str = "", device: str = "cpu",
                    threads: int = 1) -> Any:
    """The scorer a registry's profiles were made with: rebuilt from the arrays the registry stores
    (GSV), or the network it names, or both (fusion). The network is ``model`` (a command's --model),
    else ``configured`` (``registry.embedder_model``), else the checkpoint the registry recorded; a
    checkpoint, run directory or embedder export (:func:`~devrecd.openset.embedder.load_embedder`).
    The result's fingerprint is checked against the registry's."""
    from devrecd.openset.registry import RegistryError

    info = registry.embedder
    if not info:
        raise RegistryError(f"registry {registry.path} has no enrolled devices; run `devrecd enroll` first",
                            reason="no_profiles")
    network = model or configured or None
    if info.get("kind") == "fusion":
        scorer: Any = fusion_from(info, registry.scorer_arrays, model=network, device=device, threads=threads)
    else:
        scorer = _part_from(info, registry.scorer_arrays, network, device, threads)
    try:
        registry.check_embedder(scorer.describe())
    except RegistryError as exc:
        if exc.reason == "model_mismatch" and configured and not model:  # the setting applies to every registry
            raise RegistryError(f"{exc} (the network came from registry.embedder_model = {configured!r}, which "
                                "applies to every registry opened with this configuration: pass --model, or "
                                "unset registry.embedder_model for this registry)", reason="model_mismatch") from None
        raise
    return scorer
