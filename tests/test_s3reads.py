"""A mount's S3 store (`retries=False`) sends its GETs presigned, on the botocore client's own
session (blobstore/s3reads.py): the same bytes and the same named errors as the client's
own requests, connections that stay usable however a read ends, and no signed URL in any
message."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator

import pytest
from conftest import S3Server
from faultproxy import FaultProxy
from test_blobstore import compressible

from blobstore import BlobNotFound, StoreError, StoreUnavailable, open_store
from blobstore.errors import ObjectTooLarge
from blobstore.s3 import S3Store


def _mount_store(url: str, connections: int = 64) -> S3Store:
    store = open_store(url, retries=False)
    assert isinstance(store, S3Store) and store.reads is not None
    if connections != 64:
        store = S3Store(store.bucket, store.prefix, connections, retries=False)
    return store


def test_presigned_reads_are_sigv4(s3_server: S3Server) -> None:
    """SigV2, botocore's default for a presigned S3 URL, is refused by regions since 2014."""
    store = _mount_store(s3_server.url)
    assert store.reads is not None
    url = store.reads.client.generate_presigned_url(
        "get_object", Params={"Bucket": store.bucket, "Key": "blobs/ab/x"})
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "AWSAccessKeyId=" not in url, url


def test_presigned_reads_return_what_the_client_does(s3_server: S3Server) -> None:
    client_store, mine = open_store(s3_server.url), _mount_store(s3_server.url)
    assert isinstance(client_store, S3Store) and client_store.reads is None
    data = compressible(9 << 20)
    client_store.put("packs/text", data)
    client_store.put("blobs/ab/small", b"hello")
    client_store.put("blobs/ab/empty", b"")
    for store in (client_store, mine):
        assert store.get("packs/text") == data
        assert store.get("blobs/ab/small") == b"hello"
        assert store.get("blobs/ab/empty") == b""
        assert b"".join(store.get_pieces("packs/text")) == data
        for offset, length in ((0, 1), (100, 5000), ((4 << 20) - 7, 20), (len(data) - 10, 100),
                               (1, len(data)), (len(data), 10), (len(data) + 5, 10)):
            assert store.get_range("packs/text", offset, length) == data[offset:offset + length]
        assert store.get("blobs/ab/small", 5) == b"hello"
        with pytest.raises(ObjectTooLarge):
            store.get("packs/text", 1 << 20)
        with pytest.raises(BlobNotFound):
            store.get("blobs/ab/missing")
        with pytest.raises(BlobNotFound):
            list(store.get_pieces("blobs/ab/missing"))
        with pytest.raises(BlobNotFound):
            store.get_range("blobs/ab/missing", 0, 10)
    with pytest.raises(StoreError, match="does not exist"):
        _mount_store(s3_server.url.replace("cafs-test-", "cafs-none-")).get("blobs/ab/small")


def test_a_read_stopped_early_leaves_the_connection_usable(s3_server: S3Server) -> None:
    """One connection in the pool: a body left unread must not be read as the next answer."""
    store = _mount_store(s3_server.url, connections=1)
    big, small = os.urandom(3 << 20), b"s" * 100
    store.put("blobs/ab/big", big)
    store.put("blobs/ab/small", small)
    for _ in range(5):
        pieces = store.get_pieces("blobs/ab/big")
        assert next(pieces) == big[: 1 << 20]
        del pieces  # the generator is closed, as a consumer that stops early leaves it
        assert store.get("blobs/ab/small") == small
        with pytest.raises(ObjectTooLarge):
            store.get("blobs/ab/big", 1000)
        assert store.get_range("blobs/ab/big", 5, 10) == big[5:15]
        assert store.get("blobs/ab/small") == small


def test_no_signed_url_reaches_a_message(monkeypatch: pytest.MonkeyPatch,
                                         s3_server: S3Server) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    store = _mount_store(s3_server.url)
    with pytest.raises(StoreUnavailable) as exc:
        store.get("blobs/ab/x")
    message = str(exc.value)
    assert "blobs/ab/x" in message and "EndpointConnectionError" in message, message
    assert "Signature" not in message and "X-Amz" not in message and "?" not in message


class _ShortBodies(http.server.BaseHTTPRequestHandler):
    """Declares 1000 bytes and sends 10, then hangs up."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def short_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShortBodies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_body_cut_short_is_a_failed_read_not_a_short_blob(
    monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, short_server: str
) -> None:
    """A cut is retryable (StoreUnavailable), never bytes a caller would call corrupt."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", short_server)
    store = _mount_store(s3_server.url)
    with pytest.raises(StoreUnavailable, match="ended after 10 of its 1000 bytes"):
        store.get("blobs/ab/x")
    with pytest.raises(StoreUnavailable, match="ended after 10 of its 1000 bytes"):
        list(store.get_pieces("blobs/ab/x"))
    with pytest.raises(ObjectTooLarge):  # refused by its declared length, before reading
        store.get("blobs/ab/x", 5)


def test_a_bucket_that_redirects_presigned_reads_is_read_through_the_client(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket in another region than configured answers a presigned GET with a redirect
    that only botocore's client can follow (it re-signs for the bucket's region): the store
    reads through the client from then on."""
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = _mount_store(s3_server.url)
        store.put("blobs/ab/x", b"payload")
        proxy.fail(301, match=lambda method, path: "X-Amz-Signature=" in path)
        assert store.get("blobs/ab/x") == b"payload"
        assert store.get_range("blobs/ab/x", 1, 3) == b"ayl"
        assert b"".join(store.get_pieces("blobs/ab/x")) == b"payload"
        gets = [(status, "X-Amz-Signature=" in path) for method, path, status in proxy.requests
                if method == "GET"]
        assert gets == [(301, True), (200, False), (206, False), (200, False)], gets
        assert store.reads is None
