"""Checkpoint store on top of :mod:`mtssl.storage`: verified, crash-safe, with retention.

Layout under ``prefix`` (one writer at a time per prefix):

- ``step_{step:09d}.pt`` (or ``step_{step:09d}.{milestone}.pt``): ``torch.save`` bytes.
- ``manifest/<same name>.json``: key, step, milestone, sha256, size, time of that object.
- ``latest``: the manifest entry of the newest committed checkpoint.

``save`` writes object, then manifest entry, then ``latest``, so a crash at any point leaves the
previous checkpoint as ``latest``. States must hold only what ``torch.load(weights_only=True)``
accepts (tensors, numbers, strings, bytes, None, dtypes, devices, and dicts/lists/tuples of them);
``save`` checks that up front, and loading never unpickles anything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import warnings
from collections import OrderedDict
from datetime import datetime, timezone

import torch

from mtssl.storage import NotFound, Storage, StorageError

log = logging.getLogger(__name__)

_MILESTONE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_NAME_RE = re.compile(r"step_(\d{9,})(?:\.([A-Za-z0-9_.-]+))?\.pt")
_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size, torch.Tensor, torch.nn.Parameter)
_ENTRY_FIELDS = {"key": str, "step": int, "sha256": str, "size": int}


class CheckpointError(Exception):
    """A checkpoint is corrupt, undecodable, or not a checkpoint of this store."""


class CheckpointFallbackWarning(UserWarning):
    """``load_latest`` skipped unusable checkpoints and resumed from an older one."""


def check_state(obj: object, path: str = "state") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if kind in _LEAVES:
        return
    if isinstance(obj, dict) and kind in (dict, OrderedDict):
        for k, v in obj.items():
            check_state(k, f"{path} key {k!r}")
            check_state(v, f"{path}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and kind in (list, tuple):
        for i, v in enumerate(obj):
            check_state(v, f"{path}[{i}]")
        return
    raise TypeError(
        f"{path}: {kind.__module__}.{kind.__qualname__} is not checkpointable; store tensors, "
        "numbers, strings, bytes, None and dicts/lists/tuples of them (weights_only loading)"
    )


def _parse_entry(raw: bytes, where: str) -> dict:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(entry, dict) or any(
        type(entry.get(name)) is not kind for name, kind in _ENTRY_FIELDS.items()
    ):
        raise CheckpointError(f"{where}: malformed checkpoint entry {str(entry)[:200]!r}")
    entry.setdefault("milestone", None)
    return entry


# Sentences of torch's refusal text that advise loading anyway (weights_only=False, allowlisting
# globals): exactly what must never be done with a checkpoint that failed safe loading.
_ADVICE = re.compile(r"weights.only|trust|safe_globals|documentation|Alternatively", re.I)


def _refusal_reason(exc: Exception) -> str:
    """What the safe loader refused, without torch's advice to load it some other way."""
    sentences = re.split(r"(?<=\.)\s+|\n+", str(exc))
    kept = [s.strip() for s in sentences if s.strip() and not _ADVICE.search(s)]
    return " ".join(kept)[:300] or "refused by the safe loader"


class CheckpointStore:
    """Save and resume training state through a :class:`~mtssl.storage.Storage`.

    Keeps the newest ``keep_last`` step checkpoints plus every milestone checkpoint.
    """

    def __init__(self, storage: Storage, *, prefix: str = "checkpoints", keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: need at least 1")
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.keep_last = keep_last

    def __repr__(self) -> str:
        return (f"CheckpointStore({self.storage!r}, prefix={self.prefix!r}, "
                f"keep_last={self.keep_last})")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _manifest_key(self, key: str) -> str:
        name = key.rsplit("/", 1)[-1]
        if not _NAME_RE.fullmatch(name) or key != self._key(name):
            raise CheckpointError(f"{key!r} is not a checkpoint key of {self!r}")
        return self._key(f"manifest/{name[:-3]}.json")

    def save(self, state: dict, *, step: int, milestone: str | None = None) -> str:
        """Write ``state`` as the checkpoint of ``step`` and make it ``latest``; return its key."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if milestone is not None and not _MILESTONE_RE.fullmatch(milestone):
            raise ValueError(f"milestone {milestone!r}: use letters, digits, '_', '.', '-'")
        check_state(state)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        name = f"step_{step:09d}" + (f".{milestone}" if milestone else "") + ".pt"
        key = self._key(name)
        entry = {"key": key, "step": step, "milestone": milestone,
                 "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        meta = json.dumps(entry, indent=1).encode()
        self.storage.put_bytes(key, data)
        self.storage.put_bytes(self._manifest_key(key), meta)
        self.storage.put_bytes(self._key("latest"), meta)
        self._retain(step)
        return key

    def _retain(self, step: int) -> None:
        """Drop step checkpoints beyond ``keep_last`` and failed saves' leftovers above ``step``."""
        regular = [e for e in self.list_checkpoints() if e["milestone"] is None]
        kept = [e for e in regular if e["step"] <= step][-self.keep_last:]
        for entry in regular:
            if entry in kept:
                continue
            # The manifest entry goes first so no entry ever names a deleted object.
            try:
                self.storage.delete(self._manifest_key(entry["key"]))
                self.storage.delete(entry["key"])
            except StorageError as exc:
                # The new checkpoint is already committed; a failed cleanup only costs space.
                log.warning("retention could not delete %s: %s", entry["key"], exc)

    def list_checkpoints(self) -> list[dict]:
        """Manifest entries (key, step, milestone, sha256, size, time), oldest first.

        Entries newer than ``latest`` are leftovers of a failed save until the next save.
        """
        entries = []
        for mkey in self.storage.list(self._key("manifest/")):
            try:
                entries.append(_parse_entry(self.storage.get_bytes(mkey), self.storage.uri(mkey)))
            except (CheckpointError, NotFound) as exc:
                log.warning("skipping unreadable manifest entry: %s", exc)
        return sorted(entries, key=lambda e: (e["step"], e["key"]))

    def milestones(self) -> list[dict]:
        return [e for e in self.list_checkpoints() if e["milestone"] is not None]

    def _load_entry(self, entry: dict, map_location) -> dict:
        uri = self.storage.uri(entry["key"])
        data = self.storage.get_bytes(entry["key"])
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["size"] or digest != entry["sha256"]:
            raise CheckpointError(f"{uri}: corrupt ({len(data)} bytes, sha256 {digest[:12]}..., "
                                  f"expected {entry['size']} bytes, {entry['sha256'][:12]}...)")
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any decode failure means an unusable checkpoint
            raise CheckpointError(f"{uri}: cannot decode safely ({type(exc).__name__}: "
                                  f"{_refusal_reason(exc)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{uri}: holds a {type(state).__name__}, not a state dict")
        return state

    def load(self, key: str, map_location="cpu") -> dict:
        """Load and verify one checkpoint by key; CheckpointError/NotFound if unusable."""
        mkey = self._manifest_key(key)
        try:
            raw = self.storage.get_bytes(mkey)
        except NotFound:
            raise NotFound(f"{self.storage.uri(key)} has no manifest entry "
                           f"({self.storage.uri(mkey)}); not a committed checkpoint") from None
        return self._load_entry(_parse_entry(raw, self.storage.uri(mkey)), map_location)

    def load_latest(self, map_location="cpu") -> tuple[dict, int] | None:
        """(state, step) of the newest usable checkpoint, None if nothing was ever committed.

        A missing or corrupt ``latest`` object makes it fall back to older entries, newest first,
        with a CheckpointFallbackWarning naming what was skipped. Raises CheckpointError if
        checkpoints exist but none is usable; other storage failures propagate.
        """
        pointer_key = self._key("latest")
        bad: list[str] = []
        try:
            raw = self.storage.get_bytes(pointer_key)
            pointer = _parse_entry(raw, self.storage.uri(pointer_key))
        except NotFound:
            return None
        except CheckpointError as exc:
            pointer = None
            bad.append(str(exc))
        entries = self.list_checkpoints()
        if pointer is not None:
            # Entries above the committed step come from failed saves: never resume from them.
            older = [e for e in entries
                     if e["step"] <= pointer["step"] and e["key"] != pointer["key"]]
            candidates = [pointer, *reversed(older)]
        else:
            candidates = list(reversed(entries))
        for entry in candidates:
            try:
                state = self._load_entry(entry, map_location)
            except NotFound:
                bad.append(f"{self.storage.uri(entry['key'])}: missing")
                continue
            except CheckpointError as exc:
                bad.append(str(exc))
                continue
            if bad:
                warnings.warn(f"skipped unusable checkpoint(s): {'; '.join(bad)}; resuming from "
                              f"{self.storage.uri(entry['key'])} (step {entry['step']})",
                              CheckpointFallbackWarning, stacklevel=2)
            return state, entry["step"]
        reasons = "; ".join(bad) or "latest is corrupt and no manifest entry exists"
        where = self.storage.uri(pointer_key)
        raise CheckpointError(f"no usable checkpoint under {where}: {reasons}")
