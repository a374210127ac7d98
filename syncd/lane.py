"""The small-file lane: a worker's claimed batch of small files is transferred all at once.

Where S3 is tens or hundreds of milliseconds away, a small file's transfer is one round trip of
waiting, not work: handled one after another, `workers` threads kept only `workers` requests in
flight (8 at 200 ms: 40 files/s, 0.82x `aws s3 sync`, which runs 10). A worker claims up to
`pool.CLAIM_ROWS` small files at a time (no more than `pool.CLAIM_BYTES` together); it does the
first itself and hands the others to the lane, then claims again once all are done. The lane
has `PER_WORKER - 1` threads per worker, shared: small files are sent `PER_WORKER` per worker
at once (`PER_WORKER_CRT` through awscrt, `per_worker`), while their memory stays bounded by the
claims (at most 1 MiB of small files per worker). Deletions (a tombstone's empty PUT, a DELETE)
are claimed and sent the same way and weigh nothing. A large file is claimed alone and never reaches the lane (its memory is bounded
by multipart buffers, per worker, as before).

Lane threads are made when a batch needs them and end after `IDLE_EXIT` seconds without work
(or when the pool closes the lane): an idle daemon keeps none. Each calls `on_exit` as it ends
(the ledger's per-thread read connection is closed there).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_EXIT = 30.0  # seconds a lane thread waits for work before it ends
# Small-file transfers in flight per worker (the worker's own and 3 in the lane). 32 at the
# default 8 workers: at 200 ms per request 160 files/s (aws s3 sync: 10 in flight). More costs
# CPU where requests are quick: 16 per worker (128 threads) took 9% more CPU per file on loopback
# (GIL hand-overs between runnable threads) and 35 MiB more RSS; 4 per worker: no more CPU
# (A/B, 8 alternating runs of (a): 4.68 s vs 4.86 s) and 12 MiB more RSS while busy.
PER_WORKER = 4
# ... through awscrt (`transfers = "crt"`), whose requests wait in C, off the GIL: 16 (128 at 8
# workers; a claim holds at most pool.CLAIM_ROWS = 16). Medians of pairs against 4 (with awscrt's
# 25 connections then), 2,000 x 4 KiB, 2026-12-07, load 5-12 (bench/inflight.py): at 200 ms per
# request 0.60x/0.57x the time (restore/upload); at 50 ms 1.05x/0.89x for 13-16% more CPU per file
# (bound by CPU there: 8 gave 0.94x/0.87x for 4-8% more); on loopback 1.05x/1.06x the time and
# 4%/12% more CPU, still 0.69x/0.61x botocore's at 4. Botocore stays at 4: 16 gave 0.65x/0.66x
# the time at 200 ms but nothing at 50 ms or on loopback (bench/README.md, awscrt section).
PER_WORKER_CRT = 16
LANE_MAX = 256  # lane threads at most, whatever `workers` says (a batch beyond waits for one)


def per_worker(remote: object) -> int:
    """Small transfers in flight per worker for `remote` (its `native_transfers`: awscrt's)."""
    return PER_WORKER_CRT if getattr(remote, "native_transfers", False) else PER_WORKER


def lane_size(workers: int, width: int | None = None) -> int:
    """Lane threads for `workers` workers with `width` (PER_WORKER) small transfers each in
    flight (each worker handles one file of its batch itself)."""
    return min(LANE_MAX, workers * ((PER_WORKER if width is None else width) - 1))


class _Batch:
    """One `run` call: counts its unfinished items; keeps the first error."""

    __slots__ = ("left", "cond", "error")

    def __init__(self, n: int) -> None:
        self.left = n
        self.cond = threading.Condition(threading.Lock())
        self.error: BaseException | None = None

    def done(self, error: BaseException | None) -> None:
        with self.cond:
            if error is not None and self.error is None:
                self.error = error
            self.left -= 1
            if self.left == 0:
                self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            while self.left:
                self.cond.wait()


class Lane:
    """Up to `size` threads that run the items of `run` calls concurrently."""

    def __init__(self, size: int, *, name: str = "syncd-lane", on_exit: Callable[[], None] | None = None,
                 width: int | None = None) -> None:
        self.size = size
        self.width = PER_WORKER if width is None else width  # `run`'s default
        self.name = name
        self.on_exit = on_exit
        self._tasks: queue.SimpleQueue[tuple[Callable[[Any], None], Any, _Batch] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._made = 0

    def run(self, items: Sequence[T], fn: Callable[[T], None], width: int | None = None) -> None:
        """Call `fn(item)` for every item, `width` at a time: the calling thread and `width - 1`
        lane threads each take the next item until none is left. Returns when all are done.

        An exception stops the taking of new items; it is raised once the calls under way have
        returned, with the items never started in its `lane_unstarted` attribute."""
        if width is None:
            width = self.width
        if len(items) <= 1 or width <= 1 or self.size <= 0:
            for item in items:  # nothing to overlap: no hand-over cost
                fn(item)
            return
        todo = iter(items)
        left = len(items)
        lock = threading.Lock()
        failed = threading.Event()

        def take() -> tuple[bool, Any]:
            nonlocal left
            with lock:
                if failed.is_set() or not left:
                    return False, None
                left -= 1
                return True, next(todo)

        def pull(_: object) -> None:
            while True:
                ok, item = take()
                if not ok:
                    return
                try:
                    fn(item)
                except BaseException:
                    failed.set()
                    raise

        helpers = min(width, len(items)) - 1
        batch = _Batch(helpers)
        for i in range(helpers):
            try:
                self._submit(pull, None, batch)
            except RuntimeError:  # no thread could be started: fewer helpers
                for _ in range(helpers - i):
                    batch.done(None)
                break
        first: BaseException | None = None
        try:
            pull(None)
        except BaseException as e:  # noqa: BLE001 - raised below, once the others are done
            first = e
        batch.wait()
        error = first or batch.error
        if error is not None:
            error.lane_unstarted = list(todo)  # type: ignore[attr-defined]
            raise error

    def _submit(self, fn: Callable[[Any], None], item: Any, batch: _Batch) -> None:
        with self._lock:
            # `_idle`: idle threads minus queued tasks (below 0 when the lane is full). One more
            # thread only when none is idle: otherwise an idle one takes the task
            if self._idle <= 0 and len(self._threads) < self.size:
                self._made += 1
                t = threading.Thread(target=self._work, name=f"{self.name}-{self._made}", daemon=True)
                t.start()  # raises RuntimeError when no thread can be started: nothing queued then
                self._threads.add(t)
            else:
                self._idle -= 1  # an idle thread's; it counts itself idle again after the task
            self._tasks.put((fn, item, batch))

    def _work(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                try:
                    task = self._tasks.get(timeout=IDLE_EXIT)
                except queue.Empty:
                    with self._lock:
                        if self._idle > 0 and self._tasks.empty():
                            # idle with nothing queued: end (a submit that counted on this thread
                            # being idle put its task in the queue first, so it is not empty then)
                            self._idle -= 1
                            self._threads.discard(me)
                            return
                    continue
                if task is None:  # close(): its count was taken there
                    return
                fn, item, batch = task
                try:
                    fn(item)
                except BaseException as e:  # noqa: BLE001 - handed to the batch's caller
                    batch.done(e)
                else:
                    batch.done(None)
                with self._lock:
                    self._idle += 1
        finally:
            with self._lock:
                self._threads.discard(me)
            if self.on_exit is not None:
                try:
                    self.on_exit()
                except Exception:  # noqa: BLE001 - a thread's cleanup must not hide anything else
                    log.debug("lane thread cleanup failed", exc_info=True)

    def threads(self) -> int:
        with self._lock:
            return len(self._threads)

    def close(self, timeout: float | None = None) -> None:
        """End the lane's threads once the work queued before has run (callers are done); a
        later `run` makes new ones."""
        with self._lock:
            threads = list(self._threads)
            for _ in threads:  # one end for each thread; taken like tasks (no idle end meanwhile)
                self._tasks.put(None)
            self._idle -= len(threads)
        for t in threads:
            t.join(timeout)
