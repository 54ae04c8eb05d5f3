"""``mim data ...``: generate, validate, summarise and import data sets.

Each data sub-command lives in its own module with ``register(data_subparsers)``.
"""

from __future__ import annotations

import argparse

from train.cli import add_command_group

DATA_COMMAND_MODULES: tuple = (
    "train.data_synth",
    "train.data_summary",
    "train.data_validate",
    "train.data_import",
    "train.data_holdout",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command_group(subparsers, "data", "generate, validate, summarise, import data", DATA_COMMAND_MODULES)
