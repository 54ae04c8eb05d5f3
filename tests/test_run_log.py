"""The JSONL metrics log of every trainer (mim_rec.utils.run.JsonlLogger)."""

from __future__ import annotations

import json
import os

import pytest

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


def test_events_a_resumed_run_logs_again_are_kept_once(tmp_path):
    """An evaluation logged by every start piled up, stale copies beside the final one."""
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"event": "table"}, step=0)
    logger.log({"loss": 1.0}, step=4)
    logger.log({"event": "eval", "auc": 0.6}, step=4)
    logger.log({"event": "eval", "auc": 0.5})  # written before evaluations carried their step
    logger.log({"event": "rim_apply"}, step=4)
    logger.forget_after(4, redone=("eval", "table"))
    logger.log({"event": "eval", "auc": 0.7}, step=4)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("event"), r["step"]) for r in records if "step" in r] == [
        ("table", 0), (None, 4), ("rim_apply", 4), ("eval", 4)]
    assert [r["auc"] for r in records if r.get("event") == "eval"] == [0.7]


def test_a_run_folder_is_held_by_one_run_at_a_time(tmp_path, monkeypatch):
    """A resume started while a run orphaned by a killed torchrun still wrote the folder raced
    it for the checkpoints."""
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import run_folder_lock

    with run_folder_lock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=rf"another run is writing this folder \(pid {os.getpid()}\)"):
            with run_folder_lock(tmp_path / "run"):
                pass
        monkeypatch.setenv("RANK", "1")  # only rank 0 of a launch takes it
        with run_folder_lock(tmp_path / "run"):
            pass
        monkeypatch.delenv("RANK")
    with run_folder_lock(tmp_path / "run"):  # free again once the holder is done
        pass


def test_a_run_refused_under_the_lock_leaves_no_folder_nor_parent_behind(tmp_path):
    """The default out=runs/pretrain, refused for a missing world, left an empty runs/."""
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import run_folder_lock

    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "runs" / "pretrain", tmp_path / "kept" / "a" / "b"):
        with pytest.raises(ConfigError), run_folder_lock(out):
            raise ConfigError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_refused_run_removes_its_lock_file_before_it_frees_the_lock(tmp_path, monkeypatch):
    """A run refused in a folder it made removed the lock file after freeing its flock: a run
    that took the flock in between held a file that was then removed (with its folder), beside
    any run after it. Removed while held, the run in between holds a new file, which stays."""
    import fcntl

    from mim_rec.config import ConfigError
    from mim_rec.utils.run import LOCK_NAME, _locked, run_folder_lock

    path, flock, between = tmp_path / "run" / LOCK_NAME, fcntl.flock, []

    def flock_then_another_run(handle, operation) -> None:
        flock(handle, operation)
        if operation == fcntl.LOCK_UN and not between:  # another run, as the refused one frees the lock
            between.append(path.open("a+"))
            assert _locked(between[0], path)

    monkeypatch.setattr(fcntl, "flock", flock_then_another_run)
    with pytest.raises(ConfigError, match="refused"), run_folder_lock(path.parent):
        raise ConfigError("refused")
    with between[0] as handle:
        assert path.exists() and os.path.samestat(os.stat(path), os.fstat(handle.fileno()))


def test_a_killed_holder_leaves_no_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from mim_rec.utils.run import run_folder_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; from mim_rec.utils.run import run_folder_lock\n"
                               f"with run_folder_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_folder_lock(tmp_path):
        pass


def test_a_lock_file_its_holder_removed_is_not_taken_and_a_refused_writer_leaves_no_folder(tmp_path):
    """``sole_writer``'s holder removes ``.OUT.lock`` when done: a writer that opened the file
    just before took the flock of the removed file, beside a writer after it holding a new one."""
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import _locked, sole_writer

    path = tmp_path / ".v2.lock"
    with sole_writer(tmp_path / "v2"):
        late = path.open("a+")  # opened while the holder holds it
    with late:
        assert not path.exists() and not _locked(late, path)
        with sole_writer(tmp_path / "v2"):  # a writer after it holds a new file there
            assert not _locked(late, path)
    with pytest.raises(ConfigError), sole_writer(tmp_path / "new" / "v2"):
        raise ConfigError("refused")
    assert list(tmp_path.iterdir()) == []


def _holder_cleaning_up(monkeypatch, path, top, times: int, opened: bool) -> list:
    """Make the first ``times`` opens of the lock file ``path`` come as a holder that is done
    removes it and the folders it made, ``path``'s up to ``top`` (as :func:`mim_rec.utils.run._lock_file`
    does once they are empty): right before the open (between a writer's mkdir and its open), or
    with ``opened`` right after it (between the writer's open and its flock). Returns the
    removals so far."""
    import pathlib

    open_, cleaned = pathlib.Path.open, []

    def clean_up() -> None:
        cleaned.append(path)
        path.unlink(missing_ok=True)
        for made in path.parents:
            if made == top:
                break
            made.rmdir()

    def open_as_a_holder_cleans_up(self, *args, **kwargs):
        cleaning = self == path and len(cleaned) < times
        if cleaning and not opened:
            clean_up()
        handle = open_(self, *args, **kwargs)
        if cleaning and opened:
            clean_up()
        return handle

    monkeypatch.setattr(pathlib.Path, "open", open_as_a_holder_cleans_up)
    return cleaned


@pytest.mark.parametrize("opened", [False, True], ids=["before its open", "between its open and its flock"])
@pytest.mark.parametrize("lock", ["run_folder_lock", "sole_writer"])
def test_a_writer_whose_lock_file_a_finished_holder_removes_as_it_takes_it_goes_on(tmp_path, monkeypatch, lock,
                                                                                 opened):
    """A holder done with folders it made removes its lock file and them once empty: a writer
    that had just made (or found) the same folder then failed to open its lock file there, with
    a FileNotFoundError traceback, and one that had just opened the file flocked the removed one
    and was refused as "another run is writing this folder", naming the finished holder. It
    makes the folders and the file again and holds the lock (a third writer is still refused),
    and refused, leaves none of them behind; removed again, it is refused in one line."""
    from mim_rec.config import ConfigError
    from mim_rec.utils import run

    out = tmp_path / "runs" / "a"
    path = out / run.LOCK_NAME if lock == "run_folder_lock" else out.parent / ".a.lock"
    hold = getattr(run, lock)
    path.parent.mkdir(parents=True)  # made by the holder: this writer finds it
    path.write_text("999999\n")  # the finished holder's pid
    cleaned = _holder_cleaning_up(monkeypatch, path, tmp_path, times=1, opened=opened)
    with pytest.raises(ConfigError, match="refused"), hold(out):
        assert cleaned and path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match=rf"another run is writing this folder \(pid {os.getpid()}\)"), hold(out):
            pass
        raise ConfigError("refused")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    _holder_cleaning_up(monkeypatch, path, tmp_path, times=2, opened=opened)
    with pytest.raises(ConfigError, match=rf"^out={out}: its lock file {path} was removed twice as this run took it "
                                          r"\(runs finishing there meanwhile\); run again$"):
        with hold(out):
            pass
    assert list(tmp_path.iterdir()) == []
