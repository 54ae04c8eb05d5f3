"""DIN: target attention over the behaviours with the local activation unit.

Zhou et al., KDD 2018, "Deep Interest Network for Click-Through Rate Prediction"
(arXiv 1706.06978): the user's interest is a weighted sum of behaviour embeddings whose
weights an MLP computes from each (candidate item, behaviour) pair.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import ActivationUnit, masked_softmax, weighted_sum
from mim_rec.ubm.options import flag


@register_ubm("din")
class DIN(InterestModule):
    """``sum_l w_l * b_l`` with ``w = activation_unit(target, b)`` -> ``[B, dim]``.

    ``normalize=True`` (default) passes the scores through a softmax over the real behaviours,
    as the authors' released code does; ``normalize=False`` keeps the paper's unnormalised
    weights (Sec. 4.3), which preserve the *intensity* of interest at the cost of an output
    scale that grows with history length. Padding weighs zero either way.
    """

    def __init__(self, dim: int, attention_hidden: Sequence[int] = (64, 32),
                 activation: str = "prelu", dropout: float = 0.0, normalize: bool = True) -> None:
        super().__init__(dim)
        self.scorer = ActivationUnit(dim, attention_hidden, activation, dropout)
        self.normalize = flag("normalize", normalize)

    def attention_weights(self, target: torch.Tensor, behaviours: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` weights; zero at padding, summing to one per non-empty row if ``normalize``."""
        scores = self.scorer(target, behaviours)
        if self.normalize:
            return masked_softmax(scores, mask)
        return torch.where(mask, scores, torch.zeros_like(scores))

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        return weighted_sum(self.attention_weights(target, behaviours, mask), behaviours, mask)
