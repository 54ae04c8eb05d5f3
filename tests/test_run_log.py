"""The JSONL metrics log of every trainer (mim_rec.utils.run.JsonlLogger)."""

from __future__ import annotations

import json

from mim_rec.utils.run import JsonlLogger


def test_a_resumed_log_forgets_the_steps_after_its_checkpoint(tmp_path):
    """A killed run's rows past its last checkpoint were kept, and logged again on resume."""
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"event": "start"}, step=0)
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step=step)
    logger.log({"event": "table"})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"time": 1, "step": 6, "lo')  # the line a kill cut short
    resumed = JsonlLogger(tmp_path / "metrics.jsonl")
    resumed.forget_after(3)
    resumed.log({"loss": 4.5}, step=4)
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("step"), r.get("loss"), r.get("event")) for r in records] == [
        (0, None, "start"), (1, 1.0, None), (2, 2.0, None), (3, 3.0, None), (None, None, "table"), (4, 4.5, None)]
