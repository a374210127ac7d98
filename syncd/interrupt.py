"""SIGINT and SIGTERM for one-shot commands: a clean stop, then exit 130 (SPEC §3, §4.10).

The first signal sets the command's stop event: no new work is claimed, in-flight transfers
get 10 s to finish, claimed rows are released and restore temps removed (`Engine.check_stop`).
A second signal quits at once (KeyboardInterrupt; the next start recovers what was in flight).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def set_from_handler(event: threading.Event) -> None:
    """Set `event` from a signal handler. A handler runs in the main thread between two of its
    bytecodes, possibly while that thread holds the event's own lock (inside `event.wait()`):
    `event.set()` there would wait for that lock forever. A short-lived thread sets it instead."""
    threading.Thread(target=event.set, name="syncd-signal", daemon=True).start()


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread (embedded use)
        return

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("received %s; stopping: no new transfers, the ones in flight get 10 s "
                    "(send it again to quit at once)", signal.Signals(signum).name)
        set_from_handler(stop)

    signums = [signal.SIGINT, signal.SIGTERM]
    old = {s: signal.signal(s, on_signal) for s in signums}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def unless_stopped(step: Callable[[], object], stop: threading.Event, *,
                   on_end: Callable[[], None] | None = None) -> bool:
    """Run `step` in a thread and wait for it or for `stop`, whichever comes first: a request
    stalled on a dead endpoint (botocore waits 60 s for a read) must not hold up a SIGTERM beyond
    10 s (SPEC §4.10). False when stopped first (the step is left to end on its own: use it only
    for steps whose effects are harmless to cut off at exit); re-raises what `step` raised.
    `on_end` runs in the thread when the step ends (closing its ledger connection)."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        finally:
            if on_end is not None:
                on_end()

    t = threading.Thread(target=target, name="syncd-step", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
        if stop.is_set():
            t.join(1.0)  # a step that sees the stop returns; one blocked on the network is left
            if t.is_alive():
                log.info("stopping without waiting for the remote's answer")
                return False
    if "error" in box:
        raise box["error"]
    return True
