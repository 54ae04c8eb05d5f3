"""``mim data summary DIR``: counts, click rates, history lengths and item ages of a world."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("summary", help="print a world folder's summary")
    parser.add_argument("world", help="world folder (synthetic or imported)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mim_rec.data.summary import format_summary, summarize_world

    summary = summarize_world(args.world)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
