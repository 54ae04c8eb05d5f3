"""The paper's claims, each checked against this run's numbers.

``holds`` is three-valued: True / False from the measured numbers, None where the inputs were not
measured in this run. A claim over several parts (every UBM, every Table-4 variant) is False as
soon as one measured part fails, and None if the measured parts pass but some part is missing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from mim_rec.report.stats import CtrRuns, Stat, age_pairs, fmt, fmt_p, fmt_stat, nested, pooled_age_gains, \
    seen_buckets
from mim_rec.utils.text import counted

Claim = Dict[str, Any]
ABLATED = {"tfn": ("no_tfn", "TFN"), "st_nsg": ("no_st_nsg", "ST-NSG"),
           "multi_level": ("no_multi_level", "multi-level InfoNCE")}
TABLE4_OTHERS = ("category_ce", "click_ce", "purchase_ce", "click_infonce")
RECALL_K = 10  # the k of the recalls the claims read (recall@10, probe_i2t_r10)
MIN_ENCODER_OVER_LOOKUP = 100.0
MIN_TRAIN_THROUGHPUT_RATIO = 0.5
# A paired gain over seeds holds where its one-sided t-test's p-value is below this.
SIGNIFICANCE = 0.05


def _claim(claim_id: str, claim: str, measure: str, value: str, holds: Optional[bool]) -> Claim:
    return {"id": claim_id, "claim": claim, "measure": measure, "value": value, "holds": holds}


def all_of(flags: Iterable[Optional[bool]]) -> Optional[bool]:
    """False if any is False; else None if any is None or there are none; else True."""
    flags = list(flags)
    if False in flags:
        return False
    return None if not flags or None in flags else True


def _greater(a: Optional[float], b: Optional[float]) -> Optional[bool]:
    return None if a is None or b is None else a > b


def _significant_gain(s: Optional[Stat]) -> Optional[bool]:
    """A paired Δ over seeds is a gain where its mean is above zero at :data:`SIGNIFICANCE`
    (a mean of +0.0003 ± 0.0100 is no gain). None where not run, or measured on one seed only
    and not a loss (one seed has no spread to test against)."""
    if s is None:
        return None
    if s.mean <= 0:
        return False
    p = s.p_above_zero()
    return None if p is None else p < SIGNIFICANCE


def _paired(s: Optional[Stat]) -> str:
    """``+0.0100 ± 0.0020 (p=0.012, 3 seeds)``."""
    if s is None:
        return "not run"
    return f"{fmt_stat(s, signed=True)} ({fmt_p(s)}, {counted(s.n, 'seed')})"


def _mim_beats_base(ctr: CtrRuns) -> Claim:
    deltas = {ubm: ctr.delta("mim", "base", ubm) for ubm in ctr.ubms}
    value = "; ".join(f"{ubm} {_paired(d)}" for ubm, d in deltas.items()) or "not run"
    return _claim("1", "Base+MIM beats Base in AUC for every user behaviour model.",
                  f"Δ AUC (Base+MIM − Base) per UBM, mean ± std over seeds; a gain where p < {SIGNIFICANCE} "
                  "(one-sided paired t-test over seeds)", value,
                  all_of(_significant_gain(d) for d in deltas.values()))


def _newest_gain_largest(ctr: CtrRuns, age_caveat: Optional[str]) -> Claim:
    """Not measured (``holds`` None) on a world whose age buckets are not item ages. Pooled
    over the pairs with an S1 gain, so S1 and the others are averaged over the same pairs. A
    bucket with no defined gain in those pairs (one class: a small test split) is a part not
    measured, named in the value: no verdict unless a measured bucket already fails it."""
    gains = pooled_age_gains(ctr, defined="S1")
    value = "; ".join(f"{b} {fmt(s.mean, signed=True)}" for b, s in gains.items()) or \
        ("S1 AUC undefined (one class) in every pair" if age_pairs(ctr) else "not run")
    undefined = [b for b in seen_buckets(g for g in age_pairs(ctr) if g.get("S1") is not None) if b not in gains]
    if gains and undefined:
        value += "; no Δ (one class in every pair): " + ", ".join(undefined)
    newest = gains.get("S1")
    holds = None if newest is None or len(gains) < 2 or age_caveat else all_of(
        [newest.mean > 0,  # the least loss is no gain
         *(newest.mean > s.mean for b, s in gains.items() if b != "S1"), *(None for _ in undefined)])
    if age_caveat and gains:
        value += " (not item ages on this world: Figure 6)"
    return _claim("2", "The MIM gain is largest on the newest items.",
                  "Δ AUC by item-age bucket (S1 newest), mean over UBMs and seeds: S1 a gain, above every other",
                  value, holds)


def _paired_din(ctr: CtrRuns, claim_id: str, claim: str, measure: str, kind: str, reference: str) -> Claim:
    """``kind`` run beats ``reference`` run in DIN's AUC (paired Δ over seeds, a significant gain)."""
    delta = ctr.delta(kind, reference, "din")
    return _claim(claim_id, claim, f"{measure}; a gain where p < {SIGNIFICANCE}", _paired(delta),
                  _significant_gain(delta))


def _recall_claim(claim_id: str, claim: str, measure: str, value: str, holds: Optional[bool],
                  candidates: Optional[int], what: str) -> Claim:
    """A claim read from recalls at :data:`RECALL_K`, ranked among ``candidates`` (``what``
    names them). No verdict where they are :data:`RECALL_K` or fewer: every candidate then ranks
    in the top 10, so the recall is 1 for any embeddings and 1 vs 1 would read as no gain."""
    if candidates is not None and candidates <= RECALL_K:
        return _claim(claim_id, claim, measure, f"{value} (1 by construction: {candidates} {what})", None)
    return _claim(claim_id, claim, measure, value, holds)


def _csft_pair(csft: Optional[Dict], claim_id: str, claim: str, better: str, worse: str, metric: str,
               candidates: Optional[int] = None) -> Claim:
    """``better`` above ``worse`` in ``metric``; ``candidates``: the items a recall ranks (None
    for a measure that is no recall)."""
    a, b = nested(csft, better, metric), nested(csft, worse, metric)
    return _recall_claim(claim_id, claim, f"{metric}: {better} vs {worse}",
                         f"{fmt(a, missing='not run')} vs {fmt(b, missing='not run')}", _greater(a, b),
                         candidates, "candidate items")


def _csft_claims(csft: Optional[Dict]) -> List[Claim]:
    recall = f"recall@{RECALL_K}"
    candidates = nested(csft, "full", "candidate_items")  # one catalogue: every row's
    claims = [
        _csft_pair(csft, "4", "C-SFT embeddings beat the stage-1 embeddings on query→item retrieval.",
                   "full", "stage1", recall, candidates),
        _csft_pair(csft, "5", "C-SFT embeddings beat the stage-1 embeddings on content-interest AUC.",
                   "full", "stage1", "pair_auc"),
    ]
    for key, (variant, module) in ABLATED.items():
        claims.append(_csft_pair(csft, f"6-{key}", f"{module} helps C-SFT retrieval (removing it lowers {recall}).",
                                 "full", variant, recall, candidates))
    best = nested(csft, "full", recall)
    others = {v: nested(csft, v, recall) for v in TABLE4_OTHERS}
    claims.append(_recall_claim("7", "Purchase pairs with InfoNCE are the best C-SFT signal and objective.",
                                f"{recall}: full (purchase InfoNCE) vs each other Table-4 variant",
                                f"full {fmt(best, missing='not run')}; "
                                + "; ".join(f"{v} {fmt(x, missing='not run')}" for v, x in others.items()),
                                all_of(_greater(best, x) for x in others.values()), candidates, "candidate items"))
    return claims


def _dda_dma_claim(pretrain_eval: Optional[Dict]) -> Claim:
    aligned, plain = nested(pretrain_eval, "dda+dma", "probe_i2t_r10"), nested(pretrain_eval, "plain", "probe_i2t_r10")
    return _recall_claim("8", "Stage-1 pre-training (DDA + DMA) improves the encoders over the plain towers.",
                         "probe image→text R@10: dda+dma vs plain",
                         f"{fmt(aligned, missing='not run')} vs {fmt(plain, missing='not run')}",
                         _greater(aligned, plain), nested(pretrain_eval, "dda+dma", "heldout_items"),
                         "held-out items")


def _lookup_claim(bench_lookup: Optional[Dict]) -> Claim:
    encoder_over_lookup = nested(bench_lookup, "encoder_over_lookup")
    return _claim("10-lookup", "The representation center makes content interest cheap: a table lookup "
                               "replaces running the encoder for every item of every sample.",
                  f"encoder-per-sample / lookup cost > {MIN_ENCODER_OVER_LOOKUP:.0f}×",
                  "not run" if encoder_over_lookup is None else f"{encoder_over_lookup:,.0f}×",
                  None if encoder_over_lookup is None else encoder_over_lookup > MIN_ENCODER_OVER_LOOKUP)


def _training_cost_claim(bench_train: Optional[Dict]) -> Claim:
    train_ratios = {r["ubm"]: nested(r, "mim_over_base", "torchrec", "train_samples_per_s")
                    for r in (nested(bench_train, "ratios") or []) if r.get("variant") == "Base+MIM"}
    value = "; ".join(f"{ubm} {'n/a' if r is None else f'{r:.2f}×'}" for ubm, r in train_ratios.items())
    return _claim("10-train", "With the representation center, Base+MIM trains at close to Base's cost.",
                  f"Base+MIM / Base training samples/s ≥ {MIN_TRAIN_THROUGHPUT_RATIO} for every UBM",
                  value or "not run", None if bench_train is None else all_of(
                      None if r is None else r >= MIN_TRAIN_THROUGHPUT_RATIO for r in train_ratios.values()))


def paper_claims(results: Dict[str, Any]) -> List[Claim]:
    """Each claim: ``{"id", "claim", "measure", "value", "holds"}`` (``holds`` None = not measured)."""
    ctr, csft = CtrRuns(results), results.get("csft")
    return [
        _mim_beats_base(ctr),
        _newest_gain_largest(ctr, results.get("item_age_caveat")),
        _paired_din(ctr, "3", "C-SFT's MM table beats the stage-1 table in CTR AUC.",
                    "DIN Δ AUC (C-SFT table − stage-1 table), paired over seeds", "mim", "stage1table"),
        *_csft_claims(csft),
        _dda_dma_claim(results.get("pretrain_eval")),
        _paired_din(ctr, "9-content", "Content interest helps the CTR model.",
                    "DIN Δ AUC (Base+MIM − w/o content interest), paired over seeds", "mim", "nocontent"),
        _paired_din(ctr, "9-fusion", "Fusion interest helps the CTR model.",
                    "DIN Δ AUC (Base+MIM − w/o fusion interest), paired over seeds", "mim", "nofusion"),
        _lookup_claim(results.get("bench_lookup")),
        _training_cost_claim(results.get("bench_train")),
    ]
