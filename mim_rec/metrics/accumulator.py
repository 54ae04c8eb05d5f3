"""Accumulate CTR predictions over an evaluation (on every rank), then report all metrics once.

AUC-type metrics do not decompose into per-batch or per-rank pieces, so the accumulator keeps
every (prediction, label, user, category, item age) row and, at :meth:`CtrMetrics.compute`,
all-gathers them across ranks (ranks may hold different row counts) before computing. Every
rank gets the same report.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mim_rec.metrics.functional import (age_bucket_edges, binary_auc, check_edges, count_positives, gauc,
                                        grouped_auc, log_loss)
from mim_rec.utils.dist import collective_device

_FIELDS = ("preds", "labels", "user_id", "category", "item_age_days")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank, in rank order; ranks may differ in length.

    Sizes are exchanged first, then every rank pads to the longest and the padding is cut off
    after the gather (``all_gather`` needs equal shapes).
    """
    device = collective_device()
    local = tensor.to(device)
    size = torch.tensor([local.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[:local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:int(s)] for part, s in zip(gathered, sizes)])


class CtrMetrics:
    """AUC, log loss, GAUC by user, AUC per category and per item-age bucket, across ranks.

    ``age_edges``: the ``num_age_buckets - 1`` inner edges (days) of the item-age buckets. Leave
    ``None`` to take the deciles of the evaluated rows' ages; pass the ``age_edges`` of another
    run's report to bucket two runs identically. Bucket ``S1`` holds the newest items.

    Example::

        metrics = CtrMetrics()
        for batch in loader:
            metrics.update(torch.sigmoid(model(batch)), batch.labels, batch.user_id,
                           batch.target_category, batch.item_age_days)
        report = metrics.compute()   # collective: every rank must call it
    """

    def __init__(self, num_age_buckets: int = 10, age_edges: Optional[Sequence[float]] = None) -> None:
        if num_age_buckets < 1:
            raise ValueError(f"num_age_buckets must be at least 1, got {num_age_buckets}")
        self.num_age_buckets = num_age_buckets
        self.age_edges = None if age_edges is None else check_edges(age_edges, num_age_buckets)
        self.reset()

    def reset(self) -> None:
        self._rows: Dict[str, List[torch.Tensor]] = {name: [] for name in _FIELDS}

    def update(self, preds: torch.Tensor, labels: torch.Tensor, user_id: torch.Tensor,
               category: torch.Tensor, item_age_days: torch.Tensor) -> None:
        """Add one batch. ``preds`` are click probabilities in [0, 1]; ``labels`` are 0/1."""
        columns = {"preds": preds, "labels": labels, "user_id": user_id,
                   "category": category, "item_age_days": item_age_days}
        size = preds.numel()
        for name, column in columns.items():
            if column.numel() != size:
                raise ValueError(f"update(): '{name}' has {column.numel()} values, 'preds' has {size}")
        preds, labels = preds.detach().reshape(-1).float(), labels.detach().reshape(-1).float()
        if not torch.isfinite(preds).all():
            raise ValueError("update(): 'preds' hold NaN or infinity (did the model diverge?)")
        if ((preds < 0) | (preds > 1)).any():
            raise ValueError("update(): 'preds' must be probabilities in [0, 1] (apply sigmoid to logits)")
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError("update(): 'labels' must be 0 or 1")
        ages = item_age_days.detach().reshape(-1).double()
        if not torch.isfinite(ages).all():
            raise ValueError("update(): 'item_age_days' must be finite")
        self._rows["preds"].append(preds)
        self._rows["labels"].append(labels)
        self._rows["user_id"].append(user_id.detach().reshape(-1).long())
        self._rows["category"].append(category.detach().reshape(-1).long())
        self._rows["item_age_days"].append(ages)

    def _all_rows(self) -> Dict[str, torch.Tensor]:
        empty = {"preds": torch.float32, "labels": torch.float32, "user_id": torch.int64,
                 "category": torch.int64, "item_age_days": torch.float64}
        rows = {name: torch.cat(parts) if parts else torch.zeros(0, dtype=empty[name])
                for name, parts in self._rows.items()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = {name: all_gather_rows(column) for name, column in rows.items()}
        return {name: column.cpu() for name, column in rows.items()}

    def compute(self) -> Dict[str, Any]:
        """The report (a JSON-serialisable dict); gathers across ranks when distributed."""
        rows = self._all_rows()
        preds, labels = rows["preds"], rows["labels"]
        if preds.numel() == 0:
            raise ValueError("compute(): no predictions were added (update() was never called on any rank)")
        per_user = grouped_auc(preds, labels, rows["user_id"])
        edges = self.age_edges if self.age_edges is not None else age_bucket_edges(
            rows["item_age_days"], self.num_age_buckets)
        return {
            "n": preds.numel(),
            "positives": count_positives(labels),
            "auc": binary_auc(preds, labels),
            "logloss": log_loss(preds, labels),
            "gauc": gauc(per_user),
            "gauc_users": int(per_user.defined.sum()),
            "per_category": self._per_category(preds, labels, rows["category"]),
            "age_edges": edges,
            "age_deciles": self._age_buckets(preds, labels, rows["item_age_days"], edges),
        }

    @staticmethod
    def _per_category(preds: torch.Tensor, labels: torch.Tensor, category: torch.Tensor) -> Dict[str, Any]:
        """Category -> its AUC, events ``n`` and clicks ``positives``: an AUC over 3 clicks and
        one over 3,000 read alike without the counts."""
        per = grouped_auc(preds, labels, category)
        return {str(cat): {"auc": float(auc) if ok else None, "n": int(n), "positives": int(clicks)}
                for cat, auc, n, clicks, ok in zip(per.groups.tolist(), per.auc.tolist(), per.count.tolist(),
                                                   per.positives.tolist(), per.defined.tolist())}

    @staticmethod
    def _age_buckets(preds: torch.Tensor, labels: torch.Tensor, ages: torch.Tensor,
                     edges: List[float]) -> List[Dict[str, Any]]:
        bucket = torch.bucketize(ages, torch.tensor(edges, dtype=torch.float64), right=False)
        report = []
        for i in range(len(edges) + 1):
            inside = bucket == i
            upper = edges[i] if i < len(edges) else (float(ages.max()) if inside.any() else None)
            report.append({"bucket": f"S{i + 1}", "age_days_max": upper,
                           "auc": binary_auc(preds[inside], labels[inside]), "n": int(inside.sum()),
                           "positives": count_positives(labels[inside])})
        return report
