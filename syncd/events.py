"""S3 event notifications through SQS: remote changes within seconds (SPEC §2 `events_queue`).

The bucket sends its `ObjectCreated:*` / `ObjectRemoved:*` notifications to an SQS queue,
directly or through an SNS topic (one queue per host subscribed to the topic: the fan-out that
lets several hosts share a prefix). This module only turns messages into `Change`s and hands
each to a callback that records it durably in the ledger; the message is deleted only after
that callback returned, so a crash at any moment loses nothing (the message comes back after
the queue's visibility timeout). A change whose path is busy (being uploaded or restored) is
recorded on its row and applied once the path is free (`syncd.changes`: the consumer compares
those paths with the remote after each receive, and polls every second while some wait).
Local deletions go through the mass-deletion guard (`syncd.guard`). The periodic listing stays
the safety net: a lost, late or misconfigured queue only slows convergence down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit

from syncd import refusals
from syncd.keys import UnsafeKey
from syncd.logs import CauseLog
from syncd.names import shown
from syncd.remote.base import ObjectInfo
from syncd.retry import backoff

if TYPE_CHECKING:
    from syncd.config import Config
    from syncd.engine import Engine
    from syncd.ledger import Ledger

log = logging.getLogger(__name__)
WAIT_SECONDS = 10  # SQS long poll: an answer as soon as a message arrives, one request per 10 s idle
WAIT_BUSY = 1  # the long poll while changes wait for their paths: they are applied within a second
BATCH = 10  # the most SQS returns per receive


@dataclass(frozen=True)
class Change:
    """One object event: `created` is False for a removal (delete or delete marker)."""

    bucket: str
    key: str
    created: bool
    size: int = 0
    etag: str = ""
    sequencer: str = ""
    at: float = 0.0  # the event's time (Unix seconds), 0 when the notification has none


class BadMessage(ValueError):
    """A message that is not an S3 event notification (deleted, never retried)."""


def parse_body(body: str) -> list[Change]:
    """The changes of one SQS message body: an S3 notification, raw or wrapped by SNS (unless
    the subscription delivers raw messages). `s3:TestEvent` (sent when notifications are set
    up) and events other than creations and removals give no change."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and "Records" not in doc and isinstance(doc.get("Message"), str):
            doc = json.loads(doc["Message"])  # SNS envelope ("Type": "Notification")
    except (TypeError, ValueError) as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadMessage("not a JSON object")
    if doc.get("Event") == "s3:TestEvent":
        return []
    records = doc.get("Records")
    if not isinstance(records, list):
        raise BadMessage("no Records")
    out = []
    for r in records:
        try:
            name = str(r.get("eventName", ""))
            s3 = r["s3"]
            obj = s3["object"]
            # keys in notifications are URL-encoded, spaces as '+'
            key = unquote_plus(str(obj["key"]))
            bucket = str(s3["bucket"]["name"])
        except (AttributeError, KeyError, TypeError) as e:
            raise BadMessage(f"malformed record: {e!r}") from None
        if name.startswith("ObjectCreated"):
            created = True
        elif name.startswith(("ObjectRemoved", "LifecycleExpiration")):
            created = False
        else:
            continue
        out.append(Change(bucket=bucket, key=key, created=created, size=int(obj.get("size") or 0),
                          etag=str(obj.get("eTag") or "").strip('"'), sequencer=str(obj.get("sequencer") or ""),
                          at=_event_time(r.get("eventTime"))))
    return out


def _event_time(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value)).timestamp() if value else 0.0
    except ValueError:
        return 0.0


def queue_client(queue_url: str, region: str = "", profile: str = "") -> Any:
    """A botocore SQS client for `queue_url`: its endpoint is the URL's own scheme and host (AWS's
    `sqs.REGION.amazonaws.com`, or a local or compatible service), its region the URL's or the
    config's."""
    import botocore.session
    from botocore.config import Config as BotoConfig

    parts = urlsplit(queue_url)
    host = parts.hostname or ""
    if not region and host.startswith("sqs.") and host.endswith(".amazonaws.com"):
        region = host.split(".")[1]
    session = botocore.session.get_session()
    if profile:
        session.set_config_variable("profile", profile)
    return session.create_client(
        "sqs", endpoint_url=f"{parts.scheme}://{parts.netloc}", region_name=region or "us-east-1",
        config=BotoConfig(connect_timeout=10, read_timeout=WAIT_SECONDS + 10,
                          retries={"mode": "standard", "total_max_attempts": 1}))


def queue_arn(queue_url: str, region: str = "") -> str:
    """`arn:aws:sqs:REGION:ACCOUNT:NAME` of an AWS queue URL (for the IAM policy)."""
    parts = urlsplit(queue_url)
    host = parts.hostname or ""
    if host.startswith("sqs.") and host.endswith(".amazonaws.com"):
        region = host.split(".")[1]
    path = [p for p in parts.path.split("/") if p]
    account, name = (path[0], path[1]) if len(path) >= 2 else ("*", path[-1] if path else "*")
    return f"arn:aws:sqs:{region or '*'}:{account}:{name}"


def describe(e: BaseException) -> str:
    """A short cause for a failed queue call (the error code when the service gave one)."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = err.get("Code") or ""
        return f"{code}: {err.get('Message') or code}" if code else str(e)
    return f"{type(e).__name__}: {e}"


class EventConsumer:
    """Long-polls the queue in its own thread until `stop` is set.

    `apply(change)` records one change durably (the ledger) or raises; a message is deleted only
    when every change in it was applied. `after()`, run after each receive, does what waited for
    a busy path and returns how much still waits. `error` tells the daemon how the queue is
    doing, for /healthz, `status` and the logs."""

    def __init__(self, queue_url: str, apply: Callable[[Change], None], stop: threading.Event, *,
                 region: str = "", profile: str = "", client: Any = None,
                 on_exit: Callable[[], None] | None = None, after: Callable[[], int] | None = None) -> None:
        self.queue_url = queue_url
        self.apply = apply
        self.after = after
        self.waiting = 0  # what `after` said still waits
        self.stop = stop
        self.on_exit = on_exit  # run by the consumer's thread when it ends (its ledger connection)
        self.client = client if client is not None else queue_client(queue_url, region, profile)
        self.causes = CauseLog(log)
        self.error: str | None = None  # the current failure, None while the queue works
        self.error_since: float | None = None
        self.received = 0
        self.applied = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # a daemon thread: a long poll in progress must not hold up a stop; an unfinished
        # message simply comes back after its visibility timeout
        self._thread = threading.Thread(target=self.run, name="syncd-events", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _run(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            try:
                self.poll_once(WAIT_BUSY if self.waiting else WAIT_SECONDS)
            except Exception as e:  # noqa: BLE001 - the consumer must outlive any queue failure
                attempt += 1
                self._failed(describe(e))
                self.stop.wait(backoff(attempt))
                continue
            if attempt:
                log.info("events queue %s works again", self.queue_url)
                self.causes.clear()
            attempt = 0
            self.error = self.error_since = None

    def _failed(self, cause: str) -> None:
        if self.error_since is None:
            self.error_since = time.time()
        self.error = cause
        self.causes.report(f"events queue failing: {cause}; the periodic listing still converges",
                           self.queue_url, logging.ERROR)

    def poll_once(self, wait: int = WAIT_SECONDS) -> int:
        """One receive; returns how many messages were handled (and deleted)."""
        resp = self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=BATCH,
                                           WaitTimeSeconds=wait)
        messages = resp.get("Messages") or []
        self.received += len(messages)
        done = []
        for m in messages:
            if self.stop.is_set():
                break  # not deleted: comes back after the visibility timeout
            try:
                self._handle(m)
            except Exception as e:  # noqa: BLE001 - not deleted: it comes back and is tried again
                self.causes.report(f"could not apply an event: {type(e).__name__}: {e}",
                                   m.get("MessageId", "?"), logging.ERROR)
                continue
            done.append(m)
        self._delete(done)
        if self.after is not None:
            try:
                self.waiting = self.after()
            except Exception as e:  # noqa: BLE001 - the changes stay recorded: tried again next turn
                self.waiting = 1
                self.causes.report(f"could not apply the changes that waited for their paths: "
                                   f"{type(e).__name__}: {e}", self.queue_url, logging.ERROR)
        return len(done)

    def _handle(self, message: dict[str, Any]) -> None:
        try:
            changes = parse_body(message.get("Body", ""))
        except BadMessage as e:
            # nothing can make it readable later: dropped, once said
            self.causes.report(f"ignoring a message that is not an S3 event notification ({e})",
                               message.get("MessageId", "?"))
            return
        for change in changes:
            self.apply(change)  # raises: the message stays and comes back
            self.applied += 1

    def _delete(self, messages: Iterable[dict[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        if entries:
            resp = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            for f in resp.get("Failed") or []:
                # harmless: the message comes back and its change is applied again (idempotent)
                log.debug("events: could not delete a message (%s); it will be seen again", f.get("Code"))

    def probe(self) -> None:
        """For `syncd check`: one receive that hides nothing (visibility 0); raises on failure."""
        self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=0,
                                    VisibilityTimeout=0)


def start(cfg: Config, ledger: Ledger, engine: Engine, stop: threading.Event) -> EventConsumer:
    """The daemon's consumer of `events_queue`: each change goes through the listing's rules for
    one key (`changes.apply_remote_change`, durable in the ledger when it returns), then the
    workers are woken. Own uploads show the etag the ledger already has and cost nothing."""
    from syncd.changes import apply_remote_change, recheck_waiting, watch_for_key

    def apply(change: Change) -> None:
        if change.bucket != cfg.remote.bucket:
            return
        try:
            found = watch_for_key(cfg, change.key)
        except UnsafeKey as e:
            refusals.count(refusals.UNSAFE_KEY)
            engine.causes.report(f"refusing remote key from an event: {e}", change.key, logging.ERROR)
            return
        if found is None:
            return  # another prefix of the bucket
        watch, rel = found
        info = (ObjectInfo(key=change.key, size=change.size, etag=change.etag) if change.created else None)
        kind = apply_remote_change(ledger, cfg, watch, rel, info, seen_at=change.at or time.time(),
                                   remote=engine.remote, guard=engine.guard)
        if kind is not None:
            log.debug("event %s %s: %s", "created" if change.created else "removed", shown(change.key), kind)
            engine.wake.set()

    def after() -> int:
        return recheck_waiting(ledger, cfg, engine.remote, engine.guard, on_queued=engine.wake.set,
                               causes=engine.causes)

    consumer = EventConsumer(cfg.remote.events_queue, apply, stop, region=cfg.remote.region,
                             profile=cfg.remote.profile, on_exit=ledger.close_thread, after=after)
    consumer.start()
    log.info("events queue %s: remote changes arrive as they happen", cfg.remote.events_queue)
    return consumer
