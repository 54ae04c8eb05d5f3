"""``mim embeddings build``: the representation center's table (MFM)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class BuildConfig:
    world: str = ""        # world folder (items.parquet)
    encoders: str = ""     # item encoder artifact: mim csft's out/mm_encoder, or mim pretrain's
                           # out/encoders (stage 1 only: MIM w/o C-SFT), or a synthetic world's
                           # truth/ folder (its true item styles: the content ceiling)
    out: str = ""          # table folder
    shard_rows: int = 4096
    batch_size: int = 256
    feature_cache: str = ""  # mim csft's OUT/features: read the frozen backbones' catalogue features
                             # from it (exact: keyed by items file + backbone content hash)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embeddings", help="the representation center: build the MM table, serve new items (RIM), fold them in")
    sub = parser.add_subparsers(dest="embeddings_command", required=True, metavar="EMBEDDINGS_COMMAND")
    build = sub.add_parser("build", help="embed every item into an MM table folder (resumable)",
                           description="Embed every item of a world with an item encoder and write "
                                       "the MM table (Parquet shards + manifest). Re-running resumes.")
    build.add_argument("--config", default=None, help="YAML/JSON file of BuildConfig fields")
    build.add_argument("overrides", nargs="*", metavar="key=value",
                       help=f"world=DIR encoders=DIR out=DIR [shard_rows={BuildConfig.shard_rows} "
                            f"batch_size={BuildConfig.batch_size} feature_cache=DIR]")
    build.set_defaults(func=_build)
    from train import rim_cmd  # serve (RIM) and fold
    rim_cmd.register(sub)


def _build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embeddings.build import build_table
    from embeddings.encoders import item_encoder_vision, load_item_encoder
    from mim_rec.config import ConfigError, load_config, require_existing, require_positive
    from mim_rec.pretrain.corpus import require_stored_images
    from mim_rec.utils.dist import init_distributed

    config = load_config(BuildConfig, args.config, args.overrides)
    missing = [k for k in ("world", "encoders", "out") if not getattr(config, k)]
    if missing:
        raise ConfigError(f"mim embeddings build needs {', '.join(f'{k}=...' for k in missing)}")
    require_positive(config, ("shard_rows", "batch_size"))
    require_existing(config, ("world", "encoders"))  # by key, before the encoder loads
    items = Path(config.world) / "items.parquet"
    vision = item_encoder_vision(config.encoders)
    if vision is not None:  # before the encoder loads: a row it cannot read was found at its shard
        require_stored_images(items, vision)
    ctx = init_distributed("cpu")
    encoder = load_item_encoder(config.encoders, config.batch_size, config.feature_cache or None)
    out = build_table(encoder, items, config.out, config.shard_rows, ctx.rank, ctx.world_size)
    if ctx.is_main:
        print(f"MM table: {out} ({encoder.dim}-d, encoder {encoder.fingerprint})")
    return 0
