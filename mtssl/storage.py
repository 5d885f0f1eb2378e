"""Object storage every stage writes to: a local directory or an S3-compatible bucket.

Keys are relative, '/'-separated paths (``checkpoints/step_000000100.pt``). Writes are atomic for
readers: a reader sees the old object or the new one, never a partial one.

S3 connection settings come from the environment (mtssl.env.S3_VARS, read by
:func:`mtssl.env.s3_variables`, validated by :func:`s3_config_from_env`):

- ``MTSSL_S3_ENDPOINT``: ``host:port`` of the S3 service (required for ``s3://`` URIs).
- ``MTSSL_S3_ACCESS_KEY`` / ``MTSSL_S3_SECRET_KEY``: credentials (both or neither; neither means
  anonymous access). They never appear in logs, exceptions or ``repr``.
- ``MTSSL_S3_SECURE``: ``true``/``false``, use TLS (default ``true``).
- ``MTSSL_S3_REGION``: optional region name.
- ``MTSSL_S3_RETRY_S``: how long transient failures are retried, in seconds (default 90: a
  MinIO restart takes tens of seconds, and a checkpoint lost to one costs far more).
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, TypeVar
from urllib.parse import unquote, urlparse

from mtssl.env import s3_variables

log = logging.getLogger(__name__)

_TMP_MARK = ".mtssl-tmp-"
_MIB = 1024 * 1024
# S3 refuses multipart parts below 5 MiB (except the last one).
_MIN_PART_SIZE = 5 * _MIB
_HASH_CHUNK = 4 * _MIB
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalError",
     "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
T = TypeVar("T")


class StorageError(Exception):
    """A storage operation failed; the message names the object and the cause."""


class NotFound(StorageError):
    """The object does not exist."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a clean relative '/'-separated path, else raise ValueError."""
    parts = key.split("/")
    if (not key or "\\" in key or "\x00" in key
            or any(p in ("", ".", "..") or p.startswith(_TMP_MARK) for p in parts)):
        raise ValueError(f"invalid storage key {key!r}: need a relative path like 'a/b.pt'")
    return key


class Storage(abc.ABC):
    """Key -> bytes store. Writes are atomic for readers; ``delete`` of a missing key is a no-op."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise NotFound if absent, StorageError on other failures."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of an object (fewer if it is shorter)."""

    @abc.abstractmethod
    def sha256(self, key: str) -> tuple[str, int]:
        """(sha256 hex, size) of an object, streamed rather than read into memory."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (plain string prefix, not only whole folders)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def uri(self, key: str) -> str: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file without reading it into memory at once."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to ``path`` atomically (temp file in the same folder, then rename)."""


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on dirs, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write`` into a temp file next to ``path``, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_MARK}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class LocalStorage(Storage):
    """Objects as files under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            _atomic_write(self._path(key), lambda f: f.write(data))
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no such object: {self.uri(key)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(f"no such object: {self.uri(key)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from exc

    def sha256(self, key: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        try:
            with open(self._path(key), "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise NotFound(f"no such object: {self.uri(key)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from exc
        return digest.hexdigest(), size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest folder the prefix names, not the whole tree.
        base = prefix.rpartition("/")[0]
        top = self._path(base) if base else self.root
        keys = []
        for dirpath, _, files in os.walk(top):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self.uri(key)}: {exc}") from exc

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        try:
            with open(path, "rb") as src:
                _atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, _MIB))
        except OSError as exc:
            raise StorageError(f"cannot copy {path} to {self.uri(key)}: {exc}") from exc

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        try:
            src = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"no such object: {self.uri(key)}") from None
        try:
            with src:
                _atomic_write(Path(path), lambda f: shutil.copyfileobj(src, f, _MIB))
        except OSError as exc:
            raise StorageError(f"cannot copy {self.uri(key)} to {path}: {exc}") from exc


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach an S3 service. Credentials are hidden from ``repr``."""

    endpoint: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    secure: bool = True
    region: str | None = None
    retry_s: float = 90.0

    def redact(self, text: str) -> str:
        for secret in (self.secret_key, self.access_key):
            if secret:
                text = text.replace(secret, "***")
        return text


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def _seconds(value: str) -> float:
    if not value.strip().replace(".", "", 1).isdigit():
        raise StorageError(f"MTSSL_S3_RETRY_S={value!r}: expected a number of seconds >= 0")
    return float(value)


def s3_config_from_env(environ: Mapping[str, str] | None = None) -> S3Config:
    """Read the ``MTSSL_S3_*`` variables (see the module docstring; mtssl.env reads them)."""
    env = s3_variables(environ)
    endpoint = env.get("endpoint", "").strip()
    if not endpoint:
        raise StorageError("MTSSL_S3_ENDPOINT is not set; it must be host:port of the S3 service")
    if "://" in endpoint or "/" in endpoint:
        raise StorageError(f"MTSSL_S3_ENDPOINT={endpoint!r}: expected host:port without scheme "
                           "(set MTSSL_S3_SECURE for TLS)")
    access = env.get("access-key") or None
    secret = env.get("secret-key") or None
    if (access is None) != (secret is None):
        raise StorageError("set both MTSSL_S3_ACCESS_KEY and MTSSL_S3_SECRET_KEY, or neither")
    return S3Config(
        endpoint=endpoint, access_key=access, secret_key=secret,
        secure=_parse_bool("MTSSL_S3_SECURE", env.get("secure", "true")),
        region=env.get("region") or None,
        retry_s=_seconds(env.get("retry-s", "90")),
    )


def _classify(exc: Exception) -> str | None:
    """'missing', 'transient' or 'fatal' for client/transport errors; None for anything else."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        if exc.code in _MISSING_CODES:
            return "missing"
        status = exc.response.status if exc.response is not None else 0
        transient = exc.code in _THROTTLE_CODES or status >= 500 or status == 429
        return "transient" if transient else "fatal"
    if isinstance(exc, (ServerError, InvalidResponseError)):
        # InvalidResponseError (a non-XML reply, e.g. from a proxy) keeps its status private.
        status = exc.status_code if isinstance(exc, ServerError) else getattr(exc, "_code", 0)
        return "transient" if status >= 500 or status == 429 else "fatal"
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return "transient"
    return None


class S3Storage(Storage):
    """Objects in ``s3://bucket/prefix`` through the minio client.

    Transient failures (connection errors, 5xx, throttling) are retried with exponential backoff
    (``backoff_s * 2**i``, capped at ``backoff_max_s``) and jitter until ``config.retry_s``
    seconds have passed since the first attempt, or ``max_attempts`` attempts if that is given.
    Objects larger than ``part_size`` bytes are sent as a multipart upload.
    """

    def __init__(self, bucket: str, prefix: str = "", *, config: S3Config | None = None,
                 create_bucket: bool = False, part_size: int = 64 * _MIB,
                 max_attempts: int | None = None, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 connect_timeout_s: float = 10.0, read_timeout_s: float = 120.0):
        import urllib3
        from minio import Minio

        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size={part_size}: S3 needs at least {_MIN_PART_SIZE} bytes")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts}: need at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.config = config or s3_config_from_env()
        self.part_size = part_size
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        # Retries are ours (bounded, logged, redacted), so urllib3's own are switched off.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=False, maxsize=10, cert_reqs="CERT_REQUIRED",
        )
        try:
            self._client = Minio(self.config.endpoint, access_key=self.config.access_key,
                                 secret_key=self.config.secret_key, secure=self.config.secure,
                                 region=self.config.region, http_client=http)
        except ValueError as exc:
            raise StorageError(f"bad S3 settings for s3://{bucket}: "
                               f"{self.config.redact(str(exc))}") from None
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        cfg = self.config
        return f"S3Storage({where!r}, endpoint={cfg.endpoint!r}, secure={cfg.secure})"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _call(self, what: str, target: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retries; map client errors to StorageError without secrets."""
        attempt, deadline = 0, time.monotonic() + self.config.retry_s
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, unknown ones re-raised
                kind = _classify(exc)
                if kind is None:
                    raise
                detail = self.config.redact(f"{type(exc).__name__}: {exc}")
                if kind == "missing":
                    raise NotFound(f"no such object: {target}") from None
                cap = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                delay = cap * (0.5 + 0.5 * random.random())
                out_of_time = (attempt == self.max_attempts if self.max_attempts
                               else time.monotonic() + delay > deadline)
                if kind == "fatal" or out_of_time:
                    tries = f" after {attempt} attempts" if kind == "transient" else ""
                    if getattr(exc, "code", None) == "NoSuchBucket":
                        detail += (f" (bucket {self.bucket!r} missing; create it, or pass "
                                   "--create-bucket)")
                    # `from None`: the chained client error could carry request details verbatim.
                    raise StorageError(
                        f"{what} {target} failed{tries}; last error: {detail}") from None
                log.warning("%s %s: attempt %d (of %s) failed (%s); retrying in %.2fs", what, target,
                            attempt, self.max_attempts or f"{self.config.retry_s:.0f}s", detail,
                            delay)
                time.sleep(delay)

    def ensure_bucket(self) -> None:
        from minio.error import S3Error

        def make() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                # Another worker may have created it between the check and the create.
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create bucket", f"s3://{self.bucket}", make)

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._full(key)
        self._call("put", self.uri(key), lambda: self._client.put_object(
            self.bucket, name, io.BytesIO(data), len(data), part_size=self.part_size))

    def _read(self, key: str, **byte_range) -> bytes:
        name = self._full(key)

        def get() -> bytes:
            response = self._client.get_object(self.bucket, name, **byte_range)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("get", self.uri(key), get)

    def get_bytes(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._read(key, offset=offset, length=length)

    def sha256(self, key: str) -> tuple[str, int]:
        name = self._full(key)

        def stream() -> tuple[str, int]:
            digest, size = hashlib.sha256(), 0
            response = self._client.get_object(self.bucket, name)
            try:
                for chunk in response.stream(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            finally:
                response.close()
                response.release_conn()
            return digest.hexdigest(), size

        return self._call("get", self.uri(key), stream)

    def exists(self, key: str) -> bool:
        name = self._full(key)
        try:
            self._call("stat", self.uri(key), lambda: self._client.stat_object(self.bucket, name))
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0

        def names() -> list[str]:
            objs = self._client.list_objects(self.bucket, prefix=full, recursive=True)
            return sorted(o.object_name[cut:] for o in objs if not o.is_dir)

        return self._call("list", f"s3://{self.bucket}/{full}", names)

    def delete(self, key: str) -> None:
        name = self._full(key)
        self._call("delete", self.uri(key), lambda: self._client.remove_object(self.bucket, name))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        name = self._full(key)
        if not Path(path).is_file():
            raise StorageError(f"cannot upload {path} to {self.uri(key)}: not a file")
        self._call("put", self.uri(key), lambda: self._client.fput_object(
            self.bucket, name, os.fspath(path), part_size=self.part_size))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        name = self._full(key)

        def download() -> None:
            response = self._client.get_object(self.bucket, name)

            def copy(f: BinaryIO) -> None:
                for chunk in response.stream(_MIB):
                    f.write(chunk)

            try:
                _atomic_write(Path(path), copy)
            finally:
                response.close()
                response.release_conn()

        self._call("get", self.uri(key), download)


def open_storage(uri: str, **kwargs) -> Storage:
    """``s3://bucket/prefix`` -> S3Storage(**kwargs); ``file:///dir`` or a path -> LocalStorage."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: expected s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path.strip("/"), **kwargs)
    if kwargs:
        raise TypeError(f"LocalStorage takes no options, got {sorted(kwargs)}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file URIs must be local (file:///abs/path)")
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"{uri!r}: unsupported scheme {parsed.scheme!r} (use s3:// or file://)")
    return LocalStorage(uri)
