"""Shared fixtures: fake AWS credentials, moto in-process and moto's server over HTTP, configs,
and an in-process CLI runner.

No test needs the internet or real AWS credentials: every S3 endpoint is moto, started here.
"""

from __future__ import annotations

import os

# Before boto3/moto are imported anywhere: fake credentials, no user config, no IMDS lookups.
# Distinctive fake credentials: the session ends with a grep proving no log or output shows them.
FAKE_KEY_ID = "AKIASYNCDFAKEKEY0001"
FAKE_SECRET = "syncdFakeSecret/DoNotLog+0123456789abcdef"
os.environ.update(
    AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
    AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
    AWS_SESSION_TOKEN="syncdFakeSessionToken",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    AWS_EC2_METADATA_DISABLED="true",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("SYNCD_CONFIG", None)

import itertools  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402

_bucket_ids = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="longer, larger reliability runs that also write tests/reliability/last-run.md "
                          "and the README figures (or SYNCD_SOAK=1)")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server mode on a free 127.0.0.1 port, for the whole session: its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the in-process server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3RVER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # the only key it takes


def _install_s3rver() -> Path:
    """s3rver from the npm registry into a cache directory (once); skip when that cannot work.
    The installer is bench's (the benchmark's `--server s3rver` uses the same copy)."""
    from bench.s3server import install_s3rver

    try:
        return install_s3rver()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """s3rver (Node), a second, independent S3 implementation, on a free port: its endpoint URL.

    Only the access key S3RVER/S3RVER works there: tests pass it in the environment of the syncd
    run only (see `store`). `--openssl-legacy-provider`: without it, listings over 1000 keys
    fail (PITFALLS §8).
    """
    from bench.s3server import start_s3rver

    script = _install_s3rver()
    data = tmp_path_factory.mktemp("s3rver")
    log = open(data.parent / "s3rver-server.txt", "w")  # noqa: SIM115 - closed at teardown
    try:
        proc, port = start_s3rver(script, data, buckets=("syncd-s3rver",), stderr=log)
    except RuntimeError as e:
        pytest.skip(str(e))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    log.close()


@dataclass
class Store:
    """One remote under test: the config bits that reach it and a way to look inside."""

    kind: str  # "file" | "moto" | "moto_server" | "s3rver"
    url: str
    transfers: str = ""  # [remote] transfers (make_env); "": syncd's default ("auto": crt), "botocore" for moto
    endpoint_url: str = ""
    bucket: str = ""
    root: Path | None = None
    client: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def object_keys(self) -> list[str]:
        if self.kind == "file":
            assert self.root is not None
            if not self.root.exists():
                return []
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                          if p.is_file() and not p.relative_to(self.root).as_posix().startswith(".syncd-meta"))
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            out += [o["Key"] for o in page.get("Contents", ())]
        return sorted(out)

    def read(self, key: str) -> bytes:
        if self.kind == "file":
            assert self.root is not None
            return (self.root / key).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put_raw(self, key: str, data: bytes) -> None:
        """Write an object the way another tool would (no syncd metadata)."""
        if self.kind == "file":
            assert self.root is not None
            p = self.root.joinpath(*key.split("/"))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_hostile(self, key: str, data: bytes) -> None:
        """Objects whose keys no well-behaved tool would write (only possible on S3)."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)


def _new_bucket(client: Any) -> str:
    # random part: this module is imported twice (as `conftest` and as `tests.conftest`), so the
    # counter alone gave two tests the same bucket on a shared server (moto's, s3rver)
    name = f"syncd-test-{os.getpid()}-{next(_bucket_ids)}-{os.urandom(3).hex()}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "moto", "moto_server", "s3rver"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """Each scenario runs against a file:// remote, moto in-process, moto over HTTP and s3rver.
    The HTTP stores (moto_server, s3rver) take syncd's default (`transfers = "auto"`: awscrt for
    the small PUTs and GETs); moto in-process takes botocore (`transfers = "botocore"`): awscrt
    sends its own HTTP, which moto's mock of botocore never sees. "moto_server+botocore" and
    "s3rver+botocore" (asked for by name: the suite's time) send the transfers through botocore
    over HTTP too; "+crt" and "+auto" name the other settings."""
    kind, _, transfers = request.param.partition("+")
    for s in _stores(request, kind, tmp_path, monkeypatch):
        s.transfers = transfers or s.transfers
        yield s


def _stores(request: pytest.FixtureRequest, kind: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if kind == "s3rver":
        endpoint = request.getfixturevalue("s3rver")
        client = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="S3RVER",
                              aws_secret_access_key="S3RVER", aws_session_token=None)
        bucket = _new_bucket(client)
        for k, v in S3RVER_CREDENTIALS.items():  # for the syncd runs of this test (in-process)
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        yield Store(kind="s3rver", url=f"s3://{bucket}/backups", endpoint_url=endpoint, bucket=bucket,
                    client=client)
        return
    if kind == "file":
        root = tmp_path / "remote"
        yield Store(kind="file", url=f"file://{root}", root=root)
    elif kind == "moto":
        from moto import mock_aws

        with mock_aws():
            client = boto3.client("s3", region_name="us-east-1")
            bucket = _new_bucket(client)
            yield Store(kind="moto", url=f"s3://{bucket}/backups", transfers="botocore", bucket=bucket,
                        client=client)
    else:
        endpoint = request.getfixturevalue("moto_server")
        client = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint)
        bucket = _new_bucket(client)
        yield Store(kind="moto_server", url=f"s3://{bucket}/backups", endpoint_url=endpoint, bucket=bucket,
                    client=client)


def write_config(path: Path, *, remote: dict[str, Any], watches: list[dict[str, Any]],
                 syncd: dict[str, Any] | None = None) -> Path:
    """Write a TOML config (a tiny writer: strings, numbers, bools and lists of strings)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["[syncd]"] + [f"{k} = {val(v)}" for k, v in (syncd or {}).items()]
    lines += ["", "[remote]"] + [f"{k} = {val(v)}" for k, v in remote.items()]
    for w in watches:
        lines += ["", "[[watch]]"] + [f"{k} = {val(v)}" for k, v in w.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Env:
    """A ready-to-run syncd setup in tmp_path: one watch ("uploads") and a config file."""

    tmp: Path
    store: Store
    config: Path
    root: Path
    ledger: Path

    @property
    def prefix(self) -> str:
        return "backups/uploads" if self.store.kind != "file" else "uploads"


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., Env]:
    def make(store: Store, *, watch: dict[str, Any] | None = None, syncd: dict[str, Any] | None = None,
             remote: dict[str, Any] | None = None) -> Env:
        root = tmp_path / "uploads"
        remote_cfg: dict[str, Any] = {"url": store.url}
        if store.endpoint_url:
            remote_cfg["endpoint_url"] = store.endpoint_url
        # moto in-process sees only botocore's requests, whoever made the Store (tests/ops/test_hygiene.py)
        transfers = store.transfers or ("botocore" if store.kind == "moto" else "")
        if transfers:
            remote_cfg["transfers"] = transfers
        remote_cfg.update(remote or {})
        w = {"path": str(root), "prefix": "uploads"}
        w.update(watch or {})
        s = {"ledger": str(tmp_path / "state" / "ledger.db"), "settle_seconds": 0, "workers": 4,
             "health_listen": ""}
        s.update(syncd or {})
        cfg = write_config(tmp_path / "syncd.toml", remote=remote_cfg, watches=[w], syncd=s)
        return Env(tmp=tmp_path, store=store, config=cfg, root=root, ledger=Path(s["ledger"]))

    return make


def free_port() -> int:
    """A port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


_outputs: list[str] = []  # every in-process CLI output of the session, for the credentials grep


@pytest.fixture(scope="session", autouse=True)
def _no_credentials_in_any_output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: neither fake key appears in any CLI output or daemon log."""
    yield
    base = tmp_path_factory.getbasetemp()
    texts = list(_outputs) + [p.read_text(errors="replace") for p in base.rglob("*.log")]
    leaks = [t for t in texts if FAKE_KEY_ID in t or FAKE_SECRET in t]
    assert not leaks, f"credentials found in output: {leaks[0][:500]}"


@pytest.fixture
def syncd(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run the CLI in-process (so moto's in-process mock applies) and capture its output."""
    from syncd.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            # the CLI's log handler writes to this test's captured stderr, closed after it: a
            # later test logging at debug would print "--- Logging error ---" into its own
            root = logging.getLogger()
            for h in [h for h in root.handlers if getattr(h, "_syncd", False)]:
                root.removeHandler(h)
        captured = capsys.readouterr()
        _outputs.append(captured.out + captured.err)
        return Result(code, captured.out, captured.err)

    return run


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until `cond()` is truthy; fail with `what` after `timeout` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves syncd threads running (every long-lived thread has a stop)."""
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t.name.startswith("syncd-") and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    raise AssertionError(f"leaked threads: {[t.name for t in leaked]}")


def sns_fanout(endpoint: str, hosts: int = 2, visibility: int = 5) -> tuple[Any, Any, str, list[str]]:
    """A new bucket on moto's server whose S3 notifications go to an SNS topic with one SQS queue
    per host subscribed (README "Several hosts"): (s3 client, sqs client, bucket, queue URLs)."""
    import uuid

    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    sns = boto3.client("sns", endpoint_url=endpoint, region_name="us-east-1")
    name = f"ev-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    topic = sns.create_topic(Name=name)["TopicArn"]
    queues = []
    for i in range(hosts):
        url = sqs.create_queue(QueueName=f"{name}-{i}",
                               Attributes={"VisibilityTimeout": str(visibility)})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
        queues.append(url)
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={"TopicConfigurations": [
        {"TopicArn": topic, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    return s3, sqs, name, queues


@pytest.fixture
def moto_computes_crc32c(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto 5.2.5 computes CRC32C as a plain CRC32 unless the optional `crc32c` package is there
    (its docs say so): give it awscrt's, so its CRC32C objects carry the value AWS would store.
    Both moto modes run in this process (moto_server is a ThreadedMotoServer)."""
    import base64

    import moto.s3.models as models
    from awscrt import checksums

    real = models.compute_checksum

    def compute(body: bytes, algorithm: str, encode_base64: bool = True) -> bytes:
        if algorithm != "CRC32C":
            return real(body, algorithm, encode_base64)
        raw = checksums.crc32c(body).to_bytes(4, "big")
        return base64.b64encode(raw) if encode_base64 else raw

    monkeypatch.setattr(models, "compute_checksum", compute)
