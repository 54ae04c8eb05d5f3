"""Title tower: a transformers encoder, mean-pooled over the attention mask.

``forward(list[str]) -> [B, feature_dim]`` tokenises inside; pre-training objectives that
need token-level states (masked language modelling) use :meth:`tokenize` and
:meth:`token_states` directly.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from torch import nn

from mim_rec.config import ConfigError
from mim_rec.encoders.bundled import BUNDLED_TEXT_MODEL, bundled_text_folder
from mim_rec.encoders.config import TextConfig
from mim_rec.encoders.freeze import PartlyFrozen

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Random-init architecture presets (BERT family); tokenised with the bundled WordPiece vocab.
PRESETS: Dict[str, Dict[str, int]] = {
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "bge-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=1536),
}

# The files transformers saves a tokenizer as (WordPiece, BPE, SentencePiece, or the fast one).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


class HFTextEncoder(PartlyFrozen):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        folder = _model_folder(config.name)
        model_config = _model_config(config, folder)
        if folder is not None and config.pretrained:
            try:  # fp32 whatever the folder was saved in: the heads are fp32, autocast does the rest
                self.model = AutoModel.from_pretrained(str(folder), config=model_config, dtype=torch.float32)
            except OSError as exc:  # a config.json without weights beside it
                raise ConfigError(f"encoders.text.name={config.name}: no weights to load ({exc}); set "
                                  "encoders.text.pretrained=false for random ones") from exc
            except (SafetensorError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]  # a weights file cut short or foreign
                raise ConfigError(f"encoders.text.name={config.name}: its weights cannot be read "
                                  f"({type(exc).__name__}: {first_line})") from None
        else:
            self.model = AutoModel.from_config(model_config)
        self.max_length = _max_length(config, self.model)
        self.tokenizer = _tokenizer(config, folder)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ConfigError(f"encoders.text.tokenizer: the tokenizer at {self.tokenizer.name_or_path} has "
                              f"{self.tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{self.model.config.vocab_size}")
        self.feature_dim: int = self.model.config.hidden_size
        if getattr(self.model, "pooler", None) is not None:
            self.freeze([self.model.pooler])  # the [CLS] pooler is unused by mean pooling
        if config.trainable_layers is not None:
            self.freeze(_leading_modules(self.model, config.trainable_layers))
        if config.grad_checkpointing:
            self.model.gradient_checkpointing_enable()

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        device = self.model.get_input_embeddings().weight.device
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].to(device)}

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over real tokens (padding excluded), as all-MiniLM-L6-v2 was trained."""
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.token_states(input_ids, attention_mask), attention_mask)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(**self.tokenize(texts))


def _model_folder(name: str) -> Optional[Path]:
    if name == BUNDLED_TEXT_MODEL:
        return bundled_text_folder()
    path = Path(name)
    return path if (path / "config.json").exists() else None


def _model_config(config: TextConfig, folder: Optional[Path]) -> "PretrainedConfig":
    """The transformers config of ``config.name`` with ``config.overrides`` set on it.

    Each override must name an attribute the config has: transformers keeps any other key
    as an inert extra, so a misspelled ``num_hidden_layer=1`` silently built the full model.
    """
    from transformers import AutoConfig, BertConfig

    if folder is not None:
        model_config = AutoConfig.from_pretrained(str(folder))
    elif config.name in PRESETS:
        if config.pretrained:
            raise ConfigError(f"encoders.text.name={config.name}: the preset has no weights; set "
                              "encoders.text.pretrained=false or give a model folder")
        model_config = BertConfig(**PRESETS[config.name])
    else:
        raise ConfigError(f"encoders.text.name={config.name}: unknown text model: expected "
                          f"'{BUNDLED_TEXT_MODEL}', a local model folder (with a config.json), or one of "
                          f"{sorted(PRESETS)}")
    unknown = sorted(key for key in config.overrides if not hasattr(model_config, key))
    if unknown:
        raise ConfigError(f"encoders.text.overrides: {type(model_config).__name__} has no setting "
                          f"{', '.join(unknown)} (e.g. num_hidden_layers, hidden_size)")
    model_config.update(config.overrides)
    return model_config


def _max_length(config: TextConfig, model: nn.Module) -> int:
    """``config.max_length``, refused when the model has fewer usable positions: it was
    accepted, and the first title that long failed inside the model's embeddings. RoBERTa-style
    embeddings (those with a ``padding_idx``) number positions from ``padding_idx + 1``."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return config.max_length
    padding_idx = getattr(getattr(model, "embeddings", None), "padding_idx", None)
    usable = positions - (padding_idx + 1 if padding_idx is not None else 0)
    if config.max_length > usable:
        raise ConfigError(f"encoders.text.max_length={config.max_length}: the model ({config.name}) has "
                          f"{usable} usable positions (max_position_embeddings={positions})")
    return config.max_length


def _tokenizer(config: TextConfig, folder: Optional[Path]) -> "PreTrainedTokenizerBase":
    """``config.tokenizer``, else the model folder's own tokenizer, else the bundled one."""
    from transformers import AutoTokenizer

    setting, tokenizer_folder = _tokenizer_source(config, folder)
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as exc:  # what transformers raises for a folder without a tokenizer
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{setting}={tokenizer_folder}: not a tokenizer folder ({reason})") from exc


def _tokenizer_source(config: TextConfig, folder: Optional[Path]) -> Tuple[str, Path]:
    """The setting that names the tokenizer, and its folder.

    A model folder's own tokenizer is any tokenizer file in it: original BERT checkpoints ship
    a vocab.txt without a tokenizer_config.json, and the bundled vocabulary's ids would mean other
    tokens to their model. The bundled one serves the presets and folders that hold only a model.
    """
    if config.tokenizer is not None:
        if not Path(config.tokenizer).is_dir():
            raise ConfigError(f"encoders.text.tokenizer={config.tokenizer}: no such folder")
        return "encoders.text.tokenizer", Path(config.tokenizer)
    if folder is not None and any((folder / name).exists() for name in TOKENIZER_FILES):
        return "encoders.text.name", folder
    return "encoders.text.tokenizer", bundled_text_folder()


def _leading_modules(model: nn.Module, trainable_layers: int) -> List[nn.Module]:
    """Embeddings plus all but the last ``trainable_layers`` transformer layers."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise ConfigError(f"encoders.text.trainable_layers needs a BERT-style model (encoder.layer); "
                         f"{type(model).__name__} has none")
    keep_from = max(len(layers) - trainable_layers, 0)
    return [model.embeddings, *layers[:keep_from]]


def build_text_encoder(config: TextConfig) -> HFTextEncoder:
    return HFTextEncoder(config)
