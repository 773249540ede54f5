"""The paper's network (Table IV) and its ablation groups (Tables VII and VIII). Pure: no I/O.

Input: (B, 128, 73) features, already normalised. Output: logits (B, num_classes).
``embed(x)`` returns the penultimate Dense(128) activation, the device embedding.

Blocks, with Keras semantics (``../shared/design/paper-model.md``):

* F, frame level: ConvLSTM1D(64, k3, s3, valid) -> BN -> ConvLSTM1D(32, k3, s2, valid) -> BN,
  over the 128 frames, each frame's 73 dims seen as a 1-D signal with one channel:
  (B,128,73,1) -> (B,128,24,64) -> (B,128,11,32) -> (B,128,352).
* S, sample level: BiLSTM(128), last hidden state of each direction -> (B, 256).
* Cross-scale: (B,256) seen as 256 tokens of dimension 1 -> 2 Transformer encoder blocks
  (8 heads, head size 64, feed-forward 4) -> mean over the size-1 axis -> (B, 256).
* Classifier: Dense(128, relu) -> Dense(N).

The ConvLSTM recurrence is an explicit loop over the fixed 128 steps (unrolled in ONNX), which
TensorRT handles; the input-to-state convolution runs once for all steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from devrecd.features import FEATURE_DIM, N_FRAMES


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters of every architecture in this module (stored in checkpoints)."""

    num_classes: int
    use_convlstm: bool = True
    use_bilstm: bool = True
    use_transformer: bool = True
    conv_filters: tuple[int, int] = (64, 32)
    conv_kernels: tuple[int, int] = (3, 3)
    conv_strides: tuple[int, int] = (3, 2)
    lstm_units: int = 128
    encoder_blocks: int = 2
    heads: int = 8
    head_size: int = 64
    ff_dim: int = 4  # the keras.io example's feed-forward width ("MLP/ff small")
    first_layernorm: bool = False  # the paper removes the block's first LayerNorm (section IV-B3)
    mlp_units: int = 128
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class ConvLSTM1D(nn.Module):
    """Keras ConvLSTM1D(return_sequences=True): gates i, f, c, o; no peepholes.

    Input-to-state: Conv1d with the layer's kernel/stride, 'valid', with bias.
    State-to-state: Conv1d stride 1, 'same' padding, no bias.
    """

    def __init__(self, in_channels: int, filters: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.filters = filters
        self.input_conv = nn.Conv1d(in_channels, 4 * filters, kernel, stride=stride)
        self.state_conv = nn.Conv1d(filters, 4 * filters, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C, L) -> (B, T, F, L')
        b, t, c, length = x.shape
        xi = self.input_conv(x.reshape(b * t, c, length))
        xi = xi.reshape(b, t, 4 * self.filters, xi.shape[-1])
        h = xi.new_zeros(b, self.filters, xi.shape[-1])
        cell = torch.zeros_like(h)
        outputs = []
        # unbind once: indexing xi[:, step] inside the loop makes autograd write a full-size
        # zero gradient per step (quadratic in T); unbind's backward stacks them once.
        for x_t in xi.unbind(1):  # fixed length: unrolled by the exporter
            gates = x_t + self.state_conv(h)
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class FrameBlock(nn.Module):
    """Block F: two ConvLSTM1D layers with batch normalisation, flattened per frame."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        (f1, f2), (k1, k2), (s1, s2) = cfg.conv_filters, cfg.conv_kernels, cfg.conv_strides
        self.conv1 = ConvLSTM1D(1, f1, k1, s1)
        self.bn1 = nn.BatchNorm2d(f1, eps=1e-3, momentum=0.01)  # Keras BN defaults
        self.conv2 = ConvLSTM1D(f1, f2, k2, s2)
        self.bn2 = nn.BatchNorm2d(f2, eps=1e-3, momentum=0.01)
        len1 = (FEATURE_DIM - k1) // s1 + 1  # 24
        self.out_length = (len1 - k2) // s2 + 1  # 11
        self.out_dim = f2 * self.out_length  # 352

    @staticmethod
    def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:  # over (B, T, C, L), channels C
        return bn(x.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 73) -> (B, T, 352)
        y = self._bn(self.bn1, self.conv1(x.unsqueeze(2)))
        y = self._bn(self.bn2, self.conv2(y))
        # Keras reshape of (T, 11, 32) channels-last -> (T, 352): position-major, channel-minor.
        return y.transpose(2, 3).reshape(y.shape[0], y.shape[1], -1)


class MultiHeadAttention(nn.Module):
    """Keras MultiHeadAttention(num_heads, key_dim): projections to heads x key_dim, any model dim."""

    def __init__(self, dim: int, heads: int, head_size: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_size = heads, head_size
        inner = heads * head_size
        self.query = nn.Linear(dim, inner)
        self.key = nn.Linear(dim, inner)
        self.value = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_size))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        ctx = (weights @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_size)
        return self.out(ctx)


class EncoderBlock(nn.Module):
    """The keras.io time-series Transformer block; the paper drops its first LayerNorm.

    x -> [LN] -> MHA -> dropout -> +x = res -> LN -> Conv1D(ff, 1, relu) -> dropout -> Conv1D(D, 1) -> +res
    """

    def __init__(self, dim: int, cfg: NetConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6) if cfg.first_layernorm else None
        self.attention = MultiHeadAttention(dim, cfg.heads, cfg.head_size, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, cfg.ff_dim), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ff_dim, dim))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.norm1(x) if self.norm1 is not None else x
        res = x + self.dropout(self.attention(a))
        return res + self.ff(self.norm2(res))


class DeviceNet(nn.Module):
    """All architectures: the paper's (every block) and the ablation groups (some blocks)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        if not (cfg.use_convlstm or cfg.use_bilstm or cfg.use_transformer):
            raise ValueError("an architecture needs at least one block")
        self.cfg = cfg
        dim = FEATURE_DIM
        self.frame = FrameBlock(cfg) if cfg.use_convlstm else None
        if self.frame is not None:
            dim = self.frame.out_dim
        self.bilstm = nn.LSTM(dim, cfg.lstm_units, batch_first=True, bidirectional=True) if cfg.use_bilstm else None
        if self.bilstm is not None:
            dim = 2 * cfg.lstm_units
        # After the BiLSTM the encoder sees 256 scalar tokens (the paper); without it, the
        # 128 frames are the tokens (ablations 3 and 6).
        token_dim = 1 if cfg.use_bilstm else dim
        self.encoder = (nn.Sequential(*[EncoderBlock(token_dim, cfg) for _ in range(cfg.encoder_blocks)])
                        if cfg.use_transformer else None)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_units), nn.ReLU())
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.mlp_units, cfg.num_classes)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:  # (B, 128, 73) -> (B, dim)
        if x.shape[1:] != (N_FRAMES, FEATURE_DIM):
            raise ValueError(f"expected (B, {N_FRAMES}, {FEATURE_DIM}) features, got {tuple(x.shape)}")
        if self.frame is not None:
            x = self.frame(x)  # (B, 128, 352)
        if self.bilstm is not None:
            _, (h, _) = self.bilstm(x)  # h: (2, B, units), forward and backward final states
            x = torch.cat([h[0], h[1]], dim=1)  # (B, 256)
            if self.encoder is not None:
                x = self.encoder(x.unsqueeze(-1)).mean(dim=-1)  # tokens of dim 1; average that axis
            return x
        if self.encoder is not None:
            return self.encoder(x).mean(dim=1)  # attend over frames, average over time
        return x[:, -1]  # ConvLSTM alone: the last step's state (Keras return_sequences=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate Dense(128, relu) activation: the device embedding."""
        return self.mlp(self._pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))


# name -> which blocks (ConvLSTM, BiLSTM, Transformer); Tables VII and VIII of the paper.
GROUPS: dict[str, tuple[bool, bool, bool]] = {
    "paper": (True, True, True),
    "group1": (True, False, False),
    "group2": (False, True, False),
    "group3": (False, False, True),
    "group4": (True, True, True),
    "group5": (False, True, True),
    "group6": (True, False, True),
    "group7": (True, True, False),
}


def keras_parameter_count(model: DeviceNet) -> int:
    """Parameters as Keras counts them: one LSTM bias per gate, BN moving statistics included."""
    torch_count = sum(p.numel() for p in model.parameters())
    lstm_extra = 0
    if model.bilstm is not None:
        lstm_extra = sum(p.numel() for n, p in model.bilstm.named_parameters() if n.startswith("bias_hh"))
    bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return torch_count - lstm_extra + bn_stats
