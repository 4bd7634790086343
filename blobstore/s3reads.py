"""A mount's GETs: presigned by botocore, sent on the botocore client's own HTTP session.

Why: botocore's client machinery (event hooks, parameter validation, response parsing)
costs ~3 ms of CPU per request on a 2-core VM, against ~1.3 ms for the same GET presigned
(`generate_presigned_url`: the client's credentials, region, endpoint and addressing rules)
and sent on the client's own session (its proxies, TLS verification, timeouts and pool).
A mount reads weights as 4 MiB chunks, 256 requests per GiB: on loopback SeaweedFS the
fetch-verify-cache path alone fell from 2.1-3.5 to 1.5-2.5 CPU-s per GiB, the daemon's in
the `model` scenario from 3.0-3.1 to 2.5-3.0 (docs/BENCHMARKS.md).

No retries here: only a store opened with `retries=False` reads this way, and its caller
(cafs/daemon/fetcher.py) is the retry layer. Messages never carry the URL: it holds a
signature, valid for minutes, that must not reach a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import botocore.awsrequest
import botocore.exceptions
import urllib3.exceptions

EXPIRES_SECONDS = 300  # a presigned URL is used at once; this only bounds a leaked one
PIECE = 1 << 20  # bytes read at a time
ERROR_BODY = 64 << 10  # bytes of an error answer read for its code
_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class Redirected(Exception):
    """The bucket answers from another region or endpoint: botocore's client follows such a
    redirect (re-signing for the bucket's region), a presigned URL cannot."""


REDIRECT_STATUS = (301, 302, 307, 308)
REGION_CODES = ("AuthorizationHeaderMalformed", "AuthorizationQueryParametersError")


class ReadFailed(Exception):
    """The request did not complete (connection, timeout, a body cut short); retryable.
    The message names the failure's kind only, never the URL."""


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "kwargs", {}).get("error")
    return type(exc).__name__ + (f" ({type(inner).__name__})" if inner is not None else "")


class PresignedReads:
    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket
        # botocore keeps the session it sends on behind `_endpoint`; it is the one object
        # holding the client's connection settings, so reusing it keeps boto3's config the
        # single source of them.
        self.http = client._endpoint.http_session

    def open(self, key: str, byte_range: str | None = None) -> Any:
        """The streaming urllib3 response of a GET of `key` (status 200 or 206), to read
        with `pieces` or `read_body`. An error answer raises botocore's ClientError, as
        the client would (its code parsed from the answer), a redirect Redirected; no answer
        raises ReadFailed."""
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=EXPIRES_SECONDS
        )
        headers = {"Range": byte_range} if byte_range else {}
        request = botocore.awsrequest.AWSRequest("GET", url, headers=headers).prepare()
        request.stream_output = True
        try:
            raw = self.http.send(request).raw
        except botocore.exceptions.BotoCoreError as exc:
            raise ReadFailed(_reason(exc)) from None
        if raw.status in (200, 206):
            return raw
        try:
            body = read_body(raw, ERROR_BODY)
        except ReadFailed:
            body = b""
        found = _CODE.search(body)
        code = found.group(1).decode("ascii", "replace") if found else str(raw.status)
        if raw.status in REDIRECT_STATUS or (raw.status == 400 and (
                code in REGION_CODES or "x-amz-bucket-region" in raw.headers)):
            raise Redirected(f"HTTP {raw.status} {code}")
        answer: Any = {"Error": {"Code": code, "Message": ""},
                       "ResponseMetadata": {"HTTPStatusCode": raw.status}}
        raise botocore.exceptions.ClientError(answer, "GetObject")


def read_body(raw: Any, most: int | None = None) -> bytes:
    """A response's body (its first `most` bytes), the connection given back: read in one
    piece where its length is declared (no copy to join pieces)."""
    declared = raw.headers.get("Content-Length")
    size = int(declared) if declared is not None and declared.isdigit() else PIECE
    size = max(1, size if most is None else min(size, most))
    return b"".join(pieces(raw, size, most))


def pieces(raw: Any, size: int, most: int | None = None) -> Iterator[bytes]:
    """A response's body (its first `most` bytes) in pieces of up to `size` bytes, the
    connection given back, also when the consumer stops early. A body shorter than its
    Content-Length raises ReadFailed, as botocore's own check would."""
    declared = raw.headers.get("Content-Length")
    got = 0
    try:
        while most is None or got < most:
            piece = raw.read(size if most is None else min(size, most - got))
            if not piece:
                break
            got += len(piece)
            yield piece
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ReadFailed(_reason(exc)) from None
    finally:
        give_back(raw)
    if declared is not None and declared.isdigit() and got < int(declared) and (
            most is None or got < most):
        raise ReadFailed(f"the body ended after {got} of its {declared} bytes")


def give_back(raw: Any) -> None:
    """Return the connection to the pool: as it is when its body was read to the end, else
    closed first (the unread rest would be read as the next request's answer)."""
    if not raw.closed:
        raw.close()
    raw.release_conn()
