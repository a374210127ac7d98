"""`[remote] transfers = "crt"`: PUTs and GETs through awscrt (syncd/remote/s3_crt.py) keep every
guarantee of the botocore path: the same headers on the wire (the SHA-256 the server verifies,
the metadata, type, storage class, SSE), the same error kinds, a changed file refused; objects
syncd did not write, multipart uploads and versions still go through botocore.

The contract tests run against this path too: it is the default (`"auto"`) of the `store`
fixture's HTTP stores, moto_server and s3rver (tests/conftest.py; "+botocore" names the other). A request awscrt sends never passes through botocore, so what
it sent is seen through a recording proxy (tests/reliability/faultproxy.py).
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.conftest import free_port, wait_for
from tests.reliability.faultproxy import FaultProxy, Rates
from tests.reliability.util import port_of, stop_clean, wait_ready

MIB = 1024 * 1024


@pytest.fixture
def botocore_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(method, url) of every request botocore sends."""
    import botocore.endpoint

    sent: list[tuple[str, str]] = []
    real = botocore.endpoint.Endpoint._send

    def send(self, request):
        sent.append((request.method, request.url))
        return real(self, request)

    monkeypatch.setattr(botocore.endpoint.Endpoint, "_send", send)
    return sent


def _heads(proxy: FaultProxy, method: str, name: str) -> list[dict[str, str]]:
    """The headers (lowercase names) of the requests `method .../name[?...]` the proxy saw."""
    out = []
    for head in proxy.heads or ():
        line, *rest = head.decode("latin-1").split("\r\n")
        target = line.split(" ")[1]
        if line.startswith(method + " ") and target.split("?")[0].endswith("/" + name):
            out.append({k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)})
    return out


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_crt_puts_and_gets_carry_the_botocore_paths_headers_and_never_pass_through_botocore(
        store, make_env, syncd, botocore_sent):
    files = {"small": os.urandom(4096), "photo.jpg": os.urandom(4096),
             "mid.bin": os.urandom(3 * MIB),  # streamed from the file (not read beforehand)
             "big.bin": os.urandom(9 * MIB)}  # above the threshold: multipart, through botocore
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), record=True) as proxy:
        env = make_env(store, remote={"endpoint_url": proxy.url, "transfers": "crt", "storage_class": "STANDARD_IA",
                                      "sse": "AES256", "multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
        env.root.mkdir(parents=True)
        for name, data in files.items():
            (env.root / name).write_bytes(data)
        r = syncd("--config", str(env.config), "resync")
        assert r.code == 0, r.out + r.err
        by_botocore = {url.split("?")[0].rsplit("/", 1)[-1] for method, url in botocore_sent if method == "PUT"}
        assert by_botocore == {"big.bin"}, botocore_sent
        for name in ("small", "photo.jpg", "mid.bin"):
            (h,) = _heads(proxy, "PUT", name)
            sha = hashlib.sha256(files[name]).hexdigest()
            assert h["x-amz-meta-syncd-sha256"] == sha and h["x-amz-meta-syncd-mtime-ns"].isdigit()
            assert h["x-amz-sdk-checksum-algorithm"] == "SHA256" and h["x-amz-checksum-sha256"]
            assert h["x-amz-storage-class"] == "STANDARD_IA" and h["x-amz-server-side-encryption"] == "AES256"
            assert h["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" and h["authorization"].startswith("AWS4-HMAC")
            assert h["content-length"] == str(len(files[name]))
        assert _heads(proxy, "PUT", "photo.jpg")[0]["content-type"] == "image/jpeg"
        assert "content-type" not in _heads(proxy, "PUT", "small")[0]  # the store's default, as botocore
        for name, data in files.items():
            head = store.client.head_object(Bucket=store.bucket, Key=f"{env.prefix}/{name}", ChecksumMode="ENABLED")
            assert head["Metadata"]["syncd-sha256"] == hashlib.sha256(data).hexdigest()
            assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
            assert head.get("ChecksumSHA256")  # the server was given the SHA-256 to verify

        # a restore: syncd's objects of up to 8 MiB come through awscrt, the others through botocore
        store.put_raw(f"{env.prefix}/other.txt", b"written by another tool")
        files["other.txt"] = b"written by another tool"
        for name in files:
            (env.root / name).unlink(missing_ok=True)
        botocore_sent.clear()
        r = syncd("--config", str(env.config), "resync")
        assert r.code == 0 and "restored 5" in r.out, r.out + r.err
    assert {name: (env.root / name).read_bytes() for name in files} == files
    got = {url.split("?")[0].rsplit("/", 1)[-1] for method, url in botocore_sent
           if method == "GET" and f"/{env.prefix}/" in url}
    assert got == {"other.txt", "big.bin"}, botocore_sent  # not syncd's; above 8 MiB
    for name in ("small", "photo.jpg", "mid.bin"):
        (h,) = _heads(proxy, "GET", name)
        assert h["range"] == "bytes=0-8388607" and "awscrt" in h["user-agent"]


def _remote(store, make_env, transfers: str, **remote):
    from syncd.config import load_config
    from syncd.remote.s3 import S3Remote

    env = make_env(store, remote={"transfers": transfers, **remote})
    return S3Remote(load_config(env.config).remote), env


def _failure(fn) -> tuple[str, str]:
    from syncd.remote.base import RemoteError

    with pytest.raises(RemoteError) as info:
        fn()
    return info.value.kind, info.value.code


def _failures(store, make_env, proxy: FaultProxy, transfers: str, src) -> list[tuple[str, str]]:
    """(kind, code) of each failure of a scenario, with `transfers`."""
    import io

    remote, env = _remote(store, make_env, transfers, endpoint_url=proxy.url)
    nobucket, _ = _remote(store, make_env, transfers, endpoint_url=proxy.url, url=f"s3://{store.bucket}-gone/b")
    away, _ = _remote(store, make_env, transfers, endpoint_url=f"http://127.0.0.1:{free_port()}")
    key, st = f"{env.prefix}/f.txt", src.stat()

    def put(size: int = st.st_size) -> None:
        remote.put(key, src, size=size, sha256="0" * 64, mtime_ns=st.st_mtime_ns)

    cases = [_failure(lambda: remote.get(f"{env.prefix}/missing", io.BytesIO())),
             _failure(lambda: nobucket.get(key, io.BytesIO())),
             _failure(lambda: away.get(key, io.BytesIO()))]
    proxy.arm("slowdown", "PUT", b"/f.txt", count=2)  # awscrt tries twice (its least)
    cases.append(_failure(put))
    proxy.disarm()
    put()
    proxy.arm("internal", "GET", b"/f.txt", count=2)
    cases.append(_failure(lambda: remote.get(key, io.BytesIO())))
    proxy.disarm()
    cases.append(_failure(lambda: put(size=st.st_size + 1)))  # shrank meanwhile: never sent whole
    return cases


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_crt_failures_are_the_error_kinds_and_codes_botocore_gives(store, make_env, tmp_path):
    """The ledger decides from the kind (retry, deny, missing): both paths must say the same."""
    src = tmp_path / "f.txt"
    src.write_bytes(b"x" * 100)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates()) as proxy:
        seen = {t: _failures(store, make_env, proxy, t, src) for t in ("botocore", "crt")}
    assert seen["crt"] == seen["botocore"]
    assert [kind for kind, _ in seen["crt"]] == ["not_found", "no_bucket", "unreachable", "transient",
                                                 "transient", "integrity"]


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_a_crt_request_that_gets_no_answer_is_given_up_after_the_read_timeout(store, make_env, monkeypatch):
    import io

    import syncd.remote.s3_crt as s3_crt

    monkeypatch.setattr(s3_crt, "READ_TIMEOUT", 1.0)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), stall_seconds=30,
                    stall_then="hang") as proxy:
        remote, env = _remote(store, make_env, "crt", endpoint_url=proxy.url)
        store.put_raw(f"{env.prefix}/f.txt", b"data")
        proxy.arm("stall", "GET", b"/f.txt")
        assert _failure(lambda: remote.get(f"{env.prefix}/f.txt", io.BytesIO())) == ("transient", "ReadTimeout")


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_through_awscrt_a_worker_has_more_small_requests_in_flight_and_a_connection_for_each(
        store, make_env, monkeypatch):
    """awscrt opens throughput_target_gbps / 0.4 connections at most (25 at its default 10 Gbps):
    fewer than syncd's requests in flight would queue them inside awscrt."""
    import awscrt.s3

    from syncd import lane

    made: list[dict] = []
    real = awscrt.s3.S3Client

    def client(**kw):
        made.append(kw)
        return real(**kw)

    monkeypatch.setattr(awscrt.s3, "S3Client", client)
    boto, _ = _remote(store, make_env, "botocore")
    crt, _ = _remote(store, make_env, "crt")  # S3Remote's default: 8 workers
    assert lane.per_worker(boto) == lane.PER_WORKER
    assert lane.per_worker(crt) == lane.PER_WORKER_CRT > lane.PER_WORKER
    assert crt._transfers() is not None
    assert made[-1]["throughput_target_gbps"] / 0.4 >= 8 * lane.PER_WORKER_CRT
    # botocore's pool has a connection for each too (DELETEs, HEADs, GETs of other tools' objects)
    assert crt.client.meta.config.max_pool_connections >= 8 * lane.PER_WORKER_CRT
    assert boto.client.meta.config.max_pool_connections < 8 * lane.PER_WORKER_CRT


@pytest.mark.parametrize("transfers", ["botocore", "crt"])
def test_a_stop_during_the_start_up_restore_is_clean_and_the_next_start_restores_every_file(tmp_path, moto_server,
                                                                                          transfers):
    """SIGTERM while GETs wait for their answers (held 30 s by the proxy): exit 0 within the stop's
    deadline, whatever awscrt still has in flight, no temp file; nothing is failed (SPEC §4.10)."""
    import signal

    from tests.daemon_util import write_file
    from tests.reliability.util import Rig, local_tree, restore_temps

    with FaultProxy(port_of(moto_server), seed=0, rates=Rates()) as proxy:
        proxy.hold_seconds = 30
        rig = Rig(tmp_path, proxy.url, direct=moto_server, remote={"transfers": transfers})
        for i in range(40):
            write_file(rig.root / f"f{i:02d}.bin", os.urandom(1000))
        expected = local_tree(rig.root)
        d = rig.daemon()
        wait_ready(d)
        rig.wait_settled(timeout=60)
        stop_clean(d)
        for p in rig.root.iterdir():
            p.unlink()
        proxy.arm("hold", "GET", b"/uploads/", count=1000)
        d = rig.daemon()
        try:
            wait_for(lambda: proxy.fired["hold"] >= 4 or not d.alive(), timeout=60, what="restores in flight")
            assert d.alive(), d.log()
            d.signal(signal.SIGTERM)
            code = d.stop(timeout=20)  # SPEC: 10 s; a loaded test machine gets some more
        finally:
            if d.alive():
                d.kill9()
        assert code == 0 and "Traceback" not in d.log(), d.log()
        assert not restore_temps(rig.root)
        assert rig.states().get("failed", 0) == 0, rig.unsettled()
        proxy.disarm()
        d = rig.daemon()
        try:
            wait_ready(d)
        finally:
            stop_clean(d)
    assert local_tree(rig.root) == expected


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
def test_with_checksum_md5_a_crt_put_carries_the_content_md5_the_server_verifies(store, make_env, syncd):
    import base64

    data = os.urandom(5000)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), record=True) as proxy:
        env = make_env(store, remote={"endpoint_url": proxy.url, "transfers": "crt", "checksum": "md5"})
        env.root.mkdir(parents=True)
        (env.root / "a.bin").write_bytes(data)
        r = syncd("--config", str(env.config), "resync")
        assert r.code == 0, r.out + r.err
    (h,) = _heads(proxy, "PUT", "a.bin")
    assert h["content-md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert "x-amz-checksum-sha256" not in h and "awscrt" in h["user-agent"]


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # awscrt's traceback on stderr
def test_without_credentials_a_crt_transfer_fails_as_botocores_does(store, make_env, tmp_path, monkeypatch):
    import io

    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    for transfers in ("botocore", "crt"):
        remote, env = _remote(store, make_env, transfers)
        seen[transfers] = [_failure(lambda r=remote, k=f"{env.prefix}/f.txt": r.get(k, io.BytesIO())),
                           _failure(lambda r=remote, k=f"{env.prefix}/f.txt": r.put(k, src, size=1, sha256="0" * 64,
                                                                                    mtime_ns=1))]
    assert seen["crt"] == seen["botocore"] == [("credentials", "NoCredentialsError")] * 2


@pytest.mark.parametrize("store", ["moto_server"], indirect=True)
@pytest.mark.parametrize("change", ["shrank", "grew"])
def test_a_file_that_changes_while_awscrt_reads_it_is_refused_without_a_traceback(store, make_env, tmp_path, capfd,
                                                                                  change):
    """awscrt prints any exception its body stream raises (a traceback and "Treating Python
    exception as error" on stderr: the daemon's log) before it fails the request; a file
    rewritten while sent is an ordinary event, refused like botocore's (integrity) and quiet."""
    remote, env = _remote(store, make_env, "crt")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(2 * MIB))  # streamed from the file (not read into memory first)
    st = src.stat()
    size = st.st_size + 1 if change == "shrank" else st.st_size - 1  # what was hashed vs. what is there now
    key = f"{env.prefix}/f.bin"
    capfd.readouterr()
    assert _failure(lambda: remote.put(key, src, size=size, sha256="0" * 64, mtime_ns=st.st_mtime_ns)) == (
        "integrity", "FileChanged")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Treating Python exception" not in err, err
    assert key not in store.object_keys()
