"""Checks that run before any compute, so a mistake costs seconds, not `checkpoint_every` steps.

- storage: reachable, credentials accepted, bucket present (or created with --create-bucket),
  and a test object written, read back and deleted;
- data: every enabled task's source (data.images or data.frames) opens and yields at least one
  usable sample.

Each failure is a PreflightError (a UserError: one line, exit status 2) naming what to fix.
"""

from __future__ import annotations

import os
import socket
import uuid

from mtssl.data.images import BadImage
from mtssl.data.sources import TaskData
from mtssl.data.stream import NoUsableData
from mtssl.errors import UserError
from mtssl.storage import S3Storage, Storage, StorageError, open_storage

PROBE_PREFIX = "preflight"


class PreflightError(UserError):
    pass


def open_checked(uri: str, *, create_bucket: bool = False) -> Storage:
    """`open_storage(uri)` after a write, read-back and delete of a small object."""
    try:
        storage = open_storage(uri)
    except (StorageError, ValueError) as err:
        raise PreflightError(f"config key 'output.storage' ({uri}): {err}") from None
    check_storage(storage, create_bucket=create_bucket)
    return storage


def check_storage(storage: Storage, *, create_bucket: bool = False) -> None:
    """Write, read back and delete a small object; raise PreflightError on any failure."""
    key = f"{PROBE_PREFIX}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    payload = b"mtssl preflight " + key.encode()
    try:
        if create_bucket and isinstance(storage, S3Storage):
            storage.ensure_bucket()
        storage.put_bytes(key, payload)
        back = storage.get_bytes(key)
        storage.delete(key)
    except StorageError as err:
        raise PreflightError(f"storage check failed before training: {err}") from None
    if back != payload:
        raise PreflightError(f"storage check failed: {storage.uri(key)} read back different bytes")


def check_data(data: TaskData, tasks: list[str]) -> None:
    """Open each task's source and draw one usable sample from it."""
    from mtssl.tasks import TASKS
    for task in tasks:
        key = f"data.{TASKS[task].source}"
        try:
            data.stream(task, stop_batch=1).sample(0, [])
        except (NoUsableData, BadImage, StorageError, OSError, ValueError) as err:
            raise PreflightError(f"config key '{key}' ({getattr(data.cfg.data, key[5:])!r}): "
                                 f"no usable data for task {task!r}: {err}") from None
