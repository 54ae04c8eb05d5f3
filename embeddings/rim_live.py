"""Apply RIM's window messages to a running CTR model's sharded frozen MM table.

Between two steps every rank calls :meth:`LiveMMTable.apply`: rank 0 reads how far the log is
complete and broadcasts that offset, so all ranks apply exactly the same records in the same
step (a model whose ranks disagree about a row would score the same item differently), then
each rank reads those records and writes only the rows of its own shards -- the same shard
addressing as the initial fill (:func:`mim_rec.ciubm.mm_shards.local_mm_shards`). The table stays frozen:
training never writes it; only this applier does, under ``no_grad``, between steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch

from mim_rec.ciubm.sparse import shard_columns
from mim_rec.data.errors import DataError
from mim_rec.data.manifest import require
from mim_rec.utils.dist import current_rank

from embeddings.rim_fold import folded_offset, log_head_digest, require_same_log, served_tables, table_encoder
from embeddings.rim_log import check_message, check_new_ids, check_served_table, complete_end, read_messages
from embeddings.table import table_item_ids

# How long a rank waits for the log bytes rank 0 saw to become visible to it.
VIEW_LAG_PATIENCE_S = 30.0
# The entries of a checkpoint's progress that say where the applier stood (:meth:`LiveMMTable.position`).
OFFSET_KEY, HEAD_KEY = "rim_log_offset", "rim_log_head"


class LiveMMTable:
    """Tails one log into the MM table (``num_items`` rows) of models filled from ``table_dir``.

    Starts after the records the table already holds (a folded table names its log offset), so
    nothing is applied twice; ``offset`` is how far it has applied, ``applied`` how many items.
    Every apply first checks that the file at ``log_path`` is still the log it read (as long
    as ``offset``, with the same head): a log rotated at that path is refused, since reading
    it from ``offset`` would skip its first records.
    The log is read as a view that may lag (``view_may_lag``): ranks on other machines of a
    shared file system may see ``<log>.durable`` before the bytes it covers, so a log that ends
    before its durable end is read to the end it shows and waited on (a rank that never sees
    rank 0's bytes is refused), not refused at once as by the writer and the fold.
    Each record passes the fold's checks before any row of it is written (same encoder and
    width, served against this table or one it was folded from with this log, finite vectors,
    ids in range that neither the table nor an earlier record holds), so
    a live model never trains on a row the next table version would refuse.
    """

    def __init__(self, log_path: Union[str, Path], table_dir: Union[str, Path], num_items: int,
                 resume: Optional[Mapping[str, int]] = None) -> None:
        self.log_path, self.num_items, self.table_dir = Path(log_path), num_items, str(table_dir)
        manifest = require(table_dir, kind="mm_table")
        self.fingerprint, self.dim = table_encoder(table_dir, manifest), manifest.dim
        self.offset = folded_offset(table_dir, log_path)
        self.tables = served_tables(table_dir, manifest, log_path)
        self.head = self._head()                            # of the bytes read so far
        self.table_ids = table_item_ids(table_dir)           # sorted, fixed
        self.applied_ids = np.zeros(0, dtype=np.int64)       # sorted: ids this applier wrote
        self.applied = 0
        if resume is not None and OFFSET_KEY in resume:
            self._skip_applied(int(resume[OFFSET_KEY]), int(resume[HEAD_KEY]))

    def position(self) -> Dict[str, int]:
        """How far this applier has read, as integers for a checkpoint's progress: the log
        offset and the head digest of the file (as a signed 64-bit integer)."""
        head = int.from_bytes(bytes.fromhex(self.head), "big", signed=True) if self.head else 0
        return {OFFSET_KEY: self.offset, HEAD_KEY: head}

    def _skip_applied(self, offset: int, head: int) -> None:
        """Stand where the applier of a checkpointed model stood (:meth:`position`): the model's
        state holds the rows up to ``offset``, so they are neither applied nor logged again. The
        file must still be that log; the ids of the skipped records are read, so a later record
        that repeats one is refused as it would have been without the restart."""
        digest = head.to_bytes(8, "big", signed=True).hex() if offset else None
        require_same_log(self.log_path, offset, digest, "this run's checkpoint was applied from",
                         "the checkpoint's MM table")
        end = self.offset
        skipped = read_messages(self.log_path, self.offset, offset, view_may_lag=True) if offset > self.offset else ()
        for end, message in skipped:
            self.applied_ids = np.union1d(self.applied_ids, message.item_ids)
        if end != offset:
            raise DataError(str(self.log_path), f"the checkpoint applied this log to byte {offset}, not a record "
                            f"end from byte {self.offset} on, where the table's rows end (records read to byte {end})")
        self.offset, self.head = offset, digest

    def apply(self, model) -> int:
        """Write every new complete record into ``model``'s local MM shards; returns the number
        of items applied (the same on every rank)."""
        from mim_rec.ciubm.mm_shards import local_mm_shards

        require_same_log(self.log_path, self.offset, self.head, "this model's MM table was applied from",
                         f"the model filled from {self.table_dir}")
        start, stop = self.offset, _agreed(complete_end(self.log_path, self.offset, view_may_lag=True))
        shards = local_mm_shards(model)
        count, deadline = 0, time.monotonic() + VIEW_LAG_PATIENCE_S
        try:
            while True:
                for end, message in read_messages(self.log_path, self.offset, stop, view_may_lag=True):
                    check_message(message, self.fingerprint, self.dim, self.log_path, end,
                                  f"the table {self.table_dir}")
                    check_served_table(message, self.tables, self.log_path, end, self.table_dir)
                    check_new_ids(message.item_ids, [self.table_ids, self.applied_ids], self.num_items,
                                  self.log_path, f"the table {self.table_dir} or an earlier record of this log",
                                  " of the model's MM table")
                    _write_rows(shards, torch.from_numpy(message.item_ids), torch.from_numpy(message.vectors))
                    self.applied_ids = np.union1d(self.applied_ids, message.item_ids)
                    self.offset, count = end, count + len(message.item_ids)
                if self.offset >= stop:
                    break
                # This rank's view of the file ends before rank 0's (a shared file system's lag):
                # stopping here would leave its rows behind the other ranks'.
                if time.monotonic() > deadline:
                    raise DataError(str(self.log_path), f"rank {current_rank()} reads the log complete to byte "
                                    f"{self.offset} of the {stop} rank 0 read (applying from {start}) after "
                                    f"{VIEW_LAG_PATIENCE_S:g} s; every rank must see the same log")
                time.sleep(0.05)
        finally:
            # Also when a record is refused part-way: the records written before it are applied,
            # and the head must follow the offset, or the next apply reads the log as rotated.
            self.applied += count
            self.head = self._head()
        return count

    def _head(self) -> Optional[str]:
        """The digest that identifies the log file read up to ``offset`` (None before any byte)."""
        return log_head_digest(self.log_path, self.offset) if self.offset else None


def _agreed(offset: int) -> int:
    """Rank 0's offset on every rank (the offset itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return offset
    box = [offset]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _write_rows(shards, ids: torch.Tensor, vectors: torch.Tensor) -> None:
    """Each local shard takes the rows (and its columns) of the ids inside its row range; a
    record the shards' storage cannot hold is refused before any of its rows is written."""
    from mim_rec.ciubm.mm_shards import check_storable

    if shards:
        check_storable(vectors, ids, shards[0][2].dtype)
    with torch.no_grad():
        for row_offset, col_offset, tensor in shards:
            rows, cols = tensor.shape
            local = (ids >= row_offset) & (ids < row_offset + rows)
            if local.any():  # the rows arrive on the CPU; a fused shard lives on the GPU
                tensor[(ids[local] - row_offset).to(tensor.device)] = shard_columns(
                    vectors[local], col_offset, cols).to(device=tensor.device, dtype=tensor.dtype)
