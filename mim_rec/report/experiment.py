"""REPORT.md of ``mim experiment``: the paper's tables and figures, every number from ``results``.

``results`` is the orchestrator's dict (stage records, CTR metrics per run, the encoder and C-SFT
evaluations, the cost benches); any part may be missing or None when its stage was not run, and
then its section says "not run" instead of failing, so that a partial experiment still reports
what it measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mim_rec.report import plots
from mim_rec.report.claims import paper_claims
from mim_rec.report.stats import (CtrRuns, Stat, age_gains, age_pairs, by_bucket, fmt, fmt_p, fmt_stat, mean_of,
                                  nested, newest_excess, pooled_age_gains, seeds_of, seen_buckets)

NOT_RUN = "_not run_"
FIGURES = {"table2": "table2_auc.png", "fig5": "fig5_encoders.png", "fig6": "fig6_age_gain.png"}
PRETRAIN_ROWS = (("plain", "plain towers"), ("dda", "+DDA"), ("dda+dma", "+DDA+DMA"))
PRETRAIN_METRICS = (("probe_i2t_r10", "probe i2t R@10"), ("probe_t2i_r10", "probe t2i R@10"),
                    ("own_i2t_r10", "own-head i2t R@10"), ("image_linear_probe_acc", "image linear-probe acc"))
CSFT_METRICS = (("recall@10", "recall@10"), ("recall@100", "recall@100"), ("pair_auc", "pair AUC"),
                ("gauc", "GAUC"))
CSFT_STAGES = (("stage1", "stage 1 (w/o C-SFT)"), ("full", "C-SFT"))
TABLE4_ROWS = (("category_ce", "category CE (interest-irrelevant)"), ("click_ce", "click pairs, CE"),
               ("purchase_ce", "purchase pairs, CE"), ("click_infonce", "click pairs, InfoNCE"),
               ("full", "purchase pairs, InfoNCE (full)"))
TABLE5_ROWS = (("full", "C-SFT (full)"), ("no_tfn", "w/o TFN"), ("no_st_nsg", "w/o ST-NSG"),
               ("no_multi_level", "w/o multi-level InfoNCE"), ("stage1", "w/o C-SFT (stage 1)"))
MODULE_ROWS = (("mim", "Base+MIM"), ("nocontent", "w/o content interest"), ("nofusion", "w/o fusion interest"),
               ("stage1table", "w/o C-SFT (stage-1 MM table)"), ("base", "Base"))
TABLE3_CTR_ROWS = (("stage1table", "stage-1 MM table"), ("mim", "C-SFT MM table"),
                   ("truthtable", "true item styles (synthetic world only: the content ceiling)"))
BENCH_VARIANTS = ("Base", "Base+MIM")


# ------------------------------------------------------------------------------- markdown pieces

def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A GitHub markdown table (``|`` inside a cell is escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def _figure(name: str, written: Dict[str, bool], caption: str) -> List[str]:
    return ["", f"![{caption}]({FIGURES[name]})" if written.get(name) else f"Figure {FIGURES[name]}: not run"]


def _metric_table(source: Optional[Dict], rows: Sequence[Tuple[str, str]],
                  metrics: Sequence[Tuple[str, str]], first: str) -> List[str]:
    """Rows of a ``{row: {metric: value}}`` evaluation (pretrain-eval, csft-ablations); a metric
    None in a row that ran is ``n/a`` (undefined there: a linear probe over one category)."""
    if source is None:
        return [NOT_RUN]
    return md_table([first, *(label for _, label in metrics)],
                    [[label, *(fmt(nested(source, key, m), missing="not run" if nested(source, key) is None else "n/a")
                               for m, _ in metrics)]
                     for key, label in rows])


def _ctr_kinds_table(ctr: CtrRuns, ubm: str, rows: Sequence[Tuple[str, str]], first: str) -> List[str]:
    """AUC of each run kind of one UBM over seeds, and its paired Δ vs Base+MIM (``mim``)."""
    table = [[label, fmt_stat(ctr.metric(kind, ubm)),
              "-" if kind == "mim" else fmt_stat(ctr.delta(kind, "mim", ubm), signed=True),
              str(seeds_of(ctr.metric(kind, ubm)))] for kind, label in rows]
    if all(r[1] == "not run" for r in table):
        return [NOT_RUN]
    return md_table([first, "AUC", "Δ vs Base+MIM", "seeds"], table)


# ------------------------------------------------------------------------------- sections

def _header(results: Dict[str, Any]) -> List[str]:
    code = results.get("code") or {}
    commit = code.get("commit", "unknown") + (" (dirty)" if code.get("dirty") else "")
    stages = results.get("stages") or []
    total = sum(s.get("wall_s") or 0.0 for s in stages)
    lines = ["# MIM experiment report", "",
             f"- preset: {results.get('preset', 'unknown')}", f"- commit: {commit}",
             f"- world: {results.get('world', 'unknown')}",
             f"- seeds: {results.get('seeds', 'unknown')}; UBMs: {results.get('ubms', 'unknown')}",
             f"- total wall time: {total:,.0f} s ({total / 3600:.2f} h)", "", "## Stages", ""]
    if not stages:
        return lines + [NOT_RUN]
    return lines + md_table(["stage", "wall s", "reused or ran", "code", "command"],
                            [[s.get("name", "?"), f"{s.get('wall_s') or 0.0:,.1f}",
                              "reused" if s.get("reused") else "ran", _commit(s.get("code")),
                              f"`{' '.join(s.get('argv') or [])}`"]
                             for s in stages])


def _commit(code: Optional[Dict[str, Any]]) -> str:
    """The short commit a stage ran from (``+dirty`` when the tree differed); ``-`` when its
    record predates stages keeping it."""
    if not code or not code.get("commit"):
        return "-"
    return code["commit"][:8] + ("+dirty" if code.get("dirty") else "")


def _config(results: Dict[str, Any]) -> List[str]:
    config = results.get("config")
    body = [NOT_RUN] if config is None else ["```json", json.dumps(config, indent=2, default=str), "```"]
    return ["## Configuration", "", *body]


def table2_bars(ctr: CtrRuns) -> plots.Bars:
    """UBM -> {Base, Base+MIM} -> (mean AUC, std): the data of table2_auc.png."""
    bars = {}
    for ubm in ctr.ubms:
        stats = {label: ctr.metric(kind, ubm) for kind, label in (("base", "Base"), ("mim", "Base+MIM"))}
        if all(stats.values()):
            bars[ubm] = {label: (s.mean, s.std) for label, s in stats.items()}
    return bars


def _counts(counts: Optional[Tuple[int, int]]) -> List[str]:
    """The cells of a category's ``(events, clicks)``: a Δ AUC over 3 clicks is noise."""
    return ["n/a", "n/a"] if counts is None else [f"{count:,}" for count in counts]


def _table2(ctr: CtrRuns, written: Dict[str, bool]) -> List[str]:
    lines = ["## Table 2: Base vs Base+MIM per user behaviour model", ""]
    if not ctr.ubms:
        return lines + [NOT_RUN]
    rows = [[ubm, fmt_stat(ctr.metric("base", ubm)), fmt_stat(ctr.metric("mim", ubm)),
             fmt_stat(ctr.delta("mim", "base", ubm), signed=True),
             fmt_p(ctr.delta("mim", "base", ubm)),
             fmt_stat(ctr.delta("mim", "base", ubm, lambda m: m.get("gauc")), signed=True),
             str(seeds_of(ctr.delta("mim", "base", ubm)))] for ubm in ctr.ubms]
    lines += md_table(["UBM", "Base AUC", "Base+MIM AUC", "Δ AUC", "p (Δ AUC > 0)", "Δ GAUC", "seeds"], rows)
    lines += ["", "Δ = Base+MIM − Base, paired per seed; mean ± sample std over seeds; p: one-sided "
              "paired t-test over seeds.",
              "", "### Δ AUC per category (mean over seeds)", ""]
    categories = ctr.categories()
    if not categories:
        lines.append(NOT_RUN)
    else:
        lines += md_table(["category", "test events", "clicks", *ctr.ubms], [
            [c, *_counts(ctr.category_counts(c)),
             *(fmt(mean_of(ctr.category_delta(ubm, c)), signed=True) for ubm in ctr.ubms)]
            for c in categories])
    return lines + _figure("table2", written, "Table 2 AUC")


def encoder_panels(results: Dict[str, Any], ctr: CtrRuns) -> Dict[str, plots.Bars]:
    """The numbers of fig5_encoders.png: stage-1 measures, C-SFT measures, CTR AUC per MM table."""
    def panel(source: Optional[Dict], rows, metrics) -> plots.Bars:
        groups = {label: {row_label: (nested(source, row, key), None) for row, row_label in rows}
                  for key, label in metrics}
        return {g: {k: v for k, v in bars.items() if v[0] is not None} for g, bars in groups.items()
                if any(v[0] is not None for v in bars.values())}

    ctr_stats = {label: ctr.metric(kind, "din") for kind, label in TABLE3_CTR_ROWS}
    ctr_bars = {label: (s.mean, s.std) for label, s in ctr_stats.items() if s is not None}
    return {"Stage 1 (pretrain-eval)": panel(results.get("pretrain_eval"), PRETRAIN_ROWS, PRETRAIN_METRICS),
            "C-SFT vs stage 1 (csft-ablations)": panel(results.get("csft"), CSFT_STAGES, CSFT_METRICS[:3]),
            "CTR AUC, DIN Base+MIM": {"AUC": ctr_bars} if ctr_bars else {}}


def _table_age_gains(ctr: CtrRuns, ubm: str, rows: Sequence[Tuple[str, str]]) -> List[str]:
    """Δ AUC vs Base by item-age bucket (mean over seeds) for each run kind of one UBM."""
    gains = {label: by_bucket(ctr.age_gain_seeds(ubm, kind)) for kind, label in rows}
    gains = {label: row for label, row in gains.items() if row}
    if not gains:
        return []
    buckets = seen_buckets(g for kind, _ in rows for g in ctr.age_gain_seeds(ubm, kind))
    return ["", f"Δ AUC vs Base by item age ({ubm.upper()}, mean over seeds; S1 newest):", "",
            *md_table(["MM table", *buckets],
                      [[label, *(fmt(row[b].mean, signed=True) if b in row else "n/a" for b in buckets)]
                       for label, row in gains.items()])]


def _trivial_recalls(count: Optional[int], what: str, ks: Sequence[int]) -> List[str]:
    """A note under a table whose recall@k columns rank ``count`` ``what``: for k ≥ ``count``
    every candidate ranks in the top k, so the recall is 1 for any embeddings (the claims give
    it no verdict), which the bare 1.0000 in the table does not say."""
    trivial = [k for k in ks if count is not None and count <= k]
    if not trivial:
        return []
    return ["", f"recall@{', recall@'.join(map(str, trivial))}: 1 by construction here, for any embeddings "
                f"(only {count} {what} are ranked)."]


def _csft_recall_note(results: Dict[str, Any]) -> List[str]:
    return _trivial_recalls(nested(results.get("csft"), "full", "candidate_items"), "candidate items", (10, 100))


def _table3(results: Dict[str, Any], ctr: CtrRuns, written: Dict[str, bool]) -> List[str]:
    return ["## Table 3: stages of the encoder", "", "### Stage 1: pre-training and alignment", "",
            *_metric_table(results.get("pretrain_eval"), PRETRAIN_ROWS, PRETRAIN_METRICS, "encoder"),
            *_trivial_recalls(nested(results.get("pretrain_eval"), "dda+dma", "heldout_items"), "held-out items",
                              (10,)),
            "", "### Stage 2: C-SFT (query→item retrieval, content-interest pair AUC)", "",
            *_metric_table(results.get("csft"), CSFT_STAGES, CSFT_METRICS[:3], "embeddings"),
            *_csft_recall_note(results),
            "", "### CTR: DIN Base+MIM with each MM table", "",
            *_ctr_kinds_table(ctr, "din", TABLE3_CTR_ROWS, "MM table"),
            *_table_age_gains(ctr, "din", TABLE3_CTR_ROWS),
            *_figure("fig5", written, "Figure 5: encoder measures")]


def _table4(results: Dict[str, Any]) -> List[str]:
    return ["## Table 4: C-SFT signals and objectives", "",
            *_metric_table(results.get("csft"), TABLE4_ROWS, CSFT_METRICS, "signal, objective"),
            *_csft_recall_note(results)]


def _table5(results: Dict[str, Any], ctr: CtrRuns) -> List[str]:
    return ["## Table 5: ablations", "", "### C-SFT modules", "",
            *_metric_table(results.get("csft"), TABLE5_ROWS, CSFT_METRICS, "variant"),
            *_csft_recall_note(results),
            "", "### CiUBM modules (DIN)", "",
            *_ctr_kinds_table(ctr, "din", MODULE_ROWS, "model")]


def _bench_train_rows(bench: Dict[str, Any]) -> List[List[str]]:
    """Per UBM: Base and Base+MIM (TorchRec implementation), then their MIM/Base ratios."""
    rows = {(r["ubm"], r["variant"]): r for r in bench.get("rows", [])}
    ratios = {r["ubm"]: nested(r, "mim_over_base", "torchrec") or {}
              for r in bench.get("ratios", []) if r.get("variant") == "Base+MIM"}

    def ratio(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.2f}×"

    table = []
    for ubm in dict.fromkeys(u for u, _ in rows):
        for variant in BENCH_VARIANTS:
            row = rows.get((ubm, variant))
            if row:
                flops = row.get("dense_flops_per_sample")
                tr = row.get("torchrec", {})
                table.append([ubm, variant, "n/a" if flops is None else f"{flops / 1e6:.3f}",
                              f"{tr.get('peak_memory_bytes', 0) / 2**20:,.1f}",
                              f"{tr.get('train_samples_per_s', 0):,.0f}", f"{tr.get('infer_samples_per_s', 0):,.0f}"])
        if ubm in ratios:
            base, mim = rows.get((ubm, "Base"), {}), rows.get((ubm, "Base+MIM"), {})
            flops = (mim.get("dense_flops_per_sample") / base["dense_flops_per_sample"]
                     if mim.get("dense_flops_per_sample") and base.get("dense_flops_per_sample") else None)
            r = ratios[ubm]
            table.append([ubm, "MIM / Base", ratio(flops), ratio(r.get("peak_memory_bytes")),
                          ratio(r.get("train_samples_per_s")), ratio(r.get("infer_samples_per_s"))])
    return table


def _bench_train(bench: Optional[Dict[str, Any]]) -> List[str]:
    lines = ["### Training and inference cost per UBM (`mim bench train`)", ""]
    if bench is None:
        return lines + [NOT_RUN]
    config, sizes = bench.get("config", {}), bench.get("sizes", {})
    lines.append(f"Device {bench.get('device', '?')}, {bench.get('threads', '?')} torch threads; "
                 f"{sizes.get('items', '?')} items, {sizes.get('users', '?')} users; batch "
                 f"{config.get('batch_size', '?')}, history {config.get('hist_len', '?')}, MM dim "
                 f"{config.get('mm_dim', '?')}; memory: {bench.get('memory_kind', '?')}; TorchRec implementation.")
    return lines + [""] + md_table(["UBM", "variant", "MFLOPs / sample", "peak memory MB", "train samples/s",
                                    "inference samples/s"], _bench_train_rows(bench))


def _bench_lookup(bench: Optional[Dict[str, Any]]) -> List[str]:
    lines = ["### Content interest with and without the representation center (`mim bench lookup`)", ""]
    if bench is None:
        return lines + [NOT_RUN]
    config = bench.get("config", {})
    lines.append(f"{bench.get('items', 0):,} items; batch {config.get('batch_size', '?')} samples × "
                 f"(1 target + {config.get('hist_len', '?')} behaviours); MM table {config.get('mm_dtype', '?')}, "
                 f"{bench.get('table_dim', '?')}-d; encoder {bench.get('encoder', '?')}"
                 + (" (quick: tiny random encoder)" if bench.get("quick") else "")
                 + f"; {bench.get('threads', '?')} torch threads.")
    ratio = bench.get("encoder_over_lookup")
    return lines + [""] + md_table(["MM vectors from", "µs / sample"], [
        ["MM table lookup (MIM, representation center)", f"{bench.get('lookup_us_per_sample', 0):,.1f}"],
        ["encoder per sample (MIM w/o representation center)", f"{bench.get('encoder_us_per_sample', 0):,.1f}"],
        ["encoder / lookup", "n/a" if ratio is None else f"{ratio:,.0f}×"]])


def _table6(results: Dict[str, Any]) -> List[str]:
    return ["## Table 6: cost", "", *_bench_train(results.get("bench_train")), "",
            *_bench_lookup(results.get("bench_lookup"))]


def _age_row(label: str, gains: Dict[str, Stat], buckets: List[str],
             pairs: List[Dict[str, Optional[float]]]) -> List[str]:
    seeds = max((s.n for s in gains.values()), default=0)
    excess = newest_excess(pairs)
    return [label, *(fmt(mean_of(gains.get(b)), signed=True) for b in buckets), str(seeds),
            "n/a" if excess is None else fmt_stat(excess, signed=True), fmt_p(excess)]


def _figure6(ctr: CtrRuns, written: Dict[str, bool], caveat: Optional[str]) -> List[str]:
    lines = ["## Figure 6: Δ AUC by item age (S1 newest … S10 oldest)", ""]
    table, pooled = age_gains(ctr), pooled_age_gains(ctr)
    if not table:
        return lines + [NOT_RUN]
    buckets = seen_buckets(age_pairs(ctr))
    rows = [_age_row(ubm, gains, buckets, ctr.age_gain_seeds(ubm)) for ubm, gains in table.items()]
    rows.append(_age_row("all UBMs", pooled, buckets, age_pairs(ctr)))
    lines += md_table(["UBM", *buckets, "pairs", "S1 − rest", "p (S1 − rest > 0)"], rows)
    lines += ["", "Δ = Base+MIM − Base AUC in the bucket (both runs bucketed by the same age edges), "
                  "mean over seeds; \"all UBMs\" pools every (UBM, seed) pair. S1 − rest: per pair, S1's Δ "
                  "minus the mean Δ of the other buckets, mean ± std over the pairs, with its one-sided "
                  "t-test: whether the newest items gain more than the rest within a run."]
    if caveat:
        lines += ["", f"**These buckets are not item ages on this world:** {caveat}."]
    return lines + _figure("fig6", written, "Figure 6: gain by item age")


def _verdict(claim: Dict[str, Any]) -> str:
    """yes / no; without one, "not run" where a measure is missing, else "no verdict" (one
    seed, an undefined bucket, or buckets that are not item ages: measured, not decided)."""
    if claim["holds"] is not None:
        return "yes" if claim["holds"] else "**no**"
    return "not run" if "not run" in claim["value"] else "no verdict"


def _claims(claims: List[Dict[str, Any]]) -> List[str]:
    return ["## Paper claims", "", *md_table(["#", "claim", "measure", "value", "holds"], [
        [c["id"], c["claim"], c["measure"], c["value"], _verdict(c)] for c in claims])]


# ------------------------------------------------------------------------------- entry point

def _write_figures(results: Dict[str, Any], ctr: CtrRuns, out_dir: Path) -> Dict[str, bool]:
    draw: Dict[str, Callable[[Path], bool]] = {
        "table2": lambda p: plots.plot_table2(p, table2_bars(ctr)),
        "fig5": lambda p: plots.plot_encoders(p, encoder_panels(results, ctr)),
        "fig6": lambda p: plots.plot_age_gain(p, {ubm: {b: s.mean for b, s in gains.items()}
                                                  for ubm, gains in age_gains(ctr).items()}),
    }
    return {name: fn(out_dir / FIGURES[name]) for name, fn in draw.items()}


def write_report(results: Dict[str, Any], out_dir: Path) -> str:
    """Writes ``out_dir/REPORT.md`` and the PNG figures (``fig6_age_gain.png``, ``fig5_encoders.png``,
    ``table2_auc.png``; a figure with no measured number is not written); returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctr = CtrRuns(results)
    written = _write_figures(results, ctr, out_dir)
    sections = [_header(results), _config(results), _table2(ctr, written), _table3(results, ctr, written),
                _table4(results), _table5(results, ctr), _table6(results), _figure6(ctr, written, results.get("item_age_caveat")),
                _claims(paper_claims(results))]
    text = "\n\n".join("\n".join(lines) for lines in sections) + "\n"
    (out_dir / "REPORT.md").write_text(text)
    return text
