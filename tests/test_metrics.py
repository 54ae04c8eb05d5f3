"""CTR metrics: hand-computed cases, agreement with torchmetrics, buckets, and 2-rank gathering."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from mim_rec.metrics import CtrMetrics, age_bucket_edges, binary_auc, gauc, grouped_auc, log_loss, relative_auc_gain
from mim_rec.utils.dist import run_on_spawned_ranks


def random_eval(n: int, seed: int = 0):
    """Predictions that carry some signal, rounded so that ties occur."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).float()
    preds = (torch.sigmoid(torch.randn(n, generator=g) + labels) * 20).round() / 20
    users = torch.randint(0, 25, (n,), generator=g)
    categories = torch.randint(0, 6, (n,), generator=g)
    ages = torch.randint(0, 365, (n,), generator=g).double()
    return preds, labels, users, categories, ages


def test_auc_and_log_loss_by_hand():
    preds, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert binary_auc(preds, labels) == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs ordered
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    assert log_loss(preds, labels) == pytest.approx(expected)


def test_single_class_auc_is_none():
    assert binary_auc(torch.tensor([0.2, 0.9]), torch.tensor([1.0, 1.0])) is None
    assert binary_auc(torch.zeros(0), torch.zeros(0)) is None
    # float32 labels summed in float32 stop counting at 2**24: this set read as 2**24 positives
    # of 2**24 + 1 rows, so an AUC of 0.0 was made up for a set with no negative.
    many = torch.ones(2**24 + 1)
    assert binary_auc(torch.rand(many.numel()), many) is None


def test_grouped_auc_matches_torchmetrics_per_group_with_ties():
    preds, labels, users, _, _ = random_eval(600)
    per = grouped_auc(preds, labels, users)
    assert per.groups.tolist() == sorted(set(users.tolist()))
    for group, auc, count, ok in zip(per.groups, per.auc, per.count, per.defined):
        inside = users == group
        assert int(count) == int(inside.sum())
        single_class = labels[inside].min() == labels[inside].max()
        assert bool(ok) != bool(single_class)
        if ok:
            assert float(auc) == pytest.approx(float(binary_auroc(preds[inside], labels[inside].long())), abs=1e-6)


def test_gauc_on_a_tiny_hand_case():
    #            user A (AUC 1, 3 rows)  user B (AUC 0, 2)  user C (positives only)  user D (tie: 0.5, 2)
    preds = torch.tensor([0.9, 0.2, 0.6, 0.3, 0.7, 0.4, 0.8, 0.5, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    users = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    per_user = grouped_auc(preds, labels, users)
    assert per_user.defined.tolist() == [True, True, False, True]
    assert gauc(per_user) == pytest.approx((3 * 1.0 + 2 * 0.0 + 2 * 0.5) / 7)


def test_age_bucket_edges_are_deciles():
    ages = torch.arange(1, 101).double()[torch.randperm(100)]
    assert age_bucket_edges(ages) == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]


@pytest.mark.parametrize("count", [91, 101, 2001])
def test_age_bucket_edges_are_exact_lower_quantiles(count):
    """The edge index was floored from a float product: 0.7 x 90 = 62.999..., one row low."""
    edges = age_bucket_edges(torch.arange(count).double())
    assert edges == [float(k * (count - 1) // 10) for k in range(1, 10)]


def test_report_is_json_and_buckets_single_class_as_none():
    metrics = CtrMetrics()
    ages = torch.arange(1, 101).double()
    labels = (torch.arange(100) % 2).float()
    labels[:10] = 0  # S1 (ages 1..10) holds negatives only
    preds = torch.linspace(0.01, 0.99, 100)
    users = torch.arange(100) % 7
    categories = torch.where(ages > 95, 9, 1)  # category 9: ages 96..100
    labels[95:] = 1.0  # ... all positive
    for chunk in range(0, 100, 30):
        s = slice(chunk, chunk + 30)
        metrics.update(preds[s], labels[s], users[s], categories[s], ages[s])
    report = json.loads(json.dumps(metrics.compute()))
    assert report["n"] == 100 and report["positives"] == int(labels.sum())
    assert report["auc"] == pytest.approx(float(binary_auroc(preds, labels.long())))
    assert [b["bucket"] for b in report["age_deciles"]] == [f"S{i}" for i in range(1, 11)]
    assert [b["n"] for b in report["age_deciles"]] == [10] * 10
    assert [b["positives"] for b in report["age_deciles"]] == [int(labels[k:k + 10].sum()) for k in range(0, 100, 10)]
    assert report["age_deciles"][0]["auc"] is None and report["age_deciles"][0]["age_days_max"] == 10.0
    assert report["age_deciles"][9]["age_days_max"] == 100.0
    s5 = slice(40, 50)
    assert report["age_deciles"][4]["auc"] == pytest.approx(float(binary_auroc(preds[s5], labels[s5].long())))
    assert report["per_category"]["9"] == {"auc": None, "n": 5, "positives": 5}
    assert report["per_category"]["1"]["n"] == 95
    assert report["gauc"] == pytest.approx(gauc(grouped_auc(preds, labels, users)))


def test_the_printed_report_says_what_its_auc_and_gauc_rest_on():
    """``mim train`` printed an AUC over one click (a world of click rate 0.1%) and a GAUC over one
    user as it printed those over thousands."""
    from mim_rec.metrics.report import format_report

    metrics = CtrMetrics()
    metrics.update(torch.tensor([0.2, 0.7, 0.4, 0.1]), torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]),
                   torch.zeros(4, dtype=torch.int64), torch.arange(4).double())
    headline = format_report(metrics.compute()).splitlines()[0]
    assert headline == "AUC 1.0000  GAUC 1.0000 (1 user)  logloss 0.2990  n 4 (1 click)"


def test_every_category_and_age_bucket_counts_its_events_and_clicks():
    """A category's AUC came without its clicks: one over 3 read like one over 3,000."""
    preds, labels, users, categories, ages = random_eval(500, seed=3)
    metrics = CtrMetrics()
    for chunk in range(0, 500, 128):
        s = slice(chunk, chunk + 128)
        metrics.update(preds[s], labels[s], users[s], categories[s], ages[s])
    report = metrics.compute()
    assert {c: (row["n"], row["positives"]) for c, row in report["per_category"].items()} == {
        str(c): (int((categories == c).sum()), int(labels[categories == c].sum()))
        for c in categories.unique().tolist()}
    bucket = torch.bucketize(ages, torch.tensor(report["age_edges"], dtype=torch.float64))
    assert [(row["n"], row["positives"]) for row in report["age_deciles"]] == [
        (int((bucket == i).sum()), int(labels[bucket == i].sum())) for i in range(10)]


def test_given_edges_bucket_two_runs_identically_and_gain_is_per_bucket():
    preds, labels, users, categories, ages = random_eval(500)
    base = CtrMetrics()
    base.update(preds, labels, users, categories, ages)
    base_report = base.compute()
    better = CtrMetrics(age_edges=base_report["age_edges"])
    better_preds = torch.where(ages < 100, 0.5 * preds + 0.5 * labels, preds)  # helps newer items only
    better.update(better_preds, labels, users, categories, ages + 0.0)
    better_report = better.compute()
    gains = relative_auc_gain(base_report, better_report)
    assert [g["bucket"] for g in gains] == [f"S{i}" for i in range(1, 11)]
    for gain, before, after in zip(gains, base_report["age_deciles"], better_report["age_deciles"]):
        assert gain["auc_gain"] == pytest.approx(after["auc"] - before["auc"])
        assert gain["relative_gain"] == pytest.approx((after["auc"] - before["auc"]) / before["auc"])
    assert gains[0]["auc_gain"] > 0 and gains[-1]["auc_gain"] == 0

    # a bucket whose base ranks every pair wrong has an AUC gain but no ratio (it divided by zero)
    zero = {**base_report, "age_deciles": [{**d, "auc": 0.0} for d in base_report["age_deciles"]]}
    assert all(g["relative_gain"] is None and g["auc_gain"] > 0 for g in relative_auc_gain(zero, better_report))

    shifted = CtrMetrics()
    shifted.update(preds, labels, users, categories, ages + 30)
    with pytest.raises(ValueError, match="different age buckets"):
        relative_auc_gain(base_report, shifted.compute())


@pytest.mark.parametrize("bad, message", [
    (dict(preds=torch.tensor([0.5, 1.5])), "probabilities"),
    (dict(preds=torch.tensor([0.5, float("nan")])), "NaN or infinity"),
    (dict(labels=torch.tensor([0.0, 2.0])), "0 or 1"),
    (dict(user_id=torch.tensor([1])), "'user_id' has 1 values"),
    (dict(item_age_days=torch.tensor([1.0, float("nan")])), "finite"),
])
def test_update_rejects_bad_input(bad, message):
    good = dict(preds=torch.tensor([0.2, 0.7]), labels=torch.tensor([0.0, 1.0]), user_id=torch.tensor([1, 2]),
                category=torch.tensor([3, 3]), item_age_days=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=message):
        CtrMetrics().update(**{**good, **bad})


def test_bad_edges_and_empty_compute_are_errors():
    with pytest.raises(ValueError, match="need 9 edges"):
        CtrMetrics(age_edges=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        CtrMetrics(num_age_buckets=3, age_edges=[5.0, 1.0])
    with pytest.raises(ValueError, match="no predictions"):
        CtrMetrics().compute()


def _report(shards) -> dict:
    metrics = CtrMetrics()
    for shard in shards:
        metrics.update(*shard)
    return metrics.compute()


def _split(data, bounds):
    return [tuple(column[a:b] for column in data) for a, b in zip(bounds, bounds[1:])]


def _gathered_reports(rank: int, device) -> str:
    torch.set_num_threads(1)
    data = random_eval(301)
    # Unequal shards (rank 0: 120 rows in two batches, rank 1: 181 rows), then rank 1 empty.
    unequal = _split(data, [0, 50, 120]) if rank == 0 else _split(data, [120, 301])
    one_sided = _split(data, [0, 301]) if rank == 0 else []
    return json.dumps({"unequal": _report(unequal), "one_sided": _report(one_sided)})


def test_two_rank_gather_equals_one_process():
    expected = json.loads(json.dumps(_report([random_eval(301)])))
    for rank_reports in run_on_spawned_ranks(_gathered_reports, 2, "cpu"):
        for report in json.loads(rank_reports).values():
            assert _close(report, expected)


def _close(actual, expected) -> bool:
    """Structural equality with float tolerance (gathering may change summation order)."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        return all(_close(actual[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        return all(_close(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12)
        return True
    assert actual == expected
    return True
