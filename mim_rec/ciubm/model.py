"""CiUBM: the content-interest-aware user behaviour model (MIM paper, section 3.4).

``logit = OverArch(concat(ID interest, content interest, fusion interest, target ID and MM
embeddings, user, query, dense))``. Base = the ID interest module alone (no MM table at all);
Base+MIM = all three modules. Each module is switched by :class:`ModelConfig`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from mim_rec.ciubm.config import ModelConfig
from mim_rec.ciubm.interest import (ContentInterestArch, ContentMetric, FusionInterestArch, content_match,
                                   content_weights)
from mim_rec.ciubm.over import OverArch
from mim_rec.ciubm.sparse import SparseArch
from mim_rec.ciubm.whitening import MMWhitening
from mim_rec.data.loader import DENSE_FEATURES, CtrBatch
from mim_rec.ubm import build_ubm
from mim_rec.ubm.layers import zero_padding


class CiUBM(nn.Module):
    """The CTR model. ``forward(batch) -> (logits [B], auxiliary loss or None)``.

    The behaviours' ID and MM rows enter the interest modules with their padded slots zeroed
    (after whitening, which would move a zero row off zero), so whatever a lookup leaves there
    reaches no interest and no gradient. The auxiliary loss counts only the rows of weight > 0:
    the rows a loader pads a batch with train nothing, as in the CTR loss.
    """

    def __init__(self, config: ModelConfig, num_items: int, num_users: int, num_categories: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if not (config.id_interest or config.uses_mm):
            raise ValueError("CiUBM needs at least one interest module switched on")
        self.config = config
        self.sparse_arch = SparseArch(config, num_items, num_users, num_categories, device)
        self.id_interest = build_ubm(config.ubm, config.behaviour_dim, **config.ubm_options) \
            if config.id_interest else None
        self.content_interest = ContentInterestArch(config.content_pool) if config.content_interest else None
        self.fusion_interest = FusionInterestArch() if config.fusion_interest else None
        width = config.behaviour_dim + config.user_dim + config.query_dim + len(DENSE_FEATURES)
        width += self.id_interest.output_dim if self.id_interest is not None else 0
        # The model's view of the frozen table: whitened (fixed buffers) and/or projected (learned).
        whitened = config.mm_whiten_components if config.uses_mm else None
        self.mm_whitening = MMWhitening(config.mm_dim, whitened, device) if whitened else None
        looked_up = whitened or config.mm_dim
        self.content_metric = ContentMetric(looked_up) if config.uses_mm and config.content_metric else None
        mm_width = config.mm_projection or looked_up
        self.mm_projection = nn.Linear(looked_up, config.mm_projection) \
            if config.uses_mm and config.mm_projection else nn.Identity()
        width += mm_width if config.content_interest else 0
        width += mm_width if config.uses_mm and config.target_mm else 0
        width += config.behaviour_dim if config.fusion_interest else 0
        width += 2 if config.uses_mm and config.content_match else 0
        self.over_arch = OverArch(width, config.over_arch)

    def forward(self, batch: CtrBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        size = batch.labels.numel()
        pooled, ids, mm, slot_present, categories = self.sparse_arch(batch.pooled, batch.sequence, size,
                                                                     batch.slots)
        mask = slot_present[:, 1:]
        target_ids, behaviour_ids = ids[:, 0], zero_padding(ids[:, 1:], mask)
        parts = [target_ids, pooled["user_id"], pooled["query_tokens"], batch.dense_features]
        aux = None
        if self.id_interest is not None:
            parts.append(self.id_interest(target_ids, behaviour_ids, mask, categories[:, 0], categories[:, 1:]))
            aux = self.id_interest.auxiliary_loss(rows=batch.meta["weight"] > 0)
        if mm is not None:
            if self.mm_whitening is not None:
                mm = self.mm_whitening(mm)
            target_mm, behaviour_mm = mm[:, 0], zero_padding(mm[:, 1:], mask)
            weights = content_weights(target_mm, behaviour_mm, mask) if self.content_metric is None \
                else self.content_metric(target_mm, behaviour_mm, mask)
            if self.config.target_mm:
                parts.append(self.mm_projection(target_mm))
            if self.content_interest is not None:
                parts.append(self.mm_projection(self.content_interest(weights, behaviour_mm, mask)))
            if self.config.content_match:
                parts.append(content_match(weights, mask))
            if self.fusion_interest is not None:
                parts.append(self.fusion_interest(weights, behaviour_ids))
        return self.over_arch(torch.cat(parts, dim=1)), aux
