"""Networks by name: the paper's (``paper``), its ablation groups (``group1``..``group7``), and ``asp``.

``build_model(arch, num_classes, **hparams)`` returns a torch module that maps ALREADY NORMALISED
(B, 128, 73) features to (B, num_classes) logits and has ``embed(x)`` (the penultimate layer).
Normalisation statistics, labels and the frontend travel in :mod:`devrecd.model.checkpoint`.
"""

from __future__ import annotations

from typing import Any, Callable

from devrecd.errors import ArtifactError
from devrecd.model.network import GROUPS, DeviceNet, NetConfig, keras_parameter_count


def _group_factory(name: str) -> Callable[..., Any]:
    conv, lstm, transformer = GROUPS[name]

    def build(num_classes: int, **hparams: Any) -> DeviceNet:
        fixed = {"use_convlstm": conv, "use_bilstm": lstm, "use_transformer": transformer}
        clash = sorted(set(fixed) & set(hparams))
        if clash:
            raise ArtifactError(f"architecture {name!r} fixes {', '.join(clash)}; choose another architecture",
                                reason="bad_hparams")
        return DeviceNet(NetConfig(num_classes=num_classes, **fixed, **_tuples(hparams)))

    build.__doc__ = f"{name}: ConvLSTM={conv}, BiLSTM={lstm}, Transformer={transformer}"
    return build


def _tuples(hparams: dict[str, Any]) -> dict[str, Any]:
    # Checkpoints store hparams as JSON, where tuples come back as lists; NetConfig is hashable/frozen.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def _asp(num_classes: int, **hparams: Any) -> Any:
    # The open-set engineer's embedding network; imported lazily so this package stays light.
    from devrecd.openset.arch import build_asp

    return build_asp(num_classes, **hparams)


ARCHITECTURES: dict[str, Callable[..., Any]] = {name: _group_factory(name) for name in GROUPS}
ARCHITECTURES["asp"] = _asp


def build_model(arch: str, num_classes: int, **hparams: Any) -> Any:
    """A freshly initialised network by architecture name (see :data:`ARCHITECTURES`)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ArtifactError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})",
                            reason="unknown_arch") from None
    if num_classes < 2:
        raise ArtifactError(f"a classifier needs at least 2 classes, got {num_classes}", reason="bad_hparams")
    try:
        return factory(num_classes, **hparams)
    except TypeError as exc:  # an unknown hyper-parameter name
        raise ArtifactError(f"architecture {arch!r}: bad hyper-parameters {hparams}: {exc}", reason="bad_hparams") from None


__all__ = ["ARCHITECTURES", "DeviceNet", "NetConfig", "build_model", "keras_parameter_count"]
