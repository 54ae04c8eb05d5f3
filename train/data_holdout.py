"""``mim data holdout WORLD --out DIR``: a world whose test events are the latest share of
WORLD's training events, to choose settings on without the real test events."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "holdout", help="hold out the latest share of a world's training period as a validation world",
        description="Write a world folder whose events_test (and pairs_test) are the latest "
                    "--fraction of WORLD's events_train (split at the same time for pairs_train); "
                    "WORLD's own test files are not read. Tune on it with any command that takes "
                    "a world, then report the chosen setting on WORLD.")
    parser.add_argument("world", help="the world folder to hold out from")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or an earlier world, whose contents are "
                        "replaced whole (items, pairs, truth, mm_table and manifest too); any "
                        "other non-empty folder is refused")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of events_train, the latest by ts, to hold out (default 0.1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mim_rec.data.split import holdout_world

    started = time.time()
    counts = holdout_world(args.world, args.out, args.fraction)
    print(f"validation world written to {args.out} in {time.time() - started:.1f} s: "
          + ", ".join(f"{name} {rows:,}" for name, rows in counts.items()))
    return 0
