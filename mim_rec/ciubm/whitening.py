"""PCA whitening of the frozen MM vectors, fitted once from the table and never trained.

Content interest reads cosines between MM vectors. In a table whose first directions encode
the category (what C-SFT and CLIP heads learn first), every same-category pair looks alike and
the within-category differences that content interest needs are a small part of each cosine.
Whitening (Su et al. 2021, "Whitening Sentence Representations for Better Semantics and
Faster Retrieval", arXiv 2103.15316) centres the vectors and rescales their top ``k``
principal directions to unit variance, so each direction weighs the same in the cosine.

The table itself is untouched (it stays the representation center's shared, frozen artifact,
and RIM keeps writing encoder outputs into it); the CTR model applies the transform to what it
looks up, so new items' rows go through the same transform. The statistics are buffers: they
travel in the model's checkpoint and are never written by the optimizer.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn


class MMWhitening(nn.Module):
    """``[..., dim] -> [..., components]``: ``(x - mean) @ projection`` (buffers, not parameters).

    An all-zero row (an item the table lacks, read as the default vector under
    ``mm_missing=default``) stays zero: centred, every such row would become the same vector
    ``-mean @ projection``, and missing items would have cosine 1 with each other in the
    content interest instead of 0."""

    def __init__(self, dim: int, components: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if not 0 < components <= dim:
            raise ValueError(f"model.mm_whiten must be in 1..{dim} (the MM table's dim), got {components}")
        self.register_buffer("mean", torch.zeros(dim, device=device))
        self.register_buffer("projection", torch.zeros(dim, components, device=device))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        whitened = (vectors - self.mean) @ self.projection
        return whitened * vectors.ne(0).any(dim=-1, keepdim=True)


def whitening_statistics(rows_of: Callable[[int, int], torch.Tensor], count: int, components: int,
                         chunk: int = 65_536) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean [D], projection [D, k])`` over items ``0..count-1``, read ``chunk`` rows at a time.

    Under ``torch.distributed`` each rank reads a contiguous ``1/W`` of the rows and the sums
    are all-reduced (on the process group's device: the GPU under nccl), so every rank ends
    with the same transform for ``1/W`` of the reading.
    Sums are float64; the top ``k`` eigenvectors of the covariance are scaled by
    ``1/sqrt(eigenvalue)``. A direction whose variance is below 1e-6 of the largest, or below
    1e-10 of the rows' mean squared norm (a table with fewer distinct rows than ``k``, or a
    constant column), gets a zero column rather than a huge scale: whitening must not turn
    rounding noise into the loudest part of a cosine. A table with no direction left (every
    row the same vector) is refused. All-zero rows (items without a vector) are left out of
    the statistics, as :class:`MMWhitening` leaves them out of the transform.
    """
    import torch.distributed as dist

    from mim_rec.config import ConfigError
    from mim_rec.utils.dist import collective_device

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = collective_device() if distributed else torch.device("cpu")
    start, stop = count * rank // world, count * (rank + 1) // world
    dim = rows_of(0, 1).shape[1]
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    present = torch.zeros(1, dtype=torch.float64, device=device)
    for first in range(start, stop, chunk):
        rows = rows_of(first, min(first + chunk, stop)).to(device=device, dtype=torch.float64)
        rows = rows[rows.ne(0).any(dim=1)]
        total += rows.sum(0)
        gram += rows.T @ rows
        present += len(rows)
    if distributed:
        dist.all_reduce(total)
        dist.all_reduce(gram)
        dist.all_reduce(present)
    if present.item() == 0:
        raise ConfigError("model.mm_whiten: the MM table holds no non-zero row to fit the whitening on; "
                          "set model.mm_whiten=0")
    mean = total / present
    covariance = gram / present - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0)[:components], vectors.flip(1)[:, :components]
    # A direction counts if its variance is not rounding noise: relative to the largest one and
    # to the rows' own scale (identical rows make even the largest eigenvalue noise).
    noise_floor = 1e-10 * float(gram.trace() / present)
    informative = values > max(float(values[0]) * 1e-6, noise_floor)
    if not bool(informative.any()):
        raise ConfigError(f"model.mm_whiten: the MM table's {int(present.item())} non-zero rows have no variance "
                          "to whiten (they are one vector: is the encoder collapsed?); set model.mm_whiten=0")
    scale = torch.where(informative, values.clamp(min=1e-300).rsqrt(), torch.zeros_like(values))
    return mean.float().cpu(), (vectors * scale).float().cpu()
