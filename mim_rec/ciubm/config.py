"""CiUBM settings: which interest modules are on, table sizes, dims, and the sharding
constraints of each table (configuration, never code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional


@dataclass
class TableConstraint:
    """Per-table planner constraints (``torchrec.distributed.planner.ParameterConstraints``)."""

    sharding_types: Optional[List[str]] = None   # e.g. ["table_wise"], ["row_wise"]
    compute_kernels: Optional[List[str]] = None  # e.g. ["fused"], ["dense"]
    ranks: Optional[List[int]] = None            # pin the shards to these ranks (mim_rec/ciubm/placement.py)


@dataclass
class ModelConfig:
    ubm: str = "din"                       # avg | din | dien | bst | sim | twin
    ubm_options: Dict[str, object] = field(default_factory=dict)
    id_interest: bool = True               # the UBM over item-ID embeddings
    content_interest: bool = True          # sum of cos(h_t^MM, h_i^MM) * h_i^MM
    # mean: the weighted sum over the number of real behaviours, so its scale does not grow with
    # the history (docs/ciubm.md); sum: as the paper writes it.
    content_pool: Literal["sum", "mean"] = "mean"
    fusion_interest: bool = True           # sum of cos(h_t^MM, h_i^MM) * h_i^ID
    # How the behaviour tables are looked up: ebc, an EmbeddingBagCollection over one single-id
    # bag per slot; ec, EmbeddingCollections over one sequence per sample. The same rows either
    # way; ec trains faster under row-wise sharding, ebc under table- and column-wise
    # (`mim bench layout sharded=true`, docs/ciubm.md "Batches").
    sequence_layout: Literal["ebc", "ec"] = "ebc"
    item_dim: int = 16
    category_dim: int = 8
    user_dim: int = 16
    query_dim: int = 8
    mm_dim: Optional[int] = None           # None: the MM table's dim (64 for the random stand-in)
    mm_dtype: str = "fp32"                 # storage of the frozen MM table: fp32 | fp16 (int8: see sparse.py)
    mm_projection: Optional[int] = None    # learned width of the target's MM vector and the content interest
                                           # before the over-arch (None: the raw mm_dim, as in the paper)
    target_mm: bool = True                 # feed the target's own MM vector to the over-arch too
    content_match: bool = False            # also feed the mean and max content weight a_ti (2 scalars)
    # PCA-whiten the looked-up MM vectors to at most this many components (statistics fitted once
    # from the table, never trained; docs/ciubm.md). None or 0: the raw table, as in the paper.
    mm_whiten: Optional[int] = 16
    # Learn the metric of the content weights: a_ti = cos(M h_t, M h_i) with a square M (dense,
    # starts as the identity, so training starts from the fixed cosine). False: the fixed
    # cosine, as in the paper. The table stays frozen; M is a model parameter.
    content_metric: bool = False
    query_buckets: int = 20_000
    over_arch: List[int] = field(default_factory=lambda: [200, 80])
    dien_aux_weight: float = 1.0
    constraints: Dict[str, TableConstraint] = field(default_factory=dict)  # by table name

    @property
    def uses_mm(self) -> bool:
        return self.content_interest or self.fusion_interest

    @property
    def mm_whiten_components(self) -> Optional[int]:
        """The whitened width: ``mm_whiten`` capped at the table's dim, so one setting serves a grid
        whose tables differ in width (a table narrower than ``mm_whiten`` is whitened in full)."""
        if not self.mm_whiten:
            return None
        if self.mm_dim is None:
            raise ValueError("model.mm_dim must be resolved from the MM table before whitening is sized")
        return min(self.mm_whiten, self.mm_dim)

    @property
    def behaviour_dim(self) -> int:
        """Width of a behaviour's ID representation: item embedding ++ category embedding."""
        return self.item_dim + self.category_dim
