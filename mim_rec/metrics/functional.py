"""Stateless CTR metrics on whole prediction tensors: AUC, grouped AUC, GAUC, log loss, age buckets.

Overall AUC is torchmetrics' exact (non-binned) ``binary_auroc``. Per-group AUC over many
groups (every user for GAUC, every category) uses one vectorised Mann-Whitney rank computation
instead of one torchmetrics call per group; tests check it against ``binary_auroc`` group by
group, ties included (a tied positive/negative pair counts one half in both).

An AUC is ``None`` wherever only one class is present: it is undefined there, and a silent 0.5
or 0 would read as a real result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def count_positives(labels: torch.Tensor) -> int:
    """How many of the 0/1 ``labels`` are 1, exactly (a float32 sum stops counting at 2**24)."""
    return int(torch.count_nonzero(labels))


def binary_auc(preds: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    """ROC AUC of ``preds`` (probabilities) against 0/1 ``labels``; ``None`` if one class only."""
    positives = count_positives(labels)
    if positives == 0 or positives == labels.numel():
        return None
    return float(binary_auroc(preds, labels.long(), thresholds=None, validate_args=False))


def log_loss(preds: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> Optional[float]:
    """Mean binary cross-entropy in float64, probabilities clipped to ``[eps, 1 - eps]``."""
    if labels.numel() == 0:
        return None
    probs = preds.double().clamp(eps, 1 - eps)
    return float(F.binary_cross_entropy(probs, labels.double()))


@dataclass
class GroupedAuc:
    """Per-group AUC: ``groups[i]`` has ``count[i]`` rows, ``positives[i]`` of them positive.

    ``auc[i]`` is NaN where a group has a single class (see :attr:`defined`).
    """

    groups: torch.Tensor
    auc: torch.Tensor
    count: torch.Tensor
    positives: torch.Tensor

    @property
    def defined(self) -> torch.Tensor:
        return (self.positives > 0) & (self.positives < self.count)


def grouped_auc(preds: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> GroupedAuc:
    """AUC within every group at once, by the rank-sum (Mann-Whitney U) formula.

    ``AUC_g = (R_g - P_g (P_g + 1) / 2) / (P_g N_g)``, with ``R_g`` the sum of the positives'
    ranks inside group ``g`` (ties get their average rank), ``P_g``/``N_g`` its positive and
    negative counts. Sorting once by (group, score) gives every group's ranks in one pass.
    """
    n = preds.numel()
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    group, score, label = groups[order], preds[order], labels[order].double()

    group_starts = torch.ones(n, dtype=torch.bool, device=preds.device)
    group_starts[1:] = group[1:] != group[:-1]
    tie_starts = group_starts.clone()
    tie_starts[1:] |= score[1:] != score[:-1]
    group_index = group_starts.cumsum(0) - 1
    tie_index = tie_starts.cumsum(0) - 1

    position = torch.arange(n, device=preds.device)
    first_of_group = position[group_starts]
    rank = (position - first_of_group[group_index] + 1).double()
    num_ties = int(tie_index[-1]) + 1 if n else 0
    tie_count = torch.bincount(tie_index, minlength=num_ties).double()
    tie_rank = torch.zeros(num_ties, dtype=torch.float64, device=preds.device).index_add_(0, tie_index, rank)
    average_rank = (tie_rank / tie_count)[tie_index]

    num_groups = first_of_group.numel()
    count = torch.bincount(group_index, minlength=num_groups)
    positives = torch.zeros(num_groups, dtype=torch.float64, device=preds.device).index_add_(0, group_index, label)
    positive_rank_sum = torch.zeros_like(positives).index_add_(0, group_index, average_rank * label)
    negatives = count.double() - positives
    auc = (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return GroupedAuc(group[group_starts], auc, count, positives.long())


def gauc(per_user: GroupedAuc) -> Optional[float]:
    """Impression-weighted mean of per-user AUC over users with both labels (``None`` if none)."""
    defined = per_user.defined
    if not defined.any():
        return None
    weights = per_user.count[defined].double()
    return float((per_user.auc[defined] * weights).sum() / weights.sum())


def age_bucket_edges(ages: torch.Tensor, num_buckets: int = 10) -> List[float]:
    """The ``num_buckets - 1`` inner quantile edges of ``ages`` (lower-value quantiles).

    Bucket ``i`` (0 = newest) holds ages in ``(edges[i-1], edges[i]]``; with many equal ages
    some edges coincide and their buckets are empty, which is reported, not hidden.
    """
    if ages.numel() == 0:
        raise ValueError("cannot compute age buckets from an empty evaluation set")
    ordered = ages.double().sort().values
    # floor(k / B * (n - 1)) in integers: the float product rounds 0.7 x 90 down to 62.999...
    index = (torch.arange(1, num_buckets) * (ordered.numel() - 1) // num_buckets).to(ordered.device)
    return ordered[index].tolist()


def check_edges(edges: Sequence[float], num_buckets: int) -> List[float]:
    """Validate user-given bucket edges: ``num_buckets - 1`` finite, non-decreasing numbers."""
    edges = [float(e) for e in edges]
    if len(edges) != num_buckets - 1:
        raise ValueError(f"{num_buckets} buckets need {num_buckets - 1} edges, got {len(edges)}")
    if any(b < a for a, b in zip(edges, edges[1:])) or not all(math.isfinite(e) for e in edges):
        raise ValueError(f"bucket edges must be finite and non-decreasing, got {edges}")
    return edges
