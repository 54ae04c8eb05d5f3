"""BST: a transformer encoder over the behaviour sequence together with the target item.

Chen et al., DLP-KDD 2019, "Behavior Sequence Transformer for E-commerce Recommendation in
Alibaba" (arXiv 1905.06874): the target item is appended to the behaviours, each token gets a
position embedding, and self-attention lets every behaviour interact with every other and with
the target.
"""

from __future__ import annotations

import torch
from torch import nn

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import PositionalEmbedding, masked_mean, recency_positions, zero_padding
from mim_rec.ubm.options import positive_int, probability


@register_ubm("bst")
class BST(InterestModule):
    """Transformer over ``[target, behaviours...]`` -> pooled sequence output ``[B, dim]``.

    Positions: the paper embeds the time gap to the target; the seam carries no timestamps, so
    the position is the recency rank (target 0, most recent behaviour 1, ...), which plays the
    same role. Padding is a key-padding mask, so it is never attended to; the target token is
    always real, so an empty history is well defined (the target attends to itself).

    The layer is torch's pre-LN encoder layer with a GELU feed-forward and the position embedding
    is added to each token; the paper's layer is post-LN (``LayerNorm(S + Dropout(MH(S)))``) with
    a LeakyReLU feed-forward, and it concatenates the position embedding to the item's.

    ``pooling``: ``"target"`` (default) returns the target token's output, i.e. what the
    target read from the history; ``"mean"`` averages the behaviour tokens' outputs (the paper
    concatenates all of them, which needs a fixed length; the mean is its length-free form).
    """

    def __init__(self, dim: int, num_heads: int = 2, num_layers: int = 1, ffn_dim: int | None = None,
                 dropout: float = 0.1, max_positions: int = 512, pooling: str = "target") -> None:
        super().__init__(dim)
        if pooling not in ("target", "mean"):
            raise ValueError(f"pooling must be 'target' or 'mean', got {pooling!r}")
        self.pooling = pooling
        self.positions = PositionalEmbedding(max_positions, dim)
        feedforward = 4 * dim if ffn_dim is None else positive_int("ffn_dim", ffn_dim)
        layer = nn.TransformerEncoderLayer(dim, positive_int("num_heads", num_heads), dim_feedforward=feedforward,
                                           dropout=probability("dropout", dropout), activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, positive_int("num_layers", num_layers),
                                             enable_nested_tensor=False)

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([target.unsqueeze(1), behaviours], dim=1)
        real = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        positions = torch.cat([mask.new_zeros(mask.shape[0], 1, dtype=torch.long),
                               recency_positions(mask) + 1], dim=1)
        tokens = zero_padding(tokens + self.positions(positions), real)
        encoded = self.encoder(tokens, src_key_padding_mask=~real)
        if self.pooling == "target":
            return encoded[:, 0]
        return masked_mean(encoded[:, 1:], mask)
