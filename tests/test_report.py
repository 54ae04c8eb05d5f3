"""``mim experiment``'s report: sections, seed statistics, claims and figures on hand-made results."""

from __future__ import annotations

import re
import statistics

import pytest
from typing import Dict, List, Optional, Sequence

from mim_rec.report import paper_claims, write_report
from train.bench_train import ratios

UBMS = ["avg", "din"]
SEEDS = [0, 1]
EDGES = [10.0 * (i + 1) for i in range(9)]
SECTIONS = ("# MIM experiment report", "## Stages", "## Configuration", "## Table 2", "## Table 3",
            "## Table 4", "## Table 5", "## Table 6", "## Figure 6", "## Paper claims")
FIGURES = ("table2_auc.png", "fig5_encoders.png", "fig6_age_gain.png")


def ctr_metrics(auc: float, deciles: Optional[Sequence[float]] = None, categories: Optional[Dict[str, float]] = None,
                edges: Sequence[float] = EDGES) -> Dict:
    """A metrics.json of ``mim train`` with the given AUCs (GAUC = AUC - 0.01)."""
    deciles = [auc] * 10 if deciles is None else deciles
    categories = {"0": auc, "1": auc} if categories is None else categories
    return {"n": 1000, "positives": 100, "auc": auc, "logloss": 0.3, "gauc": auc - 0.01, "gauc_users": 50,
            "per_category": {c: {"auc": a, "n": 500, "positives": 50} for c, a in categories.items()},
            "age_edges": list(edges),
            "age_deciles": [{"bucket": f"S{i + 1}", "age_days_max": 10.0 * (i + 1), "auc": a, "n": 100}
                            for i, a in enumerate(deciles)],
            "steps": 10}


def bench_train(train_ratio: float) -> Dict:
    """A ``mim bench train --json`` result whose Base+MIM trains at ``train_ratio`` x Base's speed."""
    rows = []
    for ubm in UBMS:
        for variant, speed in (("Base", 1000.0), ("Base+MIM", 1000.0 * train_ratio)):
            impl = {"peak_memory_bytes": 2**20, "train_samples_per_s": speed, "infer_samples_per_s": 4 * speed}
            rows.append({"ubm": ubm, "variant": variant, "torchrec": dict(impl), "reference": dict(impl),
                         "dense_flops_per_sample": 1e5})
    return {"config": {"batch_size": 16, "hist_len": 6, "mm_dim": 8}, "sizes": {"items": 300, "users": 50},
            "device": "cpu", "threads": 1, "memory_kind": "peak RSS delta (sampled)", "rows": rows,
            "ratios": ratios(rows)}


def bench_lookup(encoder_over_lookup: float) -> Dict:
    return {"config": {"batch_size": 64, "hist_len": 20, "mm_dtype": "fp32"}, "quick": False, "encoder": "enc",
            "encoder_dim": 16, "table": "random vectors", "table_dim": 16, "items": 100, "slots": 1344,
            "threads": 1, "lookup_us_per_sample": 10.0, "encoder_us_per_sample": 10.0 * encoder_over_lookup,
            "encoder_over_lookup": encoder_over_lookup}


def csft_row(recall10: float, pair_auc: float = 0.6) -> Dict:
    return {"recall@10": recall10, "recall@100": 5 * recall10, "pair_auc": pair_auc, "gauc": pair_auc - 0.01}


def make_results(gain: Dict[str, float] = None) -> Dict:
    """Every stage present: per seed Base AUC 0.60 + 0.02 seed, Base+MIM that plus ``gain[ubm]``
    (0.01 by default); MIM's age buckets gain 0.05 at S1 and 0.01 elsewhere."""
    gain = {ubm: 0.01 for ubm in UBMS} | (gain or {})
    ctr = {}
    for seed in SEEDS:
        base = 0.60 + 0.02 * seed
        for ubm in UBMS:
            ctr[f"base_{ubm}_s{seed}"] = ctr_metrics(base)
            ctr[f"mim_{ubm}_s{seed}"] = ctr_metrics(base + gain[ubm], [base + 0.05] + [base + 0.01] * 9)
        for kind, drop in (("nocontent", 0.004), ("nofusion", 0.002), ("stage1table", 0.003)):
            ctr[f"{kind}_din_s{seed}"] = ctr_metrics(base + gain["din"] - drop)
    csft = {"stage1": csft_row(0.01, 0.55), "full": csft_row(0.03, 0.60), "no_tfn": csft_row(0.02),
            "no_st_nsg": csft_row(0.025), "no_multi_level": csft_row(0.015), "category_ce": csft_row(0.005),
            "click_ce": csft_row(0.01), "purchase_ce": csft_row(0.02), "click_infonce": csft_row(0.028)}
    pretrain = {row: {"probe_i2t_r10": r, "probe_t2i_r10": r, "own_i2t_r10": r / 2, "image_linear_probe_acc": 0.5}
                for row, r in (("plain", 0.10), ("dda", 0.12), ("dda+dma", 0.15))}
    return {"preset": "quick", "config": {"steps": 10}, "code": {"commit": "abc123", "dirty": True},
            "world": "/tmp/world", "seeds": SEEDS, "ubms": UBMS,
            "stages": [{"name": "synth", "wall_s": 12.5, "reused": False, "argv": ["mim", "data", "synth"],
                        "code": {"commit": "0123456789abcdef", "dirty": False}},
                       {"name": "pretrain", "wall_s": 30.0, "reused": True, "argv": ["mim", "pretrain"]}],
            "ctr": ctr, "pretrain_eval": pretrain, "csft": csft,
            "bench_train": bench_train(0.8), "bench_lookup": bench_lookup(500.0)}


def section(text: str, header: str) -> str:
    """The text of one ``## `` section of REPORT.md."""
    start = text.index(header)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_row(text: str, first_cell: str) -> List[str]:
    """Cells of the first markdown table row whose first cell is ``first_cell``."""
    match = re.search(rf"^\| {re.escape(first_cell)} \|(.*)\|$", text, re.M)
    assert match, f"no row {first_cell!r} in:\n{text}"
    return [c.strip() for c in match.group(1).split("|")]


def claims_by_id(results: Dict) -> Dict[str, Dict]:
    return {c["id"]: c for c in paper_claims(results)}


def test_report_has_every_section_a_row_per_ubm_and_the_figures(tmp_path):
    text = write_report(make_results(), tmp_path)
    assert (tmp_path / "REPORT.md").read_text() == text
    for header in SECTIONS:
        assert header in text
    assert "abc123 (dirty)" in text and "total wall time: 42 s" in text
    assert table_row(section(text, "## Stages"), "pretrain")[1:3] == ["reused", "-"]  # no code recorded
    assert table_row(section(text, "## Stages"), "synth")[1:3] == ["ran", "01234567"]
    table2 = section(text, "## Table 2")
    for ubm in UBMS:
        assert table_row(table2, ubm)[-1] == "2"  # seeds
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert "not run" not in section(text, "## Paper claims")


def test_mean_and_sample_std_over_seeds(tmp_path):
    results = make_results({"din": 0.03})
    results["ctr"]["mim_din_s1"]["auc"] = 0.62 + 0.04  # Δ per seed: 0.03, 0.04
    text = section(write_report(results, tmp_path), "## Table 2")
    base, mim, delta, p, delta_gauc, _ = table_row(text, "din")
    assert base == "0.6100 ± 0.0141"  # AUCs 0.60, 0.62
    assert mim == "0.6450 ± 0.0212"   # 0.63, 0.66
    assert delta == "+0.0350 ± 0.0071"
    assert p == "p=0.045"  # t = 0.035 / (0.0071 / sqrt 2) = 7 on 1 degree of freedom: 1/2 - atan(7) / pi
    assert delta_gauc == "+0.0300 ± 0.0000"  # GAUC of the edited run was not changed


def test_one_seed_prints_std_as_na(tmp_path):
    results = make_results()
    results["seeds"] = [0]
    text = section(write_report(results, tmp_path), "## Table 2")
    assert table_row(text, "avg")[:2] == ["0.6000 ± n/a", "0.6100 ± n/a"]


def test_per_category_delta_is_the_mean_over_seeds(tmp_path):
    results = make_results()
    for seed, gain in zip(SEEDS, (0.02, 0.04)):
        results["ctr"][f"mim_avg_s{seed}"]["per_category"]["1"]["auc"] += gain - 0.01
    text = section(write_report(results, tmp_path), "### Δ AUC per category")
    assert table_row(text, "1") == ["500", "50", "+0.0300", "+0.0100"]  # test events, clicks, avg, din
    assert table_row(text, "0") == ["500", "50", "+0.0100", "+0.0100"]


def test_per_category_rows_count_the_test_events_and_clicks(tmp_path):
    """A category's Δ AUC came without its clicks: one over 3 read like one over 3,000."""
    results = make_results()
    results["ctr"]["base_avg_s0"]["per_category"]["1"].update(n=1234, positives=3)
    text = section(write_report(results, tmp_path), "### Δ AUC per category")
    assert text.count("| category | test events | clicks | avg | din |") == 1
    assert table_row(text, "1")[:2] == ["1,234", "3"]
    for metrics in results["ctr"].values():  # written before categories counted their clicks
        for row in metrics["per_category"].values():
            del row["positives"]
    assert table_row(section(write_report(results, tmp_path / "old"), "### Δ AUC per category"), "1")[:2] \
        == ["n/a", "n/a"]


def test_claim_1_fails_when_one_ubm_loses():
    assert claims_by_id(make_results())["1"]["holds"] is True
    claim = claims_by_id(make_results({"avg": -0.005}))["1"]
    assert claim["holds"] is False
    assert "avg -0.0050" in claim["value"]


def test_a_gain_within_the_seed_noise_is_no_gain():
    """Claims 1, 3 and 9 held on any positive mean: +0.0025 from +0.02 and -0.015 was a win."""
    results = make_results()
    for seed, gain in zip(SEEDS, (0.02, -0.015)):
        base = results["ctr"][f"base_din_s{seed}"]["auc"]
        for kind in ("mim", "stage1table", "nocontent", "nofusion"):
            results["ctr"][f"{kind}_din_s{seed}"]["auc"] = base + gain * (kind == "mim")
    claims = claims_by_id(results)
    assert claims["1"]["holds"] is False and "din +0.0025 ± 0.0247 (p=0.45" in claims["1"]["value"]
    assert [claims[i]["holds"] for i in ("3", "9-content", "9-fusion")] == [False] * 3
    for seed, gain in zip(SEEDS, (0.02, 0.019)):  # the same mean size, steady over seeds: a gain
        results["ctr"][f"mim_din_s{seed}"]["auc"] = results["ctr"][f"base_din_s{seed}"]["auc"] + gain
    claims = claims_by_id(results)
    assert claims["1"]["holds"] is True and "din +0.0195 ± 0.0007 (p=0.008, 2 seeds)" in claims["1"]["value"]


def test_the_paired_p_value_is_students_t():
    from mim_rec.report.stats import Stat
    # mean 0.007, std 0.003: t = 0.007 / (0.003 / sqrt 3) = 4.04; with 2 degrees of freedom the
    # one-sided p is 1/2 - t / (2 sqrt(t^2 + 2)) = 0.0281
    gains = Stat((0.010, 0.004, 0.007))
    assert gains.p_above_zero() == pytest.approx(0.02806, abs=1e-4)
    assert Stat((-0.01, 0.002)).p_above_zero() > 0.5
    assert Stat((0.01,)).p_above_zero() is None
    assert Stat((0.01, 0.01)).p_above_zero() == 0.0 and Stat((0.0, 0.0)).p_above_zero() == 1.0


def test_claim_2_follows_the_age_deciles():
    assert claims_by_id(make_results())["2"]["holds"] is True
    results = make_results()
    for name, metrics in results["ctr"].items():
        if name.startswith("mim_din"):
            metrics["age_deciles"][4]["auc"] += 0.1  # S5 now gains the most in the pool
    assert claims_by_id(results)["2"]["holds"] is False
    for name, metrics in results["ctr"].items():  # every bucket loses; S1 loses least
        if name.startswith("mim_"):
            base = results["ctr"][name.replace("mim_", "base_")]["auc"]
            for i, bucket in enumerate(metrics["age_deciles"]):
                bucket["auc"] = base - 0.001 - 0.002 * i
    claim = claims_by_id(results)["2"]
    assert claim["holds"] is False and claim["value"].startswith("S1 -0.0010")



def test_a_world_whose_ages_are_not_ages_gives_no_verdict_on_claim_2_and_says_why(tmp_path):
    """An imported Amazon world's created_at is the first reviewer's index: its S1..S10 used to
    be reported, and judged, as item ages."""
    results = make_results()
    results["item_age_caveat"] = "created_at is the first appearance, ordered by user"
    claim = claims_by_id(results)["2"]
    assert claim["holds"] is None and "not item ages on this world" in claim["value"]
    figure6 = section(write_report(results, tmp_path), "## Figure 6")
    assert "not item ages on this world:** created_at is the first appearance, ordered by user." in figure6
    assert "not item ages" not in section(write_report(make_results(), tmp_path), "## Figure 6")


def test_encoder_module_and_cost_claims_follow_their_numbers():
    claims = claims_by_id(make_results())
    for claim_id in ("3", "4", "5", "6-tfn", "6-st_nsg", "6-multi_level", "7", "8", "9-content", "9-fusion", "10-lookup",
                     "10-train"):
        assert claims[claim_id]["holds"] is True, claims[claim_id]
    results = make_results()
    results["csft"]["no_tfn"]["recall@10"] = 0.05
    results["csft"]["click_infonce"]["recall@10"] = 0.04
    results["bench_train"] = bench_train(0.3)
    claims = claims_by_id(results)
    assert [claims[i]["holds"] for i in ("6-tfn", "6-st_nsg", "7", "10-lookup", "10-train")] == \
        [False, True, False, True, False]
    results["bench_lookup"]["encoder_over_lookup"] = 50.0
    assert claims_by_id(results)["10-lookup"]["holds"] is False


def test_claim_8_gives_no_verdict_where_recall_at_10_is_1_by_construction(tmp_path):
    """On a world of 40 items (9 held out) every row's R@10 is 1.000, and the claim was judged
    **no** on 1.000 vs 1.000: ten or fewer candidates all rank in the top 10."""
    results = make_results()
    for row in results["pretrain_eval"].values():
        row.update(probe_i2t_r10=1.0, heldout_items=9)
    claim = claims_by_id(results)["8"]
    assert claim["holds"] is None and "1 by construction: 9 held-out items" in claim["value"]
    report = write_report(results, tmp_path)
    row, = [line for line in report.splitlines() if line.startswith("| 8 |")]
    assert row.endswith("| no verdict |")
    # Table 3 says why its 1.0000 is no result, not only the claim
    assert "recall@10: 1 by construction here, for any embeddings (only 9 held-out items are ranked)." in report
    for row in results["pretrain_eval"].values():
        row["heldout_items"] = 11
    assert claims_by_id(results)["8"]["holds"] is False  # 11 candidates: a miss is possible
    assert "by construction here" not in write_report(results, tmp_path)


def test_csft_recall_claims_give_no_verdict_where_recall_at_10_is_1_by_construction(tmp_path):
    """A catalogue of 10 or fewer items ranks every paired item in the top 10: claims 4, 6-* and
    7 were judged **no** on 1.000 vs 1.000. Claim 5 (pair AUC) still has its verdict."""
    results = make_results()
    for row in results["csft"].values():
        row.update({"recall@10": 1.0, "candidate_items": 8})
    claims = claims_by_id(results)
    recall_claims = ["4", "6-tfn", "6-st_nsg", "6-multi_level", "7"]
    for claim_id in recall_claims:
        assert claims[claim_id]["holds"] is None
        assert claims[claim_id]["value"].endswith(" (1 by construction: 8 candidate items)")
    assert claims["5"]["holds"] is True
    report = write_report(results, tmp_path)
    for claim_id in recall_claims:
        row, = [line for line in report.splitlines() if line.startswith(f"| {claim_id} |")]
        assert row.endswith("| no verdict |")
    # under Tables 3, 4 and 5, whose recall columns rank the same 8 items
    assert report.count("recall@10, recall@100: 1 by construction here, for any embeddings "
                        "(only 8 candidate items are ranked).") == 3
    for row in results["csft"].values():
        row["candidate_items"] = 11
    assert claims_by_id(results)["4"]["holds"] is False  # 11 candidates: a miss is possible
    assert "recall@100: 1 by construction here" in write_report(results, tmp_path)  # 11 items: R@100 still is


def test_a_linear_probe_undefined_on_one_category_renders_n_a_not_not_run(tmp_path):
    """pretrain-eval leaves the probe accuracy None where every item is in one category (1 by
    construction); the stage ran, so the cell is n/a, not "not run"."""
    results = make_results()
    results["pretrain_eval"]["plain"]["image_linear_probe_acc"] = None
    del results["pretrain_eval"]["dda"]
    rows = {line.split(" | ")[0]: line for line in write_report(results, tmp_path).splitlines()
            if line.startswith(("| plain towers |", "| +DDA |"))}
    assert rows["| plain towers"].endswith("| 0.0500 | n/a |") and rows["| +DDA"].endswith("| not run |")


def test_missing_parts_render_not_run_and_give_no_verdict(tmp_path):
    results = {key: None for key in ("config", "code", "stages", "ctr", "pretrain_eval", "csft",
                                     "bench_train", "bench_lookup")}
    text = write_report(results, tmp_path)
    for header in SECTIONS[1:-1]:
        assert "not run" in section(text, header), header
    assert all(c["holds"] is None for c in paper_claims(results))
    assert all(c["holds"] is None for c in paper_claims({}))
    assert not any((tmp_path / name).exists() for name in FIGURES)
    assert write_report({}, tmp_path / "empty").count("not run") >= 10


def test_a_missing_seed_or_stage_leaves_the_rest_measured(tmp_path):
    results = make_results()
    results["csft"] = None
    results["ctr"]["mim_din_s1"] = None  # that training failed
    claims = claims_by_id(results)
    assert claims["4"]["holds"] is None
    # avg's gain is tested over both seeds; din's one seed left has no spread to test against
    assert claims["1"]["holds"] is None and "din +0.0100 ± n/a (p n/a, 1 seed)" in claims["1"]["value"]
    text = write_report(results, tmp_path)
    assert table_row(section(text, "## Table 2"), "din")[-1] == "1"
    assert "not run" in section(text, "## Table 4")


def test_runs_bucketed_differently_are_left_out_of_figure_6(tmp_path):
    results = make_results()
    for seed in SEEDS:
        results["ctr"][f"mim_avg_s{seed}"]["age_edges"] = [e + 1 for e in EDGES]
    text = section(write_report(results, tmp_path), "## Figure 6")
    assert table_row(text, "din")[-3] == "2"  # pairs, before S1 − rest and its p
    assert "| avg |" not in text



def test_table3_shows_the_true_style_ceiling_and_its_gain_by_item_age(tmp_path):
    results = make_results()
    for seed in SEEDS:
        base = 0.60 + 0.02 * seed
        results["ctr"][f"truthtable_din_s{seed}"] = ctr_metrics(base + 0.04, [base + 0.08] + [base + 0.03] * 9)
    table3 = section(write_report(results, tmp_path), "## Table 3")
    ceiling = "true item styles (synthetic world only: the content ceiling)"
    auc, delta, seeds = table_row(table3, ceiling)
    assert auc == "0.6500 ± 0.0141" and delta == "+0.0300 ± 0.0000" and seeds == "2"
    gains = table_row(section(table3, "Δ AUC vs Base by item age"), ceiling)
    assert gains[0] == "+0.0800" and gains[1:] == ["+0.0300"] * 9
    assert table_row(section(table3, "Δ AUC vs Base by item age"), "C-SFT MM table")[0] == "+0.0500"
    without = section(write_report(make_results(), tmp_path / "none"), "## Table 3")
    assert table_row(without, ceiling)[0] == "not run"


def _without_s1(results: Dict, ubms: Sequence[str]) -> Dict:
    """``results`` with S1's AUC undefined (one class) in every run of ``ubms``."""
    for name, metrics in results["ctr"].items():
        if name.split("_")[1] in ubms and metrics:
            metrics["age_deciles"][0]["auc"] = None
    return results


def test_age_buckets_stay_in_age_order_and_an_undefined_one_shows_as_na(tmp_path):
    """Buckets came in first-seen order (S2..S10, S1 when the first UBM had no S1 AUC), and a
    bucket undefined in every pair vanished from Figure 6."""
    figure6 = section(write_report(_without_s1(make_results(), ["avg"]), tmp_path), "## Figure 6")
    header = next(line for line in figure6.splitlines() if line.startswith("| UBM"))
    buckets = " | ".join(f"S{i}" for i in range(1, 11))
    assert header == f"| UBM | {buckets} | pairs | S1 − rest | p (S1 − rest > 0) |"
    assert table_row(figure6, "avg")[0] == "n/a" and table_row(figure6, "din")[0] == "+0.0500"
    figure6 = section(write_report(_without_s1(make_results(), UBMS), tmp_path / "none"), "## Figure 6")
    assert table_row(figure6, "all UBMs")[0] == "n/a"


def test_figure_6_tests_s1_against_the_rest_of_each_run(tmp_path):
    """S1 − rest is taken per (UBM, seed) pair, S1's gain minus its other buckets' mean: here
    din's S1 gains 0.04 + 0.01 × seed more than the rest, avg's 0.04 on every seed."""
    results = make_results()
    for seed in SEEDS:
        results["ctr"][f"mim_din_s{seed}"]["age_deciles"][0]["auc"] += 0.01 * seed
    figure6 = section(write_report(results, tmp_path), "## Figure 6")
    header = next(line for line in figure6.splitlines() if line.startswith("| UBM"))
    assert header.endswith("| pairs | S1 − rest | p (S1 − rest > 0) |")
    excess = [0.04 + 0.01 * seed for seed in SEEDS]
    assert table_row(figure6, "din")[-2] == f"+{statistics.fmean(excess):.4f} ± {statistics.stdev(excess):.4f}"
    assert table_row(figure6, "avg")[-2:] == ["+0.0400 ± 0.0000", "p<0.001"]
    figure6 = section(write_report(_without_s1(make_results(), ["avg"]), tmp_path / "none"), "## Figure 6")
    assert table_row(figure6, "avg")[-2:] == ["n/a", "p n/a"]


def test_claim_2_compares_s1_with_the_other_buckets_on_the_same_pairs():
    """With S1 defined for din only, S1 was averaged over din's pairs and every other bucket
    over all pairs."""
    results = _without_s1(make_results(), ["avg"])
    for seed in SEEDS:  # avg's other buckets gain far more than din's S1
        for bucket in results["ctr"][f"mim_avg_s{seed}"]["age_deciles"][1:]:
            bucket["auc"] += 0.2
    claim = claims_by_id(results)["2"]
    assert claim["holds"] is True and claim["value"].startswith("S1 +0.0500; S2 +0.0100")
    claim = claims_by_id(_without_s1(make_results(), UBMS))["2"]
    assert claim["holds"] is None and claim["value"] == "S1 AUC undefined (one class) in every pair"


def test_claim_2_gives_no_verdict_while_a_bucket_is_undefined_in_every_pair():
    """On a small test split most buckets hold one class: S1 was judged above "every other" bucket
    on the two defined ones, and the value left the others out without a word."""
    results = make_results()
    for metrics in results["ctr"].values():
        for bucket in metrics["age_deciles"][1:9]:  # S2..S9 one class in every run
            bucket["auc"] = None
    claim = claims_by_id(results)["2"]
    assert claim["holds"] is None
    assert claim["value"] == "S1 +0.0500; S10 +0.0100; no Δ (one class in every pair): S2, S3, S4, S5, S6, S7, S8, S9"
    for name, metrics in results["ctr"].items():  # a measured part that fails still decides
        if name.startswith("mim_"):
            metrics["age_deciles"][9]["auc"] += 0.1
    assert claims_by_id(results)["2"]["holds"] is False


def test_a_measured_claim_without_a_verdict_is_not_labelled_not_run(tmp_path):
    """One seed, or buckets that are not item ages, read "not run" though every run existed."""
    results = make_results()
    results["ctr"]["mim_din_s1"] = None
    results["item_age_caveat"] = "created_at is the first appearance"
    claims = section(write_report(results, tmp_path), "## Paper claims")
    assert table_row(claims, "1")[-1] == "no verdict" and table_row(claims, "2")[-1] == "no verdict"
    results["csft"] = None
    assert table_row(section(write_report(results, tmp_path), "## Paper claims"), "4")[-1] == "not run"


def test_figure_6_draws_the_buckets_in_age_order(monkeypatch, tmp_path):
    """The figure's x axis took buckets in first-seen order, drawing S1 right of S10 when the
    first UBM had no S1 gain."""
    from mim_rec.report import plots

    drawn: List[List[str]] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(
        [tick.get_text() for tick in fig.axes[0].get_xticklabels()]) or True)
    gains = {"avg": {f"S{i}": 0.01 for i in range(2, 11)}, "din": {f"S{i}": 0.01 for i in range(1, 11)}}
    assert plots.plot_age_gain(tmp_path / "fig6.png", gains)
    assert drawn == [[f"S{i}" for i in range(1, 11)]]
