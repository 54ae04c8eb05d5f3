"""Content and fusion interest (MIM paper, section 3.4).

Both use the same weights ``a_ti = cos(h_t^MM, h_i^MM)`` between the target's and each
behaviour's multi-modal embedding (zero on padding): content interest pools the behaviours'
MM embeddings with them, fusion interest pools their ID embeddings with them -- the content
decides *which* behaviours matter, the ID embeddings carry what collaborative signal they hold.
Weights are the raw cosines, not a softmax, as the paper states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.ubm.layers import zero_padding


def content_weights(target_mm: torch.Tensor, behaviour_mm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a [B, L] = cos(target_mm [B, D], behaviour_mm [B, L, D])``, 0 where ``mask`` is False.

    Padded slots are zeroed before the cosine (a zero vector has cosine 0), not multiplied by the
    mask after it: a NaN or inf left there would survive ``* 0`` and, through the einsum's
    backward, reach the target's gradient."""
    behaviour_mm = zero_padding(behaviour_mm, mask)
    return torch.einsum("bd,bld->bl", F.normalize(target_mm, dim=-1), F.normalize(behaviour_mm, dim=-1))


def content_match(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: the mean and the max of the content weights over the real behaviours (0 for an
    empty history) -- how well the target matches the history's content, as two scalars the
    over-arch need not learn to compute from the concatenated MM vectors."""
    count = mask.sum(dim=1, keepdim=True)
    mean = weights.sum(dim=1, keepdim=True) / count.clamp(min=1)
    best = weights.masked_fill(~mask, -1.0).max(dim=1, keepdim=True).values * (count > 0)
    return torch.cat([mean, best], dim=1)


class ContentMetric(nn.Module):
    """A learned square map ``M`` under the content weights: ``a_ti = cos(M h_t, M h_i)``.

    The paper's weights are fixed cosines of the frozen table, so which directions of the table
    decide "similar" is whatever the encoders made dominant. ``M`` lets the CTR loss reweigh
    them (a Mahalanobis-style metric, ``M^T M``) without touching the table. It starts as the
    identity, so an untrained model computes the paper's weights exactly.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.map = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.map.weight.copy_(torch.eye(dim))

    def forward(self, target_mm: torch.Tensor, behaviour_mm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return content_weights(self.map(target_mm), self.map(behaviour_mm), mask)


class ContentInterestArch(nn.Module):
    """``h^MM_B = sum_i a_ti h_i^MM`` -> ``[B, D_mm]`` (``pool="mean"``: divided by the number of
    real behaviours, so its scale does not grow with the history's length)."""

    def __init__(self, pool: str = "sum") -> None:
        super().__init__()
        self.pool = pool

    def forward(self, weights: torch.Tensor, behaviour_mm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("bl,bld->bd", weights, behaviour_mm)
        if self.pool == "mean":
            pooled = pooled / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return pooled


class FusionInterestArch(nn.Module):
    """``h^Fusion_B = sum_i a_ti h_i^ID`` -> ``[B, D_id]``, same weights as content interest."""

    def forward(self, weights: torch.Tensor, behaviour_ids: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bl,bld->bd", weights, behaviour_ids)
