"""Hardening: storage diagnosis on S3, transient-error retries, radius validation, state files,
secrets in printed specs.

S3 is moto on 127.0.0.1 (tests/conftest.py). moto's server does not check credentials (a wrong
key id or secret is accepted), so refused credentials are simulated by ``FaultProxy``: a small
HTTP proxy on 127.0.0.1 in front of moto that forwards every request and answers chosen ones
itself, with the status and S3 error document a real endpoint sends (403 InvalidAccessKeyId,
503 ServiceUnavailable, ...) or by dropping the connection. The whole botocore / s3fs stack runs
unchanged; nothing in the package reads a test hook.

What retries what (measured here, botocore 1.43 / s3fs 2026.9): botocore retries each request
itself (legacy mode, 5 attempts: 5xx, 429/throttling, connection errors); s3fs retries "SlowDown"
answers and broken connections (HTTPClientError, 5 attempts); ``storage`` retries what escapes
both (``RETRY_ATTEMPTS``), and never a 4xx. The tests that check our own retries pass
``config_kwargs.retries.total_max_attempts=1`` so that botocore does not hide them (botocore's
``retries.max_attempts`` does not count the first request: ``max_attempts=1`` is one retry).
"""
from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import math
import os
import pickle
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import torch

from helpers import fit_classwise, free_port
from ue_dist.data import storage

FAST = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 1}}
PLANTED_KEY, PLANTED_SECRET = "AKIAPLANTEDKEYID0042", "plantedSECRETvalue0042xyz"


def dead_endpoint() -> str:
    """A free port on 127.0.0.1 with nothing listening."""
    return f"http://127.0.0.1:{free_port()}"


# A fault-injecting proxy in front of moto --------------------------------------------------------
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}


class FaultProxy:
    """Forwards HTTP to ``target``; ``fault(method, match, status, code, times)`` makes the next
    ``times`` requests whose method is ``method`` (or ``*``) and whose path (no query) ends with
    ``match`` get an S3 error answer instead (``status=0``: the connection is dropped). ``log``
    holds ``(method, path, status)`` of every request seen."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.faults: list[dict] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                fault = proxy._take(self.command, path)
                if fault is not None:
                    proxy._record(self.command, self.path, fault["status"])
                    if fault["status"] == 0:  # drop the connection without an answer
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault["code"]}'
                           f'</Code><Message>injected by the test</Message><RequestId>t1</RequestId>'
                           f'</Error>').encode()
                    payload = b"" if self.command == "HEAD" else xml
                    self.send_response(fault["status"])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy._record(self.command, self.path, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fault(self, method: str, match: str, status: int, code: str = "", times: float = 1):
        with self.lock:
            self.faults.append({"method": method, "match": match, "status": status, "code": code,
                                "left": times})
        return self

    def _take(self, method: str, path: str) -> dict | None:
        with self.lock:
            for f in self.faults:
                if f["left"] > 0 and f["method"] in ("*", method) and path.endswith(f["match"]):
                    f["left"] -= 1
                    return f
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def requests(self, method: str, match: str) -> list[int]:
        """Statuses of the requests seen for ``method`` on paths ending with ``match``."""
        with self.lock:
            return [s for m, p, s in self.log if m == method and p.split("?")[0].endswith(match)]


@contextmanager
def fault_proxy(moto_s3):
    proxy = FaultProxy(moto_s3["endpoint"])
    proxy.thread.start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BACKOFF_S", 0.01)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 500, text
    return text


# 1. diagnosis ------------------------------------------------------------------------------------
def test_dead_endpoint_is_named_not_reported_as_a_missing_bucket(moto_s3):
    endpoint = dead_endpoint()
    so = {"endpoint_url": endpoint, **FAST}
    calls = {"check_writable_root": lambda: storage.check_writable_root("s3://bucket-ue/out", so),
             "read_bytes": lambda: storage.read_bytes("s3://bucket-ue/state.pt", so),
             "write_bytes": lambda: storage.write_bytes("s3://bucket-ue/x.bin", b"1", so),
             "exists": lambda: storage.exists("s3://bucket-ue/state.pt", so),
             "exists (bucket)": lambda: storage.exists("s3://bucket-ue", so),
             "ls": lambda: storage.ls("s3://bucket-ue/train", so)}
    for name, call in calls.items():
        with pytest.raises(storage.StorageUnreachableError) as info:
            call()
        text = _one_line(info.value)
        assert endpoint in text and "unreachable" in text and "connection refused" in text, name
        assert "does not exist" not in text, name
        assert "s3://bucket-ue" in text, name
        assert isinstance(info.value, storage.StorageError)


def test_missing_bucket_key_and_prefix_are_told_apart(s3_bucket):
    bucket = s3_bucket[len("s3://"):]
    storage.write_bytes(f"{s3_bucket}/present/a.bin", b"abc")
    assert storage.read_bytes(f"{s3_bucket}/present/a.bin") == b"abc"
    with pytest.raises(storage.StorageNotFoundError) as info:
        storage.check_writable_root("s3://no-such-bucket-ue7/out")
    assert "bucket 'no-such-bucket-ue7' does not exist" in _one_line(info.value)
    # a missing object: still a FileNotFoundError (callers rely on it), key and bucket named
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(f"{s3_bucket}/present/missing.pt")
    assert isinstance(info.value, storage.StorageNotFoundError)
    text = _one_line(info.value)
    assert "no object 'present/missing.pt'" in text and repr(bucket) in text
    with pytest.raises(storage.StorageNotFoundError) as info:
        storage.read_bytes("s3://no-such-bucket-ue7/state.pt")
    assert "bucket 'no-such-bucket-ue7' does not exist" in _one_line(info.value)
    assert storage.exists(f"{s3_bucket}/present/missing.pt") is False
    assert storage.exists(f"{s3_bucket}/present/a.bin") is True
    assert storage.exists("s3://no-such-bucket-ue7") is False
    assert storage.exists(s3_bucket) is True
    assert [p.rsplit("/", 1)[1] for p in storage.ls(f"{s3_bucket}/present")] == ["a.bin"]
    with pytest.raises(storage.StorageNotFoundError) as info:
        storage.ls(f"{s3_bucket}/nothing-here")
    assert "'nothing-here'" in _one_line(info.value) and repr(bucket) in str(info.value)
    with pytest.raises(storage.StorageNotFoundError) as info:
        storage.ls("s3://no-such-bucket-ue7/train")
    assert "bucket 'no-such-bucket-ue7' does not exist" in _one_line(info.value)
    # local files: the same classes
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("/nonexistent-ue/x.pt")


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"])
def test_refused_credentials_are_named_without_the_credentials(moto_s3, s3_bucket, code):
    """moto accepts any key; the proxy answers every request with the 403 a real endpoint sends."""
    with fault_proxy(moto_s3) as proxy:
        proxy.fault("*", "", 403, code, times=math.inf)
        so = {"endpoint_url": proxy.url, "key": PLANTED_KEY, "secret": PLANTED_SECRET, **FAST}
        for call in (lambda: storage.check_writable_root(f"{s3_bucket}/out", so),
                     lambda: storage.read_bytes(f"{s3_bucket}/state.pt", so),
                     lambda: storage.write_bytes(f"{s3_bucket}/x.bin", b"1", so),
                     lambda: storage.ls(f"{s3_bucket}/train", so)):
            with pytest.raises(storage.StoragePermissionError) as info:
                call()
            text = _one_line(info.value)
            assert text.startswith("access denied") and code in text and s3_bucket in text, text
            assert proxy.url in text
            assert PLANTED_SECRET not in text and PLANTED_KEY not in text
            assert moto_s3["secret"] not in text
            assert isinstance(info.value, PermissionError)


def test_no_credentials_at_all_is_named(moto_s3, s3_bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StoragePermissionError) as info:
        storage.read_bytes(f"{s3_bucket}/state.pt", {"skip_instance_cache": True, **FAST})
    assert "no usable S3 credentials" in _one_line(info.value)


def test_cli_on_a_dead_endpoint_exits_2_with_one_line(moto_s3, tmp_path, capsys, monkeypatch):
    from ue_dist.cli import main
    from ue_dist.data.converters import convert_digits

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: keep the test fast
    src = tmp_path / "digits"
    convert_digits(str(src), shard_size=500)
    endpoint = dead_endpoint()
    cases = {"dst": ["protect", "--method", "classwise", str(src / "train"), "s3://bucket-ue/out"],
             "state": ["protect", "--method", "classwise", "--state", "s3://bucket-ue/state.pt",
                       str(src / "train"), str(tmp_path / "out")]}
    for name, argv in cases.items():
        capsys.readouterr()
        code = main(argv + ["--storage-option", f"endpoint_url={endpoint}"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("ue-dist protect: error: ") and endpoint in err and "unreachable" in err
        assert "does not exist" not in err and moto_s3["secret"] not in err


# 2. transient errors -----------------------------------------------------------------------------
def test_transient_errors_are_retried_and_4xx_are_not(moto_s3, s3_bucket, fast_retries):
    url = f"{s3_bucket}/t/a.bin"
    storage.write_bytes(url, b"payload")
    key = url[len("s3://"):]
    with fault_proxy(moto_s3) as proxy:
        so = {"endpoint_url": proxy.url, **FAST}  # botocore does not retry: ours must
        proxy.fault("GET", key, 503, "ServiceUnavailable")
        assert storage.read_bytes(url, so) == b"payload"
        assert proxy.requests("GET", key) == [503, 200]
        proxy.fault("GET", key, 0)  # connection dropped without an answer
        assert storage.read_bytes(url, so) == b"payload"
        assert proxy.requests("GET", key)[-2:] == [0, 200]
        proxy.fault("PUT", "t/b.bin", 500, "InternalError")
        storage.write_bytes(f"{s3_bucket}/t/b.bin", b"written", so)
        assert proxy.requests("PUT", "t/b.bin") == [500, 200]
        assert storage.read_bytes(f"{s3_bucket}/t/b.bin") == b"written"
        with pytest.MonkeyPatch.context() as mp:  # without storage's retries the 503 is fatal
            mp.setattr(storage, "RETRY_ATTEMPTS", 1)
            proxy.fault("GET", key, 503, "ServiceUnavailable")
            with pytest.raises(storage.StorageTransientError):
                storage.read_bytes(url, so)
        proxy.fault("GET", key, 503, "SlowDown")  # throttling
        assert storage.read_bytes(url, so) == b"payload"
        # 4xx: one request, no retry
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{s3_bucket}/t/missing.bin", so)
        assert proxy.requests("HEAD", "t/missing.bin") == [404]  # s3fs HEADs before a GET
        assert proxy.requests("GET", "t/missing.bin") == []
        proxy.fault("GET", key, 403, "AccessDenied", times=math.inf)
        with pytest.raises(storage.StoragePermissionError):
            storage.read_bytes(url, so)
        assert proxy.requests("GET", key).count(403) == 1
        proxy.faults.clear()
        # a persistent 503 gives up after RETRY_ATTEMPTS, naming the endpoint
        proxy.fault("GET", key, 503, "ServiceUnavailable", times=math.inf)
        with pytest.raises(storage.StorageTransientError) as info:
            storage.read_bytes(url, so)
        text = _one_line(info.value)
        assert "ServiceUnavailable" in text and proxy.url in text
        assert f"after {storage.RETRY_ATTEMPTS} attempts" in text
        proxy.faults.clear()
        # with botocore's default config, botocore itself retries the 503
        default = {"endpoint_url": proxy.url}
        before = len(proxy.requests("GET", key))
        proxy.fault("GET", key, 503, "ServiceUnavailable")
        assert storage.read_bytes(url, default) == b"payload"
        assert proxy.requests("GET", key)[before:] == [503, 200]


def test_is_transient_classes():
    import botocore.exceptions as bce

    def client(code, status):
        return bce.ClientError({"Error": {"Code": code, "Message": "m"},
                                "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert storage.is_transient(client("ServiceUnavailable", 503))
    assert storage.is_transient(client("InternalError", 500))
    assert storage.is_transient(client("SlowDown", 503))
    assert storage.is_transient(client("Throttling", 400))
    assert storage.is_transient(bce.ReadTimeoutError(endpoint_url="http://h"))
    assert storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(client("NoSuchKey", 404))
    assert not storage.is_transient(client("AccessDenied", 403))
    assert not storage.is_transient(client("InvalidAccessKeyId", 403))
    assert not storage.is_transient(FileNotFoundError("x"))
    assert not storage.is_transient(bce.EndpointConnectionError(endpoint_url="http://h"))
    assert not storage.is_transient(ValueError("x"))


@pytest.mark.system
def test_protect_survives_a_transient_get_and_put_byte_identical(moto_s3, s3_bucket, ray_local,
                                                                 digits_dir, tmp_path):
    """A 503 on the first GET of one input shard and on the first PUT of one output shard,
    both inside Ray Data actors: the run finishes, complete, byte-identical to an undisturbed
    run. botocore's own retries are off (total_max_attempts=1) so that storage's retries do it."""
    import s3fs

    from ue_dist.data.shards import list_shards
    from ue_dist.runtime import ledger
    from ue_dist.runtime.protect import protect

    s3fs.S3FileSystem(endpoint_url=moto_s3["endpoint"]).put(
        str(digits_dir / "train"), f"{s3_bucket}/src/train", recursive=True)
    src = f"{s3_bucket}/src/train"
    names = [ledger.shard_name(u) for u in list_shards(src)]
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    state = str(tmp_path / "state.pt")
    fit_classwise(state)
    kwargs = dict(state_url=state, preset="quick", actors=1, cpus_per_actor=0.5, progress=None)
    clean = protect("classwise", src, f"{s3_bucket}/clean/train", **kwargs)
    bucket = s3_bucket[len("s3://"):]
    with fault_proxy(moto_s3) as proxy:
        # shard-000002 is read only by an actor (the driver peeks at the first pending shard)
        proxy.fault("GET", f"{bucket}/src/train/shard-000002.tar", 503, "ServiceUnavailable")
        proxy.fault("PUT", f"{bucket}/faulty/train/shard-000001.tar", 503, "ServiceUnavailable")
        faulty = protect("classwise", src, f"{s3_bucket}/faulty/train",
                         storage_options={"endpoint_url": proxy.url,
                                          "config_kwargs": {"retries": {"total_max_attempts": 1}}},
                         **kwargs)
        assert proxy.requests("GET", "src/train/shard-000002.tar") == [503, 200]
        assert proxy.requests("PUT", "faulty/train/shard-000001.tar") == [503, 200]
    for summary in (clean, faulty):
        assert summary["ok"] and summary["shards_done"] == 3 and summary["images"] == 1437
    for name in names:
        a = storage.read_bytes(f"{s3_bucket}/clean/train/{name}")
        b = storage.read_bytes(f"{s3_bucket}/faulty/train/{name}")
        assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest(), name
    assert sorted(ledger.committed(f"{s3_bucket}/faulty/train")) == names


def test_s3_requests_get_botocore_adaptive_retries_unless_told_otherwise(moto_s3, monkeypatch):
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    fs, _ = storage.get_fs("s3://bucket-ue/k", {"config_kwargs": {"connect_timeout": 3}})
    assert fs.config_kwargs == {"connect_timeout": 3, "retries": storage.S3_RETRIES}
    assert storage.S3_RETRIES["mode"] == "adaptive"
    fs, _ = storage.get_fs("s3://bucket-ue/k", FAST)  # the caller's retries win
    assert fs.config_kwargs["retries"]["total_max_attempts"] == 1  # (botocore adds its mode)
    assert fs.config_kwargs["retries"].get("mode") != "adaptive"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # so do the standard AWS variables
    fs, _ = storage.get_fs("s3://bucket-ue/k")
    assert "retries" not in (fs.config_kwargs or {})
    fs, _ = storage.get_fs(__file__)  # not S3: untouched
    assert not hasattr(fs, "config_kwargs")


@pytest.mark.system
def test_protect_redoes_a_shard_whose_storage_error_outlived_the_retries(
        moto_s3, s3_bucket, ray_local, digits_dir, tmp_path, monkeypatch):
    """One input shard answers 503 to RETRY_ATTEMPTS + 1 GETs in a row (botocore's retries
    off): inside the actor, ``storage`` gives up after RETRY_ATTEMPTS and the shard's task
    fails; Ray Data runs it again (``actor_task_retry_on_errors``) and the run completes with
    every shard. Without Ray Data's retries the same fault fails the run."""
    import s3fs

    from ue_dist.runtime import ledger
    from ue_dist.runtime import protect as protect_mod

    s3fs.S3FileSystem(endpoint_url=moto_s3["endpoint"]).put(
        str(digits_dir / "train"), f"{s3_bucket}/src/train", recursive=True)
    src, state = f"{s3_bucket}/src/train", str(tmp_path / "state.pt")
    fit_classwise(state)
    bucket, shard = s3_bucket[len("s3://"):], "src/train/shard-000002.tar"
    faults = storage.RETRY_ATTEMPTS + 1
    with fault_proxy(moto_s3) as proxy:
        kwargs = dict(state_url=state, preset="quick", actors=1, cpus_per_actor=0.5,
                      progress=None, storage_options={
                          "endpoint_url": proxy.url,
                          "config_kwargs": {"retries": {"total_max_attempts": 1}}})
        monkeypatch.setattr(protect_mod, "ACTOR_TASK_RETRIES", 0)
        proxy.fault("GET", f"{bucket}/{shard}", 503, "ServiceUnavailable", times=faults)
        # (Ray Data hands the error back as its own UserCodeException: the cause is in the text)
        with pytest.raises(Exception, match=r"cannot read .*shard-000002.*ServiceUnavailable"):
            protect_mod.protect("classwise", src, f"{s3_bucket}/no-retries/train", **kwargs)
        assert proxy.requests("GET", shard) == [503] * storage.RETRY_ATTEMPTS
        proxy.faults.clear()
        monkeypatch.undo()
        assert protect_mod.ACTOR_TASK_RETRIES > 0
        proxy.fault("GET", f"{bucket}/{shard}", 503, "ServiceUnavailable", times=faults)
        before = len(proxy.requests("GET", shard))
        summary = protect_mod.protect("classwise", src, f"{s3_bucket}/retried/train", **kwargs)
        # 4 in the first attempt of the task, then 503 + 200 in the second
        assert proxy.requests("GET", shard)[before:] == [503] * faults + [200]
    assert summary["ok"] and summary["shards_done"] == 3 and summary["images"] == 1437
    assert len(ledger.committed(f"{s3_bucket}/retried/train")) == 3


# 3. radii ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["2", "inf", "nan", "0", "-1", "1.5"])
def test_classwise_refuses_eps_outside_0_1(value):
    from ue_dist.core.config import SettingsError
    from ue_dist.methods.base import build_method

    with pytest.raises(SettingsError) as info:
        build_method("classwise", "paper", [f"eps={value}"])
    text = _one_line(info.value)
    assert text.startswith("eps for method 'classwise'") and "(0, 1]" in text
    with pytest.raises(SettingsError):  # typed overrides (job specs, Tune) too
        build_method("classwise", "quick", {"eps": float(value)})


def test_radii_bounds_per_kind():
    from ue_dist.core.config import SettingsError
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.methods.base import build_method, get_method

    assert build_method("classwise", "paper", ["eps=1"]).eps == 1.0
    assert build_method("classwise", "paper", ["eps=16/255"]).eps == pytest.approx(16 / 255)
    # bayes with norm=l2: eps is an L2 radius and may exceed 1; with L-inf it may not
    assert build_method("bayes", "quick", ["norm=l2", "eps=3"]).eps == 3.0
    with pytest.raises(SettingsError, match="L2 radius"):
        build_method("bayes", "quick", ["norm=l2", "eps=inf"])
    with pytest.raises(SettingsError, match=r"eps for method 'bayes' must be .*\(0, 1\]"):
        build_method("bayes", "quick", ["eps=3"])
    # adversarial radii may be 0 (off), never above 1 nor infinite
    assert resolve_victim_settings("quick", ["adv_eps=0"])["adv_eps"] == 0.0
    assert resolve_victim_settings("quick", ["adv_eps=8/255"])["adv_eps"] == pytest.approx(8 / 255)
    for bad in ("inf", "2", "nan"):
        with pytest.raises(SettingsError, match=r"adv_eps for victim must be .*\[0, 1\]"):
            resolve_victim_settings("quick", [f"adv_eps={bad}"])
    assert build_method("rem", "quick", ["rho_a=0"]).settings["rho_a"] == 0.0
    with pytest.raises(SettingsError, match="rho_a for method 'rem'"):
        build_method("rem", "quick", ["rho_a=inf"])
    with pytest.raises(SettingsError, match="at_eps for method 'gue'"):
        build_method("gue", "quick", ["at_eps=1.5"])
    # settings handed over without resolve (a state's, a Tune trial's) are checked as well
    cls = get_method("classwise")
    with pytest.raises(SettingsError, match="eps for method 'classwise'"):
        cls({"eps": float("inf"), "noise_seed": 0})


def test_every_registered_preset_still_validates():
    from ue_dist.core.victim import resolve_victim_settings
    from ue_dist.methods.base import build_method, method_names

    names = method_names()
    assert {"bayes", "classwise", "em", "gue", "gue-at", "rem", "tap"} <= set(names)
    for name in names:
        for preset in ("paper", "quick"):
            method = build_method(name, preset)
            # an L-inf radius lies in (0, 1]; an L2 radius (lsp, ar) may exceed 1
            assert 0 < method.eps and (method.norm != "linf" or method.eps <= 1), (name, preset)
    for preset in ("paper", "quick"):
        resolve_victim_settings(preset)


def test_cli_set_eps_inf_exits_2_naming_the_setting(digits_dir, tmp_path, capsys):
    from ue_dist.cli import main

    code = main(["protect", "--method", "classwise", "--set", "eps=inf", str(digits_dir / "train"),
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "eps for method 'classwise' must be a finite number in (0, 1]" in err


# 4. state files ----------------------------------------------------------------------------------
def _classwise_state(**changes):
    from ue_dist.methods.base import build_method

    method = build_method("classwise", "paper")
    state = {"method": "classwise", "version": 1, "settings": dict(method.settings),
             "image_shape": [3, 32, 32], "num_classes": 10,
             "patterns": torch.zeros(10, 3, 32, 32).uniform_(-method.eps, method.eps)}
    state.update(changes)
    return method, state


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this-must-never-run",))


def test_a_state_with_nan_is_refused_naming_the_file(tmp_path):
    from ue_dist.methods.base import StateError, load_state, save_state

    method, state = _classwise_state()
    state["patterns"][3, 0, 0, 0] = float("nan")
    url = str(tmp_path / "nan.pt")
    save_state(state, url)
    with pytest.raises(StateError) as info:
        load_state(url)
    text = _one_line(info.value)
    assert url in text and "'patterns'" in text and "1 NaN/inf value(s)" in text
    # the method's own check refuses it too (a state handed over in memory)
    with pytest.raises(StateError, match="NaN/inf"):
        method.check_state(state, None, source=url)
    nested = {**_classwise_state()[1], "extra": {"bank": [torch.tensor([1.0, float("inf")])]}}
    with pytest.raises(StateError, match=r"'extra'\.bank\[0\] holds 1 NaN/inf"):
        method.check_state(nested, None, source=url)
    good = _classwise_state()[1]
    method.check_state(good, [3, 32, 32], source=url)  # a finite state passes


def test_a_state_missing_a_key_is_refused_with_state_error(tmp_path):
    from ue_dist.core.models import build_model
    from ue_dist.methods.base import StateError, build_method

    method, state = _classwise_state()
    del state["patterns"]
    with pytest.raises(StateError) as info:
        method.check_loadable(state, source="s3://bucket/classwise.pt")
    assert "s3://bucket/classwise.pt" in _one_line(info.value)
    em = build_method("em", "quick")
    arch = em.settings["arch"]
    em_state = {"method": "em", "version": 1, "settings": dict(em.settings),
                "image_shape": [3, 32, 32],
                "model": build_model(arch, 10, 3, 32).state_dict()}  # no num_classes
    with pytest.raises(KeyError):
        em.load(em_state, "cpu")  # what a worker would have hit
    with pytest.raises(StateError) as info:
        em.check_loadable(em_state, source="/data/em.pt")
    text = _one_line(info.value)
    assert "'/data/em.pt'" in text and "lacks the key 'num_classes'" in text
    em.check_loadable({**em_state, "num_classes": 10}, source="/data/em.pt")


def test_a_state_with_pickled_code_is_refused_without_unsafe_advice(tmp_path, capsys, digits_dir):
    from ue_dist.cli import main
    from ue_dist.methods.base import StateError, load_state

    _, state = _classwise_state(extra=_RunsCode())
    url = str(tmp_path / "code.pt")
    torch.save(state, url)
    with pytest.raises(StateError) as info:
        load_state(url)
    text = _one_line(info.value)
    assert url in text and "never holds" in text
    assert "weights_only" not in text and "arbitrary code" not in text
    code = main(["protect", "--method", "classwise", "--state", url, str(digits_dir / "train"),
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert url in err and "never holds" in err
    assert "this-must-never-run" not in err
    # a truncated file: cannot be read, named, one line
    raw = open(url, "rb").read()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StateError, match="cut.pt.*cannot be read"):
        load_state(str(tmp_path / "cut.pt"))


# 5. secrets in printed specs ---------------------------------------------------------------------
def test_run_check_masks_credentials_in_any_nesting(tmp_path, capsys):
    from ue_dist.cli import main

    token, password = "plantedTOKEN0042abc", "plantedPASS0042abc"
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": "creds-check", "root": str(tmp_path / "out"),
        "storage_options": {"endpoint_url": "http://127.0.0.1:9000", "key": PLANTED_KEY,
                            "secret": PLANTED_SECRET,
                            "client_kwargs": {"aws_session_token": token,
                                              "region_name": "us-east-1"},
                            "config_kwargs": {"proxies": {"http": f"http://u:{password}@proxy:3128"}},
                            "credentials": {"password": password}},
        "data": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")},
        "method": {"name": "classwise", "preset": "quick"}}))
    for extra in ([], ["--json"]):
        assert main(["run", "--check", str(spec), *extra]) == 0
        out = capsys.readouterr()
        for secret in (PLANTED_KEY, PLANTED_SECRET, token, password):
            assert secret not in out.out + out.err
        printed = json.loads(out.out)
        options = printed["storage_options"]
        assert options["key"] == options["secret"] == "***"
        assert options["client_kwargs"] == {"aws_session_token": "***", "region_name": "us-east-1"}
        assert options["credentials"] == "***"
        assert options["config_kwargs"]["proxies"]["http"] == "http://u:***@proxy:3128"
        assert options["endpoint_url"] == "http://127.0.0.1:9000"  # not a secret: shown
        assert printed["method"]["settings"]["noise_seed"] == 0


def test_mask_secrets_leaves_the_original_alone():
    spec = {"storage_options": {"secret": "s3cr3t-value", "nested": [{"api_token": "tok-value"}]},
            "name": "x"}
    masked = storage.mask_secrets(spec)
    assert masked == {"storage_options": {"secret": "***", "nested": [{"api_token": "***"}]},
                      "name": "x"}
    assert spec["storage_options"]["secret"] == "s3cr3t-value"
