"""Plain-text rendering of a :class:`~mim_rec.metrics.CtrMetrics` report."""

from __future__ import annotations

from typing import Any, Dict, Optional

from mim_rec.utils.text import counted


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _counted(count: Optional[int], what: str) -> str:
    """`` (3 clicks)``: what a headline metric rests on, so an AUC over one click (a world with
    a click rate of 0.1%) is not read as one over thousands; empty where the report lacks it."""
    return "" if count is None else f" ({counted(count, what)})"


def format_report(report: Dict[str, Any], age_caveat: Optional[str] = None) -> str:
    """The report's headline and its item-age buckets; ``age_caveat`` (an imported world's
    ``world_age_caveat``) says why those buckets are not item ages there."""
    lines = [f"AUC {_f(report['auc'])}  GAUC {_f(report['gauc'])}{_counted(report.get('gauc_users'), 'user')}  "
             f"logloss {_f(report['logloss'])}  n {report['n']:,}{_counted(report.get('positives'), 'click')}"]
    buckets = report.get("age_deciles") or []
    if buckets:
        lines.append("item-age buckets (S1 newest): " + "  ".join(
            f"{b['bucket']} {_f(b['auc'])}" for b in buckets))
        if age_caveat:
            lines.append(f"note: these buckets are not item ages on this world: {age_caveat}")
    return "\n".join(lines)
