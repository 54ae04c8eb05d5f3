"""``mim data import --format {taobao-mm,amazon} SRC --out DIR``: a public data set as a world.

The output has the synthetic world's layout (``items.parquet``, ``events_*``, ``pairs_*`` when
the source supports them, ``manifest.json`` kind="world", stage="import"), plus ``mm_table/``
(INT8, the release's SCL embedding) for TAOBAO-MM. What each format lacks and how it is filled
is printed at the end and kept in the manifest; see ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

FORMATS = ("taobao-mm", "amazon")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="import TAOBAO-MM or Amazon (UniSRec format) "
                                                  "into a world folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="taobao-mm: TAOBAO-MM (alimama-tech/MUSE); amazon: Amazon reviews in the "
                             "UniSRec/RecBole atomic format. The files each reads, and what it fills in: "
                             "docs/data.md")
    parser.add_argument("src", type=Path, help="folder of the source files")
    parser.add_argument("--out", required=True, type=Path, help="world folder to write")
    parser.add_argument("--allow-missing", action="store_true",
                        help="fill ids that do not join (no embedding, no features, no text) "
                             "with counted defaults instead of refusing")
    # The amazon-only options default to None so that one given with another format is
    # refused (a taobao-mm import would otherwise ignore it); AmazonOptions holds the defaults.
    parser.add_argument("--negatives", type=_non_negative, default=None,
                        help="amazon: sampled non-clicks per positive (default 1)")
    parser.add_argument("--negative-sampling", choices=("uniform", "popularity"),
                        default=None, help="amazon: how negatives are drawn (default popularity)")
    parser.add_argument("--seed", type=_non_negative, default=None, help="amazon: negative sampling seed (default 0)")
    parser.add_argument("--name", default=None,
                        help="amazon: data set name (file prefix); default: the only one in SRC")
    parser.set_defaults(func=run)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


AMAZON_ONLY = {"negatives": "--negatives", "negative_sampling": "--negative-sampling",
               "seed": "--seed", "name": "--name"}


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.format == "amazon":
        from mim_rec.data.importers.amazon import AmazonOptions, import_amazon
        given = {k: getattr(args, k) for k in AMAZON_ONLY if getattr(args, k) is not None}
        report = import_amazon(args.src, args.out, AmazonOptions(allow_missing=args.allow_missing, **given))
    else:
        from mim_rec.config import ConfigError
        given = [flag for key, flag in AMAZON_ONLY.items() if getattr(args, key) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: amazon options, not used by --format {args.format} "
                              f"(its samples carry their own labels and its files have fixed names); "
                              f"leave them out")
        from mim_rec.data.importers.taobao_mm import TaobaoOptions, import_taobao_mm
        report = import_taobao_mm(args.src, args.out, TaobaoOptions(allow_missing=args.allow_missing))
    print("\n".join(report.lines()))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s "
          f"(check it with: mim data validate {args.out})")
    return 0
