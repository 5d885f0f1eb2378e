import hashlib
import io
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from s3_emulator import persistent_s3_emulator, s3_bucket, s3_emulator, s3_env  # noqa: F401

from mtssl.checkpoint import CheckpointError, CheckpointFallbackWarning, CheckpointStore
from mtssl.storage import LocalStorage, S3Storage, StorageError

FAST = dict(max_attempts=2, backoff_s=0.01, backoff_max_s=0.02)
REDUCED: list[str] = []


class RecordingStorage(LocalStorage):
    """Local storage that logs writes/deletes in order and can fail chosen writes."""

    def __init__(self, root, fail_on=None):
        super().__init__(root)
        self.ops: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def put_bytes(self, key, data):
        self.ops.append(("put", key))
        if self.fail_on is not None and self.fail_on(key):
            raise StorageError(f"injected failure writing {key}")
        super().put_bytes(key, data)

    def delete(self, key):
        self.ops.append(("delete", key))
        super().delete(key)


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g)
    w[0, 0] = float("nan")
    return {
        "model": OrderedDict(weight=w, bias=torch.randn(4, generator=g).to(torch.bfloat16),
                             count=torch.tensor(seed, dtype=torch.int64),
                             mask=torch.rand(5, generator=g) > 0.5),
        "optim": {"state": {0: {"step": torch.tensor(float(seed)),
                                "exp_avg": torch.randn(4, 3, generator=g)}},
                  "param_groups": [{"lr": 0.1 * seed, "params": [0, 1], "nesterov": False}]},
        "rng": torch.Generator().manual_seed(seed).get_state(),
        "meta": {"name": f"run-{seed}", "none": None, "pair": (seed, 2.5), "dtype": torch.float16},
    }


def assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        # Compare bytes so NaNs and signed zeros count too.
        assert torch.equal(a.contiguous().flatten().view(torch.uint8),
                           b.contiguous().flatten().view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def steps(store):
    return [(e["step"], e["milestone"]) for e in store.list_checkpoints()]


def test_roundtrip_is_bitwise_and_verified(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path))
    assert store.load_latest() is None
    state = make_state(1)
    key = store.save(state, step=7)
    assert key == "checkpoints/step_000000007.pt"
    loaded, step = store.load_latest()
    assert step == 7
    assert_same(state, loaded)
    assert_same(state, store.load(key))
    [entry] = store.list_checkpoints()
    raw = store.storage.get_bytes(key)
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest() and entry["size"] == len(raw)
    assert json.loads(store.storage.get_bytes("checkpoints/latest"))["key"] == key


def test_object_then_manifest_then_latest_then_retention(tmp_path):
    st = RecordingStorage(tmp_path)
    store = CheckpointStore(st, keep_last=1)
    store.save(make_state(1), step=1)
    st.ops.clear()
    store.save(make_state(2), step=2)
    assert st.ops == [("put", "checkpoints/step_000000002.pt"),
                      ("put", "checkpoints/manifest/step_000000002.json"),
                      ("put", "checkpoints/latest"),
                      ("delete", "checkpoints/manifest/step_000000001.json"),
                      ("delete", "checkpoints/step_000000001.pt")]


@pytest.mark.parametrize("stage", ["step_000000002.pt", "manifest/step_000000002.json", "latest"])
def test_failed_save_keeps_previous_latest(tmp_path, stage):
    st = RecordingStorage(tmp_path)
    store = CheckpointStore(st)
    store.save(make_state(1), step=1)
    before = st.get_bytes("checkpoints/latest")
    st.fail_on = lambda key: key == f"checkpoints/{stage}"
    with pytest.raises(StorageError, match="injected"):
        store.save(make_state(2), step=2)
    assert st.get_bytes("checkpoints/latest") == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed: latest is intact
        loaded, step = store.load_latest()
    assert step == 1
    assert_same(make_state(1), loaded)
    # The retried save at the same step succeeds and supersedes the leftovers.
    st.fail_on = None
    store.save(make_state(2), step=2)
    assert store.load_latest()[1] == 2


def test_retention_keeps_last_k_and_milestones(tmp_path):
    st = RecordingStorage(tmp_path)
    store = CheckpointStore(st, keep_last=2)
    for s in range(1, 7):
        store.save(make_state(s), step=s, milestone="gpuh_000.50" if s == 2 else None)
    assert steps(store) == [(2, "gpuh_000.50"), (5, None), (6, None)]
    assert [m["key"] for m in store.milestones()] == ["checkpoints/step_000000002.gpuh_000.50.pt"]
    assert st.list() == ["checkpoints/latest",
                         "checkpoints/manifest/step_000000002.gpuh_000.50.json",
                         "checkpoints/manifest/step_000000005.json",
                         "checkpoints/manifest/step_000000006.json",
                         "checkpoints/step_000000002.gpuh_000.50.pt",
                         "checkpoints/step_000000005.pt",
                         "checkpoints/step_000000006.pt"]
    assert_same(make_state(2), store.load("checkpoints/step_000000002.gpuh_000.50.pt"))
    with pytest.raises(ValueError, match="milestone"):
        store.save(make_state(7), step=7, milestone="../escape")


def test_leftovers_of_failed_save_are_never_resumed_and_get_cleaned(tmp_path):
    st = RecordingStorage(tmp_path)
    store = CheckpointStore(st, keep_last=3)
    for s in (1, 2, 3):
        store.save(make_state(s), step=s)
    st.fail_on = lambda key: key == "checkpoints/latest"
    with pytest.raises(StorageError):
        store.save(make_state(9), step=9)  # object + manifest of step 9 written, latest not
    st.fail_on = None
    assert (9, None) in steps(store)
    assert store.load_latest()[1] == 3
    # Even when latest's object is bad, the fallback goes back in time, not to the leftover.
    _corrupt(st, "checkpoints/step_000000003.pt")
    with pytest.warns(CheckpointFallbackWarning, match=r"\(step 2\)"):
        assert store.load_latest()[1] == 2
    store.save(make_state(4), step=4)
    assert steps(store) == [(2, None), (3, None), (4, None)]


def _corrupt(st, key):
    data = bytearray(st.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    st.put_bytes(key, bytes(data))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_latest_object_falls_back_and_says_so(tmp_path, damage):
    store = CheckpointStore(LocalStorage(tmp_path))
    for s in (1, 2, 3):
        store.save(make_state(s), step=s)
    bad = "checkpoints/step_000000003.pt"
    if damage == "corrupt":
        _corrupt(store.storage, bad)
    else:
        store.storage.delete(bad)
    pattern = (rf"step_000000003\.pt: {damage}.*"
               r"resuming from .*step_000000002\.pt \(step 2\)")
    with pytest.warns(CheckpointFallbackWarning, match=pattern):
        loaded, step = store.load_latest()
    assert step == 2
    assert_same(make_state(2), loaded)
    if damage == "corrupt":
        with pytest.raises(CheckpointError, match="corrupt"):
            store.load(bad)


def test_corrupt_latest_pointer_and_all_bad(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path))
    for s in (1, 2):
        store.save(make_state(s), step=s)
    store.storage.put_bytes("checkpoints/latest", b"{trunc")
    with pytest.warns(CheckpointFallbackWarning, match="latest: not valid JSON.*step 2"):
        assert store.load_latest()[1] == 2
    for s in (1, 2):
        _corrupt(store.storage, f"checkpoints/step_00000000{s}.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        store.load_latest()


class Reducer:
    """Unpickling this would run code; a safe loader must refuse it."""

    def __reduce__(self):
        return (REDUCED.append, ("code ran",))


def test_arbitrary_objects_are_refused_on_save_and_on_load(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path))
    refused = r"state\['extra'\]\['obj'\]: .*Reducer is not checkpointable"
    with pytest.raises(TypeError, match=refused):
        store.save({"w": torch.ones(2), "extra": {"obj": Reducer()}}, step=1)
    assert store.storage.list() == []  # nothing written
    store.save(make_state(1), step=1)
    # Forge step 2 with consistent hashes, as a compromised writer could: the sha256 check passes,
    # so only weights_only loading stands between the payload and code execution.
    buf = io.BytesIO()
    torch.save({"payload": Reducer()}, buf)
    data = buf.getvalue()
    key = "checkpoints/step_000000002.pt"
    entry = dict(store.list_checkpoints()[0], key=key, step=2, size=len(data),
                 sha256=hashlib.sha256(data).hexdigest())
    store.storage.put_bytes(key, data)
    store.storage.put_bytes("checkpoints/manifest/step_000000002.json", json.dumps(entry).encode())
    store.storage.put_bytes("checkpoints/latest", json.dumps(entry).encode())
    with pytest.warns(CheckpointFallbackWarning, match="step_000000002.pt: cannot decode safely"):
        assert store.load_latest()[1] == 1
    with pytest.raises(CheckpointError, match="cannot decode safely") as info:
        store.load(key)
    assert REDUCED == []
    # The refusal names what was refused, and never passes on torch's advice to retry unsafely.
    assert "GLOBAL" in str(info.value) and "weights_only" not in str(info.value)


def test_resume_from_s3_with_a_fresh_store(s3_bucket):
    store = CheckpointStore(S3Storage(s3_bucket, "run1", create_bucket=True, **FAST), keep_last=2)
    for s in (1, 2, 3):
        store.save(make_state(s), step=s)
    fresh = CheckpointStore(S3Storage(s3_bucket, "run1", **FAST), keep_last=2)
    loaded, step = fresh.load_latest()
    assert step == 3
    assert_same(make_state(3), loaded)
    assert [e["step"] for e in fresh.list_checkpoints()] == [2, 3]


@pytest.mark.parametrize("stage", ["step_000000002.pt", "manifest/step_000000002.json", "latest"])
def test_emulator_killed_during_save(persistent_s3_emulator, monkeypatch, stage):
    """SIGKILL the S3 emulator right before one of the three writes of a save, then restart it.

    The restarted emulator replays every request the old one received (moto's recorder), so the
    objects written before the kill come back, as they would on a durable S3 service.
    """
    emu = persistent_s3_emulator
    for k, v in emu.env().items():
        monkeypatch.setenv(k, v)
    st = S3Storage("ckpts", create_bucket=True, **FAST)
    store = CheckpointStore(st)
    store.save(make_state(1), step=1)
    put = st.put_bytes

    def put_then_die(key, data):
        if key == f"checkpoints/{stage}":
            emu.kill()
        put(key, data)

    monkeypatch.setattr(st, "put_bytes", put_then_die)
    with pytest.raises(StorageError, match="after 2 attempts"):
        store.save(make_state(2), step=2)
    emu.start()
    fresh = CheckpointStore(S3Storage("ckpts", **FAST))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, step = fresh.load_latest()
    assert step == 1
    assert_same(make_state(1), loaded)
    # Writes before the kill survived the restart, so this is not passing on an empty bucket.
    assert fresh.storage.exists("checkpoints/step_000000002.pt") == (stage != "step_000000002.pt")
