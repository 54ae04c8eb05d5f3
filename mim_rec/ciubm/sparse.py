"""The sparse arch: every embedding table of CiUBM, as TorchRec collections the planner shards.

* ``pooled``: user and query-word tables (an ``EmbeddingBagCollection``, sum pooling).
* the behaviour tables (item, category), looked up for the target and every behaviour, so
  target and behaviours share one item table. ``ModelConfig.sequence_layout`` picks how:
  ``ebc`` (``sequence``), an ``EmbeddingBagCollection`` over one single-id bag per slot;
  ``ec`` (``sequence_items``, ``sequence_categories``), ``EmbeddingCollection``s over one
  sequence per sample (an EC's tables share one width, so each table has its own). Both give
  the same rows; which is faster depends on the sharding (``mim bench layout``, docs/ciubm.md).
* ``mm``: the frozen multi-modal table (:class:`FrozenEmbeddingBagCollection`, or
  :class:`FrozenEmbeddingCollection` under the ``ec`` layout): looked up under ``no_grad``,
  sharded by its own sharder whose fused optimizer is plain SGD at learning rate 0 (it has no
  state), and filled from the representation center. Its storage precision is
  ``ModelConfig.mm_dtype`` (:func:`mm_data_type`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig,
                     KeyedJaggedTensor, PoolingType)
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType

from mim_rec.ciubm.config import ModelConfig
from mim_rec.config import ConfigError

MM_TABLE = "mm_item"
# Every table SparseArch builds, by name: the keys `model.constraints` may use.
TABLE_NAMES = ("user", "query_word", "item", "category", MM_TABLE)
# FBGEMM's kernels (and TorchRec's sharded collections, which assert it on every rank) need a
# table's width to be a multiple of this.
FBGEMM_COLUMN_ALIGNMENT = 4
MM_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
# FBGEMM's default epsilon, named so a data-parallel ID table's dense optimizer uses it too.
ID_OPTIMIZER_EPS = 1e-8

# Why int8 is refused rather than silently widened: fbgemm's training TBE does run INT8 rows
# on CPU (codes + an fp32 scale and bias per row, ``dim + 8`` bytes), but TorchRec 1.9's
# fused kernel then wraps those ``[rows, dim + 8]`` rows in a ShardedTensor declared
# ``[rows, dim]`` (``EmbeddingFusedOptimizer``, device-independent code) and fails.
INT8_UNSUPPORTED = (
    "model.mm_dtype=int8: TorchRec 1.9's sharded (training) EmbeddingBagCollection cannot hold an "
    "INT8 table: sharding it fails with 'Shard tensor size does not match with "
    "metadata.shard_lengths! Found shard tensor size: [rows, dim + 8], metadata.shard_lengths: "
    "[rows, dim]' (fbgemm stores a per-row scale and bias next to the codes). Use "
    "model.mm_dtype=fp16 for half the memory; an int8 table folder (MM_TABLE_INT8) still loads, "
    "dequantised, into fp16 or fp32 storage")


class FrozenEmbeddingBagCollection(EmbeddingBagCollection):
    """An EBC that training never writes: its own type, so DMP gives it :class:`FrozenSharder`."""


class FrozenEmbeddingCollection(EmbeddingCollection):
    """The frozen MM table under the ``ec`` layout: its own type, so DMP gives it
    :class:`FrozenSequenceSharder`."""


def _frozen_params() -> dict:
    """EXACT_SGD at learning rate 0: the fused optimizer of a frozen table keeps no state and
    never moves a weight (and the model reads the table under ``no_grad`` besides)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}


class NeverDataParallel:
    """Sharder mixin: every sharding type of the base sharder but ``data_parallel``.

    Used for the frozen table, because TorchRec makes a data-parallel table a dense parameter,
    which DDP and the dense optimizer take in (Adam state for a table that must not move, and
    a checkpoint that did not resume). And for every ``EmbeddingCollection``, because TorchRec
    1.9's data-parallel EC fails in its output ("split_with_sizes expects split_sizes to sum
    exactly to <batch>"; a one-table EC in one process is enough)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [t for t in super().sharding_types(compute_device_type) if t != ShardingType.DATA_PARALLEL.value]


class FrozenSharder(NeverDataParallel, EmbeddingBagCollectionSharder):
    """Shards :class:`FrozenEmbeddingBagCollection` with a stateless, zero-step optimizer."""

    def __init__(self) -> None:
        super().__init__(fused_params=_frozen_params())

    @property
    def module_type(self):
        return FrozenEmbeddingBagCollection


class FrozenSequenceSharder(NeverDataParallel, EmbeddingCollectionSharder):
    """Shards :class:`FrozenEmbeddingCollection` with a stateless, zero-step optimizer."""

    def __init__(self) -> None:
        super().__init__(fused_params=_frozen_params())

    @property
    def module_type(self):
        return FrozenEmbeddingCollection


class SequenceSharder(NeverDataParallel, EmbeddingCollectionSharder):
    """Shards the ID tables' :class:`EmbeddingCollection`\ s (the ``ec`` layout)."""


def mm_data_type(name: str) -> DataType:
    """The TorchRec storage type of the frozen MM table for ``ModelConfig.mm_dtype``."""
    if name == "int8":
        raise ConfigError(INT8_UNSUPPORTED)
    if name not in MM_DTYPES:
        raise ConfigError(f"model.mm_dtype={name!r}: choose one of {sorted(MM_DTYPES)}")
    return MM_DTYPES[name]


def mm_storage_dim(dim: int) -> int:
    """The stored width of a ``dim``-wide MM table: ``dim`` rounded up to FBGEMM's column
    alignment. An encoder's width is whatever the encoder gives (an 8-d style table, a 10-d
    one, a 510-d one), so the table is padded with zero columns rather than refused; zeros add
    nothing to a cosine or a weighted sum, and every lookup is sliced back to ``dim``."""
    return -(-dim // FBGEMM_COLUMN_ALIGNMENT) * FBGEMM_COLUMN_ALIGNMENT


def shard_columns(vectors: torch.Tensor, column: int, width: int) -> torch.Tensor:
    """Columns ``column..column+width-1`` of ``vectors [n, dim]`` as one shard stores them:
    zeros past ``dim``, where the table is wider than its vectors (:func:`mm_storage_dim`)."""
    block = vectors[:, column:column + width]
    return nn.functional.pad(block, (0, width - block.shape[1]))


def mm_table_config(num_items: int, dim: int, mm_dtype: str) -> EmbeddingBagConfig:
    """The frozen MM table's TorchRec config (stored :func:`mm_storage_dim` wide)."""
    return _table(MM_TABLE, num_items, mm_storage_dim(dim), ["mm_item_seq"], mm_data_type(mm_dtype))


def _table(name: str, rows: int, dim: int, features: List[str],
           data_type: DataType = DataType.FP32) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=dim,
                              feature_names=features, pooling=PoolingType.SUM, data_type=data_type)


def _sequence_table(bag: EmbeddingBagConfig) -> EmbeddingConfig:
    """The same table for an ``EmbeddingCollection`` (one row per id, no pooling)."""
    return EmbeddingConfig(name=bag.name, num_embeddings=bag.num_embeddings, embedding_dim=bag.embedding_dim,
                           feature_names=bag.feature_names, data_type=bag.data_type)


@torch.fx.wrap
def slot_ids(sequence: KeyedJaggedTensor, key: str, size: int, slots: int, offset: int = 0) -> torch.Tensor:
    """``[B, 1+L]`` id of ``key`` per slot of the ``ebc`` layout, plus ``offset``; 0 on empty
    slots. CiUBM reads the category of each slot for SIM's category search; ``offset=1`` keeps
    id 0 apart from padding for a library that pads with 0.

    An fx leaf (``torch.fx.wrap``): its masked assignment cannot be traced symbolically, and
    TorchRec's train pipeline traces CiUBM's forward to find the batch fields that feed each
    sharded collection."""
    jagged = sequence[key]
    dense = torch.zeros(size * slots, dtype=torch.long, device=jagged.values().device)
    dense[jagged.lengths() > 0] = jagged.values().long() + offset
    return dense.view(size, slots)


@torch.fx.wrap
def right_aligned_slots(lengths: torch.Tensor, slots: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index [count], present [B, slots])`` for per-sample sequences of ``lengths`` (the
    target, then the behaviours; ``count = sum(lengths)``): the flat slot of each id when, as
    in the slot layout the loader gives the ``ebc`` layout, the target takes slot 0 and the
    behaviours the last ``length - 1`` slots. Computed without reading a tensor back to the
    host (``count`` is the values' known length), so a CUDA step does not synchronise here.
    An fx leaf, like :func:`slot_ids`."""
    rows = torch.arange(lengths.numel(), device=lengths.device)
    row = torch.repeat_interleave(rows, lengths, output_size=count)
    within = torch.arange(count, device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[row]
    slot = torch.where(within == 0, within, slots - lengths[row] + within)
    position = torch.arange(slots, device=lengths.device)[None, :]
    present = (position >= (slots - lengths + 1)[:, None]) | (position == 0)
    return row * slots + slot, present


class SparseArch(nn.Module):
    """Looks up every sparse feature of a batch.

    Returns ``pooled {user_id: [B, Du], query_tokens: [B, Dq]}``, ``ids [B, S, Di+Dc]`` and
    ``mm [B, S, Dmm]`` (``None`` when the config uses no MM) over the ``S = 1+L`` slots (slot
    0 the target, behaviours right-aligned, empty slots zero), ``present [B, S]`` (which slots
    hold an id) and ``categories [B, S]`` (each slot's category id, 0 when empty), whichever
    ``sequence_layout`` looked them up.
    """

    def __init__(self, config: ModelConfig, num_items: int, num_users: int, num_categories: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = config
        self.pooled = EmbeddingBagCollection(tables=[
            _table("user", num_users, config.user_dim, ["user_id"]),
            _table("query_word", config.query_buckets, config.query_dim, ["query_tokens"]),
        ], device=device)
        behaviour = [_table("item", num_items, config.item_dim, ["item_seq"]),
                     _table("category", num_categories, config.category_dim, ["category_seq"])]
        mm = mm_table_config(num_items, config.mm_dim, config.mm_dtype) if config.uses_mm else None
        self.sequence = self.sequence_items = self.sequence_categories = None
        if config.sequence_layout == "ebc":
            self.sequence = EmbeddingBagCollection(tables=behaviour, device=device)
            self.mm = FrozenEmbeddingBagCollection(tables=[mm], device=device) if mm else None
        else:
            self.sequence_items = EmbeddingCollection(tables=[_sequence_table(behaviour[0])], device=device)
            self.sequence_categories = EmbeddingCollection(tables=[_sequence_table(behaviour[1])], device=device)
            self.mm = FrozenEmbeddingCollection(tables=[_sequence_table(mm)], device=device) if mm else None

    def forward(self, pooled: KeyedJaggedTensor, sequence: KeyedJaggedTensor, batch_size: int, slots: int
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                           torch.Tensor]:
        lookup = self._bag_per_slot if self.sequence is not None else self._sequence_per_sample
        ids, mm, present, categories = lookup(sequence, batch_size, slots)
        if mm is not None:  # the table's alignment padding off
            mm = mm.view(batch_size, slots, -1)[..., :self.config.mm_dim]
        return (self.pooled(pooled).to_dict(), ids.view(batch_size, slots, self.config.behaviour_dim), mm,
                present, categories)

    def _bag_per_slot(self, sequence: KeyedJaggedTensor, batch_size: int, slots: int):
        """``ebc``: the rows come out in slot order, empty bags as zero rows."""
        rows = self.sequence(sequence).to_dict()
        ids = torch.cat([rows["item_seq"], rows["category_seq"]], dim=1)
        present = sequence.lengths()[: batch_size * slots].view(batch_size, slots) > 0
        categories = slot_ids(sequence, "category_seq", batch_size, slots)
        mm = None
        if self.mm is not None:
            with torch.no_grad():
                mm = self.mm(sequence).to_dict()["mm_item_seq"].float()  # fp16 storage may pool in fp16
        return ids, mm, present, categories

    def _sequence_per_sample(self, sequence: KeyedJaggedTensor, batch_size: int, slots: int):
        """``ec``: each sample's rows are copied to its slots (:func:`right_aligned_slots`)."""
        items = self.sequence_items(sequence)["item_seq"]
        index, present = right_aligned_slots(items.lengths(), slots, items.values().shape[0])

        def in_slots(values: torch.Tensor) -> torch.Tensor:  # [N, D] -> [B * slots, D]
            return values.new_zeros(batch_size * slots, values.shape[1]).index_copy(0, index, values)

        ids = in_slots(torch.cat([items.values(), self.sequence_categories(sequence)["category_seq"].values()], 1))
        categories = in_slots(sequence["category_seq"].values().long()[:, None]).view(batch_size, slots)
        mm = None
        if self.mm is not None:
            with torch.no_grad():
                mm = in_slots(self.mm(sequence)["mm_item_seq"].values().float())
        return ids, mm, present, categories


def sharders(id_learning_rate: float, use_cuda: bool) -> list:
    """The sharders CiUBM needs: the ID tables' fused optimizer (Adam where the CUDA kernels
    have it, row-wise Adagrad on CPU) for pooled and sequence collections, and the frozen
    sharders for the MM table in either layout."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    optimizer = EmbOptimType.ADAM if use_cuda else EmbOptimType.EXACT_ROWWISE_ADAGRAD
    fused = {"optimizer": optimizer, "learning_rate": id_learning_rate, "eps": ID_OPTIMIZER_EPS}
    return [EmbeddingBagCollectionSharder(fused_params=fused), SequenceSharder(fused_params=fused),
            FrozenSharder(), FrozenSequenceSharder()]


def data_parallel_id_optimizer(id_learning_rate: float, use_cuda: bool):
    """``params -> optimizer`` for ID tables the planner made data-parallel (a small table is
    cheaper replicated): TorchRec hands those to the dense optimizer, so they get the fused
    tables' optimizer family as a dense optimizer (Adam on CUDA, row-wise Adagrad on CPU, at
    ``id_lr``), not the dense parameters' Adam at ``lr``. On the CPU row-wise Adagrad moves only
    the rows a batch touches either way; on CUDA the dense Adam also moves untouched rows on
    their momentum, where fbgemm's fused Adam leaves them."""
    if use_cuda:
        return lambda params: torch.optim.Adam(params, lr=id_learning_rate, eps=ID_OPTIMIZER_EPS)
    from torchrec.optim import RowWiseAdagrad
    return lambda params: RowWiseAdagrad(params, lr=id_learning_rate, eps=ID_OPTIMIZER_EPS)
