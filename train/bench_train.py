"""``mim bench train``: training and inference throughput and peak memory of CiUBM, per UBM.

For each UBM and each variant -- **Base** (the ID interest module alone, no MM table) and
**Base+MIM** (ID + content + fusion interest over the frozen MM table) -- two implementations
of the same model are run side by side in one process, on the same seeded synthetic batches:

* **TorchRec**: the CiUBM of ``mim train``, built by :func:`train.ciubm.build_sharded_model`
  (``DistributedModelParallel`` on a one-rank gloo/nccl group, the trainer's sharders: fused
  ID-table optimizer, frozen MM sharder; dense Adam).
* **nn.Embedding reference**: what a user would otherwise write -- the same CiUBM interest and
  over-arch modules, with the embedding tables as plain ``torch.nn.Embedding`` /
  ``nn.EmbeddingBag`` (sparse gradients, stepped by ``torch.optim.Adagrad`` on CPU /
  ``SparseAdam`` on CUDA, the optimizer families of the fused kernels) and the MM table as a
  frozen buffer. It is loaded with the TorchRec model's weights (as they are after its
  warm-up), so both compute the same logits (tests/test_bench_train.py checks it).

All four models of a UBM (Base and Base+MIM, each in both implementations) are built and
warmed up (``warmup`` training steps and inference forwards), then timed in interleaved rounds
-- ``steps`` training steps (forward + backward + optimizer) of each model in turn, the order
rotated every round, ``rounds`` times; then the same for inference forwards (``eval``,
``no_grad``) -- and each one's median round gives its samples/s, so that a shared machine's
changing load falls on all four alike (a load spike during one variant's only window once made
MIM look 38x faster than Base). The spread of the rounds, (max - min) / median, is printed per
row, with a warning where it exceeds :data:`SPREAD_WARNING`. Peak memory is taken from before a model is built
to the end of its warm-up, whose steps are the timed ones' twins: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size above the level before
the build, sampled every few milliseconds (process-wide, so anything else this process
allocates meanwhile counts too). The printed ratios are Base+MIM / Base (what MIM costs) and
TorchRec / reference (what TorchRec's kernels and sharding wrappers cost or save).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from mim_rec.ciubm.config import ModelConfig
from mim_rec.utils.text import counted
from train.bench_cmd import measuring_bench_parser, preset_cli

if TYPE_CHECKING:  # annotations only: the functions import torch and the loader, so `mim --help` stays fast
    import numpy as np
    import torch

    from mim_rec.ciubm.model import CiUBM
    from mim_rec.data.loader import CtrBatch

COMMAND_HELP = "train / inference samples/s and peak memory per UBM: Base vs Base+MIM, TorchRec vs nn.Embedding"

ALL_UBMS = ["avg", "din", "dien", "bst", "sim", "twin"]
VARIANTS = {"Base": dict(content_interest=False, fusion_interest=False),
            "Base+MIM": dict(content_interest=True, fusion_interest=True)}
# The model settings the bench sets for every model it times (variant_config), and what sets each.
SET_BY_BENCH = {"ubm": "ubms=", "mm_dim": "mm_dim=", "id_interest": "the variants (on in both)",
                "content_interest": "the variants (Base: off, Base+MIM: on)",
                "fusion_interest": "the variants (Base: off, Base+MIM: on)"}
IMPLEMENTATIONS = ("torchrec", "reference")
QUERY_WORDS = 500        # distinct words in the synthetic queries (hashed into query_buckets)


@dataclass
class TrainBenchConfig:
    world: str = ""                   # world folder: take items/users/categories from it
    items: int = 20_000
    users: int = 5_000
    categories: int = 20
    batch_size: int = 1024
    hist_len: int = 30                # behaviour slots per sample (histories fill 1..hist_len)
    mm_dim: int = 256
    ubms: List[str] = field(default_factory=lambda: list(ALL_UBMS))
    model: ModelConfig = field(default_factory=ModelConfig)  # dims, over-arch, UBM options
    steps: int = 2                    # timed training steps (and inference forwards) per round
    rounds: int = 3                   # interleaved rounds of a UBM's four models; the median counts
    warmup: int = 1                   # untimed steps first (inside the peak-memory window)
    distinct_batches: int = 4         # batches cycled through (built before timing)
    lr: float = 0.005
    id_lr: float = 0.05
    threads: Optional[int] = None     # torch threads (positive); None = torch's default
    device: str = "auto"              # auto | cpu | cuda
    flops: bool = True                # count the dense forward's FLOPs per sample
    seed: int = 0

    @classmethod
    def quick(cls) -> "TrainBenchConfig":
        """Tiny sizes for a smoke run: two UBMs, three interleaved rounds of one timed step."""
        return cls(items=300, users=50, categories=5, batch_size=16, hist_len=6, mm_dim=8,
                   ubms=["avg", "din"], steps=1, rounds=3, warmup=1, distinct_batches=2)


# ------------------------------------------------------------------------------- batches

def synthetic_events(config: TrainBenchConfig, category: np.ndarray, rows: int, seed: int):
    """A seeded events record batch (the ``events`` contract) with random ids and histories."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, config.hist_len + 1, rows)
    hist = rng.integers(0, config.items, int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    words = rng.integers(0, QUERY_WORDS, (rows, 3))
    word_counts = rng.integers(0, 4, rows)
    queries = [" ".join(f"w{w}" for w in words[r, :word_counts[r]]) for r in range(rows)]
    return pa.RecordBatch.from_pydict({
        "user_id": pa.array(rng.integers(0, config.users, rows), pa.int64()),
        "query": pa.array(queries, pa.string()),
        "target_item_id": pa.array(rng.integers(0, config.items, rows), pa.int64()),
        "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
        "ts": pa.array(np.full(rows, 86_400 * 30), pa.int64()),
        "hist_item_ids": pa.ListArray.from_arrays(offsets, pa.array(hist, pa.int64())),
        "hist_category_ids": pa.ListArray.from_arrays(offsets, pa.array(category[hist], pa.int32())),
    })


def synthetic_batches(config: TrainBenchConfig) -> List[CtrBatch]:
    """``distinct_batches`` CtrBatches built by the training loader's own ``make_batch``."""
    import numpy as np

    from mim_rec.data.loader import ItemInfo, LoaderConfig, make_batch

    rng = np.random.default_rng(config.seed)
    category = rng.integers(0, config.categories, config.items)
    items = ItemInfo(category=category, created_s=rng.integers(0, 86_400 * 30, config.items))
    loader = LoaderConfig(batch_size=config.batch_size, max_hist_len=config.hist_len,
                          query_buckets=config.model.query_buckets)
    return [make_batch(synthetic_events(config, category, config.batch_size, config.seed + 1 + i), items, loader)
            for i in range(config.distinct_batches)]


# ------------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of a block of work, in bytes, above the level when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: the process's
    resident set size sampled every ``interval_s`` by a thread (glibc's free lists are trimmed
    first, so memory freed by an earlier model does not hide this one's).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def measure(self) -> Iterator["PeakMemory"]:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield self
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - start
            return
        _trim_malloc()
        start = peak = self._rss()
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(self.interval_s):
                peak = max(peak, self._rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            done.set()
            sampler.join()
            self.peak_bytes = max(peak, self._rss()) - start


def _trim_malloc() -> None:
    """Hand glibc's free memory back to the OS, so the next window starts from a clean level."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may be reused, and deltas read low
        pass


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(model, batch: CtrBatch, aux_weight: float) -> torch.Tensor:
    import torch.nn.functional as F

    logits, aux = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    return loss + aux_weight * aux if aux is not None else loss


def _work(mode: str, model, step: Callable[[], None], aux_weight: float) -> Callable[[CtrBatch], None]:
    """One training step (forward + backward + optimizer) or one inference forward."""
    import torch

    def train(batch: CtrBatch) -> None:
        _loss(model, batch, aux_weight).backward()
        step()

    def infer(batch: CtrBatch) -> None:
        with torch.no_grad():
            model(batch)

    return train if mode == "train" else infer


def warm_up(model, step: Callable[[], None], batches: List[CtrBatch], config: TrainBenchConfig) -> None:
    """``warmup`` untimed training steps and inference forwards: first-call allocations,
    optimizer state and kernel selection happen here (inside the peak-memory window)."""
    for mode in ("train", "infer"):
        model.train(mode == "train")
        work = _work(mode, model, step, config.model.dien_aux_weight)
        for i in range(config.warmup):
            work(batches[i % len(batches)])


def _seconds(work: Callable[[CtrBatch], None], batches: List[CtrBatch], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        work(batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - start


# A row whose rounds' samples/s differ by more than this fraction of their median gets a warning.
SPREAD_WARNING = 0.5


def round_summary(samples_per_s: List[float]) -> Dict[str, Any]:
    """The median of per-round samples/s, the rounds themselves, and their spread:
    ``(max - min) / median`` (``None`` for a single round, which shows no spread)."""
    median = statistics.median(samples_per_s)
    spread = (max(samples_per_s) - min(samples_per_s)) / median if len(samples_per_s) > 1 and median else None
    return {"samples_per_s": median, "rounds": list(samples_per_s), "spread": spread}


def interleaved_throughput(models: Dict[Any, Tuple[Any, Callable[[], None]]], batches: List[CtrBatch],
                           config: TrainBenchConfig, device: torch.device) -> Dict[Any, Dict[str, Any]]:
    """Training and inference samples/s of each ``{name: (model, optimizer step)}``.

    In each of ``rounds`` rounds every model runs ``steps`` timed calls in turn (the order
    rotated by one model a round), and each model's median round counts: interleaving spreads
    a shared machine's changing load over all models alike instead of charging it to whichever
    ran during a spike. Per model and mode: ``{mode}_samples_per_s`` (median),
    ``{mode}_rounds`` (every round's samples/s) and ``{mode}_spread`` (:func:`round_summary`).
    """
    names = list(models)
    result: Dict[Any, Dict[str, Any]] = {name: {} for name in names}
    for mode in ("train", "infer"):
        works = {}
        for name, (model, step) in models.items():
            model.train(mode == "train")
            works[name] = _work(mode, model, step, config.model.dien_aux_weight)
        rates: Dict[Any, List[float]] = {name: [] for name in names}
        for round_index in range(config.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = _seconds(works[name], batches, config.steps, device)
                rates[name].append(config.steps * config.batch_size / seconds)
        for name in names:
            summary = round_summary(rates[name])
            result[name].update({f"{mode}_samples_per_s": summary["samples_per_s"],
                                 f"{mode}_rounds": summary["rounds"], f"{mode}_spread": summary["spread"]})
    return result


def dense_flops_per_sample(model: CiUBM, batch: CtrBatch) -> float:
    """FLOPs of one forward per sample, as ``FlopCounterMode`` counts them (matrix products,
    attention; the lookups count zero). Counted in training mode: in eval mode
    ``nn.TransformerEncoderLayer`` (BST) takes a fused fast path that the counter does not see."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch)
    return counter.get_total_flops() / batch.labels.numel()


# ------------------------------------------------------------------------------- the run

@contextmanager
def _process_group(device: str) -> Iterator[Any]:
    """A one-rank process group for DMP (or the caller's), and its DistContext."""
    import torch.distributed as dist

    from mim_rec.utils.dist import ensure_process_group

    owned = not dist.is_initialized()
    added = [] if not owned else [key for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
                                  if key not in os.environ]
    try:
        ctx = ensure_process_group(device)
        if dist.get_world_size() != 1:
            raise RuntimeError("mim bench train runs on one process (world size 1)")
        yield ctx
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        for key in added:
            os.environ.pop(key, None)


def bench_sizes(config: TrainBenchConfig) -> Dict[str, int]:
    """Table sizes: the world folder's, or the configured ones."""
    if not config.world:
        return {"items": config.items, "users": config.users, "categories": config.categories}
    from mim_rec.data.loader import ItemInfo
    from train.ciubm import table_sizes

    return table_sizes(config.world, ItemInfo.from_items(Path(config.world) / "items.parquet"))


def check_sizes(config: TrainBenchConfig, sizes: Dict[str, int]) -> None:
    """Refuse sizes (:func:`bench_sizes`) too small for the bench's models, before any is built.
    The batches draw user ids below ``users``: a world whose events name no user (its events
    files missing or empty) ended in numpy's traceback. Every UBM's Base+MIM whitens its MM
    table (``model.mm_whiten``), and one item's row has no variance to whiten: one item was
    refused only once the first models were built, asking whether the encoder had collapsed."""
    from mim_rec.config import ConfigError
    from train.ciubm import refuse_whitening_one_item

    if sizes["users"] == 0:  # only a world's count: a configured one is checked positive
        raise ConfigError(f"world={config.world}: its events name no user (events_train/events_test.parquet "
                          "missing or empty); the bench's batches draw their users from them")
    world = f"world={config.world} holds 1 item" if config.world else "items=1"
    refuse_whitening_one_item(config.model.mm_whiten, sizes["items"], world, "Base+MIM")


def mm_vectors(config: TrainBenchConfig, sizes: Dict[str, int]) -> torch.Tensor:
    """The MM table's rows the bench fills every model with (seeded). Made once, before any
    memory window: a copy made inside one would be charged to that model's peak."""
    import torch

    return torch.randn(sizes["items"], config.mm_dim, generator=torch.Generator().manual_seed(config.seed))


def build_torchrec(config: TrainBenchConfig, model_config: ModelConfig, sizes: Dict[str, int], ctx,
                   vectors: torch.Tensor):
    """``(DMP CiUBM, optimizer step)`` exactly as ``mim train`` builds them, the MM table
    filled from ``vectors`` (:func:`mm_vectors`) where the model reads one."""
    from mim_rec.ciubm.mm_shards import load_mm_table
    from mim_rec.data.loader_config import LoaderConfig
    from train.ciubm import TrainConfig, build_sharded_model

    train_config = TrainConfig(model=model_config, loader=LoaderConfig(batch_size=config.batch_size),
                               lr=config.lr, id_lr=config.id_lr, seed=config.seed)
    model, optimizer, _ = build_sharded_model(train_config, sizes, ctx)
    if model_config.uses_mm:
        load_mm_table(model, lambda start, stop: vectors[start:stop], sizes["items"])

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def _warm_process(config: TrainBenchConfig, sizes: Dict[str, int], batches: List[CtrBatch], ctx,
                  vectors: torch.Tensor) -> None:
    """One untimed, unmeasured step of both implementations, so that the process's one-time
    costs (kernel libraries, thread pools, allocator arenas) are not charged to the first row."""
    from train.bench_reference import reference_model, reference_optimizer, torchrec_weights

    model_config = replace(config.model, ubm=config.ubms[0], mm_dim=config.mm_dim, **VARIANTS["Base+MIM"])
    torchrec = build_torchrec(config, model_config, sizes, ctx, vectors)
    reference = reference_model(model_config, sizes, torchrec_weights(torchrec[0]), ctx.device)
    for model, step in (torchrec, (reference, reference_optimizer(reference, config.lr, config.id_lr))):
        warm_up(model, step, batches[:1], replace(config, warmup=1))


def variant_config(config: TrainBenchConfig, ubm: str, variant: str) -> ModelConfig:
    """The CiUBM the bench times for ``ubm`` as ``variant`` (Base or Base+MIM)."""
    return replace(config.model, ubm=ubm, mm_dim=config.mm_dim, id_interest=True, **VARIANTS[variant])


def run_bench(config: TrainBenchConfig) -> Dict[str, Any]:
    """Every UBM x variant x implementation; the result dict :func:`format_table` prints."""
    import torch
    from tqdm import tqdm

    from mim_rec.config import (ConfigError, refuse_changed_settings, require_distinct, require_not_negative,
                                require_positive)
    from train.bench_reference import reference_model, reference_optimizer, torchrec_weights
    from train.ciubm import check_model, check_sharding_device

    unknown = sorted(set(config.ubms) - set(ALL_UBMS))
    if unknown or not config.ubms:
        raise ConfigError(f"ubms={config.ubms}: choose one or more of {ALL_UBMS}")
    require_distinct(config, ("ubms",))  # each MIM/Base ratio pairs the rows of one UBM's rounds
    require_positive(config, ("steps", "rounds", "warmup", "distinct_batches", "batch_size", "hist_len", "mm_dim",
                              "lr", "id_lr", "threads", "items", "users", "categories"))
    # threads: None (torch's default) passes
    require_not_negative(config, ("seed",))  # numpy's generators refuse a negative seed, with a traceback
    refuse_changed_settings(config.model, SET_BY_BENCH, "mim bench train", prefix="model.")
    if config.model.sequence_layout != "ebc":
        raise ConfigError("model.sequence_layout: the plain-torch reference reads the slot (ebc) layout; "
                          "compare the layouts with mim bench layout")
    for ubm, variant in itertools.product(config.ubms, VARIANTS):  # every model the rounds will build
        model = variant_config(config, ubm, variant)
        check_model(model)
        check_sharding_device(model, config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    sizes = bench_sizes(config)
    check_sizes(config, sizes)
    config = replace(config, **sizes) if config.world else config
    batches = synthetic_batches(config)
    rows = []
    with _process_group(config.device) as ctx:
        batches = [b.to(ctx.device) for b in batches]
        memory = PeakMemory(ctx.device)
        vectors = mm_vectors(config, sizes)
        _warm_process(config, sizes, batches, ctx, vectors)
        for ubm in tqdm(config.ubms, desc="bench train", unit="ubm"):
            # Both variants in both implementations, built first and then timed interleaved, so
            # that MIM/Base compares rounds taken side by side, not minutes apart.
            models: Dict[Tuple[str, str], Tuple[Any, Callable[[], None]]] = {}
            ubm_rows: Dict[str, Dict[str, Any]] = {}
            for variant in VARIANTS:
                model_config = variant_config(config, ubm, variant)
                row: Dict[str, Any] = {"ubm": ubm, "variant": variant}
                with memory.measure():  # above the level of the models built before it
                    torchrec = build_torchrec(config, model_config, sizes, ctx, vectors)
                    warm_up(*torchrec, batches, config)
                row["torchrec"] = {"peak_memory_bytes": memory.peak_bytes}
                weights = torchrec_weights(torchrec[0])  # outside both windows: neither model's memory
                with memory.measure():
                    reference = reference_model(model_config, sizes, weights, ctx.device)
                    reference = (reference, reference_optimizer(reference, config.lr, config.id_lr))
                    warm_up(*reference, batches, config)
                row["reference"] = {"peak_memory_bytes": memory.peak_bytes}
                del weights
                if config.flops:
                    row["dense_flops_per_sample"] = dense_flops_per_sample(reference[0], batches[0])
                models[(variant, "torchrec")], models[(variant, "reference")] = torchrec, reference
                ubm_rows[variant] = row
                del torchrec, reference
            speeds = interleaved_throughput(models, batches, config, ctx.device)
            for (variant, name), figures in speeds.items():
                ubm_rows[variant][name].update(figures)
            del models
            rows.extend(ubm_rows.values())
        device = str(ctx.device)
    return {"config": asdict(config), "sizes": sizes, "device": device, "threads": torch.get_num_threads(),
            "memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "peak RSS delta (sampled)",
            "rows": rows, "ratios": ratios(rows)}


METRICS = ("train_samples_per_s", "infer_samples_per_s", "peak_memory_bytes")


def ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per row: TorchRec / reference; per UBM: Base+MIM / Base (each implementation)."""
    by_key = {(r["ubm"], r["variant"]): r for r in rows}
    out = []
    for row in rows:
        entry = {"ubm": row["ubm"], "variant": row["variant"],
                 "torchrec_over_reference": {m: _ratio(row["torchrec"][m], row["reference"][m]) for m in METRICS}}
        base = by_key.get((row["ubm"], "Base"))
        if row["variant"] == "Base+MIM" and base is not None:
            entry["mim_over_base"] = {impl: {m: _ratio(row[impl][m], base[impl][m]) for m in METRICS}
                                      for impl in IMPLEMENTATIONS}
        out.append(entry)
    return out


THROUGHPUTS = (("train", "torchrec", "train/s TR"), ("train", "reference", "train/s ref"),
               ("infer", "torchrec", "infer/s TR"), ("infer", "reference", "infer/s ref"))


def row_spread(row: Dict[str, Any]) -> Optional[float]:
    """The largest round spread of a row's four samples/s figures (``None``: one round)."""
    spreads = [row[impl].get(f"{mode}_spread") for mode, impl, _ in THROUGHPUTS]
    spreads = [s for s in spreads if s is not None]
    return max(spreads) if spreads else None


def spread_warnings(rows: List[Dict[str, Any]], threshold: float = SPREAD_WARNING) -> List[str]:
    """One line per row whose rounds disagree by more than ``threshold`` of their median."""
    lines = []
    for row in rows:
        noisy = [f"{label} {min(row[impl][f'{mode}_rounds']):,.0f}..{max(row[impl][f'{mode}_rounds']):,.0f}"
                 for mode, impl, label in THROUGHPUTS
                 if (row[impl].get(f"{mode}_spread") or 0) > threshold]
        if noisy:
            lines.append(f"warning: {row['ubm']} {row['variant']}: rounds differ by more than {threshold:.0%} of "
                         f"their median ({'; '.join(noisy)} samples/s): the machine's load moved; its figures and "
                         f"ratios are not reliable (more rounds/steps, or an idle machine)")
    return lines


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def _fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_table(result: Dict[str, Any]) -> str:
    config, sizes = result["config"], result["sizes"]
    lines = [
        f"sizes: {sizes['items']:,} items, {sizes['users']:,} users, {sizes['categories']} categories; "
        f"batch {config['batch_size']}, hist {config['hist_len']}, mm_dim {config['mm_dim']}; "
        f"median of {counted(config['rounds'], 'interleaved round')} (a UBM's 4 models in turn) of "
        f"{counted(config['steps'], 'timed step')} after {config['warmup']} warm-up; device {result['device']}, "
        f"torch threads {result['threads']}",
        f"MFLOP/smp: forward FLOPs per sample; memory: {result['memory_kind']}, MB; "
        f"ratios: TR/ref = TorchRec / nn.Embedding reference, MIM/Base = Base+MIM / Base (TorchRec); "
        f"spread: largest (max - min) / median of the rounds' samples/s in the row",
    ]
    header = (f"{'ubm':<5} {'variant':<9} {'MFLOP/smp':>9} | {'train/s TR':>10} {'ref':>8} {'TR/ref':>7} | "
              f"{'infer/s TR':>10} {'ref':>8} {'TR/ref':>7} | {'mem TR':>7} {'ref':>7} {'TR/ref':>7} | "
              f"{'MIM/Base train':>14} {'infer':>6} {'mem':>6} | {'spread':>6}")
    lines += [header, "-" * len(header)]
    for row, ratio in zip(result["rows"], result["ratios"]):
        tr, ref, vs = row["torchrec"], row["reference"], ratio["torchrec_over_reference"]
        flops = row.get("dense_flops_per_sample")
        mim = ratio.get("mim_over_base", {}).get("torchrec")
        lines.append(
            f"{row['ubm']:<5} {row['variant']:<9} {'-' if flops is None else f'{flops / 1e6:.2f}':>9} | "
            f"{tr['train_samples_per_s']:>10,.0f} {ref['train_samples_per_s']:>8,.0f} "
            f"{_fmt_ratio(vs['train_samples_per_s']):>7} | "
            f"{tr['infer_samples_per_s']:>10,.0f} {ref['infer_samples_per_s']:>8,.0f} "
            f"{_fmt_ratio(vs['infer_samples_per_s']):>7} | "
            f"{tr['peak_memory_bytes'] / 2**20:>7.1f} {ref['peak_memory_bytes'] / 2**20:>7.1f} "
            f"{_fmt_ratio(vs['peak_memory_bytes']):>7} | "
            + (f"{_fmt_ratio(mim['train_samples_per_s']):>14} {_fmt_ratio(mim['infer_samples_per_s']):>6} "
               f"{_fmt_ratio(mim['peak_memory_bytes']):>6}" if mim else f"{'':>14} {'':>6} {'':>6}")
            + f" | {_fmt_spread(row_spread(row)):>6}")
    if config["rounds"] == 1:
        lines.append("one round per figure: no spread to show, and nothing to outvote a load spike (rounds >= 3)")
    return "\n".join(lines + spread_warnings(result["rows"]))


def _fmt_spread(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def register(subparsers: argparse._SubParsersAction) -> None:
    measuring_bench_parser(subparsers, "train", COMMAND_HELP, __doc__.split("\n\n")[0], "TrainBenchConfig",
                           "tiny sizes, avg + din, 3 rounds of one timed step (smoke run)",
                           "e.g. batch_size=1024 hist_len=30 mm_dim=256 steps=5 ubms=[din,sim] world=runs/world",
                           preset_cli(TrainBenchConfig, run_bench, format_table))
