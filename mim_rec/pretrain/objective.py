"""The stage-1 training module: the encoder pair plus every pre-training head, with one
forward per phase, so a single DDP wrapper and optimizer serve the whole run."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from mim_rec.encoders.pair import EncoderPair
from mim_rec.encoders.vision import PrecomputedVisionEncoder
from mim_rec.pretrain.dda import ImageContrastive, MaskedLanguageModelling
from mim_rec.pretrain.dma import ClipLoss

PHASES = ("dda", "dma")


class PretrainObjective(nn.Module):
    """``forward(phase, titles, images)`` -> named losses, ``loss`` being the one to step on.

    * ``dda``: ``mlm`` on titles + ``image_ssl_weight`` x ``image_ssl`` on two views.
    * ``dma``: ``clip`` between the projected image and title embeddings.

    ``images`` is uint8 pixels ``[B, 3, S, S]`` (normalised here, after augmentation) or,
    for a precomputed vision tower, float features ``[B, F]``.
    """

    def __init__(self, pair: EncoderPair, mlm_probability: float = 0.15,
                 image_ssl_weight: float = 1.0, ssl_dim: int = 128) -> None:
        super().__init__()
        self.pair = pair
        self.mlm = MaskedLanguageModelling(pair.text, mlm_probability)
        self.pixels = not isinstance(pair.vision, PrecomputedVisionEncoder)
        self.image_ssl = ImageContrastive(pair.vision.feature_dim, ssl_dim) if self.pixels else None
        self.image_ssl_weight = image_ssl_weight
        self.clip = ClipLoss()

    def model_inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.pixels:
            return self.pair.vision.image_processor.normalize(images).to(device)
        return images.to(device)

    def forward(self, phase: str, titles: Sequence[str], images: torch.Tensor) -> Dict[str, torch.Tensor]:
        device = self.clip.temperature.log_scale.device
        if phase == "dda":
            losses = {"mlm": self.mlm(self.pair.text, titles)}
            loss = losses["mlm"]
            if self.image_ssl is not None and self.image_ssl_weight > 0:
                losses["image_ssl"] = self.image_ssl(self.pair.vision,
                                                     self.pair.vision.image_processor,
                                                     images, device)
                loss = loss + self.image_ssl_weight * losses["image_ssl"]
            return {"loss": loss, **losses}
        if phase == "dma":
            clip = self.clip(self.pair.embed_images(self.model_inputs(images, device)),
                             self.pair.embed_titles(titles))
            return {"loss": clip, "clip": clip,
                    "temperature": 1.0 / self.clip.temperature().detach()}
        raise ValueError(f"unknown pre-training phase '{phase}'; expected one of {PHASES}")
