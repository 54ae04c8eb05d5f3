"""``mim bench ...``: benchmarks (sharding plans, training throughput).

Each bench sub-command lives in its own module with ``register(bench_subparsers)``.
"""

from __future__ import annotations

import argparse

from train.cli import add_command_group

BENCH_COMMAND_MODULES: tuple = (
    "train.bench_sharding",
    "train.bench_lookup",
    "train.bench_rim",
    "train.bench_train",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command_group(subparsers, "bench", "benchmark sharding plans and training", BENCH_COMMAND_MODULES)
