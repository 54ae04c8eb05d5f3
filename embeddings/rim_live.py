"""Apply RIM's window messages to a running CTR model's sharded frozen MM table.

Between two steps every rank calls :meth:`LiveMMTable.apply`: rank 0 reads how far the log is
complete and broadcasts that offset, so all ranks apply exactly the same records in the same
step (a model whose ranks disagree about a row would score the same item differently), then
each rank reads those records and writes only the rows of its own shards -- the same shard
addressing as the initial fill (:func:`mim_rec.ciubm.mm_shards.local_mm_shards`). The table stays frozen:
training never writes it; only this applier does, under ``no_grad``, between steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from mim_rec.ciubm.sparse import shard_columns
from mim_rec.data.errors import DataError
from mim_rec.data.manifest import require

from embeddings.rim_log import check_fingerprint, complete_end, read_messages
from embeddings.rim_fold import folded_offset


class LiveMMTable:
    """Tails one log into the MM table (``num_items`` rows) of models filled from ``table_dir``.

    Starts after the records the table already holds (a folded table names its log offset), so
    nothing is applied twice; ``offset`` is how far it has applied, ``applied`` how many items.
    """

    def __init__(self, log_path: Union[str, Path], table_dir: Union[str, Path], num_items: int,
                 offset: Optional[int] = None) -> None:
        self.log_path, self.num_items = Path(log_path), num_items
        self.fingerprint = require(table_dir, kind="mm_table").extra["encoder_fingerprint"]
        self.offset = folded_offset(table_dir, log_path) if offset is None else offset
        self.applied = 0

    def apply(self, model) -> int:
        """Write every new complete record into ``model``'s local MM shards; returns the number
        of items applied (the same on every rank)."""
        from mim_rec.ciubm.mm_shards import local_mm_shards

        stop = _agreed(complete_end(self.log_path, self.offset))
        shards = local_mm_shards(model)
        count = 0
        for end, message in read_messages(self.log_path, self.offset, stop):
            check_fingerprint(message, self.fingerprint, self.log_path)
            outside = message.item_ids[(message.item_ids < 0) | (message.item_ids >= self.num_items)]
            if len(outside):
                raise DataError(str(self.log_path), f"record ending at byte {end}: item {outside[0]} is outside "
                                f"the model's MM table of {self.num_items} rows", field="item_id")
            _write_rows(shards, torch.from_numpy(message.item_ids), torch.from_numpy(message.vectors))
            self.offset, count = end, count + len(message.item_ids)
        self.applied += count
        return count


def _agreed(offset: int) -> int:
    """Rank 0's offset on every rank (the offset itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return offset
    box = [offset]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _write_rows(shards, ids: torch.Tensor, vectors: torch.Tensor) -> None:
    """Each local shard takes the rows (and its columns) of the ids inside its row range."""
    with torch.no_grad():
        for row_offset, col_offset, tensor in shards:
            rows, cols = tensor.shape
            local = (ids >= row_offset) & (ids < row_offset + rows)
            if local.any():  # the rows arrive on the CPU; a fused shard lives on the GPU
                tensor[(ids[local] - row_offset).to(tensor.device)] = shard_columns(
                    vectors[local], col_offset, cols).to(device=tensor.device, dtype=tensor.dtype)
