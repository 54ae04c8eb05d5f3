"""``mim bench ...``: benchmarks (sharding plans, training throughput).

Each bench sub-command lives in its own module with ``register(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_COMMAND_MODULES: tuple = (
    "train.bench_sharding",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark sharding plans and training")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    for name in BENCH_COMMAND_MODULES:
        importlib.import_module(name).register(sub)
