"""How a process that joined a process group ends: with its own exit code and all of its
output, and without the interpreter teardown that a still-running gloo worker thread can turn
into an abort (see ``mim_rec.utils.dist.exit_process``)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from mim_rec.utils.dist import free_port, run_on_spawned_ranks


def test_exit_process_keeps_the_exit_code_and_the_buffered_output(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch.distributed as dist
        from mim_rec.utils.dist import exit_process
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        print("written before the exit", end="")   # stays in the pipe's buffer until flushed
        print("and to stderr", end="", file=sys.stderr)
        exit_process(3)
        print("never reached")
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # make sets it
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3
    assert done.stdout == "written before the exit"
    assert done.stderr.endswith("and to stderr")


def _rank_and_square(rank, device, base, rows):
    return rank, torch.tensor(float(base + rank)) ** 2, torch.full((rows,), rank)


def test_spawned_ranks_return_every_rank_result_in_rank_order():
    """Tensors too, though the ranks have exited by the time the caller reads them, and results
    larger than a pipe holds (they used to go through a queue, which hangs on those)."""
    rows = 100_000  # 800 kB a rank
    results = run_on_spawned_ranks(_rank_and_square, 2, "cpu", 3, rows)
    assert [(rank, square) for rank, square, _ in results] == [(0, 9.0), (1, 16.0)]
    assert [values.tolist() == [rank] * rows for rank, _, values in results] == [True, True]


def _rank_mean(rank, device):
    from mim_rec.utils.dist import losses_over_ranks, mean_over_ranks
    losses = {"loss": torch.tensor(1.0 + rank), "aux": torch.tensor(10.0 * rank)}
    return mean_over_ranks(torch.tensor([1.0 + rank, 10.0 * rank])), losses_over_ranks(losses)


def test_logged_losses_are_the_mean_over_ranks():
    """The trainers logged rank 0's share of the loss: a 2-rank run's metrics.jsonl disagreed
    with one process on the same global batch (and an MLM step where rank 0 masked no token read 0)."""
    assert [(values.tolist(), named) for values, named in run_on_spawned_ranks(_rank_mean, 2, "cpu")] == \
        [([1.5, 5.0], {"loss": 1.5, "aux": 5.0})] * 2
    values, named = run_on_spawned_ranks(_rank_mean, 1, "cpu")[0]
    assert (values.tolist(), named) == ([1.0, 0.0], {"loss": 1.0, "aux": 0.0})
