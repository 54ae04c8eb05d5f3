"""Stage 2, C-SFT: content-interest-aware supervised contrastive fine-tuning (paper 3.3).

TFN fusion (:mod:`.fusion`), multi-level InfoNCE and the CE baselines (:mod:`.losses`),
ST-NSG negatives (:mod:`.negatives`), the item and query towers and the saved MM encoder
(:mod:`.model`). See docs/csft.md.
"""

from mim_rec.csft.config import CsftConfig, FusionConfig, ModelConfig
from mim_rec.csft.model import (CsftModel, ItemEmbeddings, MMItemEncoder, QueryEncoder,
                                load_csft_model, load_mm_encoder, save_mm_encoder)

__all__ = ["CsftConfig", "FusionConfig", "ModelConfig", "CsftModel", "ItemEmbeddings",
           "MMItemEncoder", "QueryEncoder", "load_csft_model", "load_mm_encoder",
           "save_mm_encoder"]
