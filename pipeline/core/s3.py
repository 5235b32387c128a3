"""The object-store side of ``pipeline.core.storage``: the s3fs filesystem it builds (explicit timeouts, no silent
retries) and the reading of failures from the S3 client stack into the kinds of ``StorageError`` (missing bucket,
missing object, denied, unreachable, other).
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _is_connection_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
            "ConnectionError",
            "TimeoutError",
            "FSTimeoutError",
        }
    ) or isinstance(exc, (socket.timeout, ConnectionError))


def raised_by_storage(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the storage (I/O, the S3 client stack) rather than of a caller's code."""
    if isinstance(exc, OSError):
        return True
    return any(
        c.__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")
        for c in type(exc).__mro__
    )


# S3 error codes (botocore ClientError.response["Error"]["Code"]) by the StorageError kind they mean. s3fs
# turns a ClientError into FileNotFoundError / PermissionError / OSError and chains the original to it.
_NO_BUCKET_CODES = {"NoSuchBucket"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "AllAccessDisabled",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of the first botocore ClientError in ``exc``'s chain; "" when there is none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code") or "")
        e = e.__cause__ or e.__context__
    return ""


def is_no_bucket(e: BaseException) -> bool:
    return _s3_code(e) in _NO_BUCKET_CODES


def error_kind(e: BaseException) -> str:
    """The StorageError kind of an exception from fsspec/s3fs/botocore, by its type and S3 error code."""
    if {c.__name__ for c in type(e).__mro__} & _NO_CREDENTIALS:
        return "no_credentials"
    code = _s3_code(e)
    if code in _NO_BUCKET_CODES:
        return "no_bucket"
    if code in _DENIED_CODES or isinstance(e, PermissionError):
        return "permission"
    if code in _NOT_FOUND_CODES or isinstance(e, FileNotFoundError):
        return "not_found"
    if _is_connection_error(e):
        return "unreachable"
    return "other"


_SESSIONS: dict[str, Any] = {}  # AWS profile -> its aiobotocore session (one per profile keeps s3fs's cache)


def _no_expect_continue(request: Any, **_: Any) -> None:
    # botocore asks for "Expect: 100-continue" on PUTs, and aiohttp waits for the 100 with no timeout at all: a
    # paused server would hang an upload forever instead of failing it at the read timeout. Expect is unsigned.
    request.headers.pop("Expect", None)


def _s3_session(profile: str) -> Any:
    """The aiobotocore session for ``profile`` ("" = the environment's), with the handler above."""
    if profile not in _SESSIONS:
        from aiobotocore.session import AioSession  # heavy, and only an s3:// store needs it

        session = AioSession(profile=profile or None)
        session.register("before-send.s3", _no_expect_continue)
        _SESSIONS[profile] = session
    return _SESSIONS[profile]


def s3_filesystem(
    *, endpoint_url: str, region: str, profile: str, connect_timeout_s: float, read_timeout_s: float
) -> Any:
    """The s3fs filesystem of a ``Storage`` on ``s3://``: never a cached listing, every request cut at the given
    timeouts, and one attempt per call (``Storage`` retries transient failures itself, with a log line)."""
    import s3fs  # heavy, and only an s3:// store needs it

    client_kwargs: dict[str, Any] = {}
    if region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = region or os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint_url or None,
        "client_kwargs": client_kwargs,
        # Other processes write the same prefixes (other ranks, the commit): never trust a cached listing.
        "use_listings_cache": False,
        # A dead or paused endpoint fails the request at these timeouts. One attempt only: botocore's own
        # retries (and s3fs's, below) would multiply a hang silently; ``Storage`` retries with a log line.
        "config_kwargs": {
            "connect_timeout": connect_timeout_s,
            "read_timeout": read_timeout_s,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        },
        "session": _s3_session(profile),
    }
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = 1  # s3fs retries timeouts 5 times by default, without a word
    return fs
