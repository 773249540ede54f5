"""Our own embedding architecture, ``asp``: BiLSTM over the 128 frames + attentive statistics pooling.

Why: the paper's network squeezes each clip into one BiLSTM state and then attends over 256 scalar
tokens (``../shared/design/paper-model.md``). For enrolment we want an embedding that summarises
the whole clip and lives on a hypersphere, so cosine scoring is natural:

    (B, 128, 73) -> BiLSTM(hidden) -> (B, 128, 2*hidden)
                 -> attentive statistics pooling (weighted mean and std over time)  -> (B, 4*hidden)
                 -> Linear -> BatchNorm  = embedding (B, emb_dim)
    head:  scale * cos(embedding, class weight)   (normalised softmax; with ``margin_logits`` the
           additive-angular-margin "AAM-softmax" of ArcFace for trainers that pass labels)

The module is pure (no I/O); ``forward`` returns logits like every architecture in
``devrecd.model.ARCHITECTURES`` and ``embed`` returns the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from devrecd.features import FEATURE_DIM


@dataclass(frozen=True)
class AspConfig:
    num_classes: int
    hidden: int = 128  # BiLSTM units per direction
    attention: int = 64  # attention bottleneck
    emb_dim: int = 128  # embedding size (the paper's Dense(128), for a like-for-like comparison)
    scale: float = 30.0  # logit scale of the cosine head
    margin: float = 0.2  # additive angular margin (radians) used by margin_logits


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling (Okabe et al. 2018): attention-weighted mean and std over time."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(dim, bottleneck), nn.Tanh(), nn.Linear(bottleneck, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, T, C)
        w = torch.softmax(self.attn(h), dim=1)  # per-channel weights over time
        mean = (w * h).sum(dim=1)
        var = (w * h * h).sum(dim=1) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp_min(1e-6))], dim=1)


class AspNet(nn.Module):
    """BiLSTM + attentive statistics pooling + cosine (AAM-softmax) head."""

    def __init__(self, num_classes: int, **hparams: float) -> None:
        super().__init__()
        self.cfg = AspConfig(num_classes=num_classes, **hparams)
        c = self.cfg
        self.lstm = nn.LSTM(FEATURE_DIM, c.hidden, batch_first=True, bidirectional=True)
        self.pool = AttentiveStatsPool(2 * c.hidden, c.attention)
        self.project = nn.Linear(4 * c.hidden, c.emb_dim)
        self.bn = nn.BatchNorm1d(c.emb_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, c.emb_dim))
        nn.init.xavier_uniform_(self.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128, 73) normalised features -> (B, emb_dim) embedding."""
        h, _ = self.lstm(x)
        return self.bn(self.project(self.pool(h)))

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without margin (inference, and trainers that only know cross-entropy)."""
        return self.cfg.scale * self.cosine(self.embed(x))

    def margin_logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """AAM-softmax logits: the target class's angle is widened by ``margin`` before scaling."""
        cos = self.cosine(self.embed(x)).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cos)
        target = F.one_hot(labels, cos.shape[1]).bool()
        # cos(theta + m) only where theta + m < pi keeps the logit monotone in theta (ArcFace's "easy margin" guard).
        shifted = torch.where(theta + self.cfg.margin < math.pi, torch.cos(theta + self.cfg.margin), cos - 1.0)
        return self.cfg.scale * torch.where(target, shifted, cos)


def build_asp(num_classes: int, **hparams: float) -> AspNet:
    """Factory with the ``build_model`` signature (``ARCHITECTURES["asp"]``)."""
    return AspNet(num_classes, **hparams)
