"""gpt2np's own thread pool: every core for the long forward passes.

NumPy runs a ufunc (exp, the softmax sums, GELU, layer norm) on one core; only BLAS's matrix
products use them all. A forward pass over many positions (a prompt's prefill, scoring) therefore
runs its element-wise third on one core. With `threads` > 1 such a pass runs every step as chunks
on a pool of threads instead (gpt2np.runner): the products by output columns, attention by (head
group, query block), the element-wise steps by positions. NumPy releases the GIL inside these
loops, so the chunks run at once.

BLAS is held to one thread for the whole pass (threadpoolctl), products included. Leaving the
products on BLAS's own threads was measured slower than one thread: OpenBLAS's worker busy-waits
for about 0.1 s after each product and holds the core the pool needs. A pass under `MIN_POSITIONS`
positions (a decoding step) is too short to split (the hand-outs cost more than they save) and runs
as with `threads=1`: serially, with BLAS's own threads for the products.

Only one pass of a model runs at a time (`Threads.forward`): BLAS's thread count is process-wide, so
a decoding step beside a held pass would otherwise run its products on one thread, and the bits of
its results would depend on timing.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

ENVIRONMENT_VARIABLE = "GPT2NP_NUM_THREADS"

# A gpt2-wide (768) pass over fewer positions (rows x new tokens) runs serially: below this the
# pool's hand-outs (24-37 us each) and the single-threaded products lose to BLAS's own threads
# (measured 0.83-1.00x). A pass's products grow with width squared, so the bar scales with it
# (`min_positions`): 144 positions for gpt2-medium, 59 for gpt2-xl, never for a toy model.
MIN_POSITIONS = 256
MIN_POSITIONS_WIDTH = 768


def min_positions(width: int) -> int:
    """The fewest positions a pass of a model `width` channels wide needs to run on the pool."""
    return math.ceil(MIN_POSITIONS * (MIN_POSITIONS_WIDTH / width) ** 2)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as `taskset` sets it), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads=None) -> int:
    """The thread count to use: `threads` if given, else $GPT2NP_NUM_THREADS, else the available cores."""
    if threads is None:
        text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if not text:
            return available_cores()
        try:
            threads = int(text)
        except ValueError:
            raise ValueError(f"{ENVIRONMENT_VARIABLE}={text!r} is not a whole number: set it to 1 or more, or unset it")
        if threads < 1:
            raise ValueError(f"{ENVIRONMENT_VARIABLE}={text!r}: set it to 1 or more, or unset it")
        return threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be a whole number of threads (1 or more) or None, not {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be 1 or more (1 runs serially; None uses every core), not {threads}")
    return int(threads)


class Pool:
    """`n` threads: the caller's own and n - 1 workers. `map` runs a function over items of work on
    them and returns when all are done; the first error raised by an item is raised again."""

    def __init__(self, n: int):
        self.n = n
        self._start()

    def _start(self) -> None:
        self._executor = ThreadPoolExecutor(self.n - 1, thread_name_prefix="gpt2np")
        self._pid = os.getpid()

    def map(self, fn, items) -> None:
        """fn(item) for every item. Each thread, the caller's included, takes the next item not yet
        taken until none is left, so a thread that drew short items takes more of them. After an
        error no item is started, the items already started are waited for, and the first error is
        raised; after Ctrl-C no item is started."""
        if self._pid != os.getpid():  # a forked child: the parent's worker threads are not in it
            self._start()
        items = list(items)
        taken = itertools.count()  # next() on a count is atomic under the GIL
        failed: list[BaseException] = []
        stop = threading.Event()

        def drain():
            for i in taken:
                if i >= len(items) or stop.is_set():
                    return
                try:
                    fn(items[i])
                except BaseException as e:
                    failed.append(e)
                    stop.set()
                    return

        helpers = [self._executor.submit(drain) for _ in range(min(self.n, len(items)) - 1)]
        try:
            drain()
            for helper in helpers:  # items write into shared arrays: none may run once this returns
                helper.result()
        except BaseException:  # Ctrl-C: no item starts after this; the pass's arrays are abandoned
            stop.set()
            raise
        if failed:
            raise failed[0]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class Threads:
    """A model's threads: `forward(positions)` is the context every forward pass runs in. It yields
    the pool when the pass has `min_positions` or more (BLAS then held to one thread), else None."""

    def __init__(self, threads=None, *, min_positions: int = MIN_POSITIONS):
        self.n = resolve_threads(threads)
        self.min_positions = min_positions
        self.pool = Pool(self.n) if self.n > 1 else None
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._blas = None  # threadpoolctl's handle on the loaded BLAS libraries, found on first use

    @contextlib.contextmanager
    def forward(self, positions: int):
        if self.pool is None:  # threads=1: nothing held, no lock, BLAS as the process has it
            yield None
            return
        if self._pid != os.getpid():  # a forked child: a lock another thread held at the fork stays held
            self._lock, self._pid = threading.RLock(), os.getpid()
        with self._lock:
            if positions < self.min_positions:
                yield None
                return
            with self._blas_controller().limit(limits=1):
                yield self.pool

    def __getstate__(self):  # a pickled model (sent to another process) takes its settings, not its threads
        return {"n": self.n, "min_positions": self.min_positions}

    def __setstate__(self, state):
        self.__init__(state["n"], min_positions=state["min_positions"])

    def _blas_controller(self):
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController().select(user_api="blas")
        return self._blas

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
