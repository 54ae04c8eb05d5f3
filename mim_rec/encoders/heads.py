"""Projection heads: each tower's features to the shared (L2-normalised) space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, then L2 normalisation.

    The LayerNorm puts a CNN's pooled activations and a transformer's mean-pooled states on
    a common scale before mixing; the output is unit-norm so dot products are cosines.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 even under bf16 autocast: contrastive logits need the precision.
        return F.normalize(self.net(features).float(), dim=-1)
