"""What training does to a network besides its forward pass: which layers learn while fine-tuning
(``set_trainable``, ``train_mode``), BatchNorm statistics recomputed on training windows
(``recalibrate_batchnorm``) and the validation metrics of an epoch (``validate``). Used by
:mod:`devrecd.train`; torch only.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def set_trainable(model: Any, trainable: str) -> list[Any]:
    """Freeze all but the part that fine-tuning trains; returns the parameters to optimise."""
    if trainable == "all":
        return list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    parts = [model.classifier] + ([model.mlp] if trainable == "mlp" else [])
    params = [p for part in parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train_mode(model: Any, trainable: str) -> None:
    """Frozen layers stay in eval mode while fine-tuning: their BatchNorm statistics must not drift."""
    model.train()
    if trainable != "all":
        model.eval()
        model.classifier.train()
        if trainable == "mlp":
            model.mlp.train()


def recalibrate_batchnorm(model: Any, x: Any, batch_size: int, device: str, max_windows: int = 2048) -> None:
    """Set every BatchNorm's running statistics to those of the current weights on training windows.

    The paper's BatchNorm keeps Keras' momentum (0.99, torch 0.01): on a small corpus (CCNU's 15
    phones x 3 references are ~12 batches an epoch) the running averages still remember the random
    initial weights after many epochs, and the network that is 100% right in training mode is
    ~50% right in eval mode on its own training windows (measured). So after each epoch the running
    statistics are recomputed ("precise BN"): a forward pass in training mode for BatchNorm only
    (dropout off, no gradients) over up to ``max_windows`` evenly spaced training windows, with a
    cumulative average over batches.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    subset = x[:: -(-len(x) // max_windows)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(subset), batch_size):
                model(subset[start:start + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def validate(model: Any, data: Any, device: str, batch: int) -> dict[str, float]:
    """Loss and window/recording accuracy on held-out windows (``data``: a :class:`devrecd.train_data.SplitData`;
    recording = mean log-probability)."""
    import torch

    model.eval()
    with torch.no_grad():
        lp = torch.cat([torch.log_softmax(model(data.x[s:s + batch].to(device)), dim=1).cpu()
                        for s in range(0, len(data), batch)])
    lp_np, y_np = lp.numpy(), data.y.numpy()
    rec_ok = [lp_np[data.rec == r].mean(0).argmax() == y_np[data.rec == r][0] for r in range(len(data.items))]
    return {"val_loss": float(torch.nn.functional.nll_loss(lp, data.y)),
            "val_acc": float((lp.argmax(1) == data.y).float().mean()), "val_rec_acc": float(np.mean(rec_ok))}
