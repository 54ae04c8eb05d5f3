"""The nn.Embedding reference of ``mim bench train``: CiUBM with plain torch tables, loaded
with the TorchRec model's weights. Apart from :mod:`train.bench_train` because its table module
subclasses ``nn.Module`` when defined, and that module must import without torch: ``mim --help``
registers every command."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from mim_rec.ciubm.config import ModelConfig
from mim_rec.ciubm.model import CiUBM


class PlainSparseArch(nn.Module):
    """:class:`~mim_rec.ciubm.sparse.SparseArch` written with plain torch tables.

    Same inputs (the batch's KJTs) and outputs; ``tables`` holds the trainable ID tables
    (``nn.Embedding`` for one-id features, ``nn.EmbeddingBag`` for the query's word bag),
    ``mm`` the frozen MM table as a buffer read without gradient.
    """

    def __init__(self, config: ModelConfig, num_items: int, num_users: int, num_categories: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = config
        self.tables = nn.ModuleDict({
            "user": nn.Embedding(num_users, config.user_dim, sparse=True, device=device),
            "query_word": nn.EmbeddingBag(config.query_buckets, config.query_dim, mode="sum", sparse=True,
                                          device=device),
            "item": nn.Embedding(num_items, config.item_dim, sparse=True, device=device),
            "category": nn.Embedding(num_categories, config.category_dim, sparse=True, device=device),
        })
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[config.mm_dtype]
        self.register_buffer("mm", torch.zeros(num_items, config.mm_dim, dtype=dtype, device=device)
                             if config.uses_mm else None)

    def forward(self, pooled, sequence, batch_size: int, slots: int):
        user, query = pooled["user_id"], pooled["query_tokens"]
        pooled_out = {"user_id": self.tables["user"](user.values()),
                      "query_tokens": self.tables["query_word"](query.values(), query.offsets()[:-1])}
        items, present = self._slot_ids(sequence["item_seq"])
        categories, _ = self._slot_ids(sequence["category_seq"])
        ids = torch.cat([self.tables["item"](items), self.tables["category"](categories)], dim=-1) * present
        mm = None
        if self.mm is not None:
            mm = (self.mm[items].float() * present).view(batch_size, slots, self.config.mm_dim)
        return (pooled_out, ids.view(batch_size, slots, self.config.behaviour_dim), mm,
                present.view(batch_size, slots) > 0, categories.view(batch_size, slots))

    @staticmethod
    def _slot_ids(jagged) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids [slots], present [slots, 1])``: every slot holds one id or none (then id 0, masked)."""
        present = jagged.lengths() > 0
        ids = torch.zeros(present.numel(), dtype=torch.long, device=present.device)
        ids[present] = jagged.values().long()
        return ids, present.unsqueeze(1).to(torch.float32)


def _full_tensor(weight) -> torch.Tensor:
    """A (possibly sharded) table of the one-rank TorchRec model as one plain tensor."""
    from mim_rec.ciubm.mm_shards import local_blocks

    if not hasattr(weight, "local_shards"):
        return weight.detach()
    full = torch.empty(weight.size(), dtype=weight.dtype)
    for row, col, block in local_blocks(weight):
        full[row:row + block.shape[0], col:col + block.shape[1]] = block.detach().cpu()
    return full


def torchrec_weights(model) -> Dict[str, torch.Tensor]:
    """The one-rank TorchRec CiUBM's weights under the reference model's state-dict names."""
    renamed = {}
    for key, value in model.state_dict().items():
        if ".embedding_bags." in key:
            table = key.split(".embedding_bags.")[1].rsplit(".", 1)[0]
            key = "sparse_arch.mm" if table == "mm_item" else f"sparse_arch.tables.{table}.weight"
        renamed[key] = _full_tensor(value).clone()
    return renamed


def reference_model(config: ModelConfig, sizes: Dict[str, int], weights: Dict[str, torch.Tensor],
                    device: torch.device) -> CiUBM:
    """CiUBM with :class:`PlainSparseArch` tables, loaded with ``weights`` (:func:`torchrec_weights`)."""
    meta = torch.device("meta")  # allocate once, in to_empty: a build's memory is then the model's own
    model = CiUBM(config, sizes["items"], sizes["users"], sizes["categories"], device=meta)
    model.sparse_arch = PlainSparseArch(config, sizes["items"], sizes["users"], sizes["categories"], meta)
    model = model.to_empty(device=device)
    if "sparse_arch.mm" in weights:  # TorchRec stores the MM table padded to FBGEMM's column alignment
        weights = {**weights, "sparse_arch.mm": weights["sparse_arch.mm"][:, :config.mm_dim]}
    model.load_state_dict(weights, strict=True)
    return model


def reference_optimizer(model: CiUBM, lr: float, id_lr: float) -> Callable[[], None]:
    """``step()`` of a user's optimizers: sparse ID tables (Adagrad / SparseAdam), dense Adam."""
    tables = list(model.sparse_arch.tables.parameters())
    table_ids = {id(p) for p in tables}
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in table_ids], lr=lr)
    sparse = torch.optim.SparseAdam(tables, lr=id_lr) if tables[0].is_cuda else torch.optim.Adagrad(tables, lr=id_lr)

    def step() -> None:
        dense.step()
        sparse.step()
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)

    return step
