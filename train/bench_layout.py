"""``mim bench layout``: behaviour-sequence lookups as single-behaviour bags (what CiUBM does)
vs TorchRec's ``EmbeddingCollection`` layout, measured side by side.

A sharded ``EmbeddingBagCollection`` runs fbgemm's table-batched embedding kernel
(``SplitTableBatchedEmbeddingBagsCodegen``) with sum pooling; a sharded
``EmbeddingCollection`` runs the same kernel with ``PoolingMode.NONE`` (one output row per
id). CiUBM gives every behaviour slot a bag of its own, so the sum-pooled kernel returns the
same rows the sequence kernel does; which one is faster decides the layout. Two modes, each
timing both layouts in one run, with their fused optimizer (EXACT_ROWWISE_ADAGRAD, applied in
the backward pass as in training), after checking that both return identical rows (a bench of
two different lookups would mean nothing):

* kernels (default): the fbgemm kernels alone on full ``B * (1 + L)`` slots, no distribution;
* ``sharded=true``: both collections sharded by ``DistributedModelParallel`` over ``ranks``
  spawned gloo (nccl on GPUs) processes under one sharding type, every rank with its own batch
  whose history lengths are drawn from ``min_hist_len..L``: input distribution, lookup,
  output distribution, backward and the fused update, as a CiUBM step runs them. The EBC pads
  each short history with empty bags; the EC's sequences are as long as the history. ``ranks``,
  ``sharding`` and ``min_hist_len`` are this mode's settings, refused in the kernel mode, which
  would not read them.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from mim_rec.utils.text import counted
from train.bench_cmd import measuring_bench_parser, median_seconds, run_and_report

COMMAND_HELP = "behaviour lookups: single-behaviour bags (EBC) vs sequence (EC) on fbgemm's kernels"
# (name, fbgemm pooling, what one bag of the KJT holds, label)
LAYOUTS = (("ebc_single_bags", "SUM", "slot", "EmbeddingBagCollection over single-behaviour bags (CiUBM)"),
           ("ec_sequence", "NONE", "sample", "EmbeddingCollection (sequence) layout"))


SHARDINGS = ("table_wise", "row_wise", "column_wise")
SHARDED_ONLY = ("ranks", "sharding", "min_hist_len")   # read by sharded=true alone


@dataclass
class LayoutBenchConfig:
    items: int = 20_000          # rows of the item table
    dim: int = 24                # item ++ category width of CiUBM's behaviour table
    batch_size: int = 1024       # samples per step
    hist_len: int = 30           # behaviours per sample (plus the target slot)
    # sharded=true: each sample's behaviours are drawn from min_hist_len..hist_len (hist_len:
    # every history full, as the kernel mode has them)
    min_hist_len: int = 1
    repeats: int = 20            # timed steps per layout (median reported)
    warmup: int = 3              # untimed steps first
    rounds: int = 3              # the layouts alternate this many times (drift hits both alike)
    threads: Optional[int] = 1   # torch threads; None = torch's default
    device: str = "auto"         # auto | cpu | cuda
    seed: int = 0
    # Through DistributedModelParallel on `ranks` spawned processes, under one sharding type
    # (table_wise | row_wise | column_wise), instead of the bare kernels.
    sharded: bool = False
    ranks: int = 2
    sharding: str = "table_wise"

    def validate(self) -> None:
        from mim_rec.config import ConfigError, changed_from_default, require_not_negative, require_positive
        # threads: 0 used to pass as "default" (that is threads=null), -1 crashed torch
        require_positive(self, ("items", "dim", "batch_size", "hist_len", "repeats", "rounds", "threads", "ranks"))
        require_not_negative(self, ("warmup",))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 1 <= self.min_hist_len <= self.hist_len:
            raise ConfigError(f"min_hist_len must be in 1..hist_len={self.hist_len}, got {self.min_hist_len}")
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if self.dim % 4:
            raise ConfigError(f"dim={self.dim}: FBGEMM's embedding kernels need a multiple of 4")
        if self.sharded and self.sharding == "row_wise" and 0 in row_wise_blocks(self.items, self.ranks):
            raise ConfigError(f"items={self.items}: row_wise over ranks={self.ranks} splits the table into "
                              f"TorchRec's row blocks {row_wise_blocks(self.items, self.ranks)}, and fbgemm's "
                              f"kernel cannot run a rank with no row; use more items or fewer ranks")
        if self.sharded and self.sharding == "column_wise" and self.dim % (4 * self.ranks):
            raise ConfigError(f"dim={self.dim}: column_wise over ranks={self.ranks} needs a multiple of "
                              f"{4 * self.ranks} (a block of a multiple of 4 columns a rank)")
        changed = changed_from_default(self, SHARDED_ONLY)
        if changed and not self.sharded:  # the bare kernels were timed, as if the setting had been read
            raise ConfigError(f"{changed[0]}={getattr(self, changed[0])}: a setting of sharded=true; the kernel "
                              "mode times full histories on the bare kernels of one process")


def row_wise_blocks(rows: int, ranks: int) -> List[int]:
    """Rows per rank of a row-wise table as TorchRec splits it: blocks of ``ceil(rows / ranks)``,
    the rest to the last, so a rank can be left none (5 rows over 4 ranks: 2, 2, 1, 0)."""
    block = -(-rows // ranks)
    return [max(0, min(block, rows - block * rank)) for rank in range(ranks)]


def quick() -> LayoutBenchConfig:
    return LayoutBenchConfig(items=500, dim=8, batch_size=16, hist_len=5, repeats=2, warmup=1, rounds=1)


def _kernel(config: LayoutBenchConfig, pooling: str, device):
    """One fbgemm table-batched embedding kernel with its fused row-wise Adagrad."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)

    location, compute = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device.type == "cuda" \
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    kwargs = {"device": device} if device.type == "cuda" else {}
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(config.items, config.dim, location, compute)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01, pooling_mode=getattr(PoolingMode, pooling), **kwargs)


def measure(config: LayoutBenchConfig) -> Dict[str, Any]:
    config.validate()
    return measure_sharded(config) if config.sharded else measure_kernels(config)


def measure_kernels(config: LayoutBenchConfig) -> Dict[str, Any]:
    import torch

    from mim_rec.utils.dist import resolve_device

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    slots = 1 + config.hist_len
    rows = config.batch_size * slots
    generator = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, config.items, (rows,), generator=generator).to(device)
    bag_offsets = {"slot": torch.arange(rows + 1, device=device),             # a bag per slot
                   "sample": torch.arange(0, rows + 1, slots, device=device)}  # a sequence per sample
    offsets = {name: bag_offsets[bag] for name, _, bag, _ in LAYOUTS}
    kernels = {name: _kernel(config, pooling, device) for name, pooling, _, _ in LAYOUTS}
    with torch.no_grad():  # same start weights, so the outputs can be compared exactly
        reference = kernels[LAYOUTS[0][0]].split_embedding_weights()[0]
        for kernel in kernels.values():
            kernel.split_embedding_weights()[0].copy_(reference)
        outputs = {name: kernels[name](ids, offsets[name]) for name, _, _, _ in LAYOUTS}
    first, second = (outputs[name] for name, _, _, _ in LAYOUTS)
    if first.shape != (rows, config.dim) or first.shape != second.shape or not torch.equal(first, second):
        raise RuntimeError("the two layouts returned different rows for the same ids; the bench is void")

    samples = _alternate_rounds(config, lambda name: kernels[name](ids, offsets[name]), synchronize)
    return _result(config, device.type, samples, {"rows_per_step": rows})


def _alternate_rounds(config: LayoutBenchConfig, lookup: Callable[[str], Any],
                      synchronize: Callable[[], None]) -> Dict[str, Dict[str, List[float]]]:
    """Per layout, the median seconds of a train step (``lookup(name)``, then a backward that
    runs the fused update) and of an inference step in each round; the layouts alternate
    within a round, so drift in the machine's load hits both alike."""
    import torch

    def train_step(name: str) -> Callable[[], None]:
        return lambda: lookup(name).sum().backward()

    def inference_step(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                lookup(name)
        return step

    samples: Dict[str, Dict[str, List[float]]] = {name: {"train": [], "inference": []} for name, *_ in LAYOUTS}
    for _ in range(config.rounds):
        for name, *_ in LAYOUTS:
            for kind, make in (("train", train_step), ("inference", inference_step)):
                seconds, _ = median_seconds(make(name), config.repeats, config.warmup, synchronize)
                samples[name][kind].append(seconds)
    return samples


def _result(config: LayoutBenchConfig, device: str, samples: Dict[str, Dict[str, List[float]]],
            extra: Dict[str, Any]) -> Dict[str, Any]:
    """Medians over the rounds, samples/s over all ranks, and the EC / EBC time ratios."""
    per_step = config.batch_size * (config.ranks if config.sharded else 1)
    result_rows = []
    for name, pooling, _, label in LAYOUTS:
        train_s = statistics.median(samples[name]["train"])
        inference_s = statistics.median(samples[name]["inference"])
        result_rows.append({"layout": name, "label": label, "pooling": pooling,
                            "train_ms": 1e3 * train_s, "train_samples_per_s": per_step / train_s,
                            "inference_ms": 1e3 * inference_s, "inference_samples_per_s": per_step / inference_s})
    ebc, ec = result_rows
    return {"config": asdict(config), "device": device, **extra, "layouts": result_rows,
            "ec_over_ebc_train_time": ec["train_ms"] / ebc["train_ms"],
            "ec_over_ebc_inference_time": ec["inference_ms"] / ebc["inference_ms"]}


# ---------------------------------------------------------------- through DistributedModelParallel

def measure_sharded(config: LayoutBenchConfig) -> Dict[str, Any]:
    """Time both sharded collections on ``config.ranks`` spawned processes, and keep the
    slowest rank's medians (a step with collectives ends when its slowest rank does)."""
    from mim_rec.utils.dist import resolve_device, run_on_spawned_ranks

    device = resolve_device(config.device, local_rank=0, local_world_size=config.ranks).type  # the ranks' device
    per_rank = run_on_spawned_ranks(_measure_on_rank, config.ranks, device, config)
    samples = {name: {kind: [max(rank[name][kind][r] for rank, _ in per_rank) for r in range(config.rounds)]
                      for kind in ("train", "inference")}
               for name, *_ in LAYOUTS}
    return _result(config, device, samples, {"rows_per_rank": [rows for _, rows in per_rank]})


def _sharded_collections(config: LayoutBenchConfig, device):
    """Both layouts over one ``items x dim`` table each, sharded by DMP under ``config.sharding``,
    each with the fused row-wise Adagrad, filled with the same seeded weights."""
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torch import nn
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, PoolingType
    from torchrec.distributed import sharding_plan
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from mim_rec.ciubm.mm_shards import local_blocks

    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
    sharders = {"ebc_single_bags": EmbeddingBagCollectionSharder(fused_params=fused),
                "ec_sequence": EmbeddingCollectionSharder(fused_params=fused)}
    model = nn.Module()
    meta = torch.device("meta")
    model.ebc_single_bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="slots", num_embeddings=config.items, embedding_dim=config.dim, feature_names=["slot"],
        pooling=PoolingType.SUM)], device=meta)
    model.ec_sequence = EmbeddingCollection(tables=[EmbeddingConfig(
        name="sequence", num_embeddings=config.items, embedding_dim=config.dim, feature_names=["behaviours"])],
        device=meta)
    world = dist.get_world_size()
    # The fused kernel, as CiUBM's tables use. The plan helpers' default is the dense kernel, which
    # TorchRec's planner never offers an EmbeddingCollection on CPU; forced on both collections,
    # it aborted the first step with a glibc heap error here (TorchRec 1.9.2).
    kernel = "fused"
    generator = {"table_wise": lambda: sharding_plan.table_wise(rank=0, compute_kernel=kernel),
                 "row_wise": lambda: sharding_plan.row_wise(compute_kernel=kernel),
                 "column_wise": lambda: sharding_plan.column_wise(ranks=list(range(world)), compute_kernel=kernel),
                 }[config.sharding]
    plan = ShardingPlan({name: sharding_plan.construct_module_sharding_plan(
        getattr(model, name), {table: generator()}, local_size=world, world_size=world, device_type=device.type,
        sharder=sharders[name]) for name, table in (("ebc_single_bags", "slots"), ("ec_sequence", "sequence"))})
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=list(sharders.values()))
    weights = torch.randn(config.items, config.dim, generator=torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        for table in dmp.state_dict().values():
            for row, column, block in local_blocks(table):
                block.copy_(weights[row:row + block.shape[0], column:column + block.shape[1]])
    return dmp.module


def _rank_batch(config: LayoutBenchConfig, rank: int, device):
    """This rank's batch in both layouts: ``(slot KJT, sequence KJT, slot is filled [B*(1+L)])``.
    A sample has the target and ``min_hist_len..L`` behaviours, right-aligned in its ``1 + L``
    slots."""
    import torch
    from torchrec import KeyedJaggedTensor

    generator = torch.Generator().manual_seed(config.seed * 1_000 + rank)
    slots = 1 + config.hist_len
    behaviours = torch.randint(config.min_hist_len, config.hist_len + 1, (config.batch_size,), generator=generator)
    filled = torch.arange(slots)[None, :] > (config.hist_len - behaviours)[:, None]  # [B, 1+L]
    filled[:, 0] = True                                                                 # the target
    ids = torch.randint(0, config.items, (int(filled.sum()),), generator=generator)
    slot_kjt = KeyedJaggedTensor(keys=["slot"], values=ids, lengths=filled.flatten().long())
    sequence_kjt = KeyedJaggedTensor(keys=["behaviours"], values=ids, lengths=filled.sum(1))
    return slot_kjt.to(device), sequence_kjt.to(device), filled.flatten().to(device)


def _measure_on_rank(rank: int, device, config: LayoutBenchConfig):
    """This rank's timings of both layouts and the number of ids it looked up."""
    import torch

    torch.set_num_threads(config.threads or torch.get_num_threads())
    module = _sharded_collections(config, device)
    slot_kjt, sequence_kjt, filled = _rank_batch(config, rank, device)
    lookups = {"ebc_single_bags": lambda: module.ebc_single_bags(slot_kjt).values(),
               "ec_sequence": lambda: module.ec_sequence(sequence_kjt)["behaviours"].values()}
    with torch.no_grad():
        per_slot, per_id = lookups["ebc_single_bags"](), lookups["ec_sequence"]()
    if not torch.equal(per_slot[filled], per_id) or per_slot[~filled].any():
        raise RuntimeError("the two sharded layouts returned different rows for the same ids; the bench is void")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _alternate_rounds(config, lambda name: lookups[name](), synchronize), int(filled.sum())


def render(result: Dict[str, Any]) -> str:
    config = result["config"]
    if config["sharded"]:
        rows = sum(result["rows_per_rank"])
        title = (f"Behaviour lookup layouts through DistributedModelParallel ({result['device']}, "
                 f"{counted(config['ranks'], 'rank')}, {config['sharding']}, {config['threads'] or 'default'} "
                 f"torch threads per rank): {config['items']:,} x {config['dim']} table, batch "
                 f"{config['batch_size']} per rank x (1 + {config['min_hist_len']}..{config['hist_len']}) ids = "
                 f"{rows:,} ids over all ranks; slowest rank's median of {counted(config['rounds'], 'round')} x "
                 f"{counted(config['repeats'], 'step')}")
    else:
        title = (f"Behaviour lookup layouts on fbgemm's kernels ({result['device']}, "
                 f"{config['threads'] or 'default'} torch threads): {config['items']:,} x {config['dim']} table, "
                 f"batch {config['batch_size']} x (1 + {config['hist_len']}) slots = {result['rows_per_step']:,} "
                 f"rows; median of {counted(config['rounds'], 'round')} x {counted(config['repeats'], 'step')}")
    lines = [title, "", "| layout | pooling | train ms/step | train samples/s | inference ms | inference samples/s |",
             "|---|---|---|---|---|---|"]
    for row in result["layouts"]:
        lines.append(f"| {row['label']} | {row['pooling']} | {row['train_ms']:.2f} | "
                     f"{row['train_samples_per_s']:,.0f} | {row['inference_ms']:.2f} | "
                     f"{row['inference_samples_per_s']:,.0f} |")
    lines.append(f"| EC / EBC time | | {result['ec_over_ebc_train_time']:.2f}x | | "
                 f"{result['ec_over_ebc_inference_time']:.2f}x | |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mim_rec.config import load_config
    config = load_config(LayoutBenchConfig, args.config, args.overrides, preset=quick() if args.quick else None)
    run_and_report(lambda: measure(config), render, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    measuring_bench_parser(subparsers, "layout", COMMAND_HELP, __doc__, "LayoutBenchConfig",
                           "a tiny table and batch (seconds)", "items=20000 dim=24 batch_size=1024 "
                           "hist_len=30 repeats=20 threads=1 device=auto", run)
