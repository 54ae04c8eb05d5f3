"""The deep CTR head: an MLP from the concatenated interests and features to one logit."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class OverArch(nn.Module):
    """``[B, in_features] -> [B]`` logits: Linear-ReLU layers of ``hidden`` widths, then Linear(1)."""

    def __init__(self, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers, width = [], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)
