"""The network (pure modules) and its self-describing checkpoints.

``build_model(arch, num_classes, **hparams)`` builds any architecture by name:
``paper`` (Table IV) and the ablation groups ``group1`` .. ``group7`` (Tables VII, VIII), plus
architectures registered by other modules (e.g. ``asp``, :mod:`devrecd.model.asp`).
"""

from __future__ import annotations

from typing import Any, Callable

from devrecd.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from devrecd.model.network import GROUPS, DeviceNet, NetConfig, keras_parameter_count


def _paper_family(blocks: tuple[bool, bool, bool]) -> Callable[..., Any]:
    def build(num_classes: int, **hparams: Any) -> DeviceNet:
        conv, lstm, trans = blocks
        return DeviceNet(NetConfig(num_classes=num_classes, use_convlstm=conv, use_bilstm=lstm,
                                   use_transformer=trans, **_tuples(hparams)))

    return build


def _tuples(hparams: dict[str, Any]) -> dict[str, Any]:
    # checkpoints store tuples as lists
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def _asp(num_classes: int, **hparams: Any):
    from devrecd.model.asp import build_asp

    return build_asp(num_classes, **hparams)


ARCHITECTURES: dict[str, Callable[..., Any]] = {name: _paper_family(blocks) for name, blocks in GROUPS.items()}
ARCHITECTURES["asp"] = _asp


def build_model(arch: str, num_classes: int, **hparams: Any):
    """Build architecture ``arch`` for ``num_classes`` devices."""
    from devrecd.errors import ConfigError

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    try:
        return ARCHITECTURES[arch](num_classes, **hparams)
    except TypeError as exc:
        raise ConfigError(f"architecture {arch!r}: bad hyper-parameters: {exc}") from None


__all__ = ["ARCHITECTURES", "Checkpoint", "DeviceNet", "GROUPS", "NetConfig", "build_model",
           "keras_parameter_count", "load_checkpoint", "save_checkpoint"]
