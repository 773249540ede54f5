"""The paper's network: parameter count pinned to the design note, every ablation group builds and runs."""

from __future__ import annotations

import pytest
import torch

from devrecd.errors import DevrecdError
from devrecd.model import ARCHITECTURES, GROUPS, build_model, keras_parameter_count


def _torch_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("first_layernorm, keras, torch_count", [
    (True, 626_001, 626_833),  # the keras.io block as published: the design note's "0.626 M"
    (False, 625_997, 626_829),  # the paper's variant (first LayerNorm removed): one LN of dim 1 less per block
])
def test_paper_parameter_count_for_45_classes(first_layernorm, keras, torch_count):
    net = build_model("paper", 45, first_layernorm=first_layernorm)
    assert keras_parameter_count(net) == keras
    assert _torch_count(net) == torch_count


@pytest.mark.parametrize("arch", sorted(GROUPS))
def test_every_group_builds_runs_and_embeds(arch):
    torch.manual_seed(0)
    net = build_model(arch, 5).eval()
    x = torch.randn(3, 128, 73)
    with torch.no_grad():
        logits, emb = net(x), net.embed(x)
    assert logits.shape == (3, 5) and emb.shape == (3, 128)
    assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
    # the three windows are different inputs: a network that ignores its input would repeat itself
    assert not torch.allclose(logits[0], logits[1])


def test_groups_use_the_blocks_their_names_say():
    for name, (conv, lstm, trans) in GROUPS.items():
        net = build_model(name, 3)
        assert (net.frame is not None, net.bilstm is not None, net.encoder is not None) == (conv, lstm, trans), name
    assert {"paper", *(f"group{i}" for i in range(1, 8))} <= set(ARCHITECTURES)


def test_wrong_input_shape_and_unknown_arch_are_errors():
    net = build_model("paper", 3).eval()
    with pytest.raises(ValueError, match="128, 73"):
        net(torch.zeros(1, 100, 73))
    with pytest.raises(DevrecdError, match="unknown architecture"):
        build_model("resnet", 3)
