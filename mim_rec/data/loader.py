"""CTR batches for TorchRec, streamed from an events Parquet file.

Two ``KeyedJaggedTensor``s per batch, because the model looks rows up two ways:

* ``pooled`` (stride ``B``): ``user_id`` (1 id), ``query_tokens`` (hashed words, 0..Q ids);
  pooled by an ``EmbeddingBagCollection`` (sum).
* ``sequence`` (stride ``B * (1 + L)``): one bag per *slot*, slot 0 the target item and slots
  1..L the behaviours (most recent last, left-padded with empty bags), under the keys
  ``item_seq``, ``category_seq`` and ``mm_item_seq`` (the same item ids as keys of the MM
  table). Every bag holds one id or none, so an EBC returns one row per slot -- the
  target and the behaviours share one item table, as target attention needs -- and the model
  reshapes ``[B * (1 + L), D]`` to ``[B, 1 + L, D]``. With ``sequence_layout="ec"`` the same
  values form one sequence per sample (stride ``B``, length ``1 +`` its behaviours) for
  ``EmbeddingCollection``s, and the model places each sample's rows in the same slots;
  ``mim bench layout sharded=true`` measures which layout is faster under each sharding type.

Rows are streamed by Parquet row group; each epoch shuffles the row-group order and the rows
inside a buffer of row groups (seeded by ``seed`` and the epoch), and rank ``r`` of ``W``
takes the global batches ``r, r + W, ...``. Every rank yields the same number of batches
(the last ones padded with weight-0 rows), because sharded training needs all ranks to step
together.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from mim_rec.data.errors import DataError
from mim_rec.data.io import require_rows, validate_file
from mim_rec.data.loader_config import LoaderConfig
from mim_rec.data.validate import conform_schema
from mim_rec.data.schemas import EVENTS, ITEMS
from mim_rec.utils.text import counted

POOLED_KEYS = ("user_id", "query_tokens")
SEQUENCE_KEYS = ("item_seq", "category_seq", "mm_item_seq")
EVENT_COLUMNS = ("user_id", "query", "target_item_id", "label", "ts", "hist_item_ids", "hist_category_ids")
DENSE_FEATURES = ("log1p_item_age_days", "log1p_history_length")


@dataclass
class CtrBatch(Pipelineable):
    """One CTR batch. ``meta`` holds per-row tensors for evaluation: ``user_id``,
    ``target_category``, ``item_age_days`` and ``weight`` (0 for padding rows)."""

    dense_features: torch.Tensor
    pooled: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    labels: torch.Tensor
    slots: int  # 1 + L sequence slots per row, whichever layout the sequence KJT has
    meta: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = False) -> "CtrBatch":
        return CtrBatch(self.dense_features.to(device, non_blocking=non_blocking),
                        self.pooled.to(device, non_blocking=non_blocking),
                        self.sequence.to(device, non_blocking=non_blocking),
                        self.labels.to(device, non_blocking=non_blocking), self.slots,
                        {k: v.to(device, non_blocking=non_blocking) for k, v in self.meta.items()})

    def record_stream(self, stream: torch.cuda.streams.Stream) -> None:
        for tensor in (self.dense_features, self.labels, *self.meta.values()):
            tensor.record_stream(stream)
        self.pooled.record_stream(stream)
        self.sequence.record_stream(stream)

    def pin_memory(self) -> "CtrBatch":
        return CtrBatch(self.dense_features.pin_memory(), self.pooled.pin_memory(),
                        self.sequence.pin_memory(), self.labels.pin_memory(), self.slots,
                        {k: v.pin_memory() for k, v in self.meta.items()})


@dataclass
class ItemInfo:
    """Per-item facts the loader joins onto events: category and creation time."""

    category: np.ndarray   # [N] int64
    created_s: np.ndarray  # [N] int64 unix seconds

    @classmethod
    def from_items(cls, path: Union[str, Path]) -> "ItemInfo":
        """The checked items table's facts; one without rows is refused by name (a model of no
        items cannot train, and sizing its category table failed with a bare numpy error)."""
        items = require_rows(validate_file(path, ITEMS)).table
        return cls(items["category_id"].to_numpy().astype(np.int64), created_seconds(items["created_at"], path))

    @property
    def count(self) -> int:
        return len(self.category)


def hash_tokens(texts: pa.Array, buckets: int) -> tuple:
    """``(lengths [n], ids [sum])`` of the whitespace words of each text, hashed (crc32) into
    ``buckets`` ids. Only distinct texts are hashed in Python; rows map through a dictionary."""
    encoded = pc.dictionary_encode(texts).combine_chunks() if isinstance(texts, pa.ChunkedArray) \
        else pc.dictionary_encode(texts)
    per_text = [[zlib.crc32(w.encode()) % buckets for w in t.split()] for t in encoded.dictionary.to_pylist()]
    text_len = np.array([len(t) for t in per_text], dtype=np.int64)
    text_off = np.concatenate([[0], np.cumsum(text_len)])
    flat = np.array([i for t in per_text for i in t], dtype=np.int64)
    codes = encoded.indices.to_numpy()
    lengths = text_len[codes]
    index = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - text_off[codes], lengths)
    return lengths, flat[index]


def _recent(lists: pa.Array, keep: int) -> tuple:
    """``(lengths [n], values)`` of the last ``keep`` elements of each list."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    kept = np.minimum(lengths, keep)
    starts = np.cumsum(lengths) - kept
    index = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept - starts, kept)
    return kept, values[index]


def make_batch(rows: pa.RecordBatch, items: ItemInfo, config: LoaderConfig,
               weight: Optional[np.ndarray] = None) -> CtrBatch:
    """Build a :class:`CtrBatch` from a record batch of events (no per-row Python)."""
    n, slots = rows.num_rows, 1 + config.max_hist_len
    column = {name: rows.column(name) for name in EVENT_COLUMNS}
    target = column["target_item_id"].to_numpy()
    hist_len, hist_items = _recent(column["hist_item_ids"], config.max_hist_len)
    _, hist_cats = _recent(column["hist_category_ids"], config.max_hist_len)

    # slot layout: row b owns bags [b*slots, (b+1)*slots); slot 0 = target, the last hist_len
    # slots = behaviours (most recent last), the rest empty.
    seq_lengths = np.zeros((n, slots), dtype=np.int64)
    seq_lengths[:, 0] = 1
    seq_lengths[:, 1:] = np.arange(config.max_hist_len)[None, :] >= (config.max_hist_len - hist_len)[:, None]
    # values in slot order: per row, its target first, then its behaviours
    is_target = np.zeros(n + len(hist_items), dtype=bool)
    is_target[np.arange(n) + np.concatenate([[0], np.cumsum(hist_len)[:-1]])] = True
    item_values = np.empty(len(is_target), dtype=np.int64)
    cat_values = np.empty_like(item_values)
    item_values[is_target], cat_values[is_target] = target, items.category[target]
    item_values[~is_target], cat_values[~is_target] = hist_items, hist_cats

    # the ec layout keeps the same values as one sequence per row: its target and behaviours
    seq_len_t = torch.from_numpy(seq_lengths.ravel() if config.sequence_layout == "ebc" else 1 + hist_len)
    item_t, cat_t = torch.from_numpy(item_values), torch.from_numpy(cat_values)
    sequence = KeyedJaggedTensor(
        keys=list(SEQUENCE_KEYS), values=torch.cat([item_t, cat_t, item_t]),
        lengths=torch.cat([seq_len_t, seq_len_t, seq_len_t]), stride=len(seq_len_t))

    query_len, query_ids = hash_tokens(column["query"], config.query_buckets)
    user = column["user_id"].to_numpy()
    pooled = KeyedJaggedTensor(
        keys=list(POOLED_KEYS),
        values=torch.from_numpy(np.concatenate([user, query_ids]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([np.ones(n, np.int64), query_len])), stride=n)

    age_days = item_age_days(column["ts"].to_numpy(), items.created_s[target])
    dense = np.stack([np.log1p(age_days), np.log1p(hist_len)], axis=1).astype(np.float32)
    weight = np.ones(n, np.float32) if weight is None else weight
    return CtrBatch(
        dense_features=torch.from_numpy(dense), pooled=pooled, sequence=sequence,
        labels=torch.from_numpy(column["label"].to_numpy().astype(np.float32)), slots=slots,
        meta={"user_id": torch.from_numpy(user.astype(np.int64)),
              "target_category": torch.from_numpy(items.category[target]),
              "item_age_days": torch.from_numpy(age_days.astype(np.float32)),
              "weight": torch.from_numpy(weight)})


def created_seconds(created_at: Union[pa.Array, pa.ChunkedArray], source: Union[str, Path]) -> np.ndarray:
    """``created_at`` (a timestamp of any unit, as the items contract accepts) as int64 Unix
    seconds. Sub-second values are refused, as validation refuses them: ages are whole seconds."""
    try:
        return created_at.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    except pa.ArrowInvalid as exc:
        raise DataError(str(source), f"cannot be read as whole seconds ({exc})", field="created_at") from None


def item_age_days(ts: np.ndarray, created_s: np.ndarray) -> np.ndarray:
    """An item's age at each event, in days. An event before its item was created (a clock or
    catalogue error; ``mim data summary`` counts them) is taken at age 0: the newest bucket."""
    return np.maximum(ts - created_s, 0) / 86_400


def batches_per_rank(path: Union[str, Path], rows: int, batch_size: int, world_size: int,
                     drop_last: bool = True) -> int:
    """Each rank's batches of ``batch_size`` over an epoch of the ``rows`` events in ``path``
    on ``world_size`` ranks (the last one partial unless ``drop_last``). Refuses rows that give
    a rank no batch: every rank would step 0 times. ``mim pipeline`` and ``mim experiment`` ask
    it with the row count of the world's file before pre-training runs."""
    per_rank = rows / batch_size / world_size
    batches = int(per_rank) if drop_last else int(np.ceil(per_rank))
    if batches == 0:
        raise DataError(str(path), f"{rows} events are fewer than one batch of {batch_size} per rank on "
                                   f"{counted(world_size, 'rank')}")
    return batches


class CtrEventsLoader:
    """Iterates :class:`CtrBatch`es of one rank over an events file, epoch by epoch.

    ``batches_per_epoch`` is the same on every rank. ``iterate(epoch, skip)`` starts at batch
    ``skip`` of that epoch (exact resume: the order is a pure function of seed and epoch).
    """

    def __init__(self, events_path: Union[str, Path], items: ItemInfo, config: LoaderConfig,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        self.path, self.items, self.config = Path(events_path), items, config
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self._file = pq.ParquetFile(self.path)
        conform_schema(self._file.schema_arrow, EVENTS, str(self.path))
        self.rows = self._file.metadata.num_rows
        if self.rows == 0:
            raise DataError(str(self.path), "no events to train or evaluate on")
        self.batches_per_epoch = batches_per_rank(self.path, self.rows, config.batch_size, world_size, drop_last)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _row_stream(self, epoch: int) -> Iterator[pa.RecordBatch]:
        rng = np.random.default_rng([self.config.seed, epoch])
        groups = np.arange(self._file.num_row_groups)
        if self.config.shuffle:
            rng.shuffle(groups)
        span = self.config.shuffle_row_groups if self.config.shuffle else 1
        for start in range(0, len(groups), span):
            chunk = self._file.read_row_groups(list(groups[start:start + span]), columns=list(EVENT_COLUMNS))
            if self.config.shuffle:
                chunk = chunk.take(rng.permutation(chunk.num_rows))
            yield from chunk.combine_chunks().to_batches()

    def _global_batches(self, epoch: int) -> Iterator[pa.RecordBatch]:
        size, pending, have = self.config.batch_size, [], 0
        for batch in self._row_stream(epoch):
            pending.append(batch)
            have += batch.num_rows
            while have >= size:
                table = pa.Table.from_batches(pending).combine_chunks()
                yield table.slice(0, size).to_batches()[0]
                rest = table.slice(size)
                pending, have = (rest.to_batches() if rest.num_rows else []), rest.num_rows
        if have:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[CtrBatch]:
        yielded, last = 0, None
        for index, rows in enumerate(self._global_batches(epoch)):
            if index % self.world_size != self.rank:
                continue
            last = rows
            if yielded >= self.batches_per_epoch:
                return
            if yielded >= skip:
                yield self._finish(rows)
            yielded += 1
        while yielded < self.batches_per_epoch:  # pad: every rank steps the same number of times
            filler = last if last is not None else next(self._global_batches(epoch))
            if yielded >= skip:
                yield self._finish(filler, padding=True)
            yielded += 1

    def _finish(self, rows: pa.RecordBatch, padding: bool = False) -> CtrBatch:
        size = self.config.batch_size
        weight = np.zeros(size, np.float32) if padding else np.ones(size, np.float32)
        if rows.num_rows < size:  # short last batch: repeat rows, weight 0
            weight[rows.num_rows:] = 0
            rows = pa.Table.from_batches([rows]).take(np.arange(size) % rows.num_rows).combine_chunks().to_batches()[0]
        return make_batch(rows, self.items, self.config, weight)

    def __iter__(self) -> Iterator[CtrBatch]:
        return self.iterate(0)
