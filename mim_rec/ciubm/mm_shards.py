"""This rank's shards of the CiUBM's frozen MM table: find them, fill them, size them.

The representation center's table reaches a sharded model here. Whatever plan TorchRec's
planner chose (table-, row- or column-wise), each rank writes only the rows and columns it
holds, straight into the live storage the model looks up; the trainer, the RIM live updates
and the benches all fill the table through these functions, so they agree on its addressing.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from mim_rec.ciubm.sparse import MM_TABLE, shard_columns
from mim_rec.ciubm.whitening import whitening_statistics
from mim_rec.config import ConfigError

RowsOf = Callable[[int, int], torch.Tensor]


def mm_table_state_key(model: torch.nn.Module) -> str:
    """The state-dict key of the MM table's weight, wherever DMP's wrapping put it."""
    keys = [k for k in model.state_dict() if k.endswith(f"{MM_TABLE}.weight")]
    if len(keys) != 1:
        raise RuntimeError(f"expected one MM table weight in the model, found {keys}")
    return keys[0]


def local_blocks(weight) -> List[Tuple[int, int, torch.Tensor]]:
    """``(row offset, column offset, tensor)`` of each shard of a (possibly sharded) table on this
    rank; each tensor is the live storage, so writing it changes what the model looks up."""
    if not hasattr(weight, "local_shards"):
        return [(0, 0, weight)]
    return [(*shard.metadata.shard_offsets, shard.tensor) for shard in weight.local_shards()]


def local_mm_shards(model: torch.nn.Module) -> List[Tuple[int, int, torch.Tensor]]:
    """:func:`local_blocks` of the frozen MM table."""
    return local_blocks(model.state_dict()[mm_table_state_key(model)])


def mm_table_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's shards of the MM table (its storage precision included)."""
    return sum(t.numel() * t.element_size() for _, _, t in local_mm_shards(model))


def check_storable(vectors: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse rows the table's storage ``dtype`` cannot hold. A finite value past fp16's range
    (65504) is stored as inf, every score that looks the row up is then NaN, and training
    stopped with a non-finite loss that pointed at the learning rate, not at the table. Only a
    storage narrower than the vectors' dtype is scanned: fp32 holds every finite float32 (the rows
    every reader returns), and non-finite rows are refused where they are read (the table's
    parts, the RIM log)."""
    largest = torch.finfo(dtype).max
    if largest >= torch.finfo(vectors.dtype).max:
        return
    beyond = (vectors.abs() > largest).any(dim=1)
    if beyond.any():
        row = int(beyond.nonzero()[0])
        raise ConfigError(f"item {int(ids[row])}'s MM vector holds {vectors[row].abs().max().item():g}, beyond "
                          f"the {largest:g} that {dtype} storage holds (model.mm_dtype): it would be stored as inf "
                          "and score NaN; use model.mm_dtype=fp32, or a table of smaller values")


def fill_mm_table(model: torch.nn.Module, rows_of: RowsOf, chunk: int = 65_536) -> None:
    """Fill this rank's shards of the frozen MM table: ``rows_of(start, stop)`` returns the
    ``[stop - start, dim]`` vectors of items ``start..stop-1``; only local rows are asked for,
    ``chunk`` at a time, so the fill's own memory is a chunk's, not a second copy of the shard."""
    with torch.no_grad():
        for r, c, tensor in local_mm_shards(model):
            rows, cols = tensor.shape
            for first in range(0, rows, chunk):
                last = min(first + chunk, rows)
                vectors = rows_of(r + first, r + last)
                check_storable(vectors, torch.arange(r + first, r + last), tensor.dtype)
                tensor[first:last].copy_(shard_columns(vectors, c, cols))


def load_mm_table(model: torch.nn.Module, rows_of: RowsOf, count: int) -> None:
    """Fill this rank's shards of the MM table and, when the model whitens its view of the
    table (``model.mm_whiten``), fit the whitening from the same rows. One call for both, so no
    model looks its table up through an unfitted (all-zero) transform. A resumed run then loads
    the checkpoint's copy of the statistics, which is the same transform."""
    fill_mm_table(model, rows_of)
    buffers = {name.rsplit(".", 1)[-1]: b for name, b in model.named_buffers() if ".mm_whitening." in f".{name}"}
    if not buffers:
        return
    if set(buffers) != {"mean", "projection"}:
        raise RuntimeError(f"expected the model's mm_whitening buffers, found {sorted(buffers)}")
    mean, projection = whitening_statistics(rows_of, count, buffers["projection"].shape[1])
    with torch.no_grad():
        buffers["mean"].copy_(mean)
        buffers["projection"].copy_(projection)
