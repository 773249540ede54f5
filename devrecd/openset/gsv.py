"""The GMM-supervector scorer (``gsv``): a recording's frames MAP-adapted to a UBM trained on
development recordings (:mod:`devrecd.supervector`), the development data's within-device
variability projected out (NAP, :func:`fit_nap`), unit length; scored by cosine. One of the
scorers of :mod:`devrecd.openset.scorers` (the interface, the other two, and the scorer files).

Channel models: beside its main UBM/NAP (what profiles are enrolled with and every comparison
uses), a scorer may carry one UBM/NAP per channel (:attr:`GsvScorer.channel_models`, e.g.
``amrnb``) trained on the development recordings passed through that channel. A comparison made
under that channel (the questioned recording and the references, matched, both through it) is
vectorised with that channel's model (:meth:`GsvScorer.for_channel`), and the channel's
development calibrations were fitted with it. A scorer without channel models is what it was.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from devrecd.errors import ArtifactError, ConfigError, DatasetError
from devrecd.features import FrontendConfig
from devrecd.openset.vectors import digest, unit
from devrecd.supervector import RELEVANCE, SupervectorAccumulator, Ubm, nap_project

CHANNEL_PREFIX = "channel."  # a channel model's arrays: channel.<name>.<array> (GsvScorer.arrays)


def fit_nap(vectors: np.ndarray, labels: Sequence[str], dims: int) -> np.ndarray:
    """(D, dims) orthonormal basis of the largest within-device variability of ``vectors``.

    Each device's vectors are centred on their device mean; the top right-singular vectors of what
    is left are the directions in which one device's recordings differ (Campbell et al. 2006).
    """
    x = np.asarray(vectors, dtype=np.float64)
    labels = np.asarray(labels)
    centred = np.concatenate([x[labels == d] - x[labels == d].mean(axis=0) for d in np.unique(labels)])
    rank = int(np.linalg.matrix_rank(centred)) if len(centred) else 0
    if dims < 1 or rank < dims:
        raise DatasetError(f"NAP needs {dims} within-device directions; the development data has {rank}",
                           reason="nap_data")
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:dims].T.copy()


class GsvScorer:
    """GMM supervector scorer (see the module docstring)."""

    kind = "gsv"

    def __init__(self, ubm: Ubm, frontend: FrontendConfig, *, relevance: float = RELEVANCE,
                 nap: np.ndarray | None = None, source: str = "",
                 channel_models: dict[str, GsvScorer] | None = None, trained_on: Sequence[str] = ()) -> None:
        self.ubm, self.frontend, self.relevance, self.source = ubm, frontend, float(relevance), source
        # channel name -> the model comparisons under that channel are vectorised with (module docstring)
        self.channel_models: dict[str, GsvScorer] = dict(sorted((channel_models or {}).items()))
        self.trained_on = list(trained_on)  # a channel model: the conditions its development copies went through
        for name, model in self.channel_models.items():
            if model.channel_models or model.frontend.fingerprint() != frontend.fingerprint():
                raise ArtifactError(f"channel model {name!r} must be a plain GSV model of the same frontend",
                                    reason="scorer_format")
        # The development calibrations (condition -> Calibration.to_dict()) that travel with the scorer:
        # used by registries without a case calibration of that condition (devrecd.openset.gsvtrain).
        self.calibrations: dict[str, dict[str, Any]] = {}
        self.nap = None if nap is None or nap.size == 0 else np.asarray(nap, dtype=np.float64)
        if self.nap is not None and self.nap.shape[0] != ubm.dim:
            raise ArtifactError(f"NAP basis has {self.nap.shape[0]} rows, the UBM's supervectors {ubm.dim}",
                                reason="scorer_format")
        meta: dict[str, Any] = {"kind": self.kind, "ubm": ubm.fingerprint(), "relevance": self.relevance,
                                "frontend": frontend.fingerprint()}
        if self.channel_models:  # absent without channel models: such a scorer keeps its fingerprint
            meta["channel_models"] = {n: m.fingerprint for n, m in self.channel_models.items()}
        if self.trained_on:
            meta["trained_on"] = self.trained_on
        self.fingerprint = digest(meta, [] if self.nap is None else [self.nap])

    @classmethod
    def train(cls, feats: Sequence[np.ndarray], labels: Sequence[str], frontend: FrontendConfig, *,
              mixtures: int = 64, relevance: float = RELEVANCE, nap_dims: int = 0, seed: int = 0,
              source: str = "", trained_on: Sequence[str] = ()) -> GsvScorer:
        """UBM on every frame of ``feats`` (one (n, 128, 73) array per development recording) and,
        with ``nap_dims``, the NAP basis from their supervectors and device ``labels``."""
        ubm = Ubm.fit(feats, mixtures=mixtures, seed=seed)
        nap = None
        if nap_dims:
            sv = np.stack([unit(ubm.supervector(f, relevance)) for f in feats])
            nap = fit_nap(sv, labels, nap_dims)
        return cls(ubm, frontend, relevance=relevance, nap=nap, source=source, trained_on=trained_on)

    def with_channel_models(self, models: dict[str, GsvScorer]) -> GsvScorer:
        """This scorer's main model with ``models`` as its channel models (a new scorer, a new
        fingerprint; the development calibrations are not carried over: they belong to this one)."""
        return type(self)(self.ubm, self.frontend, relevance=self.relevance, nap=self.nap, source=self.source,
                          channel_models=models, trained_on=self.trained_on)

    def for_channel(self, channel: str | None) -> GsvScorer:
        """The model comparisons under ``channel`` are vectorised with: its channel model, else this one."""
        return self.channel_models.get(channel or "", self)

    def _project(self, sv: np.ndarray) -> np.ndarray:
        return nap_project(sv, self.nap)  # one definition for numpy and the torch scorer (supervector_torch)

    def recording_vector(self, feats: np.ndarray) -> np.ndarray:
        if len(feats) == 0:
            raise DatasetError("a recording without windows has no supervector", reason="no_windows")
        return self._project(self.ubm.supervector(feats, self.relevance))

    def window_vectors(self, feats: np.ndarray) -> np.ndarray:
        return self._project(self.ubm.window_supervectors(feats, self.relevance))

    def accumulator(self) -> SupervectorAccumulator:
        """:meth:`recording_vector` and :meth:`window_vectors` of features fed chunk by chunk
        (``add(chunk)``, then ``result()``): the pipeline's open-set path, in memory that does not
        grow with the recording's length."""
        return SupervectorAccumulator(self.ubm, self.relevance, self._project, self.window_vectors)

    def score(self, queries: np.ndarray, profiles: np.ndarray) -> np.ndarray:
        return unit(np.atleast_2d(queries)) @ unit(np.atleast_2d(profiles)).T

    def _model(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "dim": self.ubm.dim, "mixtures": self.ubm.mixtures,
                "relevance": self.relevance, "nap_dims": 0 if self.nap is None else int(self.nap.shape[1])}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._model(), "frontend_sha256": self.frontend.fingerprint(),
                "frontend": self.frontend.to_dict(), "source": self.source,
                **({"channel_models": {n: {**m._model(), "trained_on": m.trained_on}
                                       for n, m in self.channel_models.items()}} if self.channel_models else {}),
                **({"dev_calibrations": self.calibrations} if self.calibrations else {})}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"ubm_{k}": v for k, v in self.ubm.to_arrays().items()}
        if self.nap is not None:
            out["nap"] = self.nap
        for name, model in self.channel_models.items():
            out.update({f"{CHANNEL_PREFIX}{name}.{k}": v for k, v in model.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> GsvScorer:
        """Rebuild from :meth:`arrays` and :meth:`describe` (the fingerprint must match)."""
        ubm = _ubm_of(arrays)
        try:
            frontend = FrontendConfig.from_dict(info["frontend"])
            channel_models = {name: cls._channel_model(name, arrays, frontend, cm)
                              for name, cm in (info.get("channel_models") or {}).items()}
        except ConfigError as exc:  # the configuration's message, the artifact named by its reader
            raise ArtifactError(f"GSV scorer: bad frontend: {exc}", reason="scorer_format") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"GSV scorer description is malformed: {exc!r}", reason="scorer_format") from None
        try:
            scorer = cls(ubm, frontend, relevance=float(info["relevance"]), nap=arrays.get("nap"),
                         source=str(info.get("source", "")), channel_models=channel_models)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"GSV scorer description is malformed: {exc!r}", reason="scorer_format") from None
        if info.get("fingerprint") not in (None, scorer.fingerprint):
            raise ArtifactError("GSV scorer arrays do not match their recorded fingerprint (damaged or mixed up)",
                                reason="scorer_format")
        scorer.calibrations = dict(info.get("dev_calibrations") or {})
        return scorer

    @classmethod
    def _channel_model(cls, name: str, arrays: dict[str, np.ndarray], frontend: FrontendConfig,
                       info: dict[str, Any]) -> GsvScorer:
        """Channel model ``name`` of :meth:`from_arrays` (its arrays under ``channel.<name>.``)."""
        prefix = f"{CHANNEL_PREFIX}{name}."
        own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if not own:
            raise ArtifactError(f"channel model {name!r} has no arrays", reason="scorer_format")
        model = cls(_ubm_of(own), frontend,
                    relevance=float(info["relevance"]), nap=own.get("nap"), trained_on=info.get("trained_on") or ())
        if info.get("fingerprint") != model.fingerprint:
            raise ArtifactError(f"channel model {name!r}: arrays do not match its recorded fingerprint",
                                reason="scorer_format")
        return model


def _ubm_of(arrays: dict[str, np.ndarray]) -> Ubm:
    """The UBM of a model's arrays (its ``ubm_*`` entries, :meth:`GsvScorer.arrays`)."""
    return Ubm.from_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("ubm_")})


class ChannelAccumulators:
    """The accumulator of a scorer with channel models: features fed chunk by chunk go to the main
    model's accumulator and to each channel model's (:meth:`result` is the main model's vectors,
    :meth:`result_for` a channel model's), since the channel a recording is compared under is known
    only once it is decoded."""

    def __init__(self, main: Any, channels: dict[str, Any]) -> None:
        self.main, self.channels = main, dict(channels)

    def add(self, feats: Any) -> None:
        self.main.add(feats)
        for acc in self.channels.values():
            acc.add(feats)

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.main.result()

    def result_for(self, channel: str | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The vectors of the model of ``channel`` (the main model's where it has none)."""
        acc = self.channels.get(channel or "")
        return acc.result() if acc is not None else self.main.result()

