"""Background callbacks that run in threads of the server process.

Dash's background callbacks (``@callback(..., background=True, progress=..., cancel=...)``) hand
long work to a *manager*. The stock :class:`dash.DiskcacheManager` starts one subprocess per job,
so every job would load its model again, and a forked child cannot use a CUDA context its parent
made. :class:`ThreadJobManager` keeps Dash's protocol (the result store is still a
``diskcache.Cache``, progress and results travel through it) but runs each job in a thread of the
server process, where :class:`app.compute.ModelPool` keeps every model loaded once.

Threads cannot be killed, so cancelling is cooperative: the cancel button sets the job's event,
and the job stops at its next :func:`checkpoint` (the progress helper calls it between steps).
A cancelled job raises :class:`JobCancelled`, a ``BaseException`` so that Dash's job wrapper does
not store it as a result a later run with the same inputs could pick up.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import diskcache
from dash import DiskcacheManager


class JobCancelled(BaseException):
    """Raised inside a job at its next checkpoint after the user pressed cancel."""


_CANCEL: ContextVar[threading.Event | None] = ContextVar("workbench_app_job_cancel", default=None)


def checkpoint() -> None:
    """Stop the current job here if it was cancelled (a no-op outside a job)."""
    event = _CANCEL.get()
    if event is not None and event.is_set():
        raise JobCancelled


def cancelled() -> bool:
    event = _CANCEL.get()
    return event is not None and event.is_set()


class ThreadJobManager(DiskcacheManager):
    """A Dash background-callback manager whose jobs are threads of this process."""

    def __init__(self, cache_dir: str | Path) -> None:
        super().__init__(diskcache.Cache(str(cache_dir)))
        self._ids = itertools.count(1)
        self._jobs: dict[int, tuple[threading.Thread, threading.Event]] = {}
        self._jobs_lock = threading.Lock()

    def call_job_fn(self, key: str, job_fn: Callable[..., Any], args: Any, context: Any) -> int:
        job = next(self._ids)
        event = threading.Event()

        def target() -> None:
            _CANCEL.set(event)
            try:
                job_fn(key, self._make_progress_key(key), args, context)
            except JobCancelled:
                pass  # nothing is stored: the browser stopped waiting for this job
            finally:
                with self._jobs_lock:
                    self._jobs.pop(job, None)

        thread = threading.Thread(target=target, name=f"workbench-app-job-{job}", daemon=True)
        with self._jobs_lock:
            self._jobs[job] = (thread, event)
        thread.start()
        return job

    def _job(self, job: Any) -> tuple[threading.Thread, threading.Event] | None:
        try:
            job_id = int(job)
        except (TypeError, ValueError):
            return None
        with self._jobs_lock:
            return self._jobs.get(job_id)

    def terminate_job(self, job: Any) -> None:
        found = self._job(job)
        if found is not None:
            found[1].set()

    def terminate_unhealthy_job(self, job: Any) -> bool:
        return False  # a thread is either running or gone

    def job_running(self, job: Any) -> bool:
        found = self._job(job)
        return found is not None and found[0].is_alive() and not found[1].is_set()
