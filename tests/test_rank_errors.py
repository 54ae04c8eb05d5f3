"""A command's error line under torchrun: printed once when every rank raises the same one (it
was printed once per rank, above torchrun's failure report), still printed by a rank that
alone fails, and every failing rank still exits non-zero."""

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from mim_rec.utils.dist import free_port, print_error_once
from train.cli import main

REPO = Path(__file__).resolve().parents[1]
UNKNOWN_KEY = "mim csft: error: unknown config key(s) ['nosuch']"


@pytest.fixture
def launcher_store(monkeypatch):
    """The store a torchrun agent serves its ranks, and the environment it gives rank 1 of 2."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    for name, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": "1",
                        "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    return store


def test_rank_zero_posts_the_line_it_prints(launcher_store, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    print_error_once("mim csft: error: x")
    assert capsys.readouterr().err == "mim csft: error: x\n"
    assert launcher_store.get("mim/error_line/0") == b"mim csft: error: x"


def test_another_rank_leaves_rank_zeros_line_unprinted_and_still_fails(launcher_store, monkeypatch, tmp_path,
                                                                      capsys):
    argv = ["csft", "nosuch.key=1", f"out={tmp_path / 'run'}"]
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert UNKNOWN_KEY in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""


def test_a_line_of_its_own_is_printed(launcher_store, capsys):
    """Rank 0 failed otherwise, or is still at work (it posts nothing): the rank's own error."""
    launcher_store.set("mim/error_line/0", "mim csft: error: rank 0's")
    print_error_once("mim csft: error: rank 1's")
    launcher_store.delete_key("mim/error_line/0")
    print_error_once("mim csft: error: rank 1 alone", wait_s=0.5)
    assert capsys.readouterr().err == "mim csft: error: rank 1's\nmim csft: error: rank 1 alone\n"


def test_without_a_launcher_store_every_rank_prints(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    print_error_once("mim csft: error: x")
    assert capsys.readouterr().err == "mim csft: error: x\n"


def _torchrun(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "ranks.py").write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "ranks.py")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_under_torchrun_a_shared_error_prints_once_and_a_rank_alone_prints_its_own(tmp_path):
    done = _torchrun("""
        import sys
        from train.cli import print_error
        print_error("mim csft: error: said by every rank")
        sys.exit(2)
    """, tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("mim csft: error: said by every rank") == 1, done.stderr
    alone = _torchrun("""
        import os, sys, time
        from train.cli import print_error
        if os.environ["RANK"] == "1":
            print_error("mim csft: error: only rank 1's")
            sys.exit(2)
        time.sleep(60)  # at work, or waiting for rank 1 in a collective; torchrun ends it
    """, tmp_path)
    assert alone.returncode != 0
    assert alone.stderr.count("mim csft: error: only rank 1's") == 1, alone.stderr
