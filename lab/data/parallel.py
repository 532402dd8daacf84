"""An ordered, bounded process pool.

`Pool.imap` reads its whole input iterable ahead into the task queue, so a 20 GB corpus would end
up in memory; here at most `max_pending` tasks per worker are in flight and results come back in
input order (outputs never depend on the number of workers). Workers are spawned, not forked: the
parent may hold tokenizers' Rust thread pool, which does not survive a fork.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, TypeVar

from lab import LabError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(configured: int | None) -> int:
    """Configured count, or every core this process may run on."""
    if configured:
        return max(1, int(configured))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, *,
                initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                max_pending: int) -> Iterator[R]:
    """`map(fn, tasks)` over `workers` processes, in order, with bounded read-ahead.

    With one worker it runs in this process (no spawn cost, easier to debug). `fn` and
    `initializer` must be importable module-level functions.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_child,
                             initargs=(os.getpid(), initializer, initargs)) as pool:
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= workers * max_pending:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as err:
            raise LabError(f"a worker process died ({err}); most often it ran out of memory: lower "
                           "prepare.workers or prepare.batch_mb") from None
        finally:
            for future in pending:
                future.cancel()


def _init_child(parent: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    _die_with_parent(parent)
    # One thread per worker process: Rust thread pools (tokenizers) inside the workers would
    # oversubscribe the cores the processes already use. Set before any Rust pool starts.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies (e.g. `kill -9` of lab.prepare).

    Without it, orphaned workers finish their queued shards and then wait forever on a queue
    nobody feeds. Elsewhere this is a no-op.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
