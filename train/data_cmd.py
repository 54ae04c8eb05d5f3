"""``mim data ...``: generate, validate, summarise and import data sets.

Each data sub-command lives in its own module with ``register(data_subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

DATA_COMMAND_MODULES: tuple = (
    "train.data_synth",
    "train.data_summary",
    "train.data_validate",
    "train.data_import",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="generate, validate, summarise, import data")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    for name in DATA_COMMAND_MODULES:
        importlib.import_module(name).register(sub)
