"""One place for storage settings: a URL plus fsspec ``storage_options`` give one filesystem.

Plain paths and ``file://`` are local; ``s3://`` goes through s3fs, which reads the standard AWS
variables (``AWS_ENDPOINT_URL``, keys, profiles, roles) or ``storage_options``
(``--storage-option key=value`` on the CLI). The same filesystem object is what Ray Data, Ray
Train and Tune receive, so an endpoint configured once works everywhere.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import fsspec
from fsspec.core import url_to_fs

from ue_dist.errors import UserError


class StorageError(UserError, RuntimeError):
    """A URL that cannot be used: missing bucket, unreachable endpoint, output inside input."""


# One classifier for storage failures --------------------------------------------------------------
# s3fs turns botocore's ClientError into FileNotFoundError / PermissionError / OSError (with the
# ClientError as __cause__), lets connection errors through raw, and its ``exists`` swallows every
# error on a bare bucket. ``storage_error`` maps all of these to one of the classes below with a
# one-line message naming the URL and, for S3, the bucket, key or endpoint; credentials never
# appear in it.
class StorageNotFoundError(StorageError, FileNotFoundError):
    """A missing bucket, object, prefix or local file; still a ``FileNotFoundError`` for callers."""


class StoragePermissionError(StorageError, PermissionError):
    """Access denied, unknown access key, signature mismatch, expired token, no credentials."""


class StorageUnreachableError(StorageError, ConnectionError):
    """The endpoint cannot be reached: connection refused, name not resolved, connect timeout."""


class StorageTransientError(StorageError):
    """A transient failure (5xx, throttling, connection reset, timeout) that outlived the retries."""


#: Attempts (first try included) for a transient failure in read_bytes / write_bytes / exists / ls;
#: botocore already retries each request (``S3_RETRIES``: 5 attempts), this covers what escapes it.
RETRY_ATTEMPTS = 4
#: Seconds before the first retry; doubled for each further one (0.25, 0.5, 1.0: under 2 s).
RETRY_BACKOFF_S = 0.25

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeoutException", "ServiceUnavailable", "InternalError",
                   "RequestLimitExceeded", "TooManyRequestsException", "BandwidthLimitExceeded",
                   "ProvisionedThroughputExceededException", "503", "500", "502", "504"}
_AUTH_HINTS = {
    "InvalidAccessKeyId": "the access key id is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "TokenRefreshRequired": "the session token must be refreshed",
    "AccessDenied": "the credentials are not allowed this operation",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "AccountProblem": "the account has a problem",
    "InvalidSecurity": "the security credentials are invalid",
    "RequestTimeTooSkewed": "the local clock differs too much from the server's",
    "403": "the credentials are not allowed this operation",
}
#: Names of settings whose values are secrets (storage options, job specs, any nesting).
SECRET_KEY_PATTERN = r"key|secret|token|passw|session|credential|auth"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it was caused by / raised during, outermost first."""
    out, stack, seen = [], [exc], set()
    while stack and len(out) < 32:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        stack += [e.__cause__, e.__context__]
    return out


def _client_error(exc: BaseException) -> tuple[str, int | None] | None:
    """``(code, HTTP status)`` of the botocore ClientError in ``exc``'s chain, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, Mapping) and isinstance(response.get("Error"), Mapping):
            code = str(response["Error"].get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code, (int(status) if status is not None else None)
    return None


def _botocore() -> Any:
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover - s3fs brings it
        return None
    return bce


def _unreachable(exc: BaseException) -> BaseException | None:
    """The 'could not connect at all' error in the chain (refused, DNS, connect timeout)."""
    bce = _botocore()
    for e in _chain(exc):
        if bce is not None and isinstance(e, (bce.EndpointConnectionError,
                                              bce.ConnectTimeoutError, bce.ProxyConnectionError)):
            return e
    return None


def _connection_problem(exc: BaseException) -> BaseException | None:
    """A connection that broke or timed out after it was made (reset, closed, read timeout)."""
    import asyncio
    import http.client
    import socket

    bce = _botocore()
    kinds: tuple[type, ...] = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                               TimeoutError, socket.timeout, asyncio.TimeoutError,
                               http.client.IncompleteRead)
    if bce is not None:
        kinds += (bce.HTTPClientError, bce.ConnectionClosedError, bce.ReadTimeoutError,
                  bce.IncompleteReadError, bce.ResponseStreamingError)
    try:
        import aiohttp

        kinds += (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                  aiohttp.ServerTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds += (FSTimeoutError,)
    except ImportError:  # pragma: no cover
        pass
    for e in _chain(exc):
        if isinstance(e, kinds):
            return e
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 5xx, throttling, connection reset / closed, timeouts. Never a 4xx (missing
    key, access denied), nor an endpoint that refuses connections (botocore already retried it)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)) and _client_error(exc) is None:
        return False
    client = _client_error(exc)
    if client is not None:
        code, status = client
        return code in _THROTTLE_CODES or status == 429 or (status is not None and status >= 500)
    if _unreachable(exc) is not None:
        return False
    if _connection_problem(exc) is not None:
        return True
    import errno

    # s3fs sometimes translates without keeping the ClientError: ServiceUnavailable / SlowDown
    # become EBUSY, InternalError EREMOTEIO.
    return isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.ETIMEDOUT,
                                                      getattr(errno, "EREMOTEIO", -1))


def _endpoint_of(exc: BaseException | None, storage_options: Mapping[str, Any] | None) -> str:
    """scheme://host:port of the S3 endpoint: the one contacted, else the one configured."""
    from urllib.parse import urlsplit

    for e in _chain(exc) if exc is not None else ():
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
        if isinstance(url, str) and "://" in url:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    options = dict(storage_options or {})
    configured = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                  or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if configured:
        parts = urlsplit(str(configured))
        if parts.hostname:
            return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return str(configured)
    return "the default AWS S3 endpoint"


def _secret_values(storage_options: Mapping[str, Any] | None) -> list[str]:
    import re

    found: list[str] = []

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, secret or bool(re.search(SECRET_KEY_PATTERN, str(k), re.I)))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, secret)
        elif secret and isinstance(obj, str) and len(obj) >= 4:
            found.append(obj)

    walk(dict(storage_options or {}), False)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        if len(os.environ.get(var, "")) >= 4:
            found.append(os.environ[var])
    return sorted(set(found), key=len, reverse=True)


def _one_line(text: str, storage_options: Mapping[str, Any] | None = None, limit: int = 400) -> str:
    for secret in _secret_values(storage_options):
        text = text.replace(secret, "***")
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _split_s3(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1] if "://" in url else url
    bucket, _, key = rest.partition("/")
    return bucket, key


def storage_error(exc: BaseException, url: str, what: str = "access",
                  storage_options: Mapping[str, Any] | None = None,
                  attempts: int = 1, bucket_level: bool = False) -> StorageError:
    """The ``StorageError`` (one line, naming URL / bucket / key / endpoint) for a failure of
    ``what`` (``read``, ``write``, ``list``, ...) on ``url``. Returns it; the caller raises it.
    ``bucket_level``: the failed request was about the bucket itself (a 404 means no bucket)."""
    if isinstance(exc, StorageError):
        return exc
    s3 = protocol_of(url) in ("s3", "s3a")
    bucket, key = _split_s3(url) if s3 else ("", "")
    endpoint = _endpoint_of(exc, storage_options) if s3 else ""
    tries = f" after {attempts} attempts" if attempts > 1 else ""

    def make(cls: type[StorageError], message: str) -> StorageError:
        return cls(_one_line(message, storage_options))

    bce = _botocore()
    if bce is not None and any(isinstance(e, (bce.NoCredentialsError, bce.PartialCredentialsError))
                               for e in _chain(exc)):
        return make(StoragePermissionError,
                    f"cannot {what} {url}: no usable S3 credentials were found (set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role, or anon=true "
                    "for a public bucket)")
    client = _client_error(exc)
    if client is not None:
        code, status = client
        if code == "NoSuchBucket" or (status == 404 and (bucket_level or not key)):
            return make(StorageNotFoundError, f"bucket {bucket!r} does not exist at {endpoint} "
                                              f"(cannot {what} {url})")
        if code in ("NoSuchKey", "404") or status == 404:
            return make(StorageNotFoundError, f"{url} does not exist (no object {key!r} in bucket "
                                              f"{bucket!r} at {endpoint})")
        if code in _AUTH_HINTS or status == 403:
            hint = _AUTH_HINTS.get(code, _AUTH_HINTS["403"])
            return make(StoragePermissionError,
                        f"access denied: cannot {what} {url} ({code or status} from {endpoint}: "
                        f"{hint}); check the credentials (AWS variables, profile or role) and the "
                        "bucket policy")
        if is_transient(exc):
            return make(StorageTransientError,
                        f"cannot {what} {url}: {endpoint} answered {code or 'an error'} "
                        f"(HTTP {status}){tries}; the service is busy or failing, try again later")
        return make(StorageError, f"cannot {what} {url}: {endpoint} answered {code or 'an error'} "
                                  f"(HTTP {status})")
    unreachable = _unreachable(exc)
    if unreachable is not None:
        reason = "connect timeout" if isinstance(unreachable, getattr(bce, "ConnectTimeoutError", ())) \
            else "connection failed"
        for e in _chain(exc):
            if isinstance(e, ConnectionRefusedError):
                reason = "connection refused"
            elif type(e).__name__ == "gaierror":
                reason = "host name not resolved"
        return make(StorageUnreachableError,
                    f"cannot {what} {url}: S3 endpoint {endpoint} is unreachable ({reason}); check "
                    "endpoint_url / AWS_ENDPOINT_URL and that the server is running")
    if isinstance(exc, FileNotFoundError):
        if s3:
            if not key or bucket_level:
                return make(StorageNotFoundError, f"bucket {bucket!r} does not exist at {endpoint}")
            thing = "nothing under prefix" if what == "list" else "no object"
            return make(StorageNotFoundError, f"{url} does not exist ({thing} {key!r} in bucket "
                                              f"{bucket!r} at {endpoint})")
        return make(StorageNotFoundError, f"{url} does not exist")
    if isinstance(exc, PermissionError):
        return make(StoragePermissionError, f"permission denied: cannot {what} {url}")
    problem = _connection_problem(exc)
    if problem is not None or is_transient(exc):
        detail = type(problem or exc).__name__
        where = f" ({endpoint})" if s3 else ""
        return make(StorageTransientError, f"cannot {what} {url}{where}: {detail}{tries}; the "
                                           "connection broke or timed out, try again later")
    return make(StorageError, f"cannot {what} {url}: {type(exc).__name__}: {exc}")


def _explain_403(exc: BaseException, url: str, fs: Any) -> BaseException:
    """A refused HEAD carries no error document (just "403"); one listing request of the bucket
    names the cause (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied). ``exc`` if not."""
    client = _client_error(exc)
    if fs is None or protocol_of(url) not in ("s3", "s3a") or client is None or \
            client[1] != 403 or client[0] not in ("403", ""):
        return exc
    try:
        fs.call_s3("list_objects_v2", Bucket=_split_s3(url)[0], MaxKeys=1)
    except Exception as probe:  # noqa: BLE001
        found = _client_error(probe)
        if found is not None and found[1] == 403 and found[0] not in ("403", ""):
            return probe
    return exc


def _retrying(op: Any, url: str, what: str, storage_options: Mapping[str, Any] | None,
              bucket_level: bool = False, fs: Any = None) -> Any:
    """Run ``op()``; retry transient failures with backoff; classify whatever is left."""
    import logging
    import time

    attempts = max(1, int(RETRY_ATTEMPTS))
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt < attempts and is_transient(exc):
                logging.getLogger(__name__).warning(
                    "transient storage error (attempt %d/%d) on %s %s: %s; retrying", attempt,
                    attempts, what, url, _one_line(f"{type(exc).__name__}: {exc}", storage_options))
                time.sleep(float(RETRY_BACKOFF_S) * 2 ** (attempt - 1))
                continue
            raise storage_error(_explain_403(exc, url, fs), url, what, storage_options,
                                attempts=attempt, bucket_level=bucket_level) from None
    raise AssertionError("unreachable")  # pragma: no cover


def mask_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (mappings / lists, any nesting) with the values of secret-looking keys
    (key, secret, token, password, session, credential, ...) replaced by ``"***"``, and the
    password of ``scheme://user:password@host`` URLs too. For printing specs and options."""
    import re

    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if re.search(SECRET_KEY_PATTERN, str(k), re.I) and v not in (None, "", {}, []):
                out[k] = "***"
            else:
                out[k] = mask_secrets(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    if isinstance(obj, str) and "@" in obj and "://" in obj:
        return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:***@", obj)
    return obj


#: botocore's retries for S3 unless the options or the environment set them: adaptive mode
#: (client-side rate limiting once the endpoint throttles: many actors hitting one bucket back
#: off together) with legacy mode's budget of retries, so a dead endpoint is named as soon.
S3_RETRIES = {"mode": "adaptive", "max_attempts": 4}


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
        options["endpoint_url"] = endpoint
    config = dict(options.get("config_kwargs") or {})
    # a botocore Config outranks the AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables: leave those be
    if "retries" not in config and not {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & set(os.environ):
        options["config_kwargs"] = {**config, "retries": dict(S3_RETRIES)}
    return options


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` from the CLI into a dict; ``a.b=v`` nests (``client_kwargs.region_name``)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise StorageError(f"--storage-option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        typed: Any = value
        if value.lower() in ("true", "false"):
            typed = value.lower() == "true"
        target = out
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = typed
    return out


def get_fs(url: str, storage_options: Mapping[str, Any] | None = None):
    """Return ``(filesystem, path)`` for a URL; plain paths are made absolute."""
    options = dict(storage_options or {})
    if url.startswith("s3://") or url.startswith("s3a://"):
        options = _s3_defaults(options)
    if "://" not in url:
        url = os.path.abspath(url)
    fs, path = url_to_fs(url, **options)
    return fs, path


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def absolute(url: str) -> str:
    """Plain local paths made absolute: Ray workers do not share the driver's working directory."""
    return url if "://" in url else os.path.abspath(url)


def join(url: str, *parts: str) -> str:
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def normalise(url: str) -> str:
    """Comparable form of a URL: scheme + absolute path without trailing slash."""
    if "://" not in url:
        return "file://" + os.path.abspath(url).rstrip("/")
    proto, rest = url.split("://", 1)
    if proto == "file":
        return "file://" + os.path.abspath("/" + rest.lstrip("/")).rstrip("/")
    return f"{proto}://" + rest.strip("/")


def resolved(url: str) -> str:
    """``normalise(url)`` with local symbolic links resolved: where the bytes really live."""
    out = normalise(url)
    if out.startswith("file://"):
        return "file://" + os.path.realpath(out[len("file://"):]).rstrip("/")
    return out


def refuse_inside(output_url: str, input_url: str, what: str = "output",
                  refuse_containing: bool = False) -> None:
    """Source data are never modified: the output may not be the input or lie inside it.

    Local paths are compared as written and with symbolic links resolved, so a DST that is (or
    passes through) a link into SRC is refused too. With ``refuse_containing``, an output that
    contains the input is refused as well (a run that may delete outputs must never reach SRC).
    """
    for out, src in ((normalise(output_url), normalise(input_url)),
                     (resolved(output_url), resolved(input_url))):
        if out == src or out.startswith(src + "/"):
            raise StorageError(f"{what} {output_url!r} lies inside the input {input_url!r}"
                               f"{' (through a symbolic link)' if out != normalise(output_url) else ''}"
                               "; write to a different prefix (source data are never modified)")
        if refuse_containing and src.startswith(out + "/"):
            raise StorageError(f"{what} {output_url!r} contains the input {input_url!r}; "
                               "write to a prefix outside it (source data are never modified)")


def _bucket_probe(fs: Any, bucket: str) -> None:
    """HEAD the bucket; an error answer carries no body, so ask once more with a listing whose
    error names the cause (NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch, ...)."""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - classified by the caller
        client = _client_error(exc)
        if client is None or client[1] == 404 or is_transient(exc):
            raise
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)


def check_writable_root(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Fail early, naming the bucket and endpoint, when an S3 bucket does not exist, the endpoint
    cannot be reached or the credentials are refused (``StorageError`` subclasses)."""
    if protocol_of(url) not in ("s3", "s3a"):
        return
    fs, path = get_fs(url, storage_options)
    bucket = path.split("/", 1)[0]
    _retrying(lambda: _bucket_probe(fs, bucket), url, "access", storage_options,
              bucket_level=True)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object; transient failures are retried. A missing file / object / bucket raises
    ``StorageNotFoundError`` (a ``FileNotFoundError``); other failures a ``StorageError``."""
    fs, path = get_fs(url, storage_options)
    return _retrying(lambda: fs.cat_file(path), url, "read", storage_options, fs=fs)



def read_prefix(url: str, size: int, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The first ``size`` bytes of the object (all of it when it is shorter); retried and
    classified like ``read_bytes``."""
    fs, path = get_fs(url, storage_options)
    return _retrying(lambda: fs.cat_file(path, start=0, end=int(size)), url, "read",
                     storage_options, fs=fs)

#: Stores where an object appears only when its upload completes (no rename needed, no folders).
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs")


@contextmanager
def atomic_write(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Open ``url`` for binary writing so that it appears whole or not at all.

    Local and other rename-capable filesystems: write ``.NAME.tmp-<uuid>`` then move it into place.
    Object stores (S3): the object becomes visible only when its upload completes, and an
    exception aborts the upload, so writing directly is already atomic.
    """
    fs, path = get_fs(url, storage_options)
    parent = posixpath.dirname(path)
    if protocol_of(url) in OBJECT_STORES:
        # No makedirs: object stores have no folders, and s3fs's makedirs creates a missing
        # bucket, which would turn a mistyped bucket name into a new bucket.
        with fs.open(path, "wb") as f:
            yield f
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        if protocol_of(url) == "file":
            # os.replace swaps the directory entry: a symbolic link planted at ``path`` is
            # replaced, never followed, so a link into the source cannot make us write there.
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            raise


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` atomically; a transient failure retries the whole (idempotent) write."""
    def write() -> None:
        with atomic_write(url, storage_options) as f:
            f.write(data)

    fs = get_fs(url, storage_options)[0]
    _retrying(write, url, "write", storage_options, fs=fs)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True / False; an unreachable endpoint or refused credentials raise a ``StorageError``
    (s3fs's own ``exists`` answers False for a bare bucket whatever went wrong)."""
    fs, path = get_fs(url, storage_options)
    if protocol_of(url) in ("s3", "s3a") and not path.strip("/").partition("/")[2]:
        def bucket_exists() -> bool:
            try:
                _bucket_probe(fs, path.strip("/"))
            except Exception as exc:  # noqa: BLE001
                client = _client_error(exc)
                if client is not None and (client[0] == "NoSuchBucket" or client[1] == 404):
                    return False
                raise
            return True

        return _retrying(bucket_exists, url, "check", storage_options, bucket_level=True)
    return _retrying(lambda: fs.exists(path), url, "check", storage_options, fs=fs)


def ls(url: str, storage_options: Mapping[str, Any] | None = None,
       detail: bool = False) -> list[Any]:
    """``fs.ls`` of ``url`` (entries as the filesystem names them), listed afresh (no cached
    listing), transient failures retried, failures classified: a missing bucket or prefix raises
    ``StorageNotFoundError`` (a ``FileNotFoundError``) naming it."""
    fs, path = get_fs(url, storage_options)
    kwargs = {"refresh": True} if protocol_of(url) in ("s3", "s3a") else {}
    return _retrying(lambda: fs.ls(path, detail=detail, **kwargs), url, "list", storage_options,
                     fs=fs)


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove the file at ``url`` if it exists."""
    fs, path = get_fs(url, storage_options)
    if fs.exists(path):
        _retrying(lambda: fs.rm(path), url, "remove", storage_options, fs=fs)


def remove_tree(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove the folder / prefix ``url`` and everything under it, if it exists (a local
    symlink is refused by ``shutil.rmtree``, so nothing outside is touched)."""
    fs, path = get_fs(url, storage_options)
    if fs.exists(path):
        _retrying(lambda: fs.rm(path, recursive=True), url, "remove", storage_options, fs=fs)


__all__ = ["StorageError", "get_fs", "join", "normalise", "resolved", "refuse_inside", "atomic_write",
           "read_bytes", "write_bytes", "exists", "parse_storage_options", "check_writable_root",
           "fsspec", "protocol_of"]
__all__ += ["StorageNotFoundError", "StoragePermissionError", "StorageUnreachableError",
            "StorageTransientError", "storage_error", "is_transient", "ls", "mask_secrets",
            "remove", "remove_tree"]
