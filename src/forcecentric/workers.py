"""Worker processes that do not outlive the job that started them.

A long job (labelling a corpus, a study, an MD benchmark) is often ended by SIGTERM: ``kill``,
``timeout``, a batch system at its wall-time limit. Python's default SIGTERM action ends the
parent at once, without unwinding, and leaves its spawned workers computing on, orphaned. Here
SIGTERM becomes :class:`SystemExit` so that ``with`` blocks unwind, and :func:`process_pool`
terminates its workers when its block is left by any exception (SIGTERM, Ctrl-C, an error),
where :class:`concurrent.futures.ProcessPoolExecutor` alone would wait for every queued task."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread (so cleanup code runs);
    the previous handler comes back after it. Outside the main thread, where Python cannot install
    handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def process_pool(max_workers: int, initializer: Callable[[], None] | None = None) -> Iterator[cf.ProcessPoolExecutor]:
    """A spawn-context :class:`~concurrent.futures.ProcessPoolExecutor` (safe beside torch, OpenMP and
    CUDA) whose workers end with the block: after a normal exit it waits for them as usual; if the
    block raises, or SIGTERM arrives, queued tasks are cancelled and running workers terminated
    before the exception propagates."""
    before = set(mp.active_children())
    pool = cf.ProcessPoolExecutor(max_workers=max_workers, mp_context=mp.get_context("spawn"),
                                  initializer=initializer)
    with sigterm_unwinds():
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            workers = [p for p in mp.active_children() if p not in before]
            for p in workers:
                p.terminate()
            for p in workers:
                p.join(timeout=10)
            raise
        pool.shutdown(wait=True)
