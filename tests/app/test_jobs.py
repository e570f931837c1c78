"""Background jobs in server threads: results reach the store, cancel stops at a checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from app import jobs
from app.jobs import ThreadJobManager


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_job_runs_in_a_thread_of_this_process(tmp_path: Path) -> None:
    manager = ThreadJobManager(tmp_path)
    seen = {}

    def job_fn(key, progress_key, args, context):
        seen["thread"] = threading.current_thread().name
        manager.handle.set(key, args[0] * 2)

    job = manager.call_job_fn("k1", job_fn, [21], {})
    _wait_until(lambda: manager.result_ready("k1"))
    assert manager.get_result("k1", job) == 42
    assert seen["thread"].startswith("workbench-app-job-")
    _wait_until(lambda: not manager.job_running(job))


def test_cancel_stops_the_job_at_its_next_checkpoint(tmp_path: Path) -> None:
    manager = ThreadJobManager(tmp_path)
    started, steps = threading.Event(), []

    def job_fn(key, progress_key, args, context):
        started.set()
        for step in range(1000):
            jobs.checkpoint()
            steps.append(step)
            time.sleep(0.01)
        manager.handle.set(key, "finished")

    job = manager.call_job_fn("k2", job_fn, [], {})
    started.wait(5)
    assert manager.job_running(job)
    manager.terminate_job(job)
    assert not manager.job_running(job)  # the browser stops polling at once
    _wait_until(lambda: manager._job(job) is None)  # the thread ends at its checkpoint
    assert len(steps) < 1000
    assert not manager.result_ready("k2")  # a cancelled job leaves no result behind


def test_checkpoint_outside_a_job_does_nothing() -> None:
    jobs.checkpoint()
    assert not jobs.cancelled()
