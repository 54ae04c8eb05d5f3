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

from mim_rec.data.importers.missing import ALL, MISSING_KINDS, admitted_kinds  # light: no importer loads

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
    kinds = "; ".join(f"{fmt}: {', '.join(named)}" for fmt, named in MISSING_KINDS.items())
    parser.add_argument("--allow-missing", nargs="?", const=ALL, default=None, metavar="KINDS",
                        type=_kinds_of_some_format,
                        help=f"fill these kinds of missing source rows (ids that do not join, rows cut "
                             f"from a file) with counted defaults instead of refusing the import; any "
                             f"other kind still refuses it: a comma list of kinds, or {ALL} (what a bare "
                             f"--allow-missing means). Kinds: {kinds}. Each default: docs/data.md")
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


def _kinds_of_some_format(text: str) -> str:
    """``--allow-missing``'s value, each kind one of some format's (the format is checked in
    :func:`run`, once it is known). Checked while parsing: a bare ``--allow-missing`` written
    before SRC takes SRC as its value, and argparse would then say only that SRC is missing."""
    from mim_rec.config import ConfigError

    try:
        admitted_kinds(text)
    except ConfigError as exc:
        swallowed = (f". {text} is a path: a bare --allow-missing written before SRC takes SRC as its "
                     f"kinds; write SRC first" if Path(text).exists() else "")
        raise argparse.ArgumentTypeError(f"{exc}{swallowed}") from exc
    return text


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


AMAZON_ONLY = {"negatives": "--negatives", "negative_sampling": "--negative-sampling",
               "seed": "--seed", "name": "--name"}


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    allow_missing = admitted_kinds(args.allow_missing, args.format)
    if args.format == "amazon":
        from mim_rec.data.importers.amazon import AmazonOptions, import_amazon
        given = {k: getattr(args, k) for k in AMAZON_ONLY if getattr(args, k) is not None}
        report = import_amazon(args.src, args.out, AmazonOptions(allow_missing=allow_missing, **given))
    else:
        from mim_rec.config import ConfigError
        given = [flag for key, flag in AMAZON_ONLY.items() if getattr(args, key) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: amazon options, not used by --format {args.format} "
                              f"(its samples carry their own labels and its files have fixed names); "
                              f"leave them out")
        from mim_rec.data.importers.taobao_mm import TaobaoOptions, import_taobao_mm
        report = import_taobao_mm(args.src, args.out, TaobaoOptions(allow_missing=allow_missing))
    print("\n".join(report.lines()))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s "
          f"(check it with: mim data validate {args.out})")
    return 0
