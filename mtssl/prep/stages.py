"""The Kubeflow pipeline's dataset prep, fanned out: plan the partitions, prepare each in its own
pod (`mtssl prep --partition K/N`), merge them (`mtssl prep-merge`). Plain functions, so they
are tested and run by kfp.local without a cluster; each runs the command a user would type."""

from __future__ import annotations

import logging

from mtssl.validation import ConfigError

log = logging.getLogger(__name__)
NOTHING = "none"  # the one plan item when nothing is to be prepared (ParallelFor needs one)


def _complete(prepared: str) -> bool:
    """A dataset with its manifest is there (a one-run prep, or partitions already merged)."""
    from mtssl.data.shards import MANIFEST
    from mtssl.storage import open_storage
    return open_storage(prepared).exists(MANIFEST)


def plan_partitions(*, data: str, prepared: str, partitions: int) -> list[str]:
    """`K/N` for K = 1..N, or [NOTHING] for the embedded data or a dataset already prepared."""
    if partitions < 1:
        raise ConfigError("prep_partitions", f"must be >= 1, got {partitions}")
    if data == "embedded":
        return [NOTHING]
    if not prepared:
        raise ConfigError("prepared", f"data {data!r} needs a location for the prepared copy")
    if _complete(prepared):
        log.info("reusing the prepared dataset at %s", prepared)
        return [NOTHING]
    return [f"{k}/{partitions}" for k in range(1, partitions + 1)]


def prepare_partition(*, data: str, prepared: str, partition: str) -> None:
    """One partition into `prepared` (resuming what an earlier attempt left); every CPU the
    pod may use works on it."""
    from mtssl.k8s.stages import run_mtssl
    if partition != NOTHING:
        run_mtssl(["prep", data, prepared, "--partition", partition, "--progress", "false"])


def merge_partitions(*, data: str, prepared: str) -> tuple[str, str]:
    """(data.images, data.frames) for training, merging the partitions unless the dataset is
    complete already."""
    from mtssl.k8s.stages import run_mtssl
    if data == "embedded":
        return "embedded", "embedded"
    if not _complete(prepared):
        run_mtssl(["prep-merge", prepared])
    return prepared, prepared
