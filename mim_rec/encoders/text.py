"""Title tower: a transformers encoder, mean-pooled over the attention mask.

``forward(list[str]) -> [B, feature_dim]`` tokenises inside; pre-training objectives that
need token-level states (masked language modelling) use :meth:`tokenize` and
:meth:`token_states` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

from mim_rec.encoders.bundled import BUNDLED_TEXT_MODEL, bundled_text_folder
from mim_rec.encoders.config import TextConfig
from mim_rec.encoders.freeze import PartlyFrozen

# Random-init architecture presets (BERT family); tokenised with the bundled WordPiece vocab.
PRESETS: Dict[str, Dict[str, int]] = {
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "bge-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=1536),
}


class HFTextEncoder(PartlyFrozen):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, BertConfig

        folder = _model_folder(config.name)
        if folder is not None and config.pretrained:
            self.model = AutoModel.from_pretrained(str(folder), **config.overrides)
        elif folder is not None:
            from transformers import AutoConfig
            model_config = AutoConfig.from_pretrained(str(folder), **config.overrides)
            self.model = AutoModel.from_config(model_config)
        elif config.name in PRESETS:
            if config.pretrained:
                raise ValueError(f"text preset '{config.name}' has no weights; set "
                                 "text.pretrained=false or give a model folder as text.name")
            self.model = AutoModel.from_config(
                BertConfig(**{**PRESETS[config.name], **config.overrides}))
        else:
            raise ValueError(f"unknown text model '{config.name}': expected "
                             f"'{BUNDLED_TEXT_MODEL}', a local model folder, or one of "
                             f"{sorted(PRESETS)}")
        tokenizer_folder = config.tokenizer or (
            folder if folder is not None and (folder / "tokenizer_config.json").exists()
            else bundled_text_folder())
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer at {tokenizer_folder} has {self.tokenizer.vocab_size} "
                             f"tokens but the model's vocabulary is {self.model.config.vocab_size}")
        self.max_length = config.max_length
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


def _model_folder(name: str):
    if name == BUNDLED_TEXT_MODEL:
        return bundled_text_folder()
    path = Path(name)
    return path if (path / "config.json").exists() else None


def _leading_modules(model: nn.Module, trainable_layers: int) -> List[nn.Module]:
    """Embeddings plus all but the last ``trainable_layers`` transformer layers."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"text.trainable_layers needs a BERT-style model (encoder.layer); "
                         f"{type(model).__name__} has none")
    keep_from = max(len(layers) - trainable_layers, 0)
    return [model.embeddings, *layers[:keep_from]]


def build_text_encoder(config: TextConfig) -> HFTextEncoder:
    return HFTextEncoder(config)
