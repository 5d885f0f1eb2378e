"""What coordinator and workers exchange: rank layout, message layouts, commands.

Per task group (the coordinator and that task's workers), one round is:
  1. down (broadcast from rank 0): header + the task's parameters + its buffers,
  2. up (reduce-sum to rank 0): gradients + buffers after the forward pass + "has gradient" flags,
  3. report (gather_object to rank 0): loss, metrics, samples, device-seconds, skipped items.
Messages are flat float32 tensors; the header's four int64 fields (command, step, batch,
version) ride in its first eight float32 slots, reinterpreted, so they stay exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import Tensor

from mtssl.config import MODEL_SECTIONS, SHARED_DATA_KEYS, Config, to_dict

CONTINUE, STOP, ABORT = 0, 1, 2  # header commands
HEADER_SLOTS = 8  # float32 slots holding 4 int64 header fields


def task_ranks(cfg: Config) -> dict[str, list[int]]:
    """Each enabled task's worker ranks: 1 + workers of earlier tasks + index (0: coordinator)."""
    out, nxt = {}, 1
    for task in cfg.enabled_tasks():
        n = getattr(cfg.tasks, task).workers
        out[task] = list(range(nxt, nxt + n))
        nxt += n
    return out


def world_size(cfg: Config) -> int:
    return 1 + sum(len(r) for r in task_ranks(cfg).values())


def worker_rank(cfg: Config, task: str, index: int) -> int:
    return task_ranks(cfg)[task][index]


def role_name(task: str | None, index: int | None = None) -> str:
    return "coordinator" if task is None else f"{task}/{index}"


@dataclass(frozen=True)
class Layout:
    """Where each tensor of one task sits in its flat messages."""
    task: str
    params: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape): what the task updates
    buffers: tuple[tuple[str, tuple[int, ...]], ...]  # running statistics, priors, counters

    @classmethod
    def of(cls, model: torch.nn.Module, task: str) -> "Layout":
        """The task's parameters (owned_names order) and the buffers of the trunk and its head."""
        named = dict(model.named_parameters())
        names = model.owned_names()[task]
        bad = [n for n in names if named[n].dtype != torch.float32]
        if bad:
            raise TypeError(f"distributed messages are float32; parameters {bad[:3]} are not")
        prefixes = ("trunk.", f"heads.{task}.")
        return cls(task=task,
                   params=tuple((n, tuple(named[n].shape)) for n in names),
                   buffers=tuple((n, tuple(b.shape)) for n, b in model.named_buffers()
                                 if n.startswith(prefixes)))

    @staticmethod
    def _numel(entries) -> int:
        return sum(int(torch.Size(s).numel()) for _, s in entries)

    @property
    def n_params(self) -> int:
        return self._numel(self.params)

    @property
    def n_buffers(self) -> int:
        return self._numel(self.buffers)

    @property
    def down_size(self) -> int:
        return HEADER_SLOTS + self.n_params + self.n_buffers

    @property
    def up_size(self) -> int:
        return self.n_params + self.n_buffers + len(self.params)

    def fingerprint(self, cfg: Config) -> str:
        config = to_dict(cfg)
        doc = {"layout": [self.params, self.buffers],
               "config": {s: config[s] for s in MODEL_SECTIONS},
               "data": {k: config["data"][k] for k in SHARED_DATA_KEYS}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def _spans(self, entries, start: int):
        for name, shape in entries:
            n = int(torch.Size(shape).numel())
            yield name, shape, start, start + n
            start += n

    # --- down: header + parameters + buffers ----------------------------------------------
    def pack_down(self, out: Tensor, header: tuple[int, int, int, int],
                  params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        out[:HEADER_SLOTS].view(torch.int64).copy_(torch.tensor(header, dtype=torch.int64))
        for name, _, a, b in self._spans(self.params, HEADER_SLOTS):
            out[a:b].copy_(params[name].detach().reshape(-1))
        for name, _, a, b in self._spans(self.buffers, HEADER_SLOTS + self.n_params):
            out[a:b].copy_(buffers[name].reshape(-1))
        return out

    @staticmethod
    def header(flat: Tensor) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in flat[:HEADER_SLOTS].view(torch.int64).tolist())

    @torch.no_grad()
    def unpack_down(self, flat: Tensor, params: dict[str, Tensor], buffers: dict[str, Tensor]
                    ) -> None:
        """Copy the coordinator's parameters and buffers into a worker's model."""
        for name, shape, a, b in self._spans(self.params, HEADER_SLOTS):
            params[name].copy_(flat[a:b].view(shape))
        for name, shape, a, b in self._spans(self.buffers, HEADER_SLOTS + self.n_params):
            buffers[name].copy_(flat[a:b].view(shape))

    def sent_buffers(self, flat: Tensor) -> dict[str, Tensor]:
        """The buffer values a down message carried (views into it)."""
        return {name: flat[a:b].view(shape)
                for name, shape, a, b in self._spans(self.buffers, HEADER_SLOTS + self.n_params)}

    # --- up: gradients + buffers + flags ----------------------------------------------------
    def pack_up(self, out: Tensor, grads: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        out.zero_()
        flags = self.n_params + self.n_buffers
        for i, (name, _, a, b) in enumerate(self._spans(self.params, 0)):
            if name in grads:
                out[a:b].copy_(grads[name].reshape(-1))
                out[flags + i] = 1.0
        for name, _, a, b in self._spans(self.buffers, self.n_params):
            out[a:b].copy_(buffers[name].reshape(-1))
        return out

    def unpack_up(self, flat: Tensor, workers: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Summed up message -> (mean gradients of parameters any worker had, mean buffers)."""
        flags = self.n_params + self.n_buffers
        grads = {name: flat[a:b].view(shape) / workers
                 for i, (name, shape, a, b) in enumerate(self._spans(self.params, 0))
                 if flat[flags + i] > 0}
        buffers = {name: flat[a:b].view(shape) / workers
                   for name, shape, a, b in self._spans(self.buffers, self.n_params)}
        return grads, buffers


def message_bytes(layout: Layout, workers: int) -> int:
    """Payload bytes of one task round: one down and one up message per worker (float32)."""
    return 4 * workers * (layout.down_size + layout.up_size)
