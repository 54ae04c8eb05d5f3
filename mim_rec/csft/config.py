"""Settings of ``mim csft`` (load with mim_rec.config.load_config + key=value overrides).

Every extension of the paper's C-SFT is a switch here, which is how the ablations run:
``model.fusion.kind=concat`` (w/o TFN), ``negatives.hard=false negatives.queue_batches=0
negatives.all_gather=false`` (w/o ST-NSG), ``loss.alpha=0 loss.beta=0`` (w/o multi-level
InfoNCE); Table 4's variants are ``data.signals`` and ``loss.kind``. See docs/csft.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from mim_rec.csft.fusion import FusionKind

LossKind = Literal["infonce", "pairwise_ce", "category_ce"]


@dataclass
class FusionConfig:
    kind: FusionKind = "tfn"       # tfn: full [h_img;1]⊗[h_txt;1]; lowrank; concat (w/o TFN)
    hidden: int = 128              # width of the MLP over the fused vector
    rank: int = 16                 # lowrank only
    # h^MM = unit(h_img + h_txt + MLP(fusion)) with the MLP's output layer zero-initialised:
    # training starts exactly at the stage-1 item embedding and learns a correction.
    # false: h^MM = unit(MLP(fusion)), as written in the paper.
    residual: bool = True


@dataclass
class QueryConfig:
    # The query image goes through the item tower's vision backbone (true), or through a
    # copy of it that trains separately (false; only differs when backbones train).
    share_vision: bool = True


@dataclass
class ModelConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    # false: both backbones frozen (their features are cached once per item, exactly); only
    # the projection heads, the fusion MLP and the query head train. true: the backbone
    # layers stage 1 trained (its trainable_groups / trainable_layers) train here too.
    train_backbones: bool = False


@dataclass
class CsftDataConfig:
    world: str = "data/world"      # folder with items.parquet, pairs_*.parquet, events_test.parquet
    # Which training pairs to learn from (paper Table 4): ["purchase"], or ["click"]. A purchase
    # is also a click: a pairs file labels each pair with its strongest signal, and ["click"]
    # selects every pair, "click" and "purchase" alike (mim_rec.csft.data.SELECTED_BY).
    signals: List[str] = field(default_factory=lambda: ["purchase"])
    batch_size: int = 128          # pairs per step, over all ranks (N = batch_size / P)
    # Hold out the latest share of pairs_train (by time) and the events_train impressions of
    # that period: training skips them and csft-eval scores them instead of the test files.
    # 0 = train on every pair, evaluate on the test files. mim csft-tune sets it.
    validation: float = 0.0
    # Backbone features, cached per (backbone weights, input file): default OUT/features.
    # Point several runs at one folder to share it (ablations on the same encoders).
    feature_cache: Optional[str] = None


@dataclass
class NegativesConfig:
    hard: bool = True              # one same-category item per pair
    # k: time-based negatives from the last k steps (0 = off; must be 0 with trainable
    # backbones, whose stale rows made C-SFT diverge: docs/csft.md)
    queue_batches: int = 10
    # Re-embed the queued items with the current weights each step (exact and free of
    # staleness, from the cached backbone features: needs model.train_backbones=false).
    # false: use the rows as computed up to k steps ago (MoCo-style, stale).
    queue_refresh: bool = True
    all_gather: bool = True        # space-based negatives from every rank


@dataclass
class LossConfig:
    # infonce: multi-level InfoNCE; pairwise_ce: a match/no-match classifier over the same
    # candidates; category_ce: classify the item's category (interest-irrelevant baseline).
    kind: LossKind = "infonce"
    # Chosen by mim csft-tune on the default world's validation split from 0.07 (the common
    # contrastive default), 0.1, 0.14 and 0.2 (docs/csft.md).
    temperature: float = 0.14
    alpha: float = 0.5             # weight of L_q2txt
    beta: float = 0.5              # weight of L_q2img


@dataclass
class CsftEvalConfig:
    ks: List[int] = field(default_factory=lambda: [10, 100])
    batch_size: int = 256          # items / queries embedded per forward pass


@dataclass
class CsftConfig:
    encoders: str = "runs/pretrain/encoders"   # the stage-1 artifact (mim pretrain)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CsftDataConfig = field(default_factory=CsftDataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: CsftEvalConfig = field(default_factory=CsftEvalConfig)
    steps: int = 300
    lr: float = 1e-3               # fusion, loss parameters (and the heads unless head_lr is set)
    # The stage-1 projection heads (image, title, and the query head copied from the image
    # head): None trains them at lr; a smaller value keeps stage 1's image-title alignment
    # while the fusion learns (discriminative learning rates, as LP-FT's lesson suggests).
    head_lr: Optional[float] = None
    backbone_lr: float = 1e-4      # backbone layers (model.train_backbones=true)
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    out: str = "runs/csft"
    checkpoint_every: int = 100
    log_every: int = 10
