"""Pinning tables to ranks: the paper's parameter machines, expressed as a TorchRec plan.

TorchRec's planner picks a sharding type and kernel per table (``TableConstraint.sharding_types``
/ ``compute_kernels`` narrow its choice) but places shards itself. ``TableConstraint.ranks``
adds the placement: the table's shards go to exactly those ranks -- table-wise on one rank,
or column-wise across several, an equal block of columns each -- so a large table (the MM
table) can be kept on chosen "parameter" ranks while every rank runs the dense part. The
sharded lookup then moves only the rows of the batch's ids between ranks (input all-to-all of
ids, output all-to-all of pooled rows), which is the parameter-machine / computation-machine
split of MIM's CMD.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

from torch import nn

from mim_rec.ciubm.config import TableConstraint
from mim_rec.ciubm.sparse import FBGEMM_COLUMN_ALIGNMENT, NeverDataParallel
from mim_rec.config import ConfigError

PINNABLE = ("table_wise", "column_wise")


def pinned_type(name: str, constraint: TableConstraint) -> str:
    """The sharding type a pinned table uses; a clear error for one a pin cannot take."""
    ranks: List[int] = list(constraint.ranks or [])
    types = constraint.sharding_types or (["table_wise"] if len(ranks) == 1 else ["column_wise"])
    if len(types) != 1 or types[0] not in PINNABLE:
        raise ConfigError(f"model.constraints.{name}.ranks needs one sharding type of {list(PINNABLE)}, "
                          f"got sharding_types={constraint.sharding_types}")
    if types[0] == "table_wise" and len(ranks) != 1:
        raise ConfigError(f"model.constraints.{name}.ranks={ranks}: table_wise puts a table on one rank")
    return types[0]


def check_pinned(name: str, constraint: TableConstraint, world_size: int) -> str:
    """The sharding type a pinned table uses; a clear error for an impossible pin."""
    ranks: List[int] = list(constraint.ranks or [])
    if not ranks or any(r < 0 or r >= world_size for r in ranks) or len(set(ranks)) != len(ranks):
        raise ConfigError(f"model.constraints.{name}.ranks={ranks}: distinct ranks in 0..{world_size - 1} "
                          f"(world size {world_size})")
    return pinned_type(name, constraint)


def check_column_blocks(name: str, constraint: TableConstraint, width: int) -> None:
    """Refuse a column-wise pin whose table, ``width`` columns as stored, does not cut into one
    equal block per rank whose width is a multiple of FBGEMM's column alignment (4).

    TorchRec's ``column_wise(ranks=...)`` generator takes the narrowest block that is a multiple
    of 4, at least ``width / len(ranks)`` and a divisor of ``width``, else the whole width, and
    pairs the blocks with the ranks: a 12-wide table pinned to [0, 1] went to rank 0 alone, 24
    columns over 4 ranks to 3 of them, and a width the rank count does not divide was TorchRec's
    ValueError after the process group was up."""
    if pinned_type(name, constraint) != "column_wise":
        return
    ranks = list(constraint.ranks or [])
    block, rest = divmod(width, len(ranks))
    if rest or block % FBGEMM_COLUMN_ALIGNMENT:
        units = width // FBGEMM_COLUMN_ALIGNMENT
        counts = [n for n in range(2, units + 1) if units % n == 0]
        advice = f"pin it over {_one_of(counts)} ranks, or table_wise on one" if counts else \
            "pin it table_wise on one rank"
        raise ConfigError(f"model.constraints.{name}.ranks={ranks}: column_wise gives each rank an equal block of "
                          f"the table's {width} stored columns, a multiple of {FBGEMM_COLUMN_ALIGNMENT} wide, and "
                          f"{width} columns do not split so over {len(ranks)} ranks; {advice}")


def _one_of(values: List[int]) -> str:
    """``[1, 2, 4]`` as "1, 2 or 4"."""
    words = [str(v) for v in values]
    return " or ".join(part for part in (", ".join(words[:-1]), words[-1]) if part)


def check_offered(model: nn.Module, constraints: Dict[str, TableConstraint], sharders: Iterable,
                  device_type: str) -> None:
    """Refuse a table whose ``sharding_types``, or ``compute_kernels``, name none its sharder
    offers on ``device_type``.

    The planner keeps the constrained types the table's sharder offers and fails with a traceback
    when none is left. On CPU, TorchRec's EmbeddingBagCollection sharders (every table of the
    ``ebc`` layout, the pooled tables of ``ec``) offer no row-wise kind: row_wise,
    table_row_wise and grid_shard need CUDA. Kernels are offered per sharding type: on CPU only
    ``fused``, and ``dense`` only data-parallel.
    """
    for sharder, module in _sharded_modules(model, sharders):
        offered = sharder.sharding_types(device_type)
        for name in sharder.shardable_parameters(module):
            if name not in constraints:
                continue
            wanted = constraints[name].sharding_types
            if wanted and not set(wanted) & set(offered):
                cuda = device_type != "cuda" and set(wanted) <= set(sharder.sharding_types("cuda"))
                never_replicated = "data_parallel" in wanted and isinstance(sharder, NeverDataParallel)
                raise ConfigError(f"model.constraints.{name}.sharding_types={wanted}: TorchRec's planner offers "
                                  f"this table {', '.join(offered)} on {device_type}"
                                  + ("; row-wise sharding needs CUDA" if cuda else "")
                                  + ("; the frozen MM table and EmbeddingCollections are never data-parallel "
                                     "(NeverDataParallel, mim_rec/ciubm/sparse.py)" if never_replicated else ""))
            _check_kernels_offered(name, constraints[name], sharder, offered, device_type)


def _check_kernels_offered(name: str, constraint: TableConstraint, sharder, offered: List[str],
                           device_type: str) -> None:
    """Refuse ``compute_kernels`` that no sharding type the table may take (its pin's, or the
    constrained ones the sharder offers) runs with on ``device_type``."""
    kernels = constraint.compute_kernels
    if not kernels:
        return
    types = [pinned_type(name, constraint)] if constraint.ranks else \
        [t for t in offered if not constraint.sharding_types or t in constraint.sharding_types]
    by_type = {t: sharder.compute_kernels(t, device_type) for t in types}
    if not any(set(kernels) & set(runs) for runs in by_type.values()):
        listing = "; ".join(f"{t}: {', '.join(runs)}" for t, runs in by_type.items())
        raise ConfigError(f"model.constraints.{name}.compute_kernels={kernels}: TorchRec offers this table "
                          f"(sharding type: kernels) {listing} on {device_type}")


def _pinned_kernel(name: str, constraint: TableConstraint, sharding_type: str, planned, sharder,
                   device_type: str) -> str:
    """The kernel a pinned table keeps: the planner's choice where the pin's sharding type runs
    it and the constraint allows it, else the first allowed kernel that type runs. The first
    constrained kernel used to be taken as is: [dense, fused] gave a table-wise table the dense
    kernel, which only data-parallel runs, and put the table in the dense optimizer."""
    runs = sharder.compute_kernels(sharding_type, device_type)
    allowed = [kernel for kernel in (constraint.compute_kernels or runs) if kernel in runs]
    if not allowed:
        raise ConfigError(f"model.constraints.{name}.compute_kernels={constraint.compute_kernels}: a "
                          f"{sharding_type} pin runs {', '.join(runs)} on {device_type}")
    chosen = getattr(planned, "compute_kernel", None)
    return chosen if chosen in allowed else allowed[0]


def check_pin_widths(model: nn.Module, constraints: Dict[str, TableConstraint], sharders: Iterable) -> None:
    """Refuse every pin of ``model``'s tables that :func:`check_column_blocks` refuses, at load
    time: a meta model knows the tables' stored widths before the process group is up."""
    for sharder, module in _sharded_modules(model, sharders):
        for name, parameter in sharder.shardable_parameters(module).items():
            if name in constraints and constraints[name].ranks:
                check_column_blocks(name, constraints[name], parameter.shape[1])


def _sharded_modules(model: nn.Module, sharders: Iterable):
    """``(sharder, module)`` for each module of ``model`` that one of ``sharders`` shards."""
    sharders = list(sharders)
    for module in model.modules():
        sharder = next((s for s in sharders if type(module) is s.module_type), None)
        if sharder is not None:
            yield sharder, module


def pin_tables(model: nn.Module, plan, constraints: Dict[str, TableConstraint], sharders: Iterable,
               world_size: int, local_size: int, device_type: str):
    """``plan`` with every table whose constraint names ``ranks`` re-placed on those ranks."""
    from torchrec.distributed import sharding_plan as sp

    pinned = {name: c for name, c in constraints.items() if c.ranks}
    for path, module_plan in plan.plan.items():
        module = model.get_submodule(path)
        sharder = next(s for s in sharders if type(module) is s.module_type)
        parameters = sharder.shardable_parameters(module)
        for name in [n for n in module_plan if n in pinned]:
            constraint = pinned.pop(name)
            sharding = check_pinned(name, constraint, world_size)
            check_column_blocks(name, constraint, parameters[name].shape[1])
            kernel = _pinned_kernel(name, constraint, sharding, module_plan[name], sharder, device_type)
            generator = sp.table_wise(rank=constraint.ranks[0], compute_kernel=kernel) \
                if sharding == "table_wise" else sp.column_wise(ranks=list(constraint.ranks), compute_kernel=kernel)
            module_plan[name] = generator(parameters[name], local_size, world_size, device_type, sharder)
            _check_placed(name, list(constraint.ranks), module_plan[name])
    if pinned:
        raise ConfigError(f"model.constraints: no sharded table named {sorted(pinned)}")
    return plan


def _check_placed(name: str, ranks: List[int], sharding) -> None:
    """Refuse a pin that TorchRec's generator left a rank of ``ranks`` without a shard of: its
    generators pair the blocks they cut with the ranks and drop the ranks left over."""
    placed = {int(shard.placement.rank()) for shard in sharding.sharding_spec.shards}
    missing = [rank for rank in ranks if rank not in placed]
    if missing:
        raise ConfigError(f"model.constraints.{name}.ranks={ranks}: TorchRec's {sharding.sharding_type} plan put "
                          f"the table's shards on ranks {sorted(placed)}, none on {missing}")


ROW_SPLIT_TYPES = ("row_wise", "table_row_wise", "grid_shard")


def empty_row_shards(plan) -> Dict[str, List[int]]:
    """Tables that ``plan`` splits by rows so that a rank gets none: name -> rows per shard.

    TorchRec cuts row blocks of ``ceil(rows / ranks)`` (1 category over 2 ranks: 1 and 0; 4
    over 3: 2, 2, 0), and fbgemm's kernel fails on the rank whose shard has no row."""
    empty = {}
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            if sharding.sharding_type not in ROW_SPLIT_TYPES or sharding.sharding_spec is None:
                continue
            rows = [shard.shard_sizes[0] for shard in sharding.sharding_spec.shards]
            if 0 in rows:
                empty[name] = rows
    return empty
