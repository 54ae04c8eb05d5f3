"""TWIN: one target-attention scorer for both the search over the long history and the ESU.

Chang et al., KDD 2023, "TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling
in CTR Prediction at Kuaishou" (arXiv 2302.02352). SIM's GSU ranks behaviours by a criterion
(category, or a separately trained embedding) that disagrees with what the ESU attends to; TWIN
makes the two stages *consistent* by ranking the whole history with the ESU's own target-
attention scores, kept cheap by a linear-projection (dot-product) scorer.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import ProjectedDotScorer, gather_positions, masked_softmax, top_k_positions, weighted_sum
from mim_rec.ubm.options import positive_int


@register_ubm("twin")
class TWIN(InterestModule):
    """GSU: score every behaviour with the shared scorer, keep the ``top_k`` best;
    ESU: multi-head target attention over those with the *same* scorer -> ``[B, dim]``.

    The GSU ranks by the heads' mean score, the ESU softmaxes each head's scores over the kept
    behaviours, pools per-head value projections and mixes the heads with an output projection.
    Because the scorer is shared, the ESU's scores are the GSU's scores gathered, not recomputed.
    """

    def __init__(self, dim: int, top_k: int = 50, num_heads: int = 2) -> None:
        super().__init__(dim)
        self.scorer = ProjectedDotScorer(dim, num_heads)
        self.top_k, self.num_heads = positive_int("top_k", top_k), num_heads
        self.value = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim)

    def search(self, target: torch.Tensor, behaviours: torch.Tensor,
               mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GSU: ``(indices [B, k], kept [B, k], head scores of the kept [B, H, k])``."""
        scores = self.scorer(target, behaviours)
        indices, kept = top_k_positions(scores.mean(dim=1), mask, self.top_k)
        head_index = indices.unsqueeze(1).expand(-1, self.num_heads, -1)
        return indices, kept, scores.gather(2, head_index)

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        indices, kept, scores = self.search(target, behaviours, mask)
        batch, k = indices.shape
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        weights = masked_softmax(scores, kept.unsqueeze(1))                              # [B, H, k]
        values = self.value(gather_positions(behaviours, indices))                        # [B, k, D]
        values = values.view(batch, k, heads, head_dim).transpose(1, 2).reshape(batch * heads, k, head_dim)
        kept_per_head = kept.repeat_interleave(heads, dim=0)
        pooled = weighted_sum(weights.reshape(batch * heads, k), values, kept_per_head)   # [B*H, d]
        # an empty history is no interest (zero, as in the other UBMs), not the output's bias
        return self.output(pooled.view(batch, self.dim)) * kept.any(dim=1, keepdim=True)
