"""Compare two evaluation reports bucket by bucket (e.g. Base vs Base+MIM by item age)."""

from __future__ import annotations

import math
from typing import Any, Dict, List


def relative_auc_gain(base: Dict[str, Any], other: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per item-age bucket: both AUCs, ``auc_gain = other - base`` and ``relative_gain = gain / base``.

    Both reports must use the same bucket edges (build the second run's ``CtrMetrics`` with the
    first report's ``age_edges``), or the buckets would hold different items and the gain would
    mix model quality with bucket membership. Buckets where either AUC is undefined get ``None``
    gains, and a base AUC of 0 no relative gain. ``n`` and ``positives`` are the bucket's rows and
    clicks in ``other`` (``positives`` None for a report written before buckets counted them).
    """
    base_edges, other_edges = base["age_edges"], other["age_edges"]
    if len(base_edges) != len(other_edges) or not all(
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(base_edges, other_edges)):
        raise ValueError(f"reports use different age buckets: {base_edges} vs {other_edges}; "
                         "evaluate the second run with CtrMetrics(age_edges=<first report's age_edges>)")
    rows = []
    for before, after in zip(base["age_deciles"], other["age_deciles"]):
        base_auc, auc = before["auc"], after["auc"]
        defined = base_auc is not None and auc is not None
        rows.append({"bucket": before["bucket"], "age_days_max": before["age_days_max"],
                     "base_auc": base_auc, "auc": auc,
                     "auc_gain": auc - base_auc if defined else None,
                     # a bucket of a few rows can rank every pair wrong (AUC 0): no ratio to it
                     "relative_gain": (auc - base_auc) / base_auc if defined and base_auc > 0 else None,
                     "n": after["n"], "positives": after.get("positives")})
    return rows
