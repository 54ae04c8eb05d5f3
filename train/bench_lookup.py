"""``mim bench lookup``: what the representation center saves -- MM lookup vs running the encoder.

For a batch of ``batch_size`` samples, each with a target and ``hist_len`` behaviours, the same
``batch_size * (1 + hist_len)`` items are turned into MM vectors two ways, timed in one run:

* **lookup** (MIM): the frozen MM table, as CiUBM holds it -- a ``FrozenEmbeddingBagCollection``
  sharded by ``DistributedModelParallel`` with the trainer's ``FrozenSharder``, stored at
  ``mm_dtype``, filled from ``mm_table`` (or random vectors), looked up under ``no_grad``.
* **encoder** (MIM without the representation center, the paper's Table 6 row): the item
  encoder run on those items' images and titles, decoding included, as a CTR model without a
  table would have to for every sample (``encoder=DIR``: a ``mim pretrain`` or ``mim csft``
  artifact via :func:`embeddings.encoders.load_item_encoder`; ``--quick``: a tiny random one).

Each side's median over ``repeats`` timed runs (after one warm-up) is divided by the batch
size; the printed ratio is encoder cost / lookup cost per sample.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from train.bench_cmd import measuring_bench_parser, median_seconds, run_and_report

COMMAND_HELP = "per-sample cost: MM table lookup vs running the item encoder (paper Table 6)"


@dataclass
class LookupBenchConfig:
    items: str = ""                    # items.parquet (images + titles) of the catalogue
    encoder: str = ""                  # encoders / mm_encoder artifact folder; "" with --quick
    mm_table: Optional[str] = None     # table folder to fill from; None = random vectors
    mm_dtype: str = "fp32"             # fp32 | fp16: storage of the looked-up table
    batch_size: int = 64               # samples per batch
    hist_len: int = 20                 # behaviours per sample (plus the target)
    repeats: int = 3                   # timed runs of the encoder side
    lookup_repeats: int = 50           # timed runs of the lookup side (it is fast)
    encoder_batch_size: int = 256      # the encoder's own inference batch
    threads: Optional[int] = None      # torch threads for both sides; None = torch's default
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings that cannot be timed, before the items and the encoder are loaded."""
        from mim_rec.ciubm.sparse import MM_DTYPES
        from mim_rec.config import ConfigError, require_not_negative, require_positive

        require_positive(self, ("batch_size", "repeats", "lookup_repeats", "encoder_batch_size", "threads"))
        require_not_negative(self, ("hist_len", "seed"))  # numpy's generator refuses a negative seed
        if self.mm_dtype not in MM_DTYPES:
            why = (" (TorchRec's sharded EmbeddingBagCollection cannot hold an INT8 table; fp16 halves the memory)"
                   if self.mm_dtype == "int8" else "")
            raise ConfigError(f"mm_dtype={self.mm_dtype!r}: choose one of {sorted(MM_DTYPES)}{why}")


@contextmanager
def _process_group():
    """DMP needs a process group: the caller's, or a one-rank gloo group for this run only."""
    import torch.distributed as dist

    from mim_rec.utils.dist import free_port

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_mm_table(num_items: int, dim: int, mm_dtype: str, rows_of):
    """The CiUBM MM table alone, sharded and filled as the trainer does it."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from mim_rec.ciubm.sparse import FrozenEmbeddingBagCollection, FrozenSharder, mm_table_config
    from mim_rec.ciubm.mm_shards import fill_mm_table

    model = torch.nn.Module()
    model.mm = FrozenEmbeddingBagCollection(tables=[mm_table_config(num_items, dim, mm_dtype)],
                                            device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"))
    plan = planner.collective_plan(model, [FrozenSharder()], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[FrozenSharder()])
    fill_mm_table(dmp, rows_of)
    return dmp


def _tiny_encoder_folder(folder: Path) -> Path:
    """A random-init stage-1 encoder pair small enough for a smoke run (quick mode)."""
    from mim_rec.encoders import EncoderPair, EncodersConfig, TextConfig, VisionConfig, save_encoders

    config = EncodersConfig(
        vision=VisionConfig(name="convnext_atto", weights=None, image_size=32,
                            model_kwargs=dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))),
        text=TextConfig(name="bert", pretrained=False, max_length=16,
                        overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64)),
        shared_dim=16)
    return save_encoders(folder, EncoderPair(config), stage="bench-quick")


def _table_rows(config: LookupBenchConfig, num_items: int, encoder, quick: bool = False):
    """``(rows_of(start, stop), dim)``: the table folder read range by range, or random
    vectors of the encoder's dim (a lookup's cost does not depend on the values). A table
    folder must be the encoder's own, since the ratio compares two ways to one item's vector;
    ``quick``'s throwaway encoder has no table, so there any table is timed as given."""
    import torch

    if config.mm_table is None:
        vectors = torch.randn(num_items, encoder.dim, generator=torch.Generator().manual_seed(config.seed))
        return (lambda start, stop: vectors[start:stop]), encoder.dim
    from embeddings.table import MMTableRows, check_table
    from mim_rec.data.errors import ManifestMismatch
    from mim_rec.data.manifest import require

    manifest = require(config.mm_table, kind="mm_table")
    built_by = manifest.extra.get("encoder_fingerprint")
    if built_by != encoder.fingerprint and not quick:
        raise ManifestMismatch(f"mm_table={config.mm_table}: built by encoder {built_by!r}, encoder= is "
                               f"{encoder.fingerprint!r}; the lookup must serve the vectors the encoder computes")
    dim = int(manifest.dim)
    check_table(config.mm_table, num_items, dim)
    return MMTableRows(config.mm_table, dim), dim


def run_bench(config: LookupBenchConfig, quick: bool = False) -> Dict[str, Any]:
    """Time both sides on the same sampled items; the result dict :func:`format_result` prints."""
    import numpy as np
    import torch
    from torchrec import KeyedJaggedTensor

    from embeddings.encoders import load_item_encoder
    from mim_rec.data.io import require_rows, validate_file
    from mim_rec.data.schemas import ITEMS

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    items_path = Path(config.items)
    items = require_rows(validate_file(items_path, ITEMS)).table  # the batches draw their items from it
    with tempfile.TemporaryDirectory() as scratch:
        encoder_dir = _tiny_encoder_folder(Path(scratch) / "encoders") if quick else Path(config.encoder)
        encoder = load_item_encoder(encoder_dir, config.encoder_batch_size)
    rows_of, dim = _table_rows(config, items.num_rows, encoder, quick)
    slots = config.batch_size * (1 + config.hist_len)
    ids = np.random.default_rng(config.seed).integers(0, items.num_rows, slots)
    kjt = KeyedJaggedTensor(keys=["mm_item_seq"], values=torch.from_numpy(ids),
                            lengths=torch.ones(slots, dtype=torch.long))
    batch_items = items.take(ids)

    def encode():
        return encoder.embed_items(batch_items, items_path)

    with _process_group():
        table = sharded_mm_table(items.num_rows, dim, config.mm_dtype, rows_of)

        def lookup():
            with torch.no_grad():
                return table.module.mm(kjt).to_dict()["mm_item_seq"][:, :dim]  # less the alignment padding

        lookup_s, looked_up = median_seconds(lookup, config.lookup_repeats)
        encoder_s, encoded = median_seconds(encode, config.repeats)
    if looked_up.shape != (slots, dim) or encoded.shape != (slots, encoder.dim):
        raise RuntimeError(f"lookup gave {tuple(looked_up.shape)}, the encoder {tuple(encoded.shape)}; "
                           f"expected ({slots}, {dim}) and ({slots}, {encoder.dim})")
    return {"config": asdict(config), "quick": quick, "encoder": encoder.fingerprint, "encoder_dim": encoder.dim,
            "table": config.mm_table or "random vectors", "table_dim": dim, "items": items.num_rows,
            "slots": slots, "threads": torch.get_num_threads(),
            "lookup_us_per_sample": lookup_s / config.batch_size * 1e6,
            "encoder_us_per_sample": encoder_s / config.batch_size * 1e6,
            "encoder_over_lookup": encoder_s / lookup_s}


def format_result(result: Dict[str, Any]) -> str:
    config = result["config"]
    per = f"{config['batch_size']} samples x (1 target + {config['hist_len']} behaviours) = {result['slots']} items"
    lines = [
        f"catalogue: {result['items']:,} items ({config['items']}); batch: {per}; torch threads {result['threads']}",
        f"lookup : sharded frozen MM table, {config['mm_dtype']}, {result['table_dim']}-d, from {result['table']}",
        f"encoder: {result['encoder']} ({result['encoder_dim']}-d), images decoded + titles tokenised per batch"
        + (" [quick: tiny random encoder]" if result["quick"] else ""),
        f"{'':<10}{'us / sample':>14}",
        f"{'lookup':<10}{result['lookup_us_per_sample']:>14,.1f}",
        f"{'encoder':<10}{result['encoder_us_per_sample']:>14,.1f}",
        f"encoder / lookup per sample: {result['encoder_over_lookup']:,.0f}x",
    ]
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from mim_rec.config import ConfigError, load_config

    config = load_config(LookupBenchConfig, args.config, args.overrides)
    if not config.items:
        raise ConfigError("items: the catalogue's items.parquet (images + titles) is required")
    if not (config.encoder or args.quick):
        raise ConfigError("encoder: give an encoders / mm_encoder folder, or --quick for a tiny random one")
    if config.encoder and args.quick:  # the tiny encoder was timed, and the result named the given one
        raise ConfigError(f"encoder={config.encoder} with --quick: --quick times a tiny random encoder instead; "
                          "give one of them")
    run_and_report(lambda: run_bench(config, quick=args.quick), format_result, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    measuring_bench_parser(subparsers, "lookup", COMMAND_HELP, __doc__.split("\n\n")[0], "LookupBenchConfig",
                           "a tiny random-init item encoder (smoke run)",
                           "e.g. items=runs/world/items.parquet encoder=runs/pretrain/encoders "
                           "mm_table=runs/mm_table batch_size=64 hist_len=20", _cli)
