"""Symmetric InfoNCE over in-batch negatives, with negatives gathered from every rank.

Shared by Different Modal Alignment (image vs title, :mod:`.dma`) and the image
self-supervised objective of Downstream Data Adaptation (view vs view, :mod:`.dda`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order), keeping the gradient path.

    ``torch.distributed.nn.all_gather`` sums the incoming gradients of each slice back to
    its owner, so with DDP's gradient averaging every parameter receives exactly the
    gradient of the loss over the concatenated global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                       gather: bool = True) -> torch.Tensor:
    """Mean of a->b and b->a cross-entropy where row i of ``a`` matches row i of ``b``.

    ``a`` and ``b`` are this rank's unit-norm rows; the candidates are all ranks' rows. The
    returned value is this rank's share: averaged over ranks (as DDP does with gradients)
    it equals the loss of one process on the concatenated batch. ``gather=False`` keeps
    the loss local (single-process work such as evaluation probes inside a DDP job).

    The logits and the loss are computed in fp32 whatever autocast is active: bf16 keeps 8
    significant bits, so a logit near the scale cap of 100 is off by up to about 0.4, which
    swamps the differences the loss ranks by (the heads hand over fp32 rows for this reason).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    all_a, all_b = (gather_with_grad(a), gather_with_grad(b)) if gather else (a, b)
    rank = dist.get_rank() if gather and dist.is_available() and dist.is_initialized() else 0
    targets = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    with torch.autocast(a.device.type, enabled=False):
        a, b, all_a, all_b, scale = (t.float() for t in (a, b, all_a, all_b, logit_scale))
        logits_ab = scale * a @ all_b.T
        logits_ba = scale * b @ all_a.T
        return 0.5 * (F.cross_entropy(logits_ab, targets) + F.cross_entropy(logits_ba, targets))
