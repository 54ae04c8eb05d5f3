"""Different Modal Alignment: CLIP-style image-title InfoNCE with a learnable temperature,
negatives all-gathered across ranks (see :func:`symmetric_info_nce`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mim_rec.pretrain.contrastive import symmetric_info_nce


class LearnableTemperature(nn.Module):
    """CLIP's learnable logit scale: starts at 1/0.07 and is capped at 100 for stability.

    The cap is applied to the parameter itself before each use (as CLIP clamps it after each
    step), not inside the graph: a clamp in the graph has zero gradient past the cap, so a
    scale that momentum carried over it could never come back down."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            self.log_scale.clamp_(max=self.max_log_scale)
        return self.log_scale.exp()


class ClipLoss(nn.Module):
    """Image-title InfoNCE with a learnable temperature (Different Modal Alignment)."""

    def __init__(self, init_temperature: float = 0.07, gather: bool = True) -> None:
        super().__init__()
        self.temperature = LearnableTemperature(init_temperature)
        self.gather = gather

    def forward(self, image_embeddings: torch.Tensor, title_embeddings: torch.Tensor) -> torch.Tensor:
        return symmetric_info_nce(image_embeddings, title_embeddings, self.temperature(),
                                  self.gather)
