"""The deep CTR head: an MLP from the concatenated interests and features to one logit.

``input_norm="batch"`` standardises every input feature over the batch first (a
``BatchNorm1d``, as DIN's reference implementation puts before its MLP): the inputs live on
very different scales (ID embeddings near zero, unit or whitened MM vectors, a content
interest that sums up to ``max_hist_len`` of them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class OverArch(nn.Module):
    """``[B, in_features] -> [B]`` logits: an optional input BatchNorm, Linear-ReLU layers of
    ``hidden`` widths, then Linear(1)."""

    def __init__(self, in_features: int, hidden: Sequence[int], input_norm: str = "none") -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(in_features) if input_norm == "batch" else nn.Identity()
        layers, width = [], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.input_norm(features)).squeeze(-1)
