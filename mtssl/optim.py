"""Per-task RMSProp: every task keeps its own optimizer state, even for shared parameters.

The rule (paper.md section 5, our reading of "separate RMSProp per task"): for a parameter p
read by tasks T, task t keeps v_t fed only by its own gradients g_t and proposes
    delta_t = -lr_t * (g_t / (sqrt(v_t) + eps) + wd * p)   (optional momentum on the ratio);
p receives the sum of the deltas of the tasks that stepped. Weight decay is decoupled from the
normalisation (Loshchilov & Hutter, ICLR 2019): added to g_t before dividing by sqrt(v_t), a
weakly used weight's decay would be amplified to a full lr-sized step and erase it. Head and
alpha parameters belong to one task and are touched only by it. The single-process trainer and
the distributed coordinator both go through `PerTaskRMSProp`, so both apply exactly the same
rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def rmsprop_delta(grad: Tensor, square_avg: Tensor, momentum_buf: Tensor | None, *,
                  lr: float, decay: float, eps: float, momentum: float,
                  param: Tensor | None = None, weight_decay: float = 0.0
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One RMSProp proposal. Returns (delta, new_square_avg, new_momentum_buf); pure.

    `param` and `weight_decay`: decoupled decay, -lr * weight_decay * param, outside the ratio.
    Fused multiply-adds (addcmul, addcdiv) round as `PerTaskRMSProp`'s in-place ops do."""
    square_avg = torch.addcmul(decay * square_avg, grad, grad, value=1.0 - decay)
    denom = square_avg.sqrt() + eps
    if momentum_buf is not None:
        direction = torch.addcdiv(momentum * momentum_buf, grad, denom)
        momentum_buf = direction
    else:
        direction = grad / denom
    delta = -lr * direction
    if weight_decay and param is not None:
        delta = torch.add(delta, param, alpha=-lr * weight_decay)
    return delta, square_avg, momentum_buf


class PerTaskRMSProp:
    """Holds one RMSProp state per (task, parameter) and applies summed per-task deltas.

    params: name -> parameter of the whole net. owners: task -> names that task updates
    (its shared names plus its own head/alpha names). Weight decay applies to weight tensors
    (ndim > 1) only: norms, biases and lasso coefficients are left alone.
    """

    def __init__(self, *, params: Mapping[str, torch.nn.Parameter],
                 owners: Mapping[str, Iterable[str]], lr: Mapping[str, float],
                 decay: float = 0.9, eps: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        self.params = dict(params)
        self.owners = {t: tuple(names) for t, names in owners.items()}
        for task, names in self.owners.items():
            missing = [n for n in names if n not in self.params]
            if missing:
                raise KeyError(f"task {task!r} owns unknown parameters {missing[:3]}")
        if set(lr) != set(self.owners):
            raise KeyError(f"learning rates given for {sorted(lr)}, tasks are {sorted(self.owners)}")
        self.lr = dict(lr)
        self.decay, self.eps, self.momentum, self.weight_decay = decay, eps, momentum, weight_decay
        self.state: dict[str, dict[str, dict[str, Tensor]]] = {t: {} for t in self.owners}
        self.steps: dict[str, int] = {t: 0 for t in self.owners}

    def deltas(self, task: str, grads: Mapping[str, Tensor], *, lr_scale: float = 1.0
               ) -> dict[str, Tensor]:
        """Task `task`'s proposed updates from its gradients; advances only that task's state.

        The same arithmetic as `rmsprop_delta`, operation for operation (so the same numbers),
        done with `torch._foreach_*` over all of the task's tensors at once: a few kernel
        launches per step instead of a dozen per parameter."""
        owned = set(self.owners[task])
        stray = [n for n in grads if n not in owned]
        if stray:
            raise KeyError(f"task {task!r} sent gradients for parameters it does not own: {stray[:3]}")
        self.steps[task] += 1
        if not grads:
            return {}
        names = list(grads)
        params = [self.params[n] for n in names]
        g = [grad if grad.dtype == p.dtype else grad.to(p.dtype)
             for grad, p in zip(grads.values(), params)]
        state = self.state[task]
        for n, p in zip(names, params):
            st = state.get(n)
            if st is None:
                st = state[n] = {"square_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if self.momentum and "momentum" not in st:
                st["momentum"] = torch.zeros_like(p)
        sts = [state[n] for n in names]
        lr, decay = self.lr[task] * lr_scale, self.decay
        with torch.no_grad():
            # In place on the task's state, fused where `rmsprop_delta` fuses (same rounding):
            # square_avg = decay * square_avg + (1 - decay) * grad * grad
            sq = [st["square_avg"] for st in sts]
            torch._foreach_mul_(sq, decay)
            torch._foreach_addcmul_(sq, g, g, value=1.0 - decay)
            # direction = grad / (sqrt(square_avg) + eps)  [+ momentum * momentum_buf]
            denom = torch._foreach_sqrt(sq)
            torch._foreach_add_(denom, self.eps)
            direction: list[Tensor] | tuple[Tensor, ...]
            if self.momentum:
                direction = [st["momentum"] for st in sts]
                torch._foreach_mul_(direction, self.momentum)
                torch._foreach_addcdiv_(direction, g, denom)
            else:
                direction = torch._foreach_div(g, denom)
            # delta = -lr * direction - lr * weight_decay * param (weights, ndim > 1, only)
            delta = torch._foreach_mul(direction, -lr)
            if self.weight_decay:
                decayed = [i for i, p in enumerate(params) if p.ndim > 1]
                if decayed:
                    torch._foreach_add_([delta[i] for i in decayed],
                                        [params[i].detach() for i in decayed],
                                        alpha=-lr * self.weight_decay)
        return dict(zip(names, delta))

    @torch.no_grad()
    def apply(self, deltas: Mapping[str, Tensor]) -> None:
        if deltas:
            torch._foreach_add_([self.params[n] for n in deltas], list(deltas.values()))

    @torch.no_grad()
    def step(self, grads_by_task: Mapping[str, Mapping[str, Tensor]], *, lr_scale: float = 1.0
             ) -> None:
        """Synchronous round: every task's delta is computed from the same parameters, then summed
        (in task order, as the per-parameter reference does)."""
        total: dict[str, Tensor] = {}
        for task, grads in grads_by_task.items():
            deltas = self.deltas(task, grads, lr_scale=lr_scale)
            shared = [n for n in deltas if n in total]
            if shared:
                summed = torch._foreach_add([total[n] for n in shared], [deltas[n] for n in shared])
                total.update(zip(shared, summed))
            total.update((n, d) for n, d in deltas.items() if n not in total)
        self.apply(total)

    def state_dict(self) -> dict:
        return {"state": {t: {n: dict(s) for n, s in per.items()} for t, per in self.state.items()},
                "steps": dict(self.steps)}

    def load_state_dict(self, sd: Mapping) -> None:
        unknown = set(sd["state"]) - set(self.owners)
        if unknown:
            raise KeyError(f"optimizer state has tasks {sorted(unknown)} this run does not train")
        for task in self.owners:
            per = sd["state"].get(task, {})
            # Copies: the state is updated in place, and must not alias what it was loaded from.
            self.state[task] = {n: {k: v.to(self.params[n].device, copy=True)
                                    for k, v in s.items()} for n, s in per.items()}
            self.steps[task] = int(sd["steps"].get(task, 0))
