"""C-SFT objectives: multi-level InfoNCE, and the cross-entropy baselines of the paper's Table 4.

Every query ``i`` is scored against one shared candidate set (the ST-NSG negatives of
:mod:`mim_rec.csft.negatives`): column ``positive_index[i]`` is its positive, and any *other*
column holding the same item id is not a negative at all (the item appears twice: clicked by
two queries of the batch, or queued from an earlier batch), so it is masked out of the softmax
instead of being pushed away. Similarities are cosines divided by a temperature ``τ``:

    L_level = −1/N Σ_i log( exp(cos(q_i, c_p(i)) / τ) / Σ_{j usable} exp(cos(q_i, c_j) / τ) )
    L       = L_q2item + α · L_q2txt + β · L_q2img

where the three levels score the same candidate items through their fused ``h^MM``, their
title embedding and their image embedding (paper section 3.3; α = β = 0.5 there).
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn.functional as F

LEVELS = ("item", "txt", "img")


def usable_columns(candidate_ids: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` bool: the positive's column, plus every column that is a true negative
    (another item id)."""
    rows = torch.arange(positive_index.numel(), device=positive_index.device)
    positive_ids = candidate_ids[positive_index]
    usable = candidate_ids.unsqueeze(0) != positive_ids.unsqueeze(1)
    usable[rows, positive_index] = True
    return usable


def negatives_per_query(candidate_ids: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """How many true negatives each query is contrasted with."""
    return usable_columns(candidate_ids, positive_index).sum(1) - 1


def cosine_logits(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
             positive_index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of the softmax cross-entropy of the positive among usable columns."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = cosine_logits(queries, candidates) / temperature
    mask = usable_columns(candidate_ids, positive_index)
    logits = logits.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits, positive_index)


def multi_level_info_nce(queries: torch.Tensor, candidates: Mapping[str, torch.Tensor],
                         candidate_ids: torch.Tensor, positive_index: torch.Tensor,
                         temperature: float, alpha: float, beta: float) -> Dict[str, torch.Tensor]:
    """``{"loss": L, "q2item": ..., "q2txt": ..., "q2img": ...}``; a level whose weight is 0
    is skipped (not computed), which is the "w/o multi-level InfoNCE" ablation."""
    weights = {"item": 1.0, "txt": alpha, "img": beta}
    losses: Dict[str, torch.Tensor] = {}
    total = queries.new_zeros((), dtype=torch.float32)
    for level in LEVELS:
        if weights[level] == 0:
            continue
        losses[f"q2{level}"] = info_nce(queries, candidates[level], candidate_ids,
                                        positive_index, temperature)
        total = total + weights[level] * losses[f"q2{level}"]
    return {"loss": total, **losses}


def pairwise_cross_entropy(queries: torch.Tensor, candidates: torch.Tensor,
                           candidate_ids: torch.Tensor, positive_index: torch.Tensor,
                           logit_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The "CE classifier" baseline: each (query, candidate) pair is classified on its own
    as match / no match, ``p = σ(scale · cos + bias)``, with binary cross-entropy.

    Unlike InfoNCE, no candidate competes with another for the query. The positives' and
    the negatives' mean losses are added with equal weight, so the many negatives do not
    drown the one positive per query.
    """
    logits = logit_scale * cosine_logits(queries, candidates) + bias
    mask = usable_columns(candidate_ids, positive_index)
    is_positive = torch.zeros_like(mask)
    is_positive[torch.arange(positive_index.numel(), device=mask.device), positive_index] = True
    targets = is_positive.to(logits.dtype)
    per_pair = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    negatives = mask & ~is_positive
    loss = per_pair[is_positive].mean()
    return loss + per_pair[negatives].mean() if negatives.any() else loss
