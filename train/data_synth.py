"""``mim data synth``: generate the embedded default world."""

from __future__ import annotations

import argparse
import json
import time


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("synth", help="generate the synthetic e-commerce world",
                            description="Generate the seeded synthetic world (items with images and "
                                        "titles, behaviour histories, search-session CTR events, "
                                        "visual-search pairs) and print its summary.")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or an earlier world, whose contents are "
                        "replaced whole; any other non-empty folder is refused")
    parser.add_argument("--tiny", action="store_true", help="a small world for tests (seconds)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: config's, 0)")
    parser.add_argument("--config", default=None, help="YAML/JSON file of SynthConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="SynthConfig overrides, e.g. items=5000 click.content=2.0")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mim_rec.config import ConfigError, load_config
    from mim_rec.data.summary import format_summary, summarize_world
    from mim_rec.data.synth import SynthConfig, generate_world, tiny

    preset = tiny(SynthConfig()) if args.tiny else None
    config = load_config(SynthConfig, args.config, args.overrides, preset=preset)
    if args.seed is not None:
        if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides) and config.seed != args.seed:
            raise ConfigError(f"--seed {args.seed} and seed={config.seed}: give the seed once")
        config = replace(config, seed=args.seed)
    start = time.time()
    out = generate_world(config, args.out)
    elapsed = time.time() - start
    summary = summarize_world(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"world written to {out} in {elapsed:.1f} s")
    print(format_summary(summary))
    return 0
