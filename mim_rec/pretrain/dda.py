"""Downstream Data Adaptation: continued pre-training of each tower on the item corpus.

* Titles: masked language modelling (BERT's 15 % rule: of the chosen tokens 80 % become
  [MASK], 10 % a random token, 10 % stay), predicted by a head tied to the input embeddings.
* Images: augmentation-contrastive learning (SimCLR-style): two random views of the same
  item image must be nearer to each other than to the other items' views of the opposite
  side in the (global) batch -- DMA's symmetric CLIP-form InfoNCE with the views as the two
  sides, so N - 1 negatives per direction, not NT-Xent's 2N - 2. Chosen over masked-image modelling because it works the same for CNNs (the default
  EfficientNet) and ViTs, needs no pixel decoder, and reuses the DMA InfoNCE.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.preprocess import ImagePreprocessor
from mim_rec.encoders.text import HFTextEncoder
from mim_rec.pretrain.contrastive import symmetric_info_nce

IGNORE_INDEX = -100


def mask_tokens(input_ids: torch.Tensor, special_tokens: torch.Tensor, mask_token_id: int,
                vocab_size: int, probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. Returns (corrupted ids, labels with IGNORE_INDEX where not predicted).

    ``special_tokens`` is a bool tensor marking [CLS]/[SEP]/[PAD], which are never chosen.
    """
    def rand(shape):
        return torch.rand(shape, generator=generator, device=input_ids.device)

    chosen = (rand(input_ids.shape) < probability) & ~special_tokens
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    corrupted = input_ids.clone()
    to_mask = chosen & (rand(input_ids.shape) < 0.8)
    corrupted[to_mask] = mask_token_id
    to_random = chosen & ~to_mask & (rand(input_ids.shape) < 0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               device=input_ids.device)
    corrupted[to_random] = random_ids[to_random]
    return corrupted, labels


class MaskedLanguageModelling(nn.Module):
    """MLM on titles: transform -> decoder tied to the text tower's word embeddings."""

    def __init__(self, text: HFTextEncoder, probability: float = 0.15) -> None:
        super().__init__()
        hidden = text.feature_dim
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(text.model.config.vocab_size))
        self.probability = probability

    def forward(self, text: HFTextEncoder, titles: Sequence[str]) -> torch.Tensor:
        batch = text.tokenize(titles)
        tokenizer = text.tokenizer
        special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids,
                                                             device=batch["input_ids"].device))
        corrupted, labels = mask_tokens(batch["input_ids"], special, tokenizer.mask_token_id,
                                        len(tokenizer), self.probability)
        states = text.token_states(corrupted, batch["attention_mask"])
        picked = labels != IGNORE_INDEX
        if not picked.any():  # a batch of very short titles: nothing was masked
            return states.sum() * 0.0
        hidden = self.transform(states[picked])
        logits = hidden @ text.model.get_input_embeddings().weight.T + self.bias
        return F.cross_entropy(logits.float(), labels[picked])


def augment(pixels_uint8: torch.Tensor, min_scale: float = 0.35) -> torch.Tensor:
    """One random view per image: resized crop, horizontal flip, brightness/contrast jitter.

    Runs on uint8 ``[B, 3, S, S]`` before normalisation; draws from torch's global RNG, so
    a seeded run (and a resumed one, which restores the RNG) sees the same views.
    """
    batch, _, size, _ = pixels_uint8.shape
    images = pixels_uint8.float() / 255.0
    scale = torch.empty(batch).uniform_(min_scale, 1.0)
    side = (scale.sqrt() * size).clamp(min=4)
    x0 = torch.rand(batch) * (size - side)
    y0 = torch.rand(batch) * (size - side)
    # An affine grid per image: crop window [x0, x0+side] mapped onto the full output.
    theta = torch.zeros(batch, 2, 3)
    flip = torch.where(torch.rand(batch) < 0.5, -1.0, 1.0)
    theta[:, 0, 0] = side / size * flip
    theta[:, 1, 1] = side / size
    theta[:, 0, 2] = (2 * x0 + side) / size - 1
    theta[:, 1, 2] = (2 * y0 + side) / size - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    brightness = torch.empty(batch, 1, 1, 1).uniform_(0.7, 1.3)
    contrast = torch.empty(batch, 1, 1, 1).uniform_(0.7, 1.3)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = ((views - mean) * contrast + mean) * brightness
    return (views.clamp(0, 1) * 255.0).round().to(torch.uint8)


class ImageContrastive(nn.Module):
    """SimCLR-style objective on the vision tower with its own projection head (the head
    is discarded after DDA; the shared-space head is trained by DMA)."""

    def __init__(self, feature_dim: int, dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        self.head = ProjectionHead(feature_dim, dim)
        self.scale = 1.0 / temperature

    def forward(self, vision: nn.Module, processor: ImagePreprocessor,
                pixels_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
        views = torch.cat([augment(pixels_uint8), augment(pixels_uint8)])
        embeddings = self.head(vision(processor.normalize(views).to(device)))
        first, second = embeddings.chunk(2)
        return symmetric_info_nce(first, second, torch.tensor(self.scale, device=device))
