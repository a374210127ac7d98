"""What syncd's S3 requests look like on the wire (moto over real HTTP)."""

from __future__ import annotations

import hashlib
import http.client
import os

import pytest


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, str]]]:
    """Every request line and its headers, as sent."""
    sent: list[tuple[str, str, dict[str, str]]] = []
    real_putrequest, real_putheader = http.client.HTTPConnection.putrequest, http.client.HTTPConnection.putheader

    def putrequest(self, method, url, *a, **kw):
        sent.append((method, url, {}))
        return real_putrequest(self, method, url, *a, **kw)

    def putheader(self, header, *values):
        sent[-1][2][header.decode() if isinstance(header, bytes) else header] = b"".join(
            v if isinstance(v, bytes) else str(v).encode() for v in values).decode()
        return real_putheader(self, header, *values)

    monkeypatch.setattr(http.client.HTTPConnection, "putrequest", putrequest)
    monkeypatch.setattr(http.client.HTTPConnection, "putheader", putheader)
    return sent


# botocore's path by name: `wire` sees what http.client sends (botocore's HTTP), and awscrt
# sends no Expect at all; its headers are checked through a recording proxy (test_crt_transfers.py)
@pytest.mark.parametrize("store", ["moto_server+botocore"], indirect=True)
def test_small_puts_skip_expect_continue_large_ones_keep_it_and_types_are_guessed(store, make_env, syncd, wire):
    env = make_env(store, remote={"multipart_threshold_mb": 64})
    env.root.mkdir(parents=True)
    small, large = os.urandom(4096), os.urandom(3 * 1024 * 1024)
    (env.root / "small").write_bytes(small)
    # other bytes: the same content already in the bucket is copied server-side (no body, no checksum)
    (env.root / "photo.jpg").write_bytes(os.urandom(4096))
    (env.root / "large.bin").write_bytes(large)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    puts = {url.rsplit("/", 1)[-1].split("?")[0]: h for method, url, h in wire if method == "PUT"}
    assert set(puts) == {"small", "photo.jpg", "large.bin"}
    assert "Expect" not in puts["small"]
    assert puts["large.bin"].get("Expect") == "100-continue"
    assert puts["large.bin"]["Content-Type"] == "application/octet-stream"
    for name in puts:  # every PUT carries the SHA-256 for the server to verify
        assert puts[name].get("x-amz-checksum-sha256")
    heads = {name: store.client.head_object(Bucket=store.bucket, Key=f"{env.prefix}/{name}") for name in puts}
    assert heads["photo.jpg"]["ContentType"] == "image/jpeg"
    assert "Content-Type" not in puts["small"]  # unknown type: the store's default, as `aws s3 sync`
    got = store.client.get_object(Bucket=store.bucket, Key=f"{env.prefix}/large.bin")["Body"].read()
    assert got == large


def proxy_wire(proxy) -> list[tuple[str, str, dict[str, str]]]:
    """Every request line and its headers (lowercase names) the recording proxy saw: what
    either path (botocore's HTTP, awscrt's) sent."""
    out = []
    for head in proxy.heads:
        line, *rest = head.decode("latin-1").split("\r\n")
        method, url = line.split(" ")[:2]
        out.append((method, url, {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}))
    return out


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_multipart_only_above_the_threshold_and_bodies_hashed_once(store, make_env, syncd):
    from tests.reliability.faultproxy import FaultProxy, Rates
    from tests.reliability.util import port_of

    exact, above = os.urandom(5 * 1024 * 1024), os.urandom(5 * 1024 * 1024 + 1)
    with FaultProxy(port_of(store.endpoint_url), seed=0, rates=Rates(), record=True) as proxy:
        env = make_env(store, remote={"endpoint_url": proxy.url, "multipart_threshold_mb": 5,
                                      "multipart_chunk_mb": 5})
        env.root.mkdir(parents=True)
        (env.root / "exact.bin").write_bytes(exact)
        (env.root / "above.bin").write_bytes(above)
        r = syncd("--config", str(env.config), "resync")
        assert r.code == 0, r.err
        wire = proxy_wire(proxy)
    exact_reqs = [(m, url) for m, url, _ in wire if "exact.bin" in url]
    above_reqs = [(m, url) for m, url, _ in wire if "above.bin" in url]
    assert len(exact_reqs) == 1 and exact_reqs[0][0] == "PUT" and "uploadId" not in exact_reqs[0][1]
    assert any(m == "POST" and "uploads" in url for m, url in above_reqs)  # multipart
    assert sum("partNumber" in url for _, url in above_reqs) == 2
    for _, url, h in wire:
        if ".bin" in url and "partNumber" in url or url.endswith("exact.bin"):
            # the signed SHA-256 checksum header protects the body; the signature does not hash it again
            assert h.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD" and h.get("x-amz-checksum-sha256")
    for name, data in (("exact.bin", exact), ("above.bin", above)):
        assert store.client.get_object(Bucket=store.bucket, Key=f"{env.prefix}/{name}")["Body"].read() == data


@pytest.mark.parametrize("store", ["moto", "moto_server", "moto_server+botocore"], indirect=True)
@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])  # one exact read / chunked reads
def test_restore_refuses_an_object_that_does_not_match_its_sha256(store, make_env, syncd, size):
    env = make_env(store)
    env.root.mkdir(parents=True)
    good = os.urandom(size)
    store.client.put_object(Bucket=store.bucket, Key=f"{env.prefix}/bad.bin", Body=good,
                            Metadata={"syncd-sha256": "0" * 64, "syncd-mtime-ns": "1"})
    store.client.put_object(Bucket=store.bucket, Key=f"{env.prefix}/good.bin", Body=good,
                            Metadata={"syncd-sha256": hashlib.sha256(good).hexdigest(), "syncd-mtime-ns": "1"})
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 1
    assert "does not match its syncd-sha256" in r.out + r.err
    assert (env.root / "good.bin").read_bytes() == good
    assert sorted(p.name for p in env.root.iterdir()) == ["good.bin"]  # no partial or temp file


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_a_small_duplicate_is_a_server_side_copy(store, make_env, syncd, wire):
    """SPEC §4.8: content already remote is copied on the server, whatever its size."""
    env = make_env(store)
    env.root.mkdir(parents=True)
    (env.root / "first.txt").write_bytes(b"same bytes")
    assert syncd("--config", str(env.config), "resync").code == 0
    (env.root / "renamed.txt").write_bytes(b"same bytes")
    wire.clear()
    assert syncd("--config", str(env.config), "resync").code == 0
    puts = [h for method, url, h in wire if method == "PUT" and url.split("?")[0].endswith("renamed.txt")]
    assert len(puts) == 1 and "x-amz-copy-source" in {k.lower() for k in puts[0]}
    assert store.read(f"{env.prefix}/renamed.txt") == b"same bytes"


@pytest.mark.parametrize("store", ["moto_server", "moto_server+botocore"], indirect=True)
def test_a_failed_part_is_sent_again_alone_not_the_whole_file(store, make_env, syncd, wire, monkeypatch):
    """One lost part of a large file costs that part, not a new multipart upload of the file."""
    import botocore.endpoint
    import botocore.exceptions

    real_send = botocore.endpoint.Endpoint._send
    failed: list[str] = []

    def send(self, request):
        if "partNumber=2" in request.url and not failed:
            failed.append(request.url)
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)
        return real_send(self, request)

    monkeypatch.setattr(botocore.endpoint.Endpoint, "_send", send)
    env = make_env(store, remote={"multipart_threshold_mb": 5, "multipart_chunk_mb": 5})
    env.root.mkdir(parents=True)
    big = os.urandom(11 * 1024 * 1024)
    (env.root / "big.bin").write_bytes(big)
    r = syncd("--config", str(env.config), "resync")
    assert r.code == 0, r.err
    assert failed, "the fault was not injected"
    starts = [url for m, url, _ in wire if m == "POST" and url.endswith("?uploads")]
    assert len(starts) == 1, starts
    assert store.client.get_object(Bucket=store.bucket, Key=f"{env.prefix}/big.bin")["Body"].read() == big
