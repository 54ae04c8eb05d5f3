"""Settings of ``mim pretrain`` (load with mim_rec.config.load_config + key=value overrides).

Defaults (those of :mod:`mim_rec.encoders.config`) are sized for a CPU host: 64x64 inputs
(the synthetic world's image size), and most of each backbone frozen -- EfficientNet-Lite0
trains its last two block groups plus its 1x1 head convolution, MiniLM its last two of six
layers; heads always train. The frozen
early layers hold generic edges/textures and sub-word statistics that a small item corpus
cannot improve, while the late layers carry the domain-specific semantics DDA/DMA adapt;
freezing cuts the backward pass by about two thirds. On GPU set
``encoders.vision.trainable_groups=null encoders.text.trainable_layers=null`` to train all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mim_rec.encoders.config import EncodersConfig
from mim_rec.pretrain.evaluate import EvalConfig


@dataclass
class PretrainDataConfig:
    world: str = "data/world"        # a world folder (items.parquet inside) or an items file
    heldout_fraction: float = 0.2    # items kept out of training, for evaluation
    batch_size: int = 32             # global batch; split evenly over ranks


@dataclass
class PretrainConfig:
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dda_steps: int = 20              # Downstream Data Adaptation (MLM + image contrastive)
    dma_steps: int = 100             # Different Modal Alignment (CLIP loss)
    # LP-FT head warm-up between DDA and DMA (Kumar et al., ICLR 2022): the projection heads
    # and the CLIP temperature first train alone on frozen tower features of the training
    # items (as the evaluation probe does), so DMA fine-tunes the backbones through aligned
    # heads instead of random ones, which distort the pretrained features. 0 = no warm-up.
    head_warmup_steps: int = 300
    head_warmup_batch_size: int = 256
    head_warmup_lr: float = 3e-3     # = EvalConfig.probe_lr
    mlm_probability: float = 0.15
    image_ssl_weight: float = 1.0
    lr: float = 1e-3                 # heads and temperature
    backbone_lr: float = 1e-4        # trainable backbone layers
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16 = torch.autocast(bfloat16)
    out: str = "runs/pretrain"
    checkpoint_every: int = 50       # steps between training checkpoints
    log_every: int = 10
