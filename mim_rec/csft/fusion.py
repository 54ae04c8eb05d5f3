"""Fusing an item's image and title embeddings into one multi-modal vector ``h^MM``.

Tensor Fusion (Zadeh et al., 2017) builds ``z = [h_img; 1] ⊗ [h_txt; 1]``: the appended 1s
keep both unimodal vectors inside ``z`` next to every bimodal product ``h_img[a] · h_txt[b]``,
so an MLP over ``z`` can model how a colour in the picture and a word in the title *interact*
-- which a concatenation cannot express in one layer.

The flattened ``z`` has ``(d_img + 1)(d_txt + 1)`` entries (66,049 for two 256-d inputs), and the
first MLP layer dominates the parameter count. :class:`LowRankTensorFusion` (Liu et al., 2018)
replaces that layer by a rank-``r`` CP factorisation of its weight, ``W[h, a, b] = Σ_k
U_k[h, a] V_k[h, b]``, so ``W vec(z) = Σ_k (U_k [h_img; 1]) ∘ (V_k [h_txt; 1])`` and the outer
product is never formed. :class:`ConcatFusion` is the ablation without TFN.

Every fusion maps ``(a [B, d_a], b [B, d_b]) -> [B, hidden]`` (the first layer's
pre-activation); :class:`FusionMLP` adds the activation and output layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

FusionKind = Literal["tfn", "lowrank", "concat"]


def with_one(x: torch.Tensor) -> torch.Tensor:
    """``[x; 1]`` along the last dimension."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def tensor_fusion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``vec([a; 1] ⊗ [b; 1])``, row by row: ``[B, (d_a + 1)(d_b + 1)]``, index ``i·(d_b+1) + j``."""
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"fusion inputs differ in batch shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    outer = with_one(a).unsqueeze(-1) * with_one(b).unsqueeze(-2)
    return outer.flatten(-2)


class TensorFusion(nn.Module):
    """A linear layer over the full tensor-fusion vector."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear((dim_a + 1) * (dim_b + 1), hidden)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.linear(tensor_fusion(a, b))


class LowRankTensorFusion(nn.Module):
    """``Σ_k (U_k [a; 1]) ∘ (V_k [b; 1]) + bias``: a rank-``rank`` :class:`TensorFusion`.

    Parameters grow as ``rank · hidden · (d_a + d_b + 2)`` instead of ``hidden · (d_a + 1)(d_b + 1)``.
    """

    def __init__(self, dim_a: int, dim_b: int, hidden: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"low-rank fusion needs rank >= 1, got {rank}")
        self.rank, self.hidden = rank, hidden
        self.factor_a = nn.Linear(dim_a + 1, rank * hidden, bias=False)
        self.factor_b = nn.Linear(dim_b + 1, rank * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = (*a.shape[:-1], self.rank, self.hidden)
        product = self.factor_a(with_one(a)).view(shape) * self.factor_b(with_one(b)).view(shape)
        return product.sum(-2) + self.bias


class ConcatFusion(nn.Module):
    """``W [a; b] + bias``: the "w/o TFN" ablation (no cross-modal products in the first layer)."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_a + dim_b, hidden)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([a, b], dim=-1))


def build_fusion(kind: FusionKind, dim_a: int, dim_b: int, hidden: int, rank: int = 16) -> nn.Module:
    if kind == "tfn":
        return TensorFusion(dim_a, dim_b, hidden)
    if kind == "lowrank":
        return LowRankTensorFusion(dim_a, dim_b, hidden, rank)
    if kind == "concat":
        return ConcatFusion(dim_a, dim_b, hidden)
    raise ValueError(f"unknown fusion '{kind}': expected tfn, lowrank or concat")


class FusionMLP(nn.Module):
    """fusion -> GELU -> Linear(hidden, out): the MLP over the fused vector.

    With ``zero_init_output`` the output layer starts at zero, so a residual user
    (:class:`mim_rec.csft.model.MMItemEncoder`) starts exactly at its unfused embedding.
    """

    def __init__(self, kind: FusionKind, dim_a: int, dim_b: int, hidden: int, out_dim: int,
                 rank: int = 16, zero_init_output: bool = False) -> None:
        super().__init__()
        self.fusion = build_fusion(kind, dim_a, dim_b, hidden, rank)
        self.activation = nn.GELU()
        self.output = nn.Linear(hidden, out_dim)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.output(self.activation(self.fusion(a, b)))
