"""``mim bench layout``: behaviour-sequence lookups as single-behaviour bags (what CiUBM does)
vs TorchRec's ``EmbeddingCollection`` layout, measured side by side on fbgemm's kernels.

A sharded ``EmbeddingBagCollection`` runs fbgemm's table-batched embedding kernel
(``SplitTableBatchedEmbeddingBagsCodegen``) with sum pooling; a sharded
``EmbeddingCollection`` runs the same kernel with ``PoolingMode.NONE`` (one output row per
id). CiUBM gives every behaviour slot a bag of its own, so the sum-pooled kernel returns the
same ``[B * (1 + L), D]`` rows the sequence kernel does; which one is faster decides the
layout. TorchRec 1.9.2's sharded ``EmbeddingCollection`` crashes on this CPU build (see
``docs/ciubm.md``), so this bench times the kernels themselves, each with its fused optimizer
(EXACT_ROWWISE_ADAGRAD, applied in the backward pass as in training), on the same ids in one
run. Both layouts must return identical rows first: a bench of two different lookups would
mean nothing. Input and output distribution move the same ``B * (1 + L)`` rows in either
layout and are left out.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

from train.bench_cmd import measuring_bench_parser, median_seconds, run_and_report

COMMAND_HELP = "behaviour lookups: single-behaviour bags (EBC) vs sequence (EC) on fbgemm's kernels"
# (name, fbgemm pooling, what one bag of the KJT holds, label)
LAYOUTS = (("ebc_single_bags", "SUM", "slot", "EmbeddingBagCollection over single-behaviour bags (CiUBM)"),
           ("ec_sequence", "NONE", "sample", "EmbeddingCollection (sequence) layout"))


@dataclass
class LayoutBenchConfig:
    items: int = 20_000          # rows of the item table
    dim: int = 24                # item ++ category width of CiUBM's behaviour table
    batch_size: int = 1024       # samples per step
    hist_len: int = 30           # behaviours per sample (plus the target slot)
    repeats: int = 20            # timed steps per layout (median reported)
    warmup: int = 3              # untimed steps first
    rounds: int = 3              # the layouts alternate this many times (drift hits both alike)
    threads: Optional[int] = 1   # torch threads; None = torch's default
    device: str = "auto"         # auto | cpu | cuda
    seed: int = 0

    def validate(self) -> None:
        from mim_rec.config import ConfigError
        for name in ("items", "dim", "batch_size", "hist_len", "repeats", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be at least 0, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


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
    import torch

    from mim_rec.utils.dist import resolve_device

    config.validate()
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

    def train_step(name: str) -> Callable[[], None]:
        return lambda: kernels[name](ids, offsets[name]).sum().backward()  # the fused update runs here

    def inference_step(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                kernels[name](ids, offsets[name])
        return step

    samples: Dict[str, Dict[str, List[float]]] = {name: {"train": [], "inference": []} for name, *_ in LAYOUTS}
    for _ in range(config.rounds):
        for name, *_ in LAYOUTS:
            for kind, make in (("train", train_step), ("inference", inference_step)):
                seconds, _ = median_seconds(make(name), config.repeats, config.warmup, synchronize)
                samples[name][kind].append(seconds)
    result_rows = []
    for name, pooling, _, label in LAYOUTS:
        train_s = statistics.median(samples[name]["train"])
        inference_s = statistics.median(samples[name]["inference"])
        result_rows.append({"layout": name, "label": label, "pooling": pooling,
                            "train_ms": 1e3 * train_s, "train_samples_per_s": config.batch_size / train_s,
                            "inference_ms": 1e3 * inference_s,
                            "inference_samples_per_s": config.batch_size / inference_s})
    ebc, ec = result_rows
    return {"config": asdict(config), "device": device.type, "rows_per_step": rows, "layouts": result_rows,
            "ec_over_ebc_train_time": ec["train_ms"] / ebc["train_ms"],
            "ec_over_ebc_inference_time": ec["inference_ms"] / ebc["inference_ms"]}


def render(result: Dict[str, Any]) -> str:
    config = result["config"]
    lines = [f"Behaviour lookup layouts on fbgemm's kernels ({result['device']}, "
             f"{config['threads'] or 'default'} torch threads): {config['items']:,} x {config['dim']} table, "
             f"batch {config['batch_size']} x (1 + {config['hist_len']}) slots = {result['rows_per_step']:,} rows; "
             f"median of {config['rounds']} rounds x {config['repeats']} steps",
             "", "| layout | pooling | train ms/step | train samples/s | inference ms | inference samples/s |",
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
