"""What a world folder holds, in numbers: counts, click rates, history lengths, item ages.

Reads only the columns it needs, batch by batch, so it works on any world in the project's
format (synthetic or imported). A missing or unreadable file is a ``DataError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import pyarrow.compute as pc

from mim_rec.data.io import open_parquet, read_events, read_parquet_columns
from mim_rec.data.loader import ItemInfo, item_age_days
from mim_rec.data.manifest import world_age_caveat

PERCENTILES = (10, 50, 90, 99)


def summarize_world(directory: Union[str, Path]) -> Dict:
    """A JSON-serialisable summary of a world folder."""
    directory = Path(directory)
    items = ItemInfo.from_items(directory / "items.parquet")  # validated: dense ids, whole-second times
    category_of, created = items.category, items.created_s
    summary: Dict = {"items": items.count, "categories": int(len(np.unique(category_of))),
                     "item_age_caveat": world_age_caveat(directory)}
    for split in ("train", "test"):
        path = directory / f"events_{split}.parquet"
        if not path.is_file():
            continue
        if open_parquet(path).metadata.num_rows == 0:  # summarised as such (validate refuses it, naming the file)
            summary[f"events_{split}"] = {"rows": 0}
            continue
        # Read through the contract, so an id outside the items table, a label other than 0/1 or
        # a null is refused with its row and field instead of indexing the wrong item's age.
        table = read_events(path, items.count, columns=["user_id", "target_item_id", "label", "ts", "hist_item_ids"])
        label = table["label"].to_numpy().astype(np.float64)
        target = table["target_item_id"].to_numpy()
        hist_len = pc.list_value_length(table["hist_item_ids"]).to_numpy(zero_copy_only=False)
        ts = table["ts"].to_numpy()
        age_days = item_age_days(ts, created[target])  # as the training and evaluation take it
        cats = category_of[target]
        per_cat = {int(c): round(float(label[cats == c].mean()), 4) for c in np.unique(cats)}
        summary[f"events_{split}"] = {
            "rows": table.num_rows,
            "users": int(len(np.unique(table["user_id"].to_numpy()))),
            "click_rate": round(float(label.mean()), 4),
            "click_rate_per_category": per_cat,
            "history_length": _percentiles(hist_len, method="lower"),
            "item_age_days": _percentiles(age_days),
            "events_before_item_created": int((ts < created[target]).sum()),
            # the evaluation's method (lower-value quantiles: mim_rec.metrics age_bucket_edges), so
            # these edges are the ones metrics.json reports for the same split
            "item_age_decile_edges_days": [round(float(x), 2) for x in np.percentile(
                age_days, np.arange(10, 100, 10), method="lower")],
        }
    for split in ("train", "test"):
        path = directory / f"pairs_{split}.parquet"
        if path.is_file():
            signal = read_parquet_columns(path, ["signal"])["signal"].to_numpy(zero_copy_only=False)
            summary[f"pairs_{split}"] = {s: int((signal == s).sum()) for s in np.unique(signal)}
    return summary


def _percentiles(values: np.ndarray, method: str = "linear") -> Dict[str, float]:
    """Mean, :data:`PERCENTILES` and max of ``values``. ``method="lower"`` for integer quantities
    (history lengths): numpy's default interpolates between neighbours ("p10 2.9"), a length no
    row has; "lower" takes a value that occurs, at most p% of the rows below it, as the decile
    edges take theirs ("nearest" may round up past that share)."""
    out = {"mean": round(float(values.mean()), 2)} if len(values) else {}
    for p in PERCENTILES:
        out[f"p{p}"] = round(float(np.percentile(values, p, method=method)), 2) if len(values) else None
    out["max"] = round(float(values.max()), 2) if len(values) else None
    return out


def format_summary(summary: Dict) -> str:
    """Human-readable lines of :func:`summarize_world`'s dict."""
    lines: List[str] = [f"items: {summary['items']:,}  categories: {summary['categories']}"]
    for split in ("train", "test"):
        ev = summary.get(f"events_{split}")
        if ev and not ev["rows"]:
            lines.append(f"events_{split}: 0 rows")
        elif ev:
            lines.append(f"events_{split}: {ev['rows']:,} rows, {ev['users']:,} users, "
                         f"click rate {ev['click_rate']:.4f}")
            rates = ev["click_rate_per_category"].values()
            lines.append(f"  click rate per category: min {min(rates):.4f} / max {max(rates):.4f}")
            lines.append("  history length: " + _fmt(ev["history_length"]))
            lines.append("  item age at event (days): " + _fmt(ev["item_age_days"]))
            if ev["events_before_item_created"]:
                lines.append(f"  warning: {ev['events_before_item_created']:,} events precede their target "
                             "item's created_at; they count as age 0 (the newest bucket, S1)")
            lines.append("  item-age decile edges (days): "
                         + ", ".join(f"{x:g}" for x in ev["item_age_decile_edges_days"]))
            if summary.get("item_age_caveat"):
                lines.append(f"  note: these are not item ages on this world: {summary['item_age_caveat']}")
        pairs = summary.get(f"pairs_{split}")
        if pairs:
            lines.append(f"pairs_{split}: " + ", ".join(f"{k} {v:,}" for k, v in pairs.items()))
    return "\n".join(lines)


def _fmt(stats: Dict[str, float]) -> str:
    return "  ".join(f"{k} {v:g}" for k, v in stats.items())
