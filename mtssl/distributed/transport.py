"""torch.distributed plumbing: one process group, one subgroup per task, failures as errors.

Every collective runs with the timeout distributed.timeout_s, so a silent peer ends the run
after at most that long; a crashed peer closes its sockets and fails the collectives at once.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from mtssl.config import Config
from mtssl.distributed.protocol import task_ranks, world_size
from mtssl.env import RoleEnv
from mtssl.errors import TrainingError


class PeerLost(TrainingError):
    """A collective failed: a peer died, hung past the timeout, or could not be reached."""


def connect(cfg: Config, env: RoleEnv, *, rank: int) -> dict:
    """Join the run (rendezvous at the coordinator) and build every task's group, in task order."""
    import torch.distributed as dist
    timeout = timedelta(seconds=cfg.distributed.timeout_s)
    with guarded(f"rendezvous at {env.addr}:{env.port} as rank {rank} of {world_size(cfg)}"):
        dist.init_process_group(cfg.distributed.backend, init_method=f"tcp://{env.addr}:{env.port}",
                                rank=rank, world_size=world_size(cfg), timeout=timeout)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        return {t: dist.new_group([0, *ranks], timeout=timeout)
                for t, ranks in task_ranks(cfg).items()}


def disconnect() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def guarded(what: str):
    """Turn a failed collective into PeerLost naming what was being done."""
    try:
        yield
    except (RuntimeError, TimeoutError, ConnectionError) as err:
        if isinstance(err, TrainingError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # gloo words a dead peer differently (closed, reset, timed out): name it plainly.
        raise PeerLost(f"lost a peer: {what} failed: {first[:400]}") from None
