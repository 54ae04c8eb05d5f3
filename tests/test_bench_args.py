"""``mim bench rim``: settings that would crash the service or measure nothing are refused in one
line naming the setting, before the service starts."""

from __future__ import annotations

import pytest

from mim_rec.config import ConfigError
from train.bench_rim import RimBenchConfig
from train.cli import main


@pytest.mark.parametrize("setting, message", [
    ("items_per_request=0", "items_per_request=0: must be positive"),    # the service would not start
    ("window_ms=0", "window_ms=0.0: must be positive"),                  # (traceback from a child process)
    ("max_batch=0", "max_batch=0: must be positive"),
    ("clients=0", "clients=0: must be positive"),                        # "0 clients x 0.0 s"
    ("seconds=0", "seconds=0.0: must be positive"),
    ("seconds=-1", "seconds=-1.0: must be positive"),
    ("items_per_request=100", "items_per_request=100 exceeds max_batch=64"),  # every request a 413, p50 nan
])
def test_bench_rim_refuses_a_setting_by_name_before_serving(tmp_path, capsys, setting, message):
    # encoders names no real artifact: had the check come after the service's start, that start
    # would have failed instead, with a traceback
    assert main(["bench", "rim", f"encoders={tmp_path / 'none'}", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mim bench rim: error: ") and message in err and len(err.splitlines()) == 1


def test_bench_rim_refuses_out_before_making_it(tmp_path, capsys):
    """out= naming a file ended in mkdir's FileExistsError traceback; a refused setting left the
    new out= folder behind."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["bench", "rim", f"encoders={tmp_path / 'none'}", f"out={afile}"]) == 2
    assert f"out={afile}: a file, not a folder for the service's log" in capsys.readouterr().err
    assert main(["bench", "rim", f"encoders={tmp_path / 'none'}", f"out={tmp_path / 'new'}", "clients=0"]) == 2
    assert not (tmp_path / "new").exists()
    # a --json path that cannot be written is refused before out= is made too
    assert main(["bench", "rim", f"encoders={tmp_path / 'none'}", f"out={tmp_path / 'new'}",
                 "--json", str(tmp_path / "no" / "rim.json")]) == 2
    assert f"--json {tmp_path / 'no' / 'rim.json'}: no folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_rim_bench_config_accepts_the_defaults_and_a_full_window():
    RimBenchConfig(encoders="x").validate()
    RimBenchConfig(encoders="x", items_per_request=64, max_batch=64).validate()
    with pytest.raises(ConfigError, match="items_per_request=65 exceeds max_batch=64"):
        RimBenchConfig(encoders="x", items_per_request=65).validate()


def test_a_service_that_refuses_its_encoders_is_one_line_not_a_traceback(tmp_path, capsys):
    """The child's own refusal came back as a RuntimeError traceback of 20 lines."""
    assert main(["bench", "rim", f"encoders={tmp_path / 'none'}", "seconds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mim bench rim: error: the RIM service did not start: ") and len(err.splitlines()) == 1
    assert str(tmp_path / "none") in err


def test_a_bench_result_without_a_figure_is_written_as_strict_json(tmp_path, capsys):
    """A RIM run too short to acknowledge an item wrote its latencies as bare NaN, which
    strict JSON readers refuse; they are null now, and the table prints '-'."""
    import json

    from train.bench_cmd import run_and_report
    from train.bench_rim import format_report

    empty = {"clients": 1, "seconds": 0.0, "items": 0, "items_per_s": 0.0, "p50_ms": None, "p99_ms": None,
             "mean_window_items": 0.0, "non_200": {}, "served_checks": 0, "unserved": 0}
    assert "p50 -, p99 -;" in format_report(empty)
    assert format_report(empty).startswith("RIM load: 1 client x 0.0 s: 0 items acknowledged,")  # not "1 clients"
    assert format_report(empty).endswith("acknowledged but not served: 0 of 0 checked (every 10th answer)")
    path = tmp_path / "bench.json"
    run_and_report(lambda: {"ratio": float("nan"), "rows": [{"x": float("inf"), "y": 1.5}]}, str, str(path))
    result = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert result["ratio"] is None and result["rows"] == [{"x": None, "y": 1.5}]


def test_bench_rim_refuses_a_truth_folder_before_serving(tmp_path, capsys):
    """A world's truth folder embeds only that world's item ids: every request the bench posts
    (new ids) was refused, and it printed "0 items acknowledged, 0.0 items/s" with exit code 0."""
    import numpy as np

    truth = tmp_path / "truth"
    truth.mkdir()
    np.savez(truth / "items.npz", style=np.zeros((4, 2)), category=np.zeros(4))
    assert main(["bench", "rim", f"encoders={truth}", "seconds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mim bench rim: error: encoders={truth}: a synthetic world's truth folder embeds only that "
                   "world's own item ids, and the bench posts new ones; give a stage-1 encoders/ or a C-SFT "
                   "mm_encoder/ artifact")


def test_bench_rim_stops_when_the_service_refuses_the_warm_up(tmp_path, monkeypatch):
    """A service that refuses every item measured nothing, yet the bench reported 0 items/s as
    its result."""
    import train.bench_rim as bench_rim

    class Service:
        terminated = False

        def terminate(self):
            Service.terminated = True

        def wait(self, timeout):
            return 0

    monkeypatch.setattr(bench_rim, "_start_service", lambda config, log: (Service(), 1))
    monkeypatch.setattr(bench_rim, "_post", lambda connection, payloads, ids: (422, "item 0: unknown id\n"))
    with pytest.raises(RuntimeError, match=r"the RIM service refused the warm-up item \(422\): item 0: unknown id$"):
        bench_rim.run(RimBenchConfig(encoders="x", seconds=1), tmp_path / "rim.log")
    assert Service.terminated


def test_bench_rim_counts_the_answers_it_checked(monkeypatch):
    """Only every 10th answer is checked with a GET, yet the report said "acknowledged but not
    served: 0" as if every item had been: a run of fewer than 10 answers a client checked none."""
    import time

    import train.bench_rim as bench_rim

    class Connection:
        """Answers every POST 200 and every GET 404 (not served)."""

        def __init__(self, *args, **kwargs):
            self.method = None

        def request(self, method, path, **kwargs):
            self.method = method

        def getresponse(self):
            status = 200 if self.method == "POST" else 404
            return type("Response", (), {"status": status, "read": lambda self: b"{}"})()

        def close(self):
            pass

    monkeypatch.setattr(bench_rim.http.client, "HTTPConnection", Connection)
    stats = bench_rim.ClientStats()
    bench_rim._client(1, 0, RimBenchConfig(encoders="x"), [{}], time.monotonic() + 0.05, stats)
    assert stats.statuses[200] >= 10 and stats.checked == stats.statuses[200] // 10 == stats.unserved


@pytest.mark.parametrize("bench", ["sharding", "lookup", "rim", "train", "layout", "peer"])
def test_every_bench_help_says_json_takes_a_dash(capsys, bench):
    """`--json -` prints the JSON (docs/bench_train.md), but the help of four benches did not say so."""
    with pytest.raises(SystemExit):
        main(["bench", bench, "--help"])
    assert "('-':" in " ".join(capsys.readouterr().out.split())
