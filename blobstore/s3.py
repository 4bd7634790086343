"""s3://bucket/prefix store through boto3, with the standard AWS configuration.

`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), profiles, and the credential chain select any
S3-compatible service; botocore refreshes expiring credentials on its own. Temporary failures
are retried with backoff by botocore (`RETRIES` more tries), and what remains is raised as
StoreUnavailable; a store opened with `retries=False` tries each request once, for a caller
that is itself the retry layer (a mount's reads: cafs/daemon/fetcher.py), so one read never waits
out two nested schedules. Such a store also sends its GETs presigned (`blobstore/s3reads.py`):
under half of botocore's CPU per request.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig

from blobstore.base import ObjectInfo, check_key
from blobstore.errors import BlobNotFound, StoreError, StoreUnavailable, too_large
from blobstore.s3reads import PresignedReads, ReadFailed, Redirected, pieces, read_body

log = logging.getLogger(__name__)
MULTIPART_THRESHOLD = 64 << 20
PIECE = 1 << 20  # bytes read at a time from a streamed body
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
RETRIES = 5  # botocore's retries of one request after its first try (standard mode)


def _client_config(max_connections: int, retries: bool = True) -> botocore.config.Config:
    return botocore.config.Config(
        retries={"total_max_attempts": 1 + RETRIES if retries else 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=max_connections,
        # Every blob is verified against its BLAKE3 key where it is read: the CRC32 botocore
        # computes over every body by default (since 1.36) only costs CPU on the read path.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Presigned URLs (a mount's reads) default to SigV2 for S3, which regions since
        # 2014 and many S3-compatible stores refuse; the client's own requests use SigV4.
        signature_version="s3v4",
    )


_loader: Any = None


def new_session() -> boto3.session.Session:
    """A session whose credentials and settings come from this process's environment now,
    sharing the parsed service models: parsing S3's takes 0.15 to 0.3 s per process, which
    is what a mount daemon forked from a warmed mount server saves (measured: building a
    client falls to ~30 ms)."""
    global _loader
    if _loader is None:
        _loader = botocore.loaders.create_loader()
    core = botocore.session.Session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def warm() -> None:
    """Parse the S3 service model now, making no request and resolving no credentials."""
    new_session().client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                         aws_access_key_id="warm", aws_secret_access_key="warm")


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", max_connections: int = 64,
                 retries: bool = True) -> None:
        if not bucket:
            raise StoreError("s3 store URL needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._max_connections = max_connections
        self.retries = retries
        self._lock = threading.Lock()
        self._client: Any = None
        self._reads: PresignedReads | None = None
        self._presign = not retries  # a caller that retries by itself reads presigned

    @property
    def client(self) -> Any:
        # boto3 clients are thread-safe once built, but building one is not.
        if self._client is None:
            with self._lock:
                if self._client is None:
                    session = new_session()
                    self._client = session.client(
                        "s3",
                        region_name=session.region_name or "us-east-1",
                        config=_client_config(self._max_connections, self.retries),
                    )
        return self._client

    @property
    def reads(self) -> PresignedReads | None:
        """The presigned GETs of a store whose caller retries (None: botocore's client)."""
        if not self._presign:
            return None
        if self._reads is None:
            self._reads = PresignedReads(self.client, self.bucket)
        return self._reads

    def connect(self) -> None:
        """Build the client now (botocore's set-up, ~40 ms of CPU), so that a daemon's first
        read does not pay it after the mount is ready."""
        assert self.client is not None

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, key: str, exc: Exception) -> StoreError:
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in _NOT_FOUND or status == 404:
                if code == "NoSuchBucket":
                    return StoreError(f"{self.url}: bucket {self.bucket!r} does not exist")
                return BlobNotFound(key)
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                return StoreUnavailable(f"{self.url}: {key}: {code} (HTTP {status})")
            return StoreError(f"{self.url}: {key}: {code} (HTTP {status})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreError(f"{self.url}: no AWS credentials found")
        if isinstance(exc, ReadFailed):  # its message names no URL: it would hold a signature
            return StoreUnavailable(f"{self.url}: {key}: {exc}")
        return StoreUnavailable(f"{self.url}: {key}: {type(exc).__name__}: {exc}")

    def _presigned(self, key: str, byte_range: str | None = None) -> Any | None:
        """The streaming answer of a presigned GET; None where this store reads through the
        client: opened with retries, or its bucket redirected a presigned read (then for
        good: botocore's client follows the redirect and remembers the bucket's region)."""
        reads = self.reads
        if reads is None:
            return None
        try:
            return reads.open(self._key(key), byte_range)
        except Redirected as exc:
            log.info("%s: reads go through botocore's client: the bucket redirected a "
                     "presigned GET (%s)", self.url, exc)
            self._presign = False
            return None

    def get(self, key: str, limit: int | None = None) -> bytes:
        try:
            size, data = self._get(key, limit)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                ReadFailed) as exc:
            raise self._fail(key, exc) from None
        if limit is not None and max(size, len(data)) > limit:
            raise too_large(key, max(size, len(data)), limit)
        return data

    def _get(self, key: str, limit: int | None) -> tuple[int, bytes]:
        """(the declared size, the bytes): none read where the size is over `limit`, else
        at most one past it."""
        most = None if limit is None else limit + 1
        raw = self._presigned(key)
        if raw is not None:
            size = int(raw.headers.get("Content-Length") or 0)
            return size, read_body(raw, 0 if limit is not None and size > limit else most)
        resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        size, body = int(resp.get("ContentLength") or 0), resp["Body"]
        if limit is not None and size > limit:
            body.close()
            return size, b""
        return size, bytes(body.read(most))

    def get_pieces(self, key: str) -> Iterator[bytes]:
        """The object's bytes in pieces of up to 1 MiB, as they arrive: a large blob goes
        to its cache file a piece at a time (hashed while written), never whole in memory
        (a fresh 4 MiB buffer per GET costs its page faults and a pass over cold memory).
        Store errors, mid-body ones included, raise as `get`'s do."""
        try:
            raw = self._presigned(key)
            if raw is not None:
                yield from pieces(raw, PIECE)
                return
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            while piece := body.read(PIECE):
                yield piece
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                ReadFailed) as exc:
            raise self._fail(key, exc) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        rng = f"bytes={offset}-{offset + length - 1}"
        try:
            raw = self._presigned(key, rng)
            if raw is not None:
                return read_body(raw, length)
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=rng)
            return bytes(resp["Body"].read())
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise self._fail(key, exc) from None
        except (botocore.exceptions.BotoCoreError, ReadFailed) as exc:
            raise self._fail(key, exc) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            if len(data) >= MULTIPART_THRESHOLD:
                cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, max_concurrency=8)
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._key(key), Config=cfg
                )
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(key, exc) from None
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StoreUnavailable(f"{self.url}: {key}: {exc}") from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            err = self._fail(key, exc)
            if isinstance(err, BlobNotFound):
                return False
            raise err from None

    def list(self, prefix: str) -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2")
        try:
            for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix) :], int(obj["Size"]),
                                     obj["LastModified"].timestamp())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(prefix, exc) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._fail(key, exc) from None
