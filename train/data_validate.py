"""``mim data validate DIR_OR_FILE [--drop-invalid] [--clean-out DIR]``: check a world folder or one file.

A world folder (``items.parquet``, ``pairs_*``, ``events_*``, optional ``mm_table/``) is checked
file by file with the cross-file rules (pair/event item ids within the items table). A single
file's contract is taken from its name (``items``, ``pairs_*``, ``events_*``); pair and event
files need the items table beside them, or ``--item-count``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="check a world folder or a data file "
                                                    "against the data contracts")
    parser.add_argument("path", help="world folder, or one items/pairs/events Parquet file")
    parser.add_argument("--drop-invalid", action="store_true",
                        help="quarantine bad rows into <file>.rejected.parquet instead of "
                             "stopping at the first one")
    parser.add_argument("--clean-out", default=None, metavar="DIR",
                        help="with a world folder: write a new world there holding each file's "
                             "valid rows (implies --drop-invalid)")
    parser.add_argument("--item-count", type=int, default=None,
                        help="item table size for a lone pairs/events file "
                             "(default: rows of items.parquet beside it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mim_rec.data.errors import DataError
    from mim_rec.data.io import (CONTRACT_BY_PREFIX, category_count, check_dense_ids, ok_line,
                                 require_rows, validate_file, validate_world)
    from mim_rec.data.schemas import ITEMS

    path = Path(args.path)
    if not path.exists():
        raise DataError(str(path), "no such file or world folder")
    if args.item_count is not None and args.item_count < 1:
        raise DataError(str(path), f"--item-count={args.item_count}: must be positive")
    if path.is_dir():
        validate_world(path, drop_invalid=args.drop_invalid or args.clean_out is not None,
                       clean_out=args.clean_out)
        return 0
    if args.clean_out is not None:
        raise DataError(str(path), "--clean-out writes a world folder; give the world folder, not one file")
    contract = CONTRACT_BY_PREFIX.get(path.name.split("_")[0].split(".")[0])
    if contract is None:
        raise DataError(str(path), "cannot tell the contract from the file name "
                                   "(expected items*.parquet, pairs_*.parquet or events_*.parquet)")
    item_count, categories, item_category = args.item_count, None, None
    items = path.parent / "items.parquet"
    if contract is not ITEMS and item_count is None:
        if not items.is_file():
            raise DataError(str(path), "needs --item-count or items.parquet beside it to check ids")
        checked = validate_file(items, ITEMS, keep=False)
        item_count, item_category = checked.rows, checked.item_category  # the world's cross-file rules
        categories = category_count(item_category)
    result = require_rows(validate_file(path, contract, item_count=item_count, category_count=categories,
                                        item_category=item_category, drop_invalid=args.drop_invalid, keep=False))
    check_dense_ids(result, contract)
    print(ok_line(result))
    return 0
