"""The one interface every ID interest module implements, and the name -> class registry.

CiUBM treats the user-behaviour model as a swappable part: it hands over the target item's
embedding and the behaviour embeddings and gets back an interest vector, whatever model sits
behind ``build_ubm(name, ...)``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Type

import torch
from torch import nn

from mim_rec.ubm.layers import zero_padding


class InterestModule(nn.Module):
    """Base class: validates the seam, then delegates to :meth:`interest`.

    ``forward(target [B, D], behaviours [B, L, D], mask [B, L] bool (True = real),
    target_category [B] long, behaviour_categories [B, L] long) -> [B, output_dim]``.

    Subclasses set ``output_dim`` and implement :meth:`interest`; a model with a training-only
    loss of its own (DIEN) overrides :meth:`auxiliary_loss`.

    :meth:`interest` receives the behaviours with their padded positions zeroed: a scorer, a
    recurrence or a projection then runs on zeros there, never on whatever the caller left in a
    padded slot, so a NaN or inf in padding reaches neither the output nor any gradient.
    """

    output_dim: int

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"embedding dim must be positive, got {dim}")
        self.dim = dim
        self.output_dim = dim

    def forward(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        batch, length = mask.shape
        torch._assert(target.shape == (batch, self.dim), "target must be [B, dim]")
        torch._assert(behaviours.shape == (batch, length, self.dim), "behaviours must be [B, L, dim]")
        torch._assert(mask.dtype == torch.bool, "mask must be bool (True = real behaviour)")
        torch._assert(target_category.shape == (batch,), "target_category must be [B]")
        torch._assert(behaviour_categories.shape == (batch, length), "behaviour_categories must be [B, L]")
        return self.interest(target, zero_padding(behaviours, mask), mask, target_category, behaviour_categories)

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A loss term to add to the CTR loss, from the last forward; ``None`` if the model has none.

        ``rows`` (bool ``[B]``): the rows of that forward's batch that count, so the weight-0 rows
        a loader pads a batch with train nothing here either; ``None``: every row.
        """
        return None


_REGISTRY: Dict[str, Type[InterestModule]] = {}


def register_ubm(name: str) -> Callable[[Type[InterestModule]], Type[InterestModule]]:
    """Class decorator: make a model constructible as ``build_ubm(name, dim, ...)``."""

    def add(cls: Type[InterestModule]) -> Type[InterestModule]:
        if name in _REGISTRY:
            raise ValueError(f"UBM name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return add


def available_ubms() -> list[str]:
    return sorted(_REGISTRY)


def build_ubm(name: str, dim: int, **options: object) -> InterestModule:
    """Construct the interest module called ``name`` over ``dim``-wide embeddings.

    ``options`` are the model's keyword arguments (hidden sizes, heads, top_k, dropout...);
    every one has a default, so ``build_ubm("din", 16)`` is a complete model.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown UBM {name!r}; available: {', '.join(available_ubms())}")
    cls = _REGISTRY[name]
    try:
        return cls(dim, **options)
    except TypeError as err:
        raise TypeError(f"bad options for UBM {name!r} ({cls.__name__}): {err}") from err
