import logging
import os
import traceback

import pytest
from s3_emulator import (  # noqa: F401
    ACCESS_KEY,
    SECRET_KEY,
    FaultyProxy,
    free_port,
    persistent_s3_emulator,
    s3_bucket,
    s3_emulator,
    s3_env,
)

from mtssl import storage as storage_mod
from mtssl.storage import (
    LocalStorage,
    NotFound,
    S3Config,
    S3Storage,
    StorageError,
    open_storage,
    s3_config_from_env,
)

FAST = dict(max_attempts=3, backoff_s=0.01, backoff_max_s=0.05)


def exercise(st) -> None:
    """The shared contract: put/get/exists/list/delete on a fresh, empty store."""
    assert st.list() == []
    st.put_bytes("a/b/c.bin", b"\x00\x01payload")
    st.put_bytes("a/x.txt", b"first")
    st.put_bytes("a/x.txt", b"second")  # overwrite
    st.put_bytes("top", b"")
    assert st.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert st.get_bytes("a/x.txt") == b"second"
    assert st.get_bytes("top") == b""
    assert st.exists("a/x.txt") and not st.exists("a/missing")
    assert st.list() == ["a/b/c.bin", "a/x.txt", "top"]
    assert st.list("a/b") == ["a/b/c.bin"]
    assert st.list("a/x") == ["a/x.txt"]
    with pytest.raises(NotFound, match="a/missing"):
        st.get_bytes("a/missing")
    st.delete("a/x.txt")
    st.delete("a/x.txt")  # deleting a missing key is a no-op
    assert not st.exists("a/x.txt")
    assert st.list() == ["a/b/c.bin", "top"]
    for bad in ["", "/abs", "a//b", "../up", "a/./b", "a\\b"]:
        with pytest.raises(ValueError, match="invalid storage key"):
            st.put_bytes(bad, b"x")


def test_local_contract(tmp_path):
    st = LocalStorage(tmp_path / "store")
    exercise(st)
    assert st.uri("a/b/c.bin") == (tmp_path / "store" / "a" / "b" / "c.bin").resolve().as_uri()
    assert (tmp_path / "store" / "a" / "b" / "c.bin").read_bytes() == b"\x00\x01payload"


def test_local_failed_write_keeps_old_object_and_no_temp(tmp_path, monkeypatch):
    st = LocalStorage(tmp_path)
    st.put_bytes("k.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(storage_mod.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="disk full"):
        st.put_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert st.get_bytes("k.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin"]


def test_local_files_roundtrip(tmp_path):
    st = LocalStorage(tmp_path / "store")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3_000_000))
    st.put_file("big/obj.bin", src)
    dst = tmp_path / "out" / "copy.bin"
    st.get_file("big/obj.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(NotFound):
        st.get_file("big/none.bin", tmp_path / "none.bin")
    assert not (tmp_path / "none.bin").exists()


def test_open_storage_dispatch(tmp_path, monkeypatch):
    assert open_storage(str(tmp_path)).root == tmp_path.resolve()
    assert open_storage(tmp_path.as_uri()).root == tmp_path.resolve()
    for bad in ["gs://bucket/x", "file://otherhost/x", "s3:///nobucket"]:
        with pytest.raises(ValueError):
            open_storage(bad)
    pytest.importorskip("minio")
    monkeypatch.setenv("MTSSL_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.setenv("MTSSL_S3_SECURE", "false")
    st = open_storage("s3://bkt/runs/one/", max_attempts=2)
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix, st.max_attempts) == ("bkt", "runs/one", 2)
    assert st.uri("x/y.pt") == "s3://bkt/runs/one/x/y.pt"


def test_s3_config_from_env():
    cfg = s3_config_from_env({"MTSSL_S3_ENDPOINT": "minio:9000", "MTSSL_S3_ACCESS_KEY": ACCESS_KEY,
                              "MTSSL_S3_SECRET_KEY": SECRET_KEY, "MTSSL_S3_SECURE": "False"})
    assert (cfg.endpoint, cfg.secure, cfg.region) == ("minio:9000", False, None)
    assert (cfg.access_key, cfg.secret_key) == (ACCESS_KEY, SECRET_KEY)
    assert ACCESS_KEY not in repr(cfg) and SECRET_KEY not in repr(cfg)
    assert s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1"}).secure is True
    with pytest.raises(StorageError, match="MTSSL_S3_ENDPOINT"):
        s3_config_from_env({})
    with pytest.raises(StorageError, match="without scheme"):
        s3_config_from_env({"MTSSL_S3_ENDPOINT": "http://h:1"})
    with pytest.raises(StorageError, match="both"):
        s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1", "MTSSL_S3_ACCESS_KEY": "a"})
    with pytest.raises(ValueError, match="MTSSL_S3_SECURE"):
        s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1", "MTSSL_S3_SECURE": "maybe"})
    assert s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1"}).retry_s == 90
    assert s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1", "MTSSL_S3_RETRY_S": "2.5"}).retry_s == 2.5
    for bad in ("-1", "inf", "soon"):
        with pytest.raises(StorageError, match="MTSSL_S3_RETRY_S"):
            s3_config_from_env({"MTSSL_S3_ENDPOINT": "h:1", "MTSSL_S3_RETRY_S": bad})


def test_s3_contract(s3_bucket):
    st = S3Storage(s3_bucket, "runs/a", create_bucket=True, **FAST)
    exercise(st)
    assert st.uri("top") == f"s3://{s3_bucket}/runs/a/top"
    # The prefix really namespaces objects in the bucket.
    assert S3Storage(s3_bucket, "runs/b").list() == []
    assert S3Storage(s3_bucket).list() == ["runs/a/a/b/c.bin", "runs/a/top"]


def test_s3_missing_bucket_is_a_clear_error(s3_bucket):
    st = S3Storage(s3_bucket, **FAST)
    with pytest.raises(StorageError, match="--create-bucket") as info:
        st.put_bytes("k", b"x")
    assert not isinstance(info.value, NotFound)


def test_s3_multipart_large_objects(s3_bucket, tmp_path):
    mib = 1024 * 1024
    st = S3Storage(s3_bucket, "big", create_bucket=True, part_size=5 * mib, **FAST)
    data = os.urandom(11 * mib)
    st.put_bytes("blob.bin", data)
    assert st.get_bytes("blob.bin") == data
    src = tmp_path / "src.bin"
    src.write_bytes(data[::-1])
    st.put_file("file.bin", src)
    st.get_file("file.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data[::-1]
    # A multipart object's ETag ends in "-<number of parts>": 11 MiB / 5 MiB parts -> 3.
    for key in ("blob.bin", "file.bin"):
        etag = st._client.stat_object(s3_bucket, f"big/{key}").etag
        assert etag.endswith("-3"), etag


@pytest.mark.parametrize("xml", [True, False], ids=["s3-xml-503", "plain-503"])
def test_s3_retries_transient_errors(s3_emulator, s3_env, s3_bucket, xml, caplog):
    S3Storage(s3_bucket, create_bucket=True).put_bytes("k", b"value")
    with FaultyProxy(s3_emulator.endpoint, failures=2, xml=xml) as proxy:
        cfg = S3Config(proxy.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
        st = S3Storage(s3_bucket, config=cfg, **FAST)
        with caplog.at_level(logging.WARNING, logger="mtssl.storage"):
            assert st.get_bytes("k") == b"value"
    assert [s for _, _, s in proxy.seen] == [503, 503, 200]
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2


def test_s3_gives_up_with_backoff_and_no_secrets(s3_emulator, s3_bucket, caplog):
    with FaultyProxy(s3_emulator.endpoint, failures=100, xml=False, echo_auth=True) as proxy:
        cfg = S3Config(proxy.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
        st = S3Storage(s3_bucket, "p", config=cfg, max_attempts=5, backoff_s=0.01,
                       backoff_max_s=0.03)
        with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as info:
            st.put_bytes("ckpt/obj.pt", b"x" * 100)
    assert len(proxy.seen) == 5  # bounded attempts
    msg = str(info.value)
    assert f"s3://{s3_bucket}/p/ckpt/obj.pt" in msg and "after 5 attempts" in msg and "503" in msg
    assert "Credential=***" in msg  # the echoed Authorization header was redacted, not dropped
    delays = [r.args[-1] for r in caplog.records if "retrying" in r.getMessage()]
    # Doubling from 0.01, capped at 0.03; jitter draws from [cap/2, cap].
    assert len(delays) == 4
    for delay, cap in zip(delays, [0.01, 0.02, 0.03, 0.03]):
        assert cap / 2 <= delay <= cap
    text = "".join(traceback.format_exception(info.value)) + repr(info.value) + caplog.text
    text += repr(st) + repr(st.config)
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in text


def test_s3_client_errors_are_not_retried(s3_emulator, s3_bucket):
    with FaultyProxy(s3_emulator.endpoint, failures=100, status=403) as proxy:
        cfg = S3Config(proxy.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
        with pytest.raises(StorageError, match="AccessDenied") as info:
            S3Storage(s3_bucket, config=cfg, **FAST).get_bytes("k")
    assert len(proxy.seen) == 1
    assert "attempts" not in str(info.value)


def test_s3_unreachable_endpoint_fails_fast(s3_bucket):
    cfg = S3Config(f"127.0.0.1:{free_port()}", ACCESS_KEY, SECRET_KEY, secure=False,
                   region="us-east-1")
    st = S3Storage(s3_bucket, config=cfg, max_attempts=2, backoff_s=0.01)
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/k.*after 2 attempts"):
        st.get_bytes("k")
    with pytest.raises(StorageError):
        st.exists("k")  # unreachable is not the same as absent


def test_s3_create_bucket_is_idempotent(s3_bucket):
    S3Storage(s3_bucket, create_bucket=True).put_bytes("k", b"1")
    again = S3Storage(s3_bucket, create_bucket=True)
    assert again.get_bytes("k") == b"1"


def test_s3_save_survives_an_emulator_restart(persistent_s3_emulator, monkeypatch):
    """The store is down for 10 s during a save (killed, then restarted): the default retry
    window (MTSSL_S3_RETRY_S, 90 s) covers it; the former ~6 s of retries did not."""
    import threading
    import time
    for k, v in persistent_s3_emulator.env().items():
        monkeypatch.setenv(k, v)
    st = S3Storage("restart", "p", create_bucket=True)
    st.put_bytes("before", b"1")
    persistent_s3_emulator.kill()
    restarter = threading.Timer(10.0, persistent_s3_emulator.start)
    restarter.start()
    t0 = time.monotonic()
    try:
        st.put_bytes("ckpt.pt", b"x" * (6 * 1024 * 1024))
    finally:
        restarter.join()
    assert time.monotonic() - t0 >= 10
    assert st.get_bytes("ckpt.pt") == b"x" * (6 * 1024 * 1024)
    assert st.get_bytes("before") == b"1"  # the restarted store kept what it had
