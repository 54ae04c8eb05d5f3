"""SIM: search the long history for relevant behaviours, then attend to those exactly.

Pi et al., CIKM 2020, "Search-based User Interest Modeling with Lifelong Sequential Behavior
Data for Click-Through Rate Prediction" (arXiv 2006.05639). A General Search Unit (GSU) cuts a
history of thousands of behaviours down to the ``top_k`` relevant ones; an Exact Search Unit
(ESU) models the target's interest over that short list. This is SIM(hard): the GSU keeps the
behaviours in the target's category (the paper's deployed variant), most recent first.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import ActivationUnit, gather_positions, masked_softmax, top_k_positions, weighted_sum
from mim_rec.ubm.options import positive_int


def category_search(mask: torch.Tensor, target_category: torch.Tensor, behaviour_categories: torch.Tensor,
                    top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard search: the ``top_k`` most recent real behaviours sharing the target's category.

    Returns ``(indices [B, k], kept [B, k])`` as :func:`top_k_positions` does. Recency is the
    position in the row (the contract stores the most recent behaviour last).
    """
    matches = mask & (behaviour_categories == target_category.unsqueeze(1))
    recency = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32).expand(mask.shape)
    return top_k_positions(recency, matches, top_k)


@register_ubm("sim")
class SIM(InterestModule):
    """GSU = category hard search (``top_k`` most recent same-category behaviours);
    ESU = DIN-style target attention over them -> ``[B, dim]``.

    The paper's ESU is multi-head attention plus time-gap embeddings. Here it is the DIN
    activation unit the other target-attention UBMs share, and there are no time-gap embeddings
    (the seam carries no timestamps). A target whose category never occurs in the history yields
    the zero vector.
    """

    def __init__(self, dim: int, top_k: int = 50, attention_hidden: Sequence[int] = (64, 32),
                 activation: str = "prelu", dropout: float = 0.0) -> None:
        super().__init__(dim)
        self.top_k = positive_int("top_k", top_k)
        self.scorer = ActivationUnit(dim, attention_hidden, activation, dropout)

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        indices, kept = category_search(mask, target_category, behaviour_categories, self.top_k)
        selected = gather_positions(behaviours, indices)
        weights = masked_softmax(self.scorer(target, selected), kept)
        return weighted_sum(weights, selected, kept)
