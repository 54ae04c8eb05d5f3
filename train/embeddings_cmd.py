"""``mim embeddings build``: the representation center's table (MFM)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("embeddings", help="the representation center: build the MM table")
    sub = parser.add_subparsers(dest="embeddings_command", required=True, metavar="EMBEDDINGS_COMMAND")
    build = sub.add_parser("build", help="embed every item into an MM table folder (resumable)",
                           description="Embed every item of a world with an item encoder and write "
                                       "the MM table (Parquet shards + manifest). Re-running resumes.")
    build.add_argument("--world", required=True, help="world folder (items.parquet)")
    build.add_argument("--encoders", required=True,
                       help="stage-1 encoders artifact folder (mim pretrain's out/encoders)")
    build.add_argument("--out", required=True, help="table folder")
    build.add_argument("--shard-rows", type=int, default=4096)
    build.add_argument("--batch-size", type=int, default=256)
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embeddings.build import build_table
    from embeddings.encoders import Stage1ItemEncoder
    from mim_rec.utils.dist import init_distributed

    ctx = init_distributed("cpu")
    encoder = Stage1ItemEncoder(args.encoders, args.batch_size)
    out = build_table(encoder, Path(args.world) / "items.parquet", args.out, args.shard_rows,
                      ctx.rank, ctx.world_size)
    if ctx.is_main:
        print(f"MM table: {out} ({encoder.dim}-d, encoder {encoder.fingerprint})")
    return 0
