"""Seed aggregation for the experiment report: the numbers that the tables, figures and claims share.

Every CTR run is named ``{kind}_{ubm}_s{seed}`` (``base``, ``mim``, ``nocontent``, ...). A
comparison between two kinds is *paired*: per seed, the difference of the two runs of that seed,
then mean and sample standard deviation over seeds, so that seed-to-seed variation common to
both runs (the same data order, the same world) cancels out of the difference.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from mim_rec.metrics.gain import relative_auc_gain

Metrics = Dict[str, Any]
_RUN_NAME = re.compile(r"^(?:base|mim)_(?P<ubm>.+)_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Stat:
    """Values of one measure over seeds; ``std`` is the sample std (ddof=1), None for one seed."""

    values: Tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if self.n > 1 else None

    def p_above_zero(self) -> Optional[float]:
        """One-sided p-value that the mean is above zero (Student's t over the values; on paired
        differences, the paired t-test). None for one value: no spread to test against."""
        if self.n < 2:
            return None
        if self.std == 0:  # every value the same: certain either way, where t would divide by zero
            return 0.0 if self.mean > 0 else 1.0
        from scipy.stats import ttest_1samp
        return float(ttest_1samp(self.values, 0.0, alternative="greater").pvalue)


def stat(values: Iterable[Optional[float]]) -> Optional[Stat]:
    """A :class:`Stat` of the defined values (None and NaN dropped); None when none is left."""
    kept = tuple(float(v) for v in values if v is not None and not math.isnan(v))
    return Stat(kept) if kept else None


def mean_of(s: Optional[Stat]) -> Optional[float]:
    return None if s is None else s.mean


def seeds_of(s: Optional[Stat]) -> int:
    return 0 if s is None else s.n


def fmt(value: Optional[float], signed: bool = False, missing: str = "n/a") -> str:
    """4 decimals (the AUC precision used throughout), ``+`` on differences."""
    if value is None:
        return missing
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def fmt_stat(s: Optional[Stat], signed: bool = False) -> str:
    """``mean ± std``; ``± n/a`` with one seed; ``not run`` without any."""
    if s is None:
        return "not run"
    return f"{fmt(s.mean, signed)} ± {fmt(s.std)}"


def fmt_p(s: Optional[Stat]) -> str:
    """The :meth:`Stat.p_above_zero` of ``s``: ``p=0.012``, ``p<0.001``; ``p n/a`` with one
    seed or none."""
    p = None if s is None else s.p_above_zero()
    if p is None:
        return "p n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _unique(values: Iterable[Any]) -> List[Any]:
    return list(dict.fromkeys(values))


class CtrRuns:
    """The experiment's CTR metrics, addressed by (kind, ubm, seed)."""

    def __init__(self, results: Dict[str, Any]) -> None:
        self.runs: Dict[str, Optional[Metrics]] = results.get("ctr") or {}
        parsed = [m for m in map(_RUN_NAME.match, self.runs) if m]
        # The orchestrator names UBMs and seeds; a results dict without them still renders its runs.
        self.ubms: List[str] = list(results.get("ubms") or _unique(m["ubm"] for m in parsed))
        self.seeds: List[int] = list(results.get("seeds") or sorted(_unique(int(m["seed"]) for m in parsed)))

    def run(self, kind: str, ubm: str, seed: int) -> Optional[Metrics]:
        return self.runs.get(f"{kind}_{ubm}_s{seed}")

    def metric(self, kind: str, ubm: str, key: str = "auc") -> Optional[Stat]:
        """``key`` of every seed's ``kind`` run."""
        return stat(m.get(key) for m in (self.run(kind, ubm, s) for s in self.seeds) if m)

    def delta(self, kind: str, reference: str, ubm: str,
              value: Callable[[Metrics], Optional[float]] = lambda m: m.get("auc")) -> Optional[Stat]:
        """Paired per seed: ``value(kind run) - value(reference run)``, over seeds that have both."""
        diffs = []
        for seed in self.seeds:
            a, b = self.run(kind, ubm, seed), self.run(reference, ubm, seed)
            if a and b and value(a) is not None and value(b) is not None:
                diffs.append(value(a) - value(b))
        return stat(diffs)

    def _per_category(self) -> Iterable[Dict[str, Any]]:
        """The ``per_category`` of every Base and Base+MIM run there is."""
        return ((self.run(kind, ubm, seed) or {}).get("per_category") or {}
                for ubm in self.ubms for seed in self.seeds for kind in ("base", "mim"))

    def categories(self) -> List[str]:
        """Every category with a per-category AUC in some Base or Base+MIM run, in numeric order."""
        keys = _unique(c for per_category in self._per_category() for c in per_category)
        return sorted(keys, key=lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c))

    def category_counts(self, category: str) -> Optional[Tuple[int, int]]:
        """``(events, clicks)`` of ``category`` in the test events, from the first Base or
        Base+MIM run that counted both (the runs of an experiment score one test split); None
        where none did (metrics written before categories counted their clicks)."""
        for per_category in self._per_category():
            row = per_category.get(category) or {}
            if row.get("positives") is not None:
                return row["n"], row["positives"]
        return None

    def category_delta(self, ubm: str, category: str) -> Optional[Stat]:
        return self.delta("mim", "base", ubm, lambda m: ((m.get("per_category") or {}).get(category) or {}).get("auc"))

    def age_gain_seeds(self, ubm: str, kind: str = "mim") -> List[Dict[str, Optional[float]]]:
        """Per seed with both runs bucketed alike: bucket -> ``kind`` (default Base+MIM) AUC -
        Base AUC (S1 newest).

        A seed whose two runs used different age edges is left out: its buckets would hold
        different items (see :func:`~mim_rec.metrics.gain.relative_auc_gain`).
        """
        gains = []
        for seed in self.seeds:
            base, mim = self.run("base", ubm, seed), self.run(kind, ubm, seed)
            if not (base and mim and base.get("age_deciles") and mim.get("age_deciles")):
                continue
            try:
                gains.append({row["bucket"]: row["auc_gain"] for row in relative_auc_gain(base, mim)})
            except ValueError:
                continue
        return gains


def seen_buckets(seed_gains: Iterable[Dict[str, Optional[float]]]) -> List[str]:
    """Every bucket the per-seed gains name, undefined ones included, in age order (S1 newest
    ... S10 oldest; by number, not by first appearance, which put S1 last when the first UBM
    had no S1 AUC)."""
    names = _unique(b for gains in seed_gains for b in gains)
    return sorted(names, key=lambda b: (0, int(b[1:])) if b[:1] == "S" and b[1:].isdigit() else (1, names.index(b)))


def by_bucket(seed_gains: List[Dict[str, Optional[float]]]) -> Dict[str, Stat]:
    """Bucket -> :class:`Stat` over the given per-seed gains, in age order; a bucket with no
    defined gain (one class in every pair) is left out here, and shown as n/a by the tables."""
    stats = {b: stat(gains.get(b) for gains in seed_gains) for b in seen_buckets(seed_gains)}
    return {b: s for b, s in stats.items() if s is not None}


def age_gains(ctr: CtrRuns) -> Dict[str, Dict[str, Stat]]:
    """UBM -> bucket -> Δ AUC over seeds (Figure 6); UBMs without a comparable pair are left out."""
    table = {ubm: by_bucket(ctr.age_gain_seeds(ubm)) for ubm in ctr.ubms}
    return {ubm: row for ubm, row in table.items() if row}


def age_pairs(ctr: CtrRuns) -> List[Dict[str, Optional[float]]]:
    """Every (UBM, seed) pair's bucket -> Δ AUC."""
    return [gains for ubm in ctr.ubms for gains in ctr.age_gain_seeds(ubm)]


def pooled_age_gains(ctr: CtrRuns, defined: Optional[str] = None) -> Dict[str, Stat]:
    """Bucket -> Δ AUC over every (UBM, seed) pair: the gain by item age across the whole table.
    With ``defined``, over the pairs where that bucket's gain is defined only, so the buckets
    are compared on the same pairs."""
    return by_bucket([gains for gains in age_pairs(ctr) if defined is None or gains.get(defined) is not None])


def newest_excess(seed_gains: Iterable[Dict[str, Optional[float]]]) -> Optional[Stat]:
    """Per pair, S1's gain minus the mean gain of its other defined buckets, over the pairs where
    S1 and another bucket are defined. Taken within each run, it is free of the run-to-run
    spread that each bucket's own mean carries, so its p-value says whether the newest items
    gain more than the rest, not whether S1 tops nine noisy means."""
    excess = []
    for gains in seed_gains:
        others = [g for b, g in gains.items() if b != "S1" and g is not None]
        if gains.get("S1") is not None and others:
            excess.append(gains["S1"] - statistics.fmean(others))
    return stat(excess)


def nested(data: Optional[Dict[str, Any]], *keys: str) -> Optional[Any]:
    """``data[k1][k2]...`` or None where any level is missing (a stage that did not run)."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
