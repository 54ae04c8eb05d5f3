"""The report's figures (matplotlib, Agg: no display is needed on a training host).

Each function takes already aggregated numbers, writes one PNG and returns True, or writes
nothing and returns False when it has no number to draw (the stage did not run), so that the
report never shows an empty chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from mim_rec.report.stats import seen_buckets  # noqa: E402

# group -> bar label -> (height, error bar or None)
Bars = Dict[str, Dict[str, Tuple[float, Optional[float]]]]


def _grouped_bars(ax, groups: Bars, ylabel: str) -> None:
    """One cluster of bars per group, one colour per bar label (shared legend)."""
    labels = list(dict.fromkeys(label for bars in groups.values() for label in bars))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g, bars in enumerate(groups.values()) if label in bars]
        heights = [bars[label] for bars in groups.values() if label in bars]
        errors = [e if e is not None else 0.0 for _, e in heights]
        ax.bar(xs, [h for h, _ in heights], width, yerr=errors if any(errors) else None, capsize=3, label=label)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _zoom_to_data(ax, groups: Bars) -> None:
    """AUC-like bars differ in the third decimal: start the axis just below the lowest bar
    (at 0 when the bars reach down near it, as recall bars do)."""
    lows = [h - (e or 0.0) for bars in groups.values() for h, e in bars.values()]
    highs = [h + (e or 0.0) for bars in groups.values() for h, e in bars.values()]
    pad = max(0.005, (max(highs) - min(lows)) * 0.2)
    ax.set_ylim(max(0.0, min(lows) - pad), max(highs) + pad)


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_table2(path: Path, groups: Bars) -> bool:
    """Grouped bars of AUC per UBM (Base vs Base+MIM, std over seeds as error bars)."""
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups)), 3.5))
    _grouped_bars(ax, groups, "test AUC")
    _zoom_to_data(ax, groups)
    ax.set_title("Table 2: Base vs Base+MIM (mean ± std over seeds)", fontsize=9)
    return _save(fig, path)


def plot_encoders(path: Path, panels: Dict[str, Bars]) -> bool:
    """One bar chart per encoder measure family (Table 3: stage 1, C-SFT, CTR with each table)."""
    panels = {title: groups for title, groups in panels.items() if groups}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels.items()):
        _grouped_bars(ax, groups, "")
        _zoom_to_data(ax, groups)
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_age_gain(path: Path, lines: Dict[str, Dict[str, float]]) -> bool:
    """Δ AUC by item-age bucket, one line per UBM (x = S1 newest ... S10 oldest)."""
    if not lines:
        return False
    buckets = seen_buckets(lines.values())
    fig, ax = plt.subplots(figsize=(6.0, 3.5))
    for ubm, gains in lines.items():
        xs = [i for i, b in enumerate(buckets) if b in gains]
        ax.plot(xs, [gains[buckets[i]] for i in xs], marker="o", label=ubm)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel("item age at impression (S1 newest)")
    ax.set_ylabel("Δ AUC (Base+MIM − Base)")
    ax.set_title("Figure 6: MIM gain by item age (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
