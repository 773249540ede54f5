"""The shipped GSV scorer in torch, on a GPU: the same scorer behind the same interface.

:class:`TorchGsvScorer` wraps a :class:`~devrecd.openset.gsv.GsvScorer` (same UBM arrays, NAP
basis, relevance factor, frontend and fingerprint: a registry enrolled with one is served by the
other) and computes on its torch device what the numpy scorer computes on the CPU:

* the features, when given clips (:meth:`features`): the one frontend (``devrecd/features.py``) on
  torch tensors;
* the GMM statistics, the MAP supervectors, the NAP projection and the cosine scores: the array-API
  code of ``devrecd/supervector.py`` (:meth:`Ubm.supervectors_of`, :func:`nap_project`,
  :func:`unit_rows`) run on tensors, in float64 like the numpy scorer: the formulas are not
  written a second time here. The windows of a recording are one batched call (numpy loops them).

Features may arrive as a tensor on the device (the pipeline's CUDA frontend) or as numpy arrays
(condition-matched references, tests); vectors and scores go back to the host as numpy, as the
scorer interface (:class:`~devrecd.openset.scorers.VectorScorer`) returns them. torch is imported here
only, and this module only where a GSV scorer is served on a torch device (:func:`on_device`).
Parity with the numpy scorer on the 15 CCNU phones: ``tests/test_openset_scorers.py`` (CPU) and
``benchmarks/gpu.py`` (the GPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from devrecd.features import FrontendConfig
from devrecd.stages import frontend_for
from devrecd.supervector import nap_project, unit_rows


def on_device(scorer: Any, device: str) -> Any:
    """``scorer`` served on ``device``: a GSV scorer on a CUDA device becomes a :class:`TorchGsvScorer`;
    anything else (the CPU, other scorer kinds) is returned as it is."""
    if getattr(scorer, "kind", None) == "gsv" and str(device).startswith("cuda"):
        return TorchGsvScorer(scorer, device)
    return scorer


class TorchGsvScorer:
    """A :class:`~devrecd.openset.gsv.GsvScorer` computed with torch on ``device`` (see the module docstring)."""

    kind = "gsv"

    def __init__(self, scorer: Any, device: str = "cuda") -> None:
        import torch

        if getattr(scorer, "kind", None) != "gsv":
            raise TypeError(f"TorchGsvScorer serves a GSV scorer, not {getattr(scorer, 'kind', scorer)!r}")
        self.scorer = scorer
        self.ubm = scorer.ubm
        self.frontend: FrontendConfig = scorer.frontend
        self.relevance = scorer.relevance
        self.fingerprint = scorer.fingerprint
        self.device = torch.device(device)
        self.input_device = str(self.device)  # the pipeline hands features over on this device
        self._nap = None if scorer.nap is None else torch.as_tensor(scorer.nap, device=self.device)
        self._channels: dict[str, TorchGsvScorer] = {}

    def __getattr__(self, name: str) -> Any:
        """Everything else (its development calibrations, source, NAP basis, ...) is the wrapped scorer's."""
        if name == "scorer":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.scorer, name)

    # --- the scorer interface (numpy out) -------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The wrapped scorer's description: the same scorer (the registry's fingerprint check)."""
        return self.scorer.describe()

    def arrays(self) -> dict[str, np.ndarray]:
        return self.scorer.arrays()

    def for_channel(self, channel: str | None) -> Any:
        """The wrapped scorer's model of ``channel`` (:meth:`GsvScorer.for_channel
        <devrecd.openset.gsv.GsvScorer.for_channel>`), on this device too."""
        model = self.scorer.for_channel(channel)
        if model is self.scorer:
            return self
        if channel not in self._channels:
            self._channels[str(channel)] = TorchGsvScorer(model, str(self.device))
        return self._channels[str(channel)]

    def recording_vector(self, feats: Any) -> np.ndarray:
        from devrecd.errors import DatasetError

        if len(feats) == 0:
            raise DatasetError("a recording without windows has no supervector", reason="no_windows")
        return self._host(self.recording_vector_on_device(feats))

    def window_vectors(self, feats: Any) -> np.ndarray:
        return self._host(self.window_vectors_on_device(feats))

    def accumulator(self) -> Any:
        """As :meth:`GsvScorer.accumulator <devrecd.openset.gsv.GsvScorer.accumulator>`, the
        statistics summed on the device."""
        from devrecd.supervector import SupervectorAccumulator

        return SupervectorAccumulator(self.ubm, self.relevance, lambda sv: nap_project(sv, self._nap),
                                      lambda x: self._host(self.window_vectors_on_device(x)),
                                      to_input=self._tensor, to_host=self._host)

    def score(self, queries: Any, profiles: Any) -> np.ndarray:
        q, p = (self._tensor(np.atleast_2d(v) if isinstance(v, np.ndarray) else v) for v in (queries, profiles))
        import torch

        return self._host(torch.matmul(unit_rows(torch.atleast_2d(q)), unit_rows(torch.atleast_2d(p)).T))

    # --- on the device ---------------------------------------------------------------------------
    def features(self, clips: Any) -> Any:
        """(n, clip_samples) clips -> (n, 128, 73) features on the device (the one frontend, on torch)."""
        return frontend_for(self.frontend)(self._tensor(clips, dtype="float32"))

    def recording_vector_on_device(self, feats: Any) -> Any:
        """(n, 128, 73) features -> (dim,) float64 tensor: the supervector of all frames, NAP-projected."""
        return nap_project(self.ubm.supervector(self._tensor(feats), self.relevance), self._nap)

    def window_vectors_on_device(self, feats: Any) -> Any:
        """(n, 128, 73) features -> (n, dim) float64 tensor, every window in one batched call."""
        return nap_project(self.ubm.window_supervectors(self._tensor(feats), self.relevance), self._nap)

    def _tensor(self, x: Any, dtype: str | None = None) -> Any:
        import torch

        t = torch.as_tensor(x, device=self.device)
        return t if dtype is None else t.to(getattr(torch, dtype))

    @staticmethod
    def _host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()
