"""Bench jobs side by side: `Workers` runs calls in this process, or in worker processes
that each take an equal share of the threads."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from isomod.errors import Interrupted, IsomodError


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise IsomodError(f"jobs must be >= 1, got {jobs}")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_context(preload: tuple[str, ...]):
    """On Linux, worker processes forked from a fresh server that has imported `preload` (the
    benches), torch and the part of torch its optimisers import on first use (some 4 s a process):
    the server pays the imports once for every worker this process starts (importing
    them initialises no device). Elsewhere each worker is a fresh interpreter (spawn;
    macOS forks badly). Never a fork of this process, whose thread pools a fork would
    copy in an unknown state."""
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*preload, "torch._dynamo"])
    return context


class Workers:
    """Runs calls in this process when `jobs` is 1, otherwise in `jobs` worker processes
    side by side, each with `threads // jobs` threads (training runs that each use every
    core slow each other down many times over; one thread each does not). The processes
    start at the first call that needs them and serve every later one until the `with`
    block ends: a bench's stages share them. `preload`: modules the workers import before
    their first call (the benches whose functions they run)."""

    def __init__(self, jobs: int = 1, preload: tuple[str, ...] = ()):
        check_jobs(jobs)
        self.jobs, self.preload, self._pool = jobs, tuple(preload), None
        self._futures: list = []  # the calls of the current `map`

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if exc[0] is not None:  # interrupted or failed: no worker goes on alone
                self.stop()
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every worker: SIGTERM (a training run saves a checkpoint of its step in
        progress and ends its job), the jobs still running waited for up to `timeout`
        seconds, then the processes shut down (killed if they do not)."""
        import concurrent.futures

        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        for future in self._futures:
            future.cancel()
        concurrent.futures.wait(self._futures, timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()

    def map(self, fn: Callable, calls: list[tuple]) -> Iterator:
        """`fn(*args)` for every `args` in `calls`, yielded in order. `fn` must be a
        module-level function and its arguments picklable when `jobs` > 1."""
        if self.jobs == 1 or len(calls) <= 1:
            for args in calls:
                yield fn(*args)
            return
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, torch.get_num_threads() // self.jobs)
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=_worker_context(self.preload), initializer=_init_worker,
                                             initargs=(threads,))
        self._futures = futures = [self._pool.submit(fn, *args) for args in calls]
        with terminate_raises():
            for future in futures:
                yield future.result()


@contextlib.contextmanager
def terminate_raises():
    """While it lasts, SIGTERM raises `Interrupted` in this process's main thread (by
    default it would end the process at once, leaving its worker processes to run on
    alone, holding their run folders)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name}: the worker processes saved their runs and "
                          "stopped; the same command again resumes",
                          signum)

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
