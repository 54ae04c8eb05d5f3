"""The sparse arch: every embedding table of CiUBM, as TorchRec collections the planner shards.

* ``pooled``: user and query-word tables (an ``EmbeddingBagCollection``, sum pooling).
* ``sequence``: the item and category tables, looked up once per sequence slot (target +
  behaviours), so target and behaviours share one item table.
* ``mm``: the frozen multi-modal table (a :class:`FrozenEmbeddingBagCollection`): looked up
  under ``no_grad``, sharded by its own sharder whose fused optimizer is plain SGD at learning
  rate 0 (it has no state), and filled from the representation center. Its storage precision
  is ``ModelConfig.mm_dtype`` (:func:`mm_data_type`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.modules.embedding_configs import DataType

from mim_rec.ciubm.config import ModelConfig
from mim_rec.config import ConfigError

MM_TABLE = "mm_item"
# FBGEMM's kernels (and TorchRec's sharded collections, which assert it on every rank) need a
# table's width to be a multiple of this.
FBGEMM_COLUMN_ALIGNMENT = 4
MM_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}

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


class FrozenSharder(EmbeddingBagCollectionSharder):
    """Shards :class:`FrozenEmbeddingBagCollection` with a stateless, zero-step optimizer.

    The model reads the table under ``no_grad``, so no gradient ever reaches it; EXACT_SGD at
    learning rate 0 additionally guarantees no optimizer state and no update.
    """

    def __init__(self) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        super().__init__(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0})

    @property
    def module_type(self):
        return FrozenEmbeddingBagCollection


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


class SparseArch(nn.Module):
    """Looks up every sparse feature of a batch.

    Returns ``pooled {user_id: [B, Du], query_tokens: [B, Dq]}``, ``ids [B, 1+L, Di+Dc]``
    (slot 0 the target), and ``mm [B, 1+L, Dmm]`` (``None`` when the config uses no MM).
    """

    def __init__(self, config: ModelConfig, num_items: int, num_users: int, num_categories: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = config
        self.pooled = EmbeddingBagCollection(tables=[
            _table("user", num_users, config.user_dim, ["user_id"]),
            _table("query_word", config.query_buckets, config.query_dim, ["query_tokens"]),
        ], device=device)
        self.sequence = EmbeddingBagCollection(tables=[
            _table("item", num_items, config.item_dim, ["item_seq"]),
            _table("category", num_categories, config.category_dim, ["category_seq"]),
        ], device=device)
        self.mm = FrozenEmbeddingBagCollection(
            tables=[mm_table_config(num_items, config.mm_dim, config.mm_dtype)], device=device) \
            if config.uses_mm else None

    def forward(self, pooled: KeyedJaggedTensor, sequence: KeyedJaggedTensor, batch_size: int
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        pooled_out = self.pooled(pooled).to_dict()
        seq = self.sequence(sequence).to_dict()
        ids = torch.cat([seq["item_seq"], seq["category_seq"]], dim=1).view(batch_size, -1, self.config.behaviour_dim)
        mm = None
        if self.mm is not None:
            with torch.no_grad():
                rows = self.mm(sequence).to_dict()["mm_item_seq"].float()  # fp16 storage may pool in fp16
                mm = rows.view(batch_size, -1, mm_storage_dim(self.config.mm_dim))[..., :self.config.mm_dim]
        return pooled_out, ids, mm


def sharders(id_learning_rate: float, use_cuda: bool) -> list:
    """The sharders CiUBM needs: the ID tables' fused optimizer (Adam where the CUDA kernels
    have it, row-wise Adagrad on CPU) and the frozen sharder for the MM table."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    optimizer = EmbOptimType.ADAM if use_cuda else EmbOptimType.EXACT_ROWWISE_ADAGRAD
    return [EmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer,
                                                        "learning_rate": id_learning_rate}),
            FrozenSharder()]
