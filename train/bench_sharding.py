"""``mim bench sharding``: compare TorchRec sharding plans for the ID tables and the MM table.

For one set of tables and one topology, every candidate plan (table-wise, row-wise,
column-wise, table-row-wise, table-column-wise, data-parallel, and the planner's own choice)
is shown with TorchRec's planner estimates (per-rank memory, communication, step time, does it
fit). With ``--measure`` the same plans are then run for real: ``world_size`` gloo/nccl ranks
wrap a model of embedding collections (trainable ID tables, frozen MM table looked up under
no_grad, as CiUBM does) in ``DistributedModelParallel`` and time forward/backward steps on
random KJTs.

Where an estimate comes from matters, so every row says it:
  * ``planner``: TorchRec's ``EmbeddingShardingPlanner`` with the sharding type forced through
    ``ParameterConstraints`` (or free, for the ``planner`` row); estimates are its own.
  * ``manual``: the sharding type is not offered by TorchRec's sharder on this compute device
    (row-wise and table-row-wise for an EmbeddingBagCollection on CPU), so the plan is built
    with ``torchrec.distributed.sharding_plan`` helpers. Its per-rank storage is TorchRec's
    ``EmbeddingStorageEstimator``'s for the plan's own shards, and ``fits`` is decided as for
    the planner's rows (capacity less the same reservation); it has no comms or step estimate.
    A plan of either source that does not fit is never measured.

The batches have CiUBM's ``ebc`` layout (mim_rec/ciubm/sparse.py, docs/ciubm.md "Batches"): the
MM table and the behaviour ID tables (``per_slot``: item and category by default)
are looked up in ``1 + L`` single-id bags per sample, the target and ``L = mm_pooling``
behaviours (KJTs of stride ``B (1 + L)``, ``B (1 + L)`` output rows); the other ID tables
(user, query words) in one bag per sample (a KJT of stride ``B``). The planner is
told both (``pooling_factors`` = ids per bag, ``num_poolings`` = bags per sample), so the
storage, lookups and communication per id and per output row are those of the CiUBM lookup,
whose layout ``mim bench layout sharded=true`` compares with an ``EmbeddingCollection``. The
model averages each sample's ``1 + L`` rows before its linear over arch, which is not
CiUBM's (attention over the slots) and moves no embedding bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from tqdm import tqdm

from mim_rec.config import ConfigError, load_config, require_distinct, require_not_negative, require_positive
from mim_rec.utils.text import counted
from train.bench_cmd import check_json_path, run_and_report

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise",
                  "table_column_wise", "data_parallel")
PLANNER_CHOICE = "planner"
GB, MB = 1e9, 1e6  # decimal, as TorchRec's topology capacities and the paper's sizes


@dataclass
class TableSpec:
    """One embedding table (one feature), looked up in bags of ``pooling`` ids: one bag per
    sample, or with ``per_slot`` one per behaviour slot, ``1 + L`` a sample (the target and
    ``L = mm_pooling`` behaviours; :meth:`ShardingBenchConfig.bags`).

    The bags set the table's output rows, ``B x bags``, and so the planner's output and
    communication estimates (TorchRec's ``num_poolings``): CiUBM looks its MM, item and
    category tables up once per slot, ``1 + L`` single-id bags, not one bag of ``L`` ids
    summed to one row.
    """

    name: str
    rows: int
    dim: int
    pooling: int = 1
    per_slot: bool = False


@dataclass
class ShardingBenchConfig:
    """Tables, topology and run length. Defaults are a CPU-sized run for 2 gloo ranks."""

    # One bag a sample (stride B, CiUBM's ``pooled`` KJT), or per_slot: one single-id bag a slot,
    # target and behaviours (stride B (1 + L), CiUBM's ``sequence`` KJT).
    id_tables: List[TableSpec] = field(default_factory=lambda: [
        TableSpec("user_id", 20_000, 32, 1),
        TableSpec("item_id", 50_000, 32, 1, per_slot=True),
        TableSpec("category_id", 1_000, 16, 1, per_slot=True),
        TableSpec("query_token", 30_000, 32, 8),
    ])
    mm_rows: int = 50_000
    mm_dim: int = 128
    mm_dtype: str = "fp32"          # fp32 | fp16
    # The behaviour-sequence length L (the name is kept for old configs): the MM table is looked
    # up in 1 + L single-id bags a sample (target + behaviours), as CiUBM's ebc layout does.
    mm_pooling: int = 20
    batch_size: int = 512           # per rank
    world_size: int = 2
    local_world_size: Optional[int] = None   # ranks per host; default: all on one host
    compute_device: str = "cpu"     # cpu | cuda (cuda may be simulated: planner-only)
    hbm_gb_per_device: float = 80.0
    ddr_gb_per_device: float = 16.0
    plans: List[str] = field(default_factory=lambda: [
        "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel", "planner"])
    warmup_steps: int = 3
    steps: int = 20
    seed: int = 0
    # Columns per shard of a column-wise table (ParameterConstraints.min_partition); None keeps
    # TorchRec's 128, under which a table of <= 128 columns stays whole (the row says so).
    column_wise_min_dim: Optional[int] = None

    @classmethod
    def paper_scale(cls) -> "ShardingBenchConfig":
        """The paper's MM table: 1.4 B items x 128-d (fp16), 8 hosts x 8 GPUs of 80 GB HBM."""
        return cls(id_tables=[TableSpec("category_id", 10_000, 16, 1, per_slot=True)],
                   mm_rows=1_400_000_000, mm_dim=128, mm_dtype="fp16", mm_pooling=50,
                   batch_size=2048, world_size=64, local_world_size=8, compute_device="cuda",
                   hbm_gb_per_device=80.0, ddr_gb_per_device=0.0,
                   plans=list(SHARDING_TYPES) + [PLANNER_CHOICE])

    def validate(self) -> None:
        require_positive(self, ("mm_rows", "mm_dim", "mm_pooling", "batch_size", "world_size", "local_world_size",
                                "steps", "column_wise_min_dim"))
        require_not_negative(self, ("warmup_steps", "hbm_gb_per_device", "ddr_gb_per_device"))
        for index, table in enumerate(self.id_tables):
            require_positive(table, ("rows", "dim", "pooling"), prefix=f"id_tables[{index}].")
        if self.mm_dtype not in ("fp32", "fp16"):
            # TorchRec's training EmbeddingBagCollection silently stores an INT8 table as fp16,
            # so the planner would estimate fp16 bytes under an int8 label.
            raise ConfigError(f"mm_dtype: {self.mm_dtype!r} is not fp32 or fp16 (TorchRec "
                              "trains no int8 tables; the header shows int8 sizes)")
        if self.compute_device not in ("cpu", "cuda"):
            raise ConfigError(f"compute_device: {self.compute_device!r} is not cpu or cuda")
        if not self.plans:
            raise ConfigError(f"plans: empty; choose one or more of {list(SHARDING_TYPES) + [PLANNER_CHOICE]}")
        unknown = [p for p in self.plans if p not in SHARDING_TYPES + (PLANNER_CHOICE,)]
        if unknown:
            raise ConfigError(f"plans: unknown {unknown}; choose from "
                              f"{list(SHARDING_TYPES) + [PLANNER_CHOICE]}")
        require_distinct(self, ("plans",))
        if self.world_size % self.ranks_per_host:
            raise ConfigError(f"world_size={self.world_size} is not a multiple of "
                              f"local_world_size={self.ranks_per_host}")
        names = [t.name for t in self.id_tables] + ["mm_table"]
        if len(set(names)) != len(names):
            raise ConfigError(f"id_tables: table names must be unique (and not 'mm_table'): {names}")

    @property
    def ranks_per_host(self) -> int:
        return self.local_world_size or self.world_size

    @property
    def mm_table(self) -> TableSpec:
        return TableSpec("mm_table", self.mm_rows, self.mm_dim, pooling=1, per_slot=True)

    @property
    def pooled_tables(self) -> List[TableSpec]:
        """ID tables with one bag a sample (a KJT of stride ``batch_size``)."""
        return [t for t in self.id_tables if not t.per_slot]

    @property
    def sequence_tables(self) -> List[TableSpec]:
        """ID tables with one bag a slot (a KJT of stride ``batch_size * (1 + L)``)."""
        return [t for t in self.id_tables if t.per_slot]

    def bags(self, table: TableSpec) -> int:
        """Bags a sample of ``table``: ``1 + mm_pooling`` per slot (target and behaviours), else 1."""
        return self.mm_pooling + 1 if table.per_slot else 1


@dataclass
class PlanRow:
    """One candidate: how it was made, the planner's estimates, and (optionally) measurements."""

    plan: str
    source: str                      # planner | manual | failed
    table_types: Dict[str, str] = field(default_factory=dict)
    fits: Optional[bool] = None
    note: str = ""
    est_mem_gb: List[float] = field(default_factory=list)       # per rank
    est_comms_ms: List[float] = field(default_factory=list)     # per rank
    est_step_ms: Optional[float] = None                         # slowest rank
    step_ms: Optional[float] = None
    samples_per_s: Optional[float] = None
    shard_mb: List[float] = field(default_factory=list)         # per rank
    peak_mem_mb: List[float] = field(default_factory=list)      # per rank
    sharding_plan: Any = None                                   # ShardingPlan, not printed


# ---------------------------------------------------------------------------------- model

def _dtype(name: str):
    from torchrec.modules.embedding_configs import DataType
    return {"fp32": DataType.FP32, "fp16": DataType.FP16}[name]


def build_model(config: ShardingBenchConfig, device: str = "meta"):
    """The bench model: trainable ID tables (``pooled_ids``: one bag a sample; ``sequence_ids``:
    one bag a slot), a frozen MM table (one bag a slot), a linear over arch. Each sample's slot
    rows are averaged to one, so the over arch's width is the tables' dims whatever ``bags``."""
    import torch
    import torch.nn.functional as F
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    def ebc(specs: List[TableSpec], dtype: str) -> EmbeddingBagCollection:
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                       feature_names=[t.name], data_type=_dtype(dtype))
                    for t in specs],
            device=torch.device(device))

    def per_sample(rows, bags: int):
        """``[B * bags, D]`` rows (a sample's bags consecutive, as in a KJT) -> ``[B, D]``."""
        return rows.view(-1, bags, rows.shape[1]).mean(dim=1) if bags > 1 else rows

    slots = config.mm_pooling + 1

    class ShardingBenchModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooled_ids = ebc(config.pooled_tables, "fp32") if config.pooled_tables else None
            self.sequence_ids = ebc(config.sequence_tables, "fp32") if config.sequence_tables else None
            self.mm_table = ebc([config.mm_table], config.mm_dtype)
            width = config.mm_dim + sum(t.dim for t in config.id_tables)
            self.over = torch.nn.Linear(width, 1, device=None if device == "meta" else device)

        def forward(self, pooled_features, sequence_features, mm_features, labels):
            with torch.no_grad():  # frozen: no gradient, no optimizer state
                parts = [per_sample(self.mm_table(mm_features).values().float(), slots)]
            if self.pooled_ids is not None:
                parts.append(self.pooled_ids(pooled_features).values())
            if self.sequence_ids is not None:
                parts.append(per_sample(self.sequence_ids(sequence_features).values(), slots))
            logits = self.over(torch.cat(parts, dim=1)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logits, labels)

    return ShardingBenchModel()


def _sharders():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    # EXACT_SGD: no optimizer state, runs on CPU and GPU, so memory is the tables themselves.
    return [EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.01})]


# -------------------------------------------------------------------------------- planning

def _topology(config: ShardingBenchConfig):
    from torchrec.distributed.planner import Topology
    return Topology(world_size=config.world_size, compute_device=config.compute_device,
                    local_world_size=config.ranks_per_host,
                    hbm_cap=int(config.hbm_gb_per_device * GB) if config.compute_device == "cuda" else 0,
                    ddr_cap=int(config.ddr_gb_per_device * GB))


def _all_tables(config: ShardingBenchConfig) -> List[TableSpec]:
    return list(config.id_tables) + [config.mm_table]


# Kept free on each rank before any shard is placed: 15% of its memory, plus the dense part and
# the batch's input copies as TorchRec's HeuristicalStorageReservation computes them (its
# default percentage, named here so that "fits" has a stated meaning, for planner and manual
# rows alike).
RESERVED_FRACTION = 0.15


def _load(config: ShardingBenchConfig, table: TableSpec) -> Dict[str, List[float]]:
    """The ``ParameterConstraints`` fields giving the planner a table's lookups: ``pooling``
    ids a bag, :meth:`~ShardingBenchConfig.bags` bags (output rows) a sample."""
    return {"pooling_factors": [float(table.pooling)], "num_poolings": [float(config.bags(table))]}


def _storage_reservation(config: ShardingBenchConfig):
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation

    class IdsPerSample(HeuristicalStorageReservation):
        """TorchRec's reservation for the batch's input copies reads ``pooling_factors`` as a
        table's ids a sample (it ignores ``num_poolings``): give it ``pooling x bags``."""

        def reserve(self, topology, batch_size, module, sharders, constraints=None):
            ids = {t.name: ParameterConstraints(pooling_factors=[float(t.pooling * config.bags(t))])
                   for t in _all_tables(config)}
            return super().reserve(topology, batch_size, module, sharders, ids)

    return IdsPerSample(percentage=RESERVED_FRACTION)


def planner_offers(compute_device: str) -> List[str]:
    """Sharding types TorchRec's EBC sharder offers the planner on ``compute_device``."""
    return list(_sharders()[0].sharding_types(compute_device))


def plan_with_planner(config: ShardingBenchConfig, model, sharding_type: Optional[str]) -> PlanRow:
    """Ask TorchRec's planner for a plan (every table forced to ``sharding_type`` if given)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.constants import MIN_CW_DIM
    from torchrec.distributed.planner.types import PlannerError, Stats

    from embeddings.compact import row_bytes

    class KeepBestPlan(Stats):
        """Keeps the chosen sharding options (with their per-shard estimates)."""

        def __init__(self) -> None:
            self.best_plan: list = []

        def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals,
                num_plans, run_time, best_plan, *args, **kwargs) -> None:
            self.best_plan = best_plan

    # Tables live in device memory ("fused"; "dense" is the kernel of data-parallel tables),
    # never in a UVM cache, so "fits" means fits in HBM (cuda) or DDR (cpu).
    kernels = {"data_parallel": ["dense"], None: ["fused", "dense"]}.get(sharding_type, ["fused"])
    constraints = {t.name: ParameterConstraints(
        sharding_types=[sharding_type] if sharding_type else None,
        compute_kernels=kernels, min_partition=config.column_wise_min_dim, **_load(config, t))
        for t in _all_tables(config)}
    stats = KeepBestPlan()
    planner = EmbeddingShardingPlanner(
        topology=_topology(config), batch_size=config.batch_size, constraints=constraints,
        storage_reservation=_storage_reservation(config), stats=stats, debug=False)
    name = sharding_type or PLANNER_CHOICE
    try:
        plan = planner.plan(model, _sharders())
    except PlannerError as exc:
        mm = config.mm_table
        mm_gb = mm.rows * row_bytes(config.mm_dtype, mm.dim) / GB
        return PlanRow(name, "planner", fits=False,
                       note=f"{_first_line(str(exc))} (mm_table {mm_gb:.4g} GB, "
                            f"{_capacity_gb(config):g} GB per rank)")
    row = PlanRow(name, "planner", fits=True, sharding_plan=plan)
    mem = [0.0] * config.world_size
    comms = [0.0] * config.world_size
    perf = [0.0] * config.world_size
    for option in stats.best_plan:
        row.table_types[option.name] = option.sharding_type
        for shard in option.shards:
            mem[shard.rank] += (shard.storage.hbm + shard.storage.ddr) / GB
            comms[shard.rank] += (shard.perf.fwd_comms + shard.perf.bwd_comms
                                  + shard.perf.input_dist_comms)
            perf[shard.rank] += shard.perf.total
    row.est_mem_gb, row.est_comms_ms, row.est_step_ms = mem, comms, max(perf)
    column_wise = [o for o in stats.best_plan if o.sharding_type in ("column_wise", "table_column_wise")]
    if column_wise and all(len(o.shards) == 1 for o in column_wise):
        row.note = (f"no table was split by columns (each has <= {config.column_wise_min_dim or MIN_CW_DIM} "
                    f"columns, the shard width): the layout of table_wise; set column_wise_min_dim to split")
    return row


def _fused(generator):
    """The same sharding with the ``fused`` compute kernel, as the planner's rows use.

    Left alone, TorchRec's helpers take the sharder's first kernel, ``dense`` on CPU, whose
    backward has no autograd kernel in fbgemm's CPU build (a measured run aborted in it).
    """
    import dataclasses

    def make(*args):
        return dataclasses.replace(generator(*args), compute_kernel="fused")

    return make


def plan_manually(config: ShardingBenchConfig, model, sharding_type: str) -> PlanRow:
    """Build a plan with TorchRec's ``sharding_plan`` helpers (no planner: its storage per rank
    comes from TorchRec's storage estimator and decides ``fits``; no comms or step estimates)."""
    from torchrec.distributed import sharding_plan as sp
    from torchrec.distributed.types import ShardingPlan

    world, per_host = config.world_size, config.ranks_per_host
    generators = {  # the two types the EBC sharder keeps from the planner on CPU
        "row_wise": lambda i: _fused(sp.row_wise()),
        "table_row_wise": lambda i: _fused(sp.table_row_wise(host_index=i % (world // per_host))),
    }
    if sharding_type not in generators:
        raise ValueError(f"{sharding_type} plans come from the planner, not built by hand")
    device = "cuda" if config.compute_device == "cuda" else "cpu"
    modules: Dict[str, Any] = {}
    row = PlanRow(sharding_type, "manual")
    index = 0
    for path in ("pooled_ids", "sequence_ids", "mm_table"):
        module = getattr(model, path)
        if module is None:
            continue
        per_param = {}
        for table in module.embedding_bag_configs():
            per_param[table.name] = generators[sharding_type](index)
            row.table_types[table.name] = sharding_type
            index += 1
        modules[path] = sp.construct_module_sharding_plan(
            module, per_param, local_size=per_host, world_size=world, device_type=device,
            sharder=_sharders()[0])
    row.sharding_plan = ShardingPlan(modules)
    estimate_manual_storage(config, model, row)
    return row


def _manual_shard_storage(config: ShardingBenchConfig, model, row: PlanRow, topology, constraints,
                          sharder) -> List[Tuple[int, int]]:
    """``[(hbm, ddr) bytes per rank]`` of a manual plan, priced by TorchRec's own estimator.

    ``EmbeddingStorageEstimator`` (what the planner's rows show) prices every table under the
    plan's sharding type and kernel, shard by shard; each estimated shard is charged to the rank
    the manual plan puts it on (matched by its offsets). Shards that are not exactly the plan's
    mean this TorchRec splits tables differently from :func:`plan_manually`: that is refused by
    table name rather than priced some other way, so every row of the bench is priced alike."""
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    def mismatch(table: str) -> RuntimeError:
        return RuntimeError(f"{row.plan}: TorchRec's estimator splits table {table!r} into other shards "
                            "than the manual plan does; the plan cannot be priced")

    per_rank = [[0, 0] for _ in range(config.world_size)]
    enumerator = EmbeddingEnumerator(
        topology=topology, batch_size=config.batch_size, constraints=constraints,
        estimator=[EmbeddingStorageEstimator(topology=topology, constraints=constraints)])
    seen = set()
    for option in enumerator.enumerate(model, [sharder]):
        spec = row.sharding_plan.plan[option.path][option.name]
        if (option.path, option.name) in seen or option.sharding_type != spec.sharding_type \
                or option.compute_kernel != spec.compute_kernel:
            raise mismatch(option.name)
        seen.add((option.path, option.name))
        placed = {(tuple(s.shard_offsets), tuple(s.shard_sizes)): s.placement.rank()
                  for s in spec.sharding_spec.shards}
        if len(placed) != len(option.shards):
            raise mismatch(option.name)
        for shard in option.shards:
            rank = placed.get((tuple(shard.offset), tuple(shard.size)))
            if rank is None:
                raise mismatch(option.name)
            per_rank[rank][0] += shard.storage.hbm
            per_rank[rank][1] += shard.storage.ddr
    missing = {(path, name) for path, tables in row.sharding_plan.plan.items() for name in tables} - seen
    if missing:
        raise mismatch(sorted(missing)[0][1])
    return [tuple(r) for r in per_rank]


def estimate_manual_storage(config: ShardingBenchConfig, model, row: PlanRow) -> None:
    """Fill ``est_mem_gb`` and ``fits`` of a manual row as the planner does for its own rows:
    each rank's shard storage against its capacity less the planner's reservation
    (:data:`RESERVED_FRACTION`, the dense part and the inputs). A plan that does not fit is not
    measured (it could allocate far more than the rank has)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.planner.types import PlannerError

    sharding_type = row.plan
    compute_kernel = next(iter(next(iter(row.sharding_plan.plan.values())).values())).compute_kernel

    class EstimateOnlySharder(EmbeddingBagCollectionSharder):
        """The bench's sharder offering the manual plan's type to the estimator (never to DMP)."""

        def sharding_types(self, compute_device_type: str) -> List[str]:
            return [sharding_type]

    sharder = EstimateOnlySharder(fused_params=_sharders()[0].fused_params)
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[compute_kernel],
                                                **_load(config, t))
                   for t in _all_tables(config)}
    topology = _topology(config)
    per_rank = _manual_shard_storage(config, model, row, topology, constraints, sharder)
    row.est_mem_gb = [(hbm + ddr) / GB for hbm, ddr in per_rank]
    row.note = ("planner offers it only on cuda; storage estimated by TorchRec's EmbeddingStorageEstimator "
                f"for this plan's shards; comms/step estimates n/a on {config.compute_device}")
    try:
        free = [(d.storage.hbm, d.storage.ddr) for d in
                _storage_reservation(config).reserve(topology, config.batch_size, model, [sharder],
                                                     constraints).devices]
    except PlannerError as exc:  # the reservation alone exceeds a rank's memory
        row.fits = False
        row.note += f"; does not fit: {_first_line(str(exc))}; not run"
        return
    short = [r for r, ((hbm, ddr), (free_hbm, free_ddr)) in enumerate(zip(per_rank, free))
             if hbm > free_hbm or ddr > free_ddr]
    row.fits = not short
    if short:
        rank = max(short, key=lambda r: row.est_mem_gb[r])
        left = max(0.0, sum(free[rank])) / GB
        row.note += (f"; does not fit: rank {rank} needs {row.est_mem_gb[rank]:.4g} GB, {left:.4g} GB of "
                     f"{_capacity_gb(config):g} GB per rank is left after the planner's reservation; not run")


def make_plans(config: ShardingBenchConfig) -> List[PlanRow]:
    """One row per candidate in ``config.plans``, planner where it can, manual otherwise."""
    config.validate()
    model = build_model(config, device="meta")
    offered = planner_offers(config.compute_device)
    rows = []
    for name in config.plans:
        if name == PLANNER_CHOICE:
            rows.append(plan_with_planner(config, model, None))
        elif name in offered:
            rows.append(plan_with_planner(config, model, name))
        else:
            rows.append(plan_manually(config, model, name))
    return rows


def _capacity_gb(config: ShardingBenchConfig) -> float:
    """Memory a table shard may use per rank: HBM on cuda, DDR on cpu."""
    return config.hbm_gb_per_device if config.compute_device == "cuda" else config.ddr_gb_per_device


def _first_line(text: str) -> str:
    line = next((l.strip() for l in text.splitlines() if l.strip()), text)
    return line[:160]


# ------------------------------------------------------------------------------ measuring

def _random_batch(config: ShardingBenchConfig, generator):
    """``(pooled KJT, sequence KJT, MM KJT, labels)``: each KJT holds ``batch_size * bags``
    bags of ``pooling`` random ids per table (``None`` for no tables), CiUBM's ``ebc`` layout."""
    import torch
    from torchrec import KeyedJaggedTensor

    def kjt(tables: List[TableSpec]) -> Optional[KeyedJaggedTensor]:
        if not tables:
            return None
        bags = config.batch_size * config.bags(tables[0])  # one stride a KJT: its tables share bags
        lengths = torch.cat([torch.full((bags,), t.pooling, dtype=torch.int32) for t in tables])
        values = torch.cat([torch.randint(0, t.rows, (bags * t.pooling,), generator=generator)
                            for t in tables])
        return KeyedJaggedTensor(keys=[t.name for t in tables], values=values, lengths=lengths,
                                 stride=bags)

    labels = torch.randint(0, 2, (config.batch_size,), generator=generator).float()
    return kjt(config.pooled_tables), kjt(config.sequence_tables), kjt([config.mm_table]), labels


def _local_bytes(tensor) -> int:
    """Bytes of this rank's part of a state-dict entry (ShardedTensor, DTensor or plain)."""
    if hasattr(tensor, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def _measure_plan(rank: int, device, config: ShardingBenchConfig, plan) -> Tuple[float, float, float]:
    """Run warm-up + timed steps under ``plan`` on this rank (one torch thread); return
    (median step s, shard MB, peak memory MB)."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.set_num_threads(1)
    model = DistributedModelParallel(build_model(config), device=device, plan=plan,
                                     sharders=_sharders())
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=0.01))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    batches = [[x.to(device) if x is not None else None for x in _random_batch(config, generator)]
               for _ in range(min(4, config.steps))]
    step_times = []
    for step in range(config.warmup_steps + config.steps):
        if step == config.warmup_steps:
            dist.barrier()
        start = time.perf_counter()
        loss = model(*batches[step % len(batches)])
        loss.backward()
        dense_optimizer.step()
        dense_optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= config.warmup_steps:
            step_times.append(time.perf_counter() - start)
    dist.barrier()
    # The median step: robust to the odd step stalled by another process on a shared host.
    step_s = statistics.median(step_times)
    shard_bytes = sum(_local_bytes(v) for k, v in model.state_dict().items()
                      if "embedding_bags" in k)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_resident_bytes()
    return step_s, shard_bytes / MB, peak / MB


def _peak_resident_bytes() -> int:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    across fork and exec, so a spawned rank reported its caller's peak whenever it was larger."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory is measured on Linux only")


def measure(config: ShardingBenchConfig, rows: List[PlanRow]) -> None:
    """Fill the measured columns of every row that has a plan.

    Each plan runs in its own freshly spawned ranks, so peak memory belongs to that plan alone.
    """
    from mim_rec.utils.dist import run_on_spawned_ranks

    for row in tqdm(rows, desc="measuring plans", unit="plan", file=sys.stderr):
        if row.sharding_plan is None or row.fits is False:  # never run a plan that does not fit
            continue
        per_rank = run_on_spawned_ranks(_measure_plan, config.world_size, config.compute_device, config,
                                        row.sharding_plan)
        row.step_ms = max(step for step, _, _ in per_rank) * 1e3
        row.samples_per_s = config.batch_size * config.world_size / (row.step_ms / 1e3)
        row.shard_mb = [mb for _, mb, _ in per_rank]
        row.peak_mem_mb = [peak for _, _, peak in per_rank]


# ------------------------------------------------------------------------------- printing

def describe(config: ShardingBenchConfig) -> str:
    """The header: tables with their bytes, and the topology's capacity."""
    from embeddings.compact import row_bytes

    lines = []
    for t in _all_tables(config):
        dtype = config.mm_dtype if t.name == "mm_table" else "fp32"
        size = t.rows * row_bytes(dtype, t.dim)
        lines.append(f"  {t.name:<12} {t.rows:>14,} x {t.dim:<4} {dtype:<5} "
                     f"{size / GB:>10.3f} GB  pooling {t.pooling} x {counted(config.bags(t), 'bag')}")
    mm_fp = {d: config.mm_rows * row_bytes(d, config.mm_dim) / GB for d in ("fp32", "fp16", "int8")}
    cap = _capacity_gb(config)
    lines.append(f"  mm_table in fp32 / fp16 / int8: {mm_fp['fp32']:.4g} / {mm_fp['fp16']:.4g} / "
                 f"{mm_fp['int8']:.4g} GB (int8: codes plus an fp32 scale and bias a row, fbgemm's layout)")
    lines.append(f"topology: {counted(config.world_size, 'rank')} "
                 f"({counted(config.world_size // config.ranks_per_host, 'host')} x {config.ranks_per_host}), "
                 f"{config.compute_device}, "
                 f"{cap:g} GB per rank ({cap * config.world_size:g} GB in all); "
                 f"batch {config.batch_size} per rank")
    return "tables:\n" + "\n".join(lines)


def _span(values: List[float], fmt: str) -> str:
    """Per-rank values: all of them for a few ranks, else min..max."""
    if not values:
        return "-"
    if len(values) <= 4:
        return "/".join(format(v, fmt) for v in values)
    return f"{format(min(values), fmt)}..{format(max(values), fmt)}"


def _types(row: PlanRow) -> str:
    short = {"table_wise": "tw", "row_wise": "rw", "column_wise": "cw", "table_row_wise": "twrw",
             "table_column_wise": "twcw", "data_parallel": "dp"}
    kinds = sorted({short.get(v, v) for k, v in row.table_types.items() if k != "mm_table"})
    mm = short.get(row.table_types.get("mm_table", ""), "-")
    return f"id:{','.join(kinds) or '-'} mm:{mm}"


def format_table(rows: List[PlanRow], measured: bool) -> str:
    headers = ["plan", "source", "tables", "fits", "est mem/rank GB", "est comms ms",
               "est step ms"]
    if measured:
        headers += ["median step ms", "samples/s", "shard MB/rank", "peak mem MB/rank"]
    body = []
    for r in rows:
        cells = [r.plan, r.source, _types(r) if r.table_types else "-",
                 {True: "yes", False: "no", None: "?"}[r.fits],
                 _span(r.est_mem_gb, ".3g"), _span(r.est_comms_ms, ".3g"),
                 "-" if r.est_step_ms is None else f"{r.est_step_ms:.3g}"]
        if measured:
            cells += ["-" if r.step_ms is None else f"{r.step_ms:.1f}",
                      "-" if r.samples_per_s is None else f"{r.samples_per_s:,.0f}",
                      _span(r.shard_mb, ".3g"), _span(r.peak_mem_mb, ".0f")]
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    notes = [f"  {r.plan}: {r.note}" for r in rows if r.note]
    legend = [f"est mem/rank: TorchRec's storage estimate of the table shards each rank holds (weights, "
              f"optimizer state, the batch's lookup inputs/outputs); fits: every rank's estimate is within its "
              f"memory less the planner's reservation ({RESERVED_FRACTION:.0%} + dense part + input copies)"]
    if measured:
        legend.append("shard MB: bytes of the table shards a rank holds; peak mem: a rank's peak resident set "
                      "(VmHWM) on the CPU, its peak CUDA allocation on a GPU; GB and MB are 10^9 and 10^6 bytes")
    return "\n".join(lines + legend + (["notes:"] + notes if notes else []))


def to_json(config: ShardingBenchConfig, rows: List[PlanRow]) -> Dict[str, Any]:
    return {"config": asdict(config),
            "rows": [{k: v for k, v in asdict(r).items() if k != "sharding_plan"} for r in rows]}


# ------------------------------------------------------------------------------------ CLI

def run(args: argparse.Namespace) -> int:
    if args.paper_scale:
        if args.config:
            raise ConfigError("--paper-scale is a whole config: give it or --config, not both")
        preset = [f"{k}={json.dumps(v)}"
                  for k, v in asdict(ShardingBenchConfig.paper_scale()).items()]
        config = load_config(ShardingBenchConfig, None, preset + list(args.overrides))
    else:
        config = load_config(ShardingBenchConfig, args.config, args.overrides)
    config.validate()
    check_json_path(args.json)
    if args.measure and config.ranks_per_host != config.world_size:
        # TorchRec reads the host size from LOCAL_WORLD_SIZE; the measured ranks all run here
        raise ConfigError(f"--measure runs all {config.world_size} ranks on this host: set "
                          f"local_world_size={config.world_size} (or leave it unset), not "
                          f"{config.ranks_per_host}, or drop --measure to plan only")
    if args.measure and config.compute_device == "cuda":
        import torch
        if torch.cuda.device_count() < config.world_size:
            raise ConfigError(f"--measure on cuda needs {config.world_size} visible GPUs, "
                              f"found {torch.cuda.device_count()}; drop --measure to plan only")
    rows: List[PlanRow] = []

    def plan_and_measure() -> Dict[str, Any]:
        rows.extend(make_plans(config))
        if args.measure:
            measure(config, rows)
        return to_json(config, rows)

    # the shared path, as the other benches: wall_s in the JSON, and NaN or inf written as null
    run_and_report(plan_and_measure, lambda _: f"{describe(config)}\n{format_table(rows, measured=args.measure)}",
                   args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sharding", help="compare sharding plans: planner estimates and measured steps",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML/JSON ShardingBenchConfig")
    parser.add_argument("--paper-scale", action="store_true",
                        help="preset: 1.4B x 128 fp16 MM table on 8x8 80 GB GPUs (planner-only)")
    parser.add_argument("--measure", action="store_true",
                        help="also run real steps on world_size local ranks")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-': stdout)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. world_size=100 mm_dtype=fp16")
    parser.set_defaults(func=run)
