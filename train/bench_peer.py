"""``mim bench peer``: mim_rec's Base CTR models against DeepCTR-Torch's, on the same samples.

MIM's gains mean something only if its baselines are as good as the ones a user already
trusts. For each UBM that DeepCTR-Torch also implements (DIN, DIEN), both implementations are
trained in one process on the same batches: one :class:`CtrEventsLoader` order, one loader
seed. They get the same inputs: user id, target item and category, the last
``loader.max_hist_len`` behaviours' items and categories, the hashed query words and the two
dense features. Widths (embedding dims, attention and over-arch MLPs), the attention's
activation and softmax, DIEN's auxiliary weight and (unless ``peer_lr`` is set) the dense
learning rate are the same too.
Both are scored on ``events_test`` by the same :class:`mim_rec.metrics.CtrMetrics`: AUC, GAUC,
log loss, AUC on the newest-item decile (S1), and training samples/s.

* **mim_rec**: ``mim train`` itself (:func:`train.ciubm.run`, Base: the ID interest module
  alone) on one process: TorchRec tables with the fused row-wise Adagrad (``id_lr``), dense Adam
  (``lr``), batches streamed and built from Parquet inside the timed loop.
* **DeepCTR-Torch** 0.3: ``deepctr_torch.models.DIN``, or ``DIEN`` with AUGRU and its
  negative-sampling auxiliary loss. Its own ``nn.Embedding`` tables; Adam at ``lr`` (or
  ``peer_lr``) on every parameter, its usual optimiser. Its ``fit`` is not used, because it
  would reshuffle the samples. A plain loop feeds it the same batches, converted once before
  timing into the fixed-width float matrix its models read (so the timing leaves its input
  pipeline out), and adds its auxiliary loss as ``fit`` does.

What is left to each library is its own design: initialisation, DeepCTR-Torch's extra L2 term
(set to 0 here), and DIEN's auxiliary loss. Ours scores a state against the next behaviour by
an inner product (the paper's Eq. 2) with an in-batch negative, the previous row's behaviour at
the same step (left out where it is the positive item). DeepCTR-Torch scores the pair with an MLP and takes the negative sequence from
the caller: uniform random items here, as in its own example. Its DIEN also feeds its MLP no
variable-length feature but the histories, so it never sees the query words.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from mim_rec.ciubm.config import ModelConfig
from mim_rec.data.loader_config import LoaderConfig
from train.bench_cmd import measuring_bench_parser, preset_cli

if TYPE_CHECKING:  # annotations only: the functions import torch and the loader, so `mim --help` stays fast
    import torch

    from mim_rec.data.loader import CtrBatch, CtrEventsLoader, ItemInfo

COMMAND_HELP = "Base DIN / DIEN of mim_rec against DeepCTR-Torch's, same samples: AUC, GAUC, samples/s"

PEER_UBMS = ("din", "dien")
# The model settings base_model sets for every run, and what sets each.
SET_BY_BENCH = {"ubm": "ubms=", **dict.fromkeys(("id_interest", "content_interest", "fusion_interest"),
                                                 "the bench (Base: the ID interest alone)")}
FLOAT_EXACT_IDS = 2 ** 24   # DeepCTR-Torch reads ids from a float32 matrix: exact below this


@dataclass
class PeerBenchConfig:
    world: str = ""                   # world folder: items.parquet, events_train/test.parquet
    ubms: List[str] = field(default_factory=lambda: list(PEER_UBMS))
    seeds: List[int] = field(default_factory=lambda: [0])   # model seeds (the data order is loader.seed's)
    epochs: int = 1
    max_steps: Optional[int] = None   # stop both after this many steps (None: whole epochs)
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(max_hist_len=30))
    model: ModelConfig = field(default_factory=ModelConfig)  # dims, over-arch, UBM options, dien_aux_weight
    lr: float = 0.005                 # dense Adam (both); DeepCTR-Torch's embeddings too
    peer_lr: Optional[float] = None   # DeepCTR-Torch's Adam lr if not lr (its compile("adam") uses 0.001)
    id_lr: float = 0.05               # mim_rec's fused ID-table optimizer
    query_len: int = 16               # query words per row in DeepCTR-Torch's fixed-width input
    threads: Optional[int] = None     # torch threads; None = torch's default

    @classmethod
    def quick(cls, world: str = "") -> "PeerBenchConfig":
        """A smoke run: a few small steps of both UBMs."""
        return cls(world=world, max_steps=6, loader=LoaderConfig(batch_size=64, max_hist_len=8))


# ------------------------------------------------------------------------- DeepCTR-Torch side

def peer_columns(ubm: str, sizes: Dict[str, int], config: PeerBenchConfig) -> list:
    """DeepCTR-Torch feature columns for our inputs. Ids are shifted by one: 0 is its padding."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    model, length = config.model, config.loader.max_hist_len
    item = SparseFeat("item", sizes["items"] + 1, model.item_dim)
    category = SparseFeat("cate", sizes["categories"] + 1, model.category_dim)

    def history(name: str, base: SparseFeat) -> VarLenSparseFeat:
        return VarLenSparseFeat(SparseFeat(name, base.vocabulary_size, base.embedding_dim, embedding_name=base.name),
                                maxlen=length, length_name="seq_length")

    columns = [SparseFeat("user", sizes["users"] + 1, model.user_dim), item, category,
               history("hist_item", item), history("hist_cate", category)]
    if ubm == "dien":
        columns += [history("neg_hist_item", item), history("neg_hist_cate", category)]
    columns += [VarLenSparseFeat(SparseFeat("query", config.loader.query_buckets + 1, model.query_dim),
                                 maxlen=config.query_len, combiner="sum"),
                DenseFeat("log1p_item_age_days"), DenseFeat("log1p_history_length")]
    return columns


def peer_model(ubm: str, sizes: Dict[str, int], config: PeerBenchConfig, seed: int, device: torch.device):
    """DeepCTR-Torch's DIN / DIEN with our widths, attention activation and softmax."""
    from deepctr_torch.models import DIEN, DIN

    options = {"attention_hidden": (64, 32), "activation": "prelu", **config.model.ubm_options}
    shared = dict(dnn_hidden_units=tuple(config.model.over_arch), l2_reg_embedding=0.0, seed=seed,
                  device=str(device))
    columns = peer_columns(ubm, sizes, config)
    if ubm == "din":
        return DIN(columns, ["item", "cate"], att_hidden_size=tuple(options["attention_hidden"]),
                   att_activation=options["activation"], att_weight_normalization=options.get("normalize", True),
                   **shared)
    return DIEN(columns, ["item", "cate"], gru_type="AUGRU", use_negsampling=True,
                alpha=config.model.dien_aux_weight, att_hidden_units=tuple(options["attention_hidden"]),
                att_activation=options["activation"], att_weight_normalization=True, **shared)


def _left_aligned(right_aligned: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each row's last ``n`` entries to its front (our padding is on the left, DeepCTR-Torch
    masks by length from the right), zeros after them."""
    import torch

    width = right_aligned.shape[1]
    index = (torch.arange(width)[None, :] + (width - lengths)[:, None]).clamp(max=width - 1)
    moved = right_aligned.gather(1, index)
    return torch.where(torch.arange(width)[None, :] < lengths[:, None], moved, torch.zeros_like(moved))


def _query_words(batch: CtrBatch, width: int) -> torch.Tensor:
    """``[B, width]`` hashed query words, shifted by one, zero-padded; refuses longer queries."""
    import torch

    jagged = batch.pooled["query_tokens"]
    lengths = jagged.lengths()
    if lengths.numel() and int(lengths.max()) > width:
        raise ValueError(f"query_len={width}: a query of this batch has {int(lengths.max())} words; "
                         f"raise query_len so DeepCTR-Torch sees every word mim_rec sees")
    rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    columns = torch.arange(rows.numel()) - starts[rows]
    words = torch.zeros(lengths.numel(), width, dtype=torch.long)
    words[rows, columns] = jagged.values().long() + 1
    return words


def peer_input(batch: CtrBatch, feature_index: Dict[str, tuple], items: ItemInfo, query_len: int,
               negatives: Optional[torch.Generator] = None) -> torch.Tensor:
    """The float matrix DeepCTR-Torch's models read, one row per sample, laid out by its
    ``feature_index``. ``negatives`` (DIEN) draws the uniform negative behaviours."""
    import torch

    from mim_rec.ciubm.sparse import slot_ids

    size = batch.labels.numel()
    item_slots, category_slots = (slot_ids(batch.sequence, key, size, batch.slots, offset=1)
                                  for key in ("item_seq", "category_seq"))
    lengths = (item_slots[:, 1:] > 0).sum(1)
    values = {
        "user": batch.pooled["user_id"].values().long()[:, None] + 1,
        "item": item_slots[:, :1], "cate": category_slots[:, :1],
        "hist_item": _left_aligned(item_slots[:, 1:], lengths),
        "hist_cate": _left_aligned(category_slots[:, 1:], lengths),
        "seq_length": lengths[:, None],
        "query": _query_words(batch, query_len),
        "log1p_item_age_days": batch.dense_features[:, :1],
        "log1p_history_length": batch.dense_features[:, 1:],
    }
    if negatives is not None:
        sampled = torch.randint(0, items.count, values["hist_item"].shape, generator=negatives)
        real = values["hist_item"] > 0
        values["neg_hist_item"] = torch.where(real, sampled + 1, 0)
        values["neg_hist_cate"] = torch.where(real, torch.from_numpy(items.category)[sampled] + 1, 0)
    matrix = torch.zeros(batch.labels.numel(), max(end for _, end in feature_index.values()))
    for name, (start, end) in feature_index.items():
        matrix[:, start:end] = values[name].float()
    return matrix


def _epochs(loader: CtrEventsLoader, epochs: int, max_steps: Optional[int]) -> Iterator[CtrBatch]:
    """The training batches of ``mim train``'s loop: ``epochs`` passes, cut at ``max_steps``."""
    total = loader.batches_per_epoch * epochs
    steps = total if max_steps is None else min(total, max_steps)
    return itertools.islice(itertools.chain.from_iterable(loader.iterate(e) for e in range(epochs)), steps)


def run_peer(ubm: str, seed: int, config: PeerBenchConfig, items: ItemInfo, sizes: Dict[str, int],
             device: torch.device) -> Dict[str, Any]:
    """Train and evaluate DeepCTR-Torch's ``ubm`` on the loader's batches."""
    import torch
    import torch.nn.functional as F

    from mim_rec.data.loader import CtrEventsLoader
    from mim_rec.metrics import CtrMetrics

    model = peer_model(ubm, sizes, config, seed, device)
    negatives = torch.Generator().manual_seed(seed + 104_729) if ubm == "dien" else None
    world = Path(config.world)
    train_loader = CtrEventsLoader(world / "events_train.parquet", items, config.loader)
    batches = [(peer_input(b, model.feature_index, items, config.query_len, negatives).to(device),
                b.labels.to(device), b.meta["weight"].to(device))
               for b in _epochs(train_loader, config.epochs, config.max_steps)]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr if config.peer_lr is None else config.peer_lr)
    model.train()
    started = time.perf_counter()
    for features, labels, weight in batches:
        probability = model(features).squeeze(-1)
        loss = F.binary_cross_entropy(probability, labels, weight=weight, reduction="sum") / weight.sum().clamp_min(1)
        loss = loss + model.aux_loss.sum()  # DIEN's alpha-weighted auxiliary loss (0 for DIN), as fit adds it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":  # DeepCTR-Torch's forward never waits on the GPU: count its queue
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    test_loader = CtrEventsLoader(world / "events_test.parquet", items, replace(config.loader, shuffle=False),
                                  drop_last=False)
    metrics = CtrMetrics()
    model.eval()
    with torch.no_grad():
        for batch in test_loader.iterate(0):
            probability = model(peer_input(batch, model.feature_index, items, config.query_len,
                                           negatives).to(device)).squeeze(-1).cpu()
            keep = batch.meta["weight"] > 0
            metrics.update(probability[keep], batch.labels[keep], batch.meta["user_id"][keep],
                           batch.meta["target_category"][keep], batch.meta["item_age_days"][keep])
    samples = sum(labels.numel() for _, labels, _ in batches)
    return {**_summary(metrics.compute()), "steps": len(batches), "train_samples_per_s": samples / seconds}


# ------------------------------------------------------------------------------ mim_rec side

def base_model(config: PeerBenchConfig, ubm: str) -> ModelConfig:
    """The CiUBM the peer is compared with: Base ``ubm`` (the ID interest module only)."""
    return replace(config.model, ubm=ubm, id_interest=True, content_interest=False, fusion_interest=False)


def run_ours(ubm: str, seed: int, config: PeerBenchConfig) -> Dict[str, Any]:
    """``mim train`` of Base ``ubm`` in this process, in a throw-away run folder."""
    from train.ciubm import DataPaths, TrainConfig, run

    with tempfile.TemporaryDirectory(prefix="mim-bench-peer-") as out:
        train_config = TrainConfig(
            data=DataPaths(world=config.world), out=out, seed=seed, epochs=config.epochs,
            max_steps=config.max_steps, lr=config.lr, id_lr=config.id_lr, loader=config.loader,
            model=base_model(config, ubm), log_every=1, checkpoint_every=10 ** 9)
        report = run(train_config)
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logged if "samples_per_s" in r]
    return {**_summary(report), "steps": report["steps"], "train_samples_per_s": steps[-1]["samples_per_s"]}


def _summary(report: Dict[str, Any]) -> Dict[str, Any]:
    return {"auc": report["auc"], "gauc": report["gauc"], "logloss": report["logloss"],
            "s1_auc": report["age_deciles"][0]["auc"]}


# -------------------------------------------------------------------------------- the bench

def check_config(config: PeerBenchConfig) -> None:
    """Refuse, before any training, a setting that would fail late or print an empty table."""
    from mim_rec.config import (ConfigError, refuse_changed_settings, require_distinct, require_not_negative,
                                require_positive)
    from train.ciubm import (NOT_NEGATIVE_SETTINGS, POSITIVE_SETTINGS, check_model, check_sharding_device,
                             match_loader_to_model)

    if not config.world:
        raise ConfigError("mim bench peer needs world=DIR (a folder with items.parquet and events_*.parquet)")
    if not config.ubms or not config.seeds:
        raise ConfigError(f"ubms={config.ubms} seeds={config.seeds}: give at least one of each")
    require_distinct(config, ("ubms", "seeds"))
    unknown = sorted(set(config.ubms) - set(PEER_UBMS))
    if unknown:
        raise ConfigError(f"ubms: DeepCTR-Torch has no {unknown}; choose from {list(PEER_UBMS)}")
    if config.model.sequence_layout != "ebc":
        raise ConfigError("model.sequence_layout: the peer's input is read from the slot (ebc) layout")
    refuse_changed_settings(config.model, SET_BY_BENCH, "mim bench peer", prefix="model.")
    # The loader's settings get mim train's checks: a shuffle_row_groups of 0 or a negative seed
    # ended in a traceback from inside the loader, in the middle of a run.
    require_positive(config, ("epochs", "max_steps", "lr", "peer_lr", "id_lr", "query_len", "threads",
                              *(key for key in POSITIVE_SETTINGS if key.startswith("loader."))))
    # seeds: each is the seed of a mim train run, so it gets that run's check of its one seed
    require_not_negative(config, ["seeds", *(key for key in NOT_NEGATIVE_SETTINGS if key.startswith("loader."))])
    match_loader_to_model(config.loader, config.model)  # both libraries hash queries into the model's table size
    for ubm in config.ubms:
        model = base_model(config, ubm)
        check_model(model)
        check_sharding_device(model, "auto")  # the device run_ours trains on


def check_query_len(config: PeerBenchConfig) -> None:
    """Refuse a ``query_len`` shorter than the world's longest query before either library
    trains: DeepCTR-Torch's fixed-width input would drop words mim_rec sees."""
    import pyarrow.compute as pc

    from mim_rec.config import ConfigError
    from mim_rec.data.io import read_parquet_columns

    longest = 0
    for split in ("train", "test"):
        queries = read_parquet_columns(Path(config.world) / f"events_{split}.parquet", ["query"])["query"]
        longest = max([longest, *(len(text.split()) for text in pc.unique(queries).to_pylist() if text)])
    if longest > config.query_len:
        raise ConfigError(f"query_len={config.query_len}: the longest query of {config.world} has {longest} "
                          "words; raise query_len so DeepCTR-Torch sees every word mim_rec sees")


def run_bench(config: PeerBenchConfig) -> Dict[str, Any]:
    import torch

    from mim_rec.data.loader import ItemInfo
    from train.ciubm import table_sizes

    check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    items = ItemInfo.from_items(Path(config.world) / "items.parquet")
    check_query_len(config)
    sizes = table_sizes(config.world, items)
    if max(sizes.values()) + 1 >= FLOAT_EXACT_IDS or config.loader.query_buckets + 1 >= FLOAT_EXACT_IDS:
        raise ValueError(f"tables of {sizes} do not fit DeepCTR-Torch's float32 input exactly (ids < 2**24)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where mim train's "auto" runs
    rows = []
    for ubm, seed in itertools.product(config.ubms, config.seeds):
        rows.append({"ubm": ubm, "seed": seed, "implementation": "mim_rec", **run_ours(ubm, seed, config)})
        rows.append({"ubm": ubm, "seed": seed, "implementation": "deepctr_torch",
                     **run_peer(ubm, seed, config, items, sizes, device)})
    return {"world": config.world, "sizes": sizes, "seeds": config.seeds, "rows": rows,
            "summary": summarise(rows)}


METRICS = ("auc", "gauc", "logloss", "s1_auc", "train_samples_per_s")


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std over seeds per (UBM, implementation), and the per-seed paired differences."""
    summary = []
    for ubm in dict.fromkeys(r["ubm"] for r in rows):
        by_impl = {impl: [r for r in rows if r["ubm"] == ubm and r["implementation"] == impl]
                   for impl in ("mim_rec", "deepctr_torch")}
        entry: Dict[str, Any] = {"ubm": ubm}
        for impl, runs in by_impl.items():
            entry[impl] = {m: _mean_std([r[m] for r in runs]) for m in METRICS}
        pairs = list(zip(by_impl["mim_rec"], by_impl["deepctr_torch"]))
        entry["auc_difference"] = _mean_std([a["auc"] - b["auc"] for a, b in pairs])
        entry["gauc_difference"] = _mean_std([a["gauc"] - b["gauc"] for a, b in pairs])
        entry["speed_ratio"] = _mean_std([a["train_samples_per_s"] / b["train_samples_per_s"] for a, b in pairs])
        summary.append(entry)
    return summary


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    """Mean and sample std; the std of one value is ``None`` (unknown, not zero)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _fmt(stat: Dict[str, Optional[float]], digits: int = 4, signed: bool = False) -> str:
    sign = "+" if signed else ""
    spread = "" if stat["std"] is None else f" ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:{sign}.{digits}f}{spread}"


def format_table(result: Dict[str, Any]) -> str:
    seeds = result["seeds"]
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread"
    lines = [f"world {result['world']}  sizes {result['sizes']}  seeds {seeds} ({spread})",
             f"{'ubm':<5} {'implementation':<14} {'AUC':>17} {'GAUC':>17} {'log loss':>17} {'S1 AUC':>17} "
             f"{'train samples/s':>19}"]
    for entry in result["summary"]:
        for impl, name in (("mim_rec", "mim_rec"), ("deepctr_torch", "DeepCTR-Torch")):
            s = entry[impl]
            lines.append(f"{entry['ubm']:<5} {name:<14} {_fmt(s['auc']):>17} {_fmt(s['gauc']):>17} "
                         f"{_fmt(s['logloss']):>17} {_fmt(s['s1_auc']):>17} {_fmt(s['train_samples_per_s'], 0):>19}")
        lines.append(f"{entry['ubm']:<5} {'mim − peer':<14} {_fmt(entry['auc_difference'], signed=True):>17} "
                     f"{_fmt(entry['gauc_difference'], signed=True):>17} {'':>17} {'':>17} "
                     f"{_fmt(entry['speed_ratio'], 2) + 'x':>19}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    measuring_bench_parser(subparsers, "peer", COMMAND_HELP, __doc__.split("\n\n")[0], "PeerBenchConfig",
                           "a few small steps of both UBMs (smoke run; needs world=DIR)",
                           "e.g. world=runs/demo/world seeds=[0,1,2] max_steps=300 loader.batch_size=1024",
                           preset_cli(PeerBenchConfig, run_bench, format_table))
