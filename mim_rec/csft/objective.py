"""The C-SFT training module: both towers, the loss's own parameters and the ST-NSG state,
behind one ``forward(batch, step)`` so a single DDP wrapper and optimizer serve every variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.csft.config import LossConfig, LossKind, NegativesConfig
from mim_rec.csft.losses import multi_level_info_nce, negatives_per_query, pairwise_cross_entropy
from mim_rec.csft.model import CsftModel, ItemEmbeddings
from mim_rec.csft.negatives import SpaceTimeNegatives


@dataclass
class CsftBatch:
    """One rank's step. The first ``num_queries`` item rows are the queries' positives (row
    ``i`` belongs to query ``i``), any further rows their hard negatives.

    With ``features=True`` the tensors are backbone features (frozen backbones, cached);
    otherwise vision inputs (normalised pixels or feature vectors) and raw titles.
    """

    queries: torch.Tensor
    item_images: torch.Tensor
    item_titles: Union[torch.Tensor, List[str]]
    item_ids: torch.Tensor
    item_categories: torch.Tensor
    features: bool

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]


class CsftObjective(nn.Module):
    """``forward(batch, step)`` -> named losses (``loss`` is the one to step on) and the
    number of negatives each query saw."""

    def __init__(self, model: CsftModel, loss: LossConfig, negatives: NegativesConfig,
                 num_categories: int) -> None:
        super().__init__()
        if loss.kind not in get_args(LossKind):
            raise ValueError(f"unknown loss '{loss.kind}': expected one of {get_args(LossKind)}")
        self.model = model
        self.loss = loss
        self.negatives = SpaceTimeNegatives(negatives.queue_batches, negatives.all_gather)
        if loss.kind == "pairwise_ce":
            # p(match) = σ(scale · cos + bias); the scale starts where a temperature of 0.1 is.
            self.logit_scale = nn.Parameter(torch.tensor(10.0))
            self.logit_bias = nn.Parameter(torch.tensor(0.0))
        if loss.kind == "category_ce":
            self.classifier = nn.Linear(model.items.dim, num_categories)

    def refresh_queue_from(self, item_features: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Re-embed queued items with the current weights at every step, from their cached
        backbone features ``item_features(item_ids) -> (image, title)``: a queue without
        staleness (see :mod:`mim_rec.csft.negatives`). Chunked: the full TFN vector of a
        whole queue would not fit comfortably in memory."""
        def refresh(ids: torch.Tensor, chunk: int = 256) -> Dict[str, torch.Tensor]:
            parts = [self.levels(self.model.items.from_features(*item_features(ids[s:s + chunk])))
                     for s in range(0, ids.numel(), chunk)]
            return {level: torch.cat([p[level] for p in parts]) for level in parts[0]}

        self.negatives.refresh = refresh

    def embed_items(self, batch: CsftBatch) -> ItemEmbeddings:
        items = self.model.items
        if batch.features:
            return items.from_features(batch.item_images, batch.item_titles)
        return items(batch.item_images, batch.item_titles)

    def embed_queries(self, batch: CsftBatch) -> torch.Tensor:
        queries = self.model.queries
        return queries.from_features(batch.queries) if batch.features else queries(batch.queries)

    def levels(self, items: ItemEmbeddings) -> Dict[str, torch.Tensor]:
        """The item levels the loss scores (and the queue keeps)."""
        levels = {"item": items.mm}
        if self.loss.kind == "infonce":
            if self.loss.alpha:
                levels["txt"] = items.txt
            if self.loss.beta:
                levels["img"] = items.img
        return levels

    def forward(self, batch: CsftBatch, step: int) -> Dict[str, torch.Tensor]:
        items = self.embed_items(batch)
        if self.loss.kind == "category_ce":
            loss = F.cross_entropy(self.classifier(items.mm), batch.item_categories)
            return {"loss": loss, "category_ce": loss}
        queries = self.embed_queries(batch)
        candidates = self.negatives(step, self.levels(items), batch.item_ids, batch.num_queries)
        if self.loss.kind == "infonce":
            losses = multi_level_info_nce(queries, candidates.embeddings, candidates.item_ids,
                                          candidates.positive_index, self.loss.temperature,
                                          self.loss.alpha, self.loss.beta)
        else:
            loss = pairwise_cross_entropy(queries, candidates.embeddings["item"],
                                          candidates.item_ids, candidates.positive_index,
                                          self.logit_scale, self.logit_bias)
            losses = {"loss": loss, "pairwise_ce": loss}
        count = negatives_per_query(candidates.item_ids, candidates.positive_index)
        return {**losses, "negatives": count.float().mean().detach()}
