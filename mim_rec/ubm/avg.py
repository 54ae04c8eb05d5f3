"""Average pooling of the behaviour embeddings: the target-agnostic baseline.

The "Base" model of the DIN paper's comparison (Zhou et al., KDD 2018, "Deep Interest Network
for Click-Through Rate Prediction", Sec. 4.2): every behaviour counts equally, whatever the
candidate item is.
"""

from __future__ import annotations

import torch

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import masked_mean


@register_ubm("avg")
class AvgPooling(InterestModule):
    """Mean of the real behaviour embeddings -> ``[B, dim]`` (zeros for an empty history).

    Example::

        ubm = AvgPooling(dim=8)
        out = ubm(target, behaviours, mask, target_category, behaviour_categories)  # [B, 8]
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        return masked_mean(behaviours, mask)
