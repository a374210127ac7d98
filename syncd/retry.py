"""The one place that decides what is retried, and when (SPEC §4.6).

Who retries what:
- botocore makes a single attempt per request (set in `remote/s3.py`);
- a failed transfer goes back to the ledger with `due_at` pushed out by `backoff()` (tenacity's
  full-jitter exponential, capped at 5 minutes). The worker pool picks it up when it is due, so
  retries survive restarts and never stack across layers.
- `run` retries forever. One-shot commands (`resync`, `restore`) give transient errors
  `ONESHOT_ATTEMPTS` tries, then report the file failed (exit 1).
- Denied permissions, bad credentials and missing buckets mark the file `failed` at once and are
  retried at the cap, so a fixed permission drains the backlog without a restart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import tenacity

from syncd.remote.base import (
    CREDENTIALS,
    DENIED,
    INTEGRITY,
    INVALID,
    LOCAL,
    NO_BUCKET,
    NOT_FOUND,
    TRANSIENT,
    UNREACHABLE,
    RemoteError,
)

CAP_SECONDS = 300.0
ONESHOT_ATTEMPTS = 5
_WAIT = tenacity.wait_random_exponential(multiplier=0.5, max=CAP_SECONDS)


def backoff(attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1` (full jitter, capped at 5 minutes)."""
    # the wait strategy only reads the attempt number of the state it is given
    state = tenacity.RetryCallState(retry_object=cast(tenacity.BaseRetrying, None), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempt)
    # never zero: a hot loop against a failing server helps nobody
    return max(0.05, _WAIT(state))


def at_cap() -> float:
    """The wait for failures that need an operator (denied, credentials): the cap, jittered."""
    return CAP_SECONDS * random.uniform(0.9, 1.0)


def is_transient(err: BaseException) -> bool:
    return isinstance(err, RemoteError) and err.kind in (TRANSIENT, UNREACHABLE)


# kinds that say a write was not applied: never sent (nothing answers at the endpoint, a local
# read error) or refused by the store (denied, credentials, bucket, a bad request, a checksum)
NOT_APPLIED = (UNREACHABLE, DENIED, CREDENTIALS, NO_BUCKET, INVALID, INTEGRITY, LOCAL)


def may_have_landed(err: BaseException) -> bool:
    """Could the store have applied the write (PUT, multipart upload, copy) that raised `err`?

    A lost answer is not a failed write (PITFALLS §10): a connection reset or closed after the
    request was sent, a read timeout or a 5xx may follow a stored object, and a multipart upload
    whose completion answer was lost gets NoSuchUpload when its part client sends it again.
    A bug (`Internal`) may have struck after the request: it may have landed too."""
    if not isinstance(err, RemoteError):
        return True
    return err.kind not in NOT_APPLIED or err.code == "Internal"


def is_remote_wide(err: BaseException) -> bool:
    """Errors that concern the whole remote, not one file (every file would fail the same way)."""
    return isinstance(err, RemoteError) and err.kind in (CREDENTIALS, NO_BUCKET, UNREACHABLE)


@dataclass(frozen=True)
class Decision:
    state: str  # the row's next state: pending (retry) or failed
    delay: float  # seconds until it is due again; None-like inf = never by itself
    requeue: bool = True  # False: leave op NULL, nothing to retry (e.g. the object is gone)


def decide(err: BaseException, attempts: int, *, oneshot: bool, op: str) -> Decision:
    """What to do with a row whose transfer raised `err` on attempt number `attempts`."""
    if is_transient(err):
        if oneshot and attempts >= ONESHOT_ATTEMPTS:
            return Decision("failed", at_cap())
        return Decision("pending", backoff(attempts))
    if isinstance(err, RemoteError) and err.kind == NOT_FOUND and op == "get":
        return Decision("failed", at_cap(), requeue=False)
    if isinstance(err, RemoteError) and err.kind in (DENIED, CREDENTIALS, NO_BUCKET, INTEGRITY):
        return Decision("failed", at_cap())
    return Decision("failed", at_cap())


def call(fn, *, attempts: int = ONESHOT_ATTEMPTS, forever: bool = False, stop_event=None, on_retry=None):
    """Run `fn()` with the same policy, in-process: for single calls outside the ledger queue
    (probing the remote, listing). `forever` keeps trying transient errors (the daemon).
    `on_retry(exc)` hears of every failure that is retried (so none is silent)."""
    stop: tenacity.stop.stop_base = tenacity.stop_never if forever else tenacity.stop_after_attempt(attempts)
    if stop_event is not None:
        stop = stop | tenacity.stop_when_event_set(stop_event)
    sleep = (lambda s: stop_event.wait(s)) if stop_event is not None else tenacity.nap.sleep
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=_WAIT,
        stop=stop,
        sleep=sleep,
        reraise=True,
        before_sleep=_tell(on_retry) if on_retry is not None else None,
    )
    return retrying(fn)


def _tell(on_retry) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(rs: tenacity.RetryCallState) -> None:
        if rs.outcome is not None:
            on_retry(rs.outcome.exception())

    return before_sleep
