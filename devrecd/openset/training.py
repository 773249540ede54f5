"""Training an embedder with a margin loss (AAM-softmax), for architectures that offer ``margin_logits``.

The closed-set trainer (``devrecd train``) optimises plain cross-entropy on ``model(x)``; an
embedding for cosine scoring of devices never seen in training is better trained with an angular
margin, which needs the labels inside the forward pass. This module is that small loop; it takes
the per-recording features that :class:`devrecd.data.FeatureCache` (the one frontend) computed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.errors import DatasetError
from devrecd.features import FrontendConfig
from devrecd.openset.embedder import Embedder
from devrecd.train import normalisation_stats, recalibrate_batchnorm

log = logging.getLogger("devrecd.openset")


def build_embedding_net(arch: str, num_classes: int, **hparams: Any) -> Any:
    """Any architecture of the model package's ``build_model`` (``asp`` included)."""
    from devrecd.model import build_model

    return build_model(arch, num_classes, **hparams)


def train_embedder(feats: Sequence[np.ndarray], labels: Sequence[str], *, frontend: FrontendConfig,
                   arch: str = "asp", epochs: int = 30, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                   hparams: dict[str, Any] | None = None,
                   on_epoch: Callable[[int, float, float], None] | None = None) -> Embedder:
    """Train an embedding network on per-recording window features and return it as an :class:`Embedder`.

    ``feats[i]`` is recording i's (windows, 128, 73) raw features and ``labels[i]`` its device.
    Uses ``margin_logits(x, y)`` (AAM-softmax) when the network has it, else cross-entropy on
    ``model(x)``. Deterministic on the CPU for a given seed. ``on_epoch(epoch, loss, accuracy)``
    reports progress (the library does not print).
    """
    import torch
    from torch.nn import functional as F

    if len(feats) != len(labels) or len(set(labels)) < 2:
        raise DatasetError("an embedder needs recordings of at least two devices, one label per recording",
                           reason="embedder_data")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = normalisation_stats(feats)
    x_all = torch.as_tensor((np.concatenate(feats) - mean) / std, dtype=torch.float32)
    y_all = torch.as_tensor(np.concatenate([np.full(len(f), index[lab]) for f, lab in zip(feats, labels)]))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hp = dict(hparams or {})
    model = build_embedding_net(arch, len(classes), **hp)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    margin = callable(getattr(model, "margin_logits", None))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=gen)
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x, y = x_all[idx], y_all[idx]
            logits = model.margin_logits(x, y) if margin else model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
            with torch.no_grad():
                correct += int((logits.argmax(1) == y).sum())
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / max(n, 1), correct / max(n, 1))
    recalibrate_batchnorm(model, x_all, batch_size, "cpu")  # eval-mode statistics of the final weights
    return Embedder(model.eval(), arch=arch, hparams=hp, frontend=frontend, norm_mean=mean, norm_std=std,
                    labels=classes, source=f"in-memory {arch} ({len(classes)} devices, {epochs} epochs, seed {seed})")
