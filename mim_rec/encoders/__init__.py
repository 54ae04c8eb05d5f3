"""Stage-1 encoders: a timm image tower and a transformers title tower, projection heads
into a shared space, and the saved encoders artifact. See docs/pretrain.md."""

from mim_rec.encoders.config import EncodersConfig, TextConfig, VisionConfig
from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.pair import EncoderPair, load_encoders, save_encoders
from mim_rec.encoders.text import HFTextEncoder, build_text_encoder
from mim_rec.encoders.vision import (PrecomputedVisionEncoder, TimmVisionEncoder,
                                     build_vision_encoder, load_timm_model)

__all__ = [
    "EncodersConfig", "TextConfig", "VisionConfig", "ProjectionHead", "EncoderPair",
    "load_encoders", "save_encoders", "HFTextEncoder", "build_text_encoder",
    "PrecomputedVisionEncoder", "TimmVisionEncoder", "build_vision_encoder", "load_timm_model",
]
