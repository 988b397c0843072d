"""Bench jobs side by side: `Workers` runs calls in this process, or in worker processes
that each take an equal share of the threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from isomod.errors import IsomodError

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

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

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
        futures = [self._pool.submit(fn, *args) for args in calls]
        try:
            for future in futures:
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
