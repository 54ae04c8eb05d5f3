"""Layers shared by the user-behaviour models (one implementation each, reused everywhere).

Conventions for every function here:

* ``mask`` is a bool tensor, ``True`` for a real behaviour and ``False`` for padding.
* Padding never influences a result: padded entries are replaced with ``torch.where`` (not
  multiplied by zero, which would let a NaN or inf in a padded slot leak through), and padded
  scores are overwritten before any softmax or top-k.
* A row with no real behaviour is well defined: its attention weights are all zero, so every
  pooled vector of such a row is the zero vector rather than NaN.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from mim_rec.ubm.options import positive_int, positive_ints, probability

_ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int | None = None,
        activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> activation -> dropout`` per hidden size, then an optional plain ``Linear``.

    The trailing projection has no activation so the MLP can end in a logit or a score.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
    dropout = probability("dropout", dropout)
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the real entries only; all-padding rows get all-zero weights (not NaN).

    Padding is filled with the dtype's most negative *finite* value rather than ``-inf``: a row
    of ``-inf`` makes softmax NaN, and the NaN would come back through its backward pass even
    after ``torch.where`` discards it.
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=dim)
    return torch.where(mask, weights, torch.zeros_like(weights))


def zero_padding(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values [B, L, D]`` with every padded position replaced by zeros (``torch.where``, so a
    NaN or inf there reaches neither a result nor, through backward, a gradient)."""
    return torch.where(mask.unsqueeze(-1), values, torch.zeros_like(values))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, L, D]`` over real positions -> ``[B, D]``; zero for empty rows."""
    kept = zero_padding(values, mask)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(values.dtype)
    return kept.sum(dim=1) / count


def weighted_sum(weights: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_l weights[b, l] * values[b, l]`` over real positions: ``[B, L] x [B, L, D] -> [B, D]``."""
    kept = zero_padding(values, mask)
    return torch.bmm(weights.unsqueeze(1), kept).squeeze(1)


class ActivationUnit(nn.Module):
    """DIN's local activation unit: a target-attention scorer ``(target, behaviour) -> score``.

    Scores ``MLP([t, b, t - b, t * b])`` for every behaviour ``b``; the difference and product
    terms give the MLP the explicit target/behaviour interaction that Zhou et al. (KDD 2018,
    "Deep Interest Network for Click-Through Rate Prediction", Sec. 4.3) feed it.

    Example::

        unit = ActivationUnit(dim=8)
        scores = unit(torch.randn(4, 8), torch.randn(4, 10, 8))  # [4, 10]

    ``attention_hidden`` is the option of that name of every UBM that scores with this unit, so
    its check names it.
    """

    def __init__(self, dim: int, attention_hidden: Sequence[int] = (64, 32),
                 activation: str = "prelu", dropout: float = 0.0) -> None:
        super().__init__()
        hidden = positive_ints("attention_hidden", attention_hidden)
        self.net = mlp(4 * dim, hidden, out_dim=1, activation=activation, dropout=dropout)

    def forward(self, target: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        query = target.unsqueeze(1).expand_as(keys)
        features = torch.cat([query, keys, query - keys, query * keys], dim=-1)
        return self.net(features).squeeze(-1)


class ProjectedDotScorer(nn.Module):
    """Multi-head scaled dot-product target attention scores, linear in the sequence length.

    ``score[b, h, l] = <W_q t_b, W_k k_bl>_h / sqrt(d_head)``. Unlike :class:`ActivationUnit`
    there is no per-(target, behaviour) MLP, so scoring a thousand behaviours costs one
    ``[L, D] x [D, D]`` projection plus a dot product: cheap enough to score a whole long
    history, which is what TWIN's consistency-preserving search needs.
    """

    def __init__(self, dim: int, num_heads: int = 1) -> None:
        super().__init__()
        if dim % positive_int("num_heads", num_heads):
            raise ValueError(f"num_heads={num_heads}: must be a positive divisor of dim {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)

    def forward(self, target: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``target [B, D]``, ``keys [B, L, D]`` -> scores ``[B, H, L]``."""
        batch, length, _ = keys.shape
        q = self.query(target).view(batch, self.num_heads, 1, self.head_dim)
        k = self.key(keys).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        return (q * k).sum(-1) / math.sqrt(self.head_dim)


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by an attention score (DIEN's AUGRU).

    ``u'_t = a_t * u_t`` and ``h_t = (1 - u'_t) * h_{t-1} + u'_t * h~_t`` (Zhou et al., AAAI
    2019, "Deep Interest Evolution Network for Click-Through Rate Prediction", Eq. 6-7): a
    behaviour unrelated to the target (``a_t`` near 0) barely moves the interest state.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gates = nn.Linear(input_dim + hidden_dim, 2 * hidden_dim)
        self.candidate_input = nn.Linear(input_dim, hidden_dim)
        self.candidate_hidden = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``x [B, D_in]``, ``hidden [B, D_h]``, ``attention [B]`` -> new hidden ``[B, D_h]``."""
        reset, update = torch.sigmoid(self.gates(torch.cat([x, hidden], dim=-1))).chunk(2, dim=-1)
        candidate = torch.tanh(self.candidate_input(x) + reset * self.candidate_hidden(hidden))
        update = attention.unsqueeze(-1) * update
        return (1 - update) * hidden + update * candidate


def recency_positions(mask: torch.Tensor) -> torch.Tensor:
    """Recency rank of each real behaviour: 0 for the most recent, 1 for the one before, ...

    Behaviours are stored oldest first (most recent last) in the data contract; counting real
    entries from the right makes the rank independent of where the padding sits.
    Padded positions get rank 0 (they are masked wherever the rank is used).
    """
    from_right = mask.flip(1).long().cumsum(1).flip(1)
    return torch.where(mask, from_right - 1, torch.zeros_like(from_right))


class PositionalEmbedding(nn.Module):
    """Learned embedding of a recency rank, clamped to ``max_positions - 1`` for longer histories."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = positive_int("max_positions", max_positions)
        self.table = nn.Embedding(max_positions, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions.clamp(max=self.max_positions - 1))


def top_k_positions(scores: torch.Tensor, mask: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` best-scoring real behaviours per row, and which of them are real.

    ``scores [B, L]``, ``mask [B, L]`` -> ``(indices [B, k'], kept [B, k'])`` with
    ``k' = min(k, L)``. Rows with fewer than ``k`` real behaviours fill the remaining slots
    with padding positions, flagged ``False`` in ``kept``.
    """
    k = min(k, scores.shape[1])
    _, indices = scores.masked_fill(~mask, float("-inf")).topk(k, dim=1)
    return indices, mask.gather(1, indices)


def gather_positions(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``values [B, L, ...]`` at ``indices [B, k]`` -> ``[B, k, ...]`` (one gather, no loop)."""
    index = indices.reshape(indices.shape + (1,) * (values.dim() - 2))
    return values.gather(1, index.expand(indices.shape + values.shape[2:]))
