"""Stage-1 pre-training objectives: DDA (title MLM, image contrastive) and DMA (CLIP loss)."""

from mim_rec.pretrain.contrastive import gather_with_grad, symmetric_info_nce
from mim_rec.pretrain.dma import ClipLoss, LearnableTemperature
from mim_rec.pretrain.dda import ImageContrastive, MaskedLanguageModelling, augment, mask_tokens

__all__ = ["ClipLoss", "LearnableTemperature", "gather_with_grad", "symmetric_info_nce",
           "ImageContrastive", "MaskedLanguageModelling", "augment", "mask_tokens"]
