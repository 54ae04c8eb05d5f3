"""CTR evaluation metrics: AUC, log loss, GAUC, per-category AUC, AUC by item-age bucket."""

from mim_rec.metrics.accumulator import CtrMetrics, all_gather_rows
from mim_rec.metrics.functional import age_bucket_edges, binary_auc, gauc, grouped_auc, log_loss
from mim_rec.metrics.gain import relative_auc_gain

__all__ = ["CtrMetrics", "age_bucket_edges", "all_gather_rows", "binary_auc", "gauc", "grouped_auc",
           "log_loss", "relative_auc_gain"]
