"""S3 event notifications through SQS (SPEC §2 `events_queue`): messages become changes, and a
message is deleted only once its changes are applied."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from syncd.events import BadMessage, Change, EventConsumer, parse_body, queue_arn
from tests.conftest import sns_fanout, wait_for


def s3_event(name: str, key: str, bucket: str = "bkt", etag: str = "abc") -> dict[str, Any]:
    return {"Records": [{"eventSource": "aws:s3", "eventName": name,
                         "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 5, "eTag": etag}}}]}


def test_raw_and_sns_wrapped_notifications_give_the_same_changes() -> None:
    raw = json.dumps(s3_event("ObjectCreated:Put", "up/a+b%2Bc%20d.txt"))
    wrapped = json.dumps({"Type": "Notification", "Message": raw, "MessageId": "m1"})
    want = [Change(bucket="bkt", key="up/a b+c d.txt", created=True, size=5, etag="abc")]
    assert parse_body(raw) == want
    assert parse_body(wrapped) == want


def test_removals_test_events_and_other_events() -> None:
    assert parse_body(json.dumps(s3_event("ObjectRemoved:DeleteMarkerCreated", "k")))[0].created is False
    assert parse_body(json.dumps(s3_event("LifecycleExpiration:Delete", "k")))[0].created is False
    assert parse_body(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"})) == []
    assert parse_body(json.dumps(s3_event("ObjectRestore:Completed", "k"))) == []
    for junk in ("not json", "[]", json.dumps({"Records": [{"s3": {}}]}), json.dumps({"x": 1})):
        with pytest.raises(BadMessage):
            parse_body(junk)


def test_queue_arn_for_the_iam_policy() -> None:
    assert queue_arn("https://sqs.eu-west-1.amazonaws.com/123456789012/syncd-a") == \
        "arn:aws:sqs:eu-west-1:123456789012:syncd-a"


@pytest.fixture
def fanout(moto_server: str) -> dict[str, Any]:
    """A bucket whose notifications go to an SNS topic with two queues subscribed (one per host)."""
    s3, sqs, bucket, queues = sns_fanout(moto_server, visibility=1)
    return {"s3": s3, "sqs": sqs, "bucket": bucket, "queues": queues}


def test_every_host_queue_gets_the_change_and_deletes_it_once_applied(fanout: dict[str, Any]) -> None:
    stop = threading.Event()
    seen: dict[str, list[Change]] = {"a": [], "b": []}
    consumers = [EventConsumer(q, seen[h].append, stop, region="us-east-1")
                 for h, q in zip(("a", "b"), fanout["queues"], strict=True)]
    fanout["s3"].put_object(Bucket=fanout["bucket"], Key="up/photo 1.jpg", Body=b"hello")
    fanout["s3"].delete_object(Bucket=fanout["bucket"], Key="up/photo 1.jpg")
    for c in consumers:
        wait_for(lambda c=c: c.poll_once(wait=1) >= 0 and len(seen["a" if c is consumers[0] else "b"]) >= 2,
                 30, what="both changes")
    for host in ("a", "b"):
        assert [(ch.key, ch.created) for ch in seen[host]] == [("up/photo 1.jpg", True), ("up/photo 1.jpg", False)]
    # deleted: nothing comes back after the visibility timeout
    for q in fanout["queues"]:
        wait_for(lambda q=q: fanout["sqs"].get_queue_attributes(
            QueueUrl=q, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"] == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"},
                 10, what="the queue to be empty")


def test_a_change_that_cannot_be_applied_keeps_its_message(fanout: dict[str, Any]) -> None:
    stop = threading.Event()
    attempts: list[Change] = []

    def flaky(change: Change) -> None:
        attempts.append(change)
        if len(attempts) == 1:
            raise OSError("ledger disk full")  # not durable: the message must come back

    consumer = EventConsumer(fanout["queues"][0], flaky, stop, region="us-east-1")
    fanout["s3"].put_object(Bucket=fanout["bucket"], Key="up/x", Body=b"x")
    wait_for(lambda: consumer.poll_once(wait=1) >= 0 and len(attempts) >= 2, 30,
             what="the message to come back after the visibility timeout")
    assert [c.key for c in attempts[:2]] == ["up/x", "up/x"]


def test_a_missing_queue_is_reported_and_the_consumer_keeps_trying(moto_server: str) -> None:
    stop = threading.Event()
    consumer = EventConsumer(f"{moto_server}/123456789012/no-such-queue", lambda c: None, stop,
                             region="us-east-1")
    consumer.start()
    try:
        wait_for(lambda: consumer.error is not None, 30, what="the failure to be reported")
        assert "NonExistentQueue" in consumer.error or "QueueDoesNotExist" in consumer.error, consumer.error
        assert consumer.alive()
    finally:
        stop.set()
        consumer.join(5)


def events_config(tmp_path, endpoint: str, bucket: str, queue: str):
    from tests.conftest import write_config

    return write_config(tmp_path / "syncd.toml",
                        remote={"url": f"s3://{bucket}/backups", "endpoint_url": endpoint, "region": "us-east-1",
                                "events_queue": queue},
                        watches=[{"path": str(tmp_path / "uploads"), "prefix": "uploads", "mode": "shared"}],
                        syncd={"ledger": str(tmp_path / "ledger.db"), "health_listen": ""})


def test_iam_policy_and_check_cover_the_queue(tmp_path, syncd, moto_server: str, fanout: dict[str, Any]) -> None:
    cfg = events_config(tmp_path, moto_server, fanout["bucket"],
                        "https://sqs.us-east-1.amazonaws.com/123456789012/syncd-a")
    r = syncd("--config", str(cfg), "iam-policy")
    events = [s for s in json.loads(r.out)["Statement"] if s.get("Sid") == "SyncdEvents"]
    assert events == [{"Sid": "SyncdEvents", "Effect": "Allow", "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"],
                       "Resource": "arn:aws:sqs:us-east-1:123456789012:syncd-a"}]

    ok = syncd("--config", str(events_config(tmp_path, moto_server, fanout["bucket"], fanout["queues"][0])), "check")
    assert ok.code == 0, ok.out + ok.err
    assert "events  ok" in ok.out
    missing = f"{moto_server}/123456789012/no-such-queue"
    bad = syncd("--config", str(events_config(tmp_path, moto_server, fanout["bucket"], missing)), "check")
    assert bad.code == 3, bad.out + bad.err
    assert "events  failed (" in bad.out
