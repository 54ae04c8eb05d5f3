"""Plain-text rendering of a :class:`~mim_rec.metrics.CtrMetrics` report."""

from __future__ import annotations

from typing import Any, Dict, Optional


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report(report: Dict[str, Any], age_caveat: Optional[str] = None) -> str:
    """The report's headline and its item-age buckets; ``age_caveat`` (an imported world's
    ``world_age_caveat``) says why those buckets are not item ages there."""
    lines = [f"AUC {_f(report['auc'])}  GAUC {_f(report['gauc'])}  logloss {_f(report['logloss'])}  "
             f"n {report['n']:,}"]
    buckets = report.get("age_deciles") or []
    if buckets:
        lines.append("item-age buckets (S1 newest): " + "  ".join(
            f"{b['bucket']} {_f(b['auc'])}" for b in buckets))
        if age_caveat:
            lines.append(f"note: these buckets are not item ages on this world: {age_caveat}")
    return "\n".join(lines)
