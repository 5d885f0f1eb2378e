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
from dataclasses import dataclass

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


@dataclass(eq=False)
class _Flat:
    """One task's RMSProp state as flat buffers over `names` (in order, each reshaped to 1-D),
    a workspace of the same size (the denominator, which then becomes the delta), and each
    buffer's per-parameter views."""
    names: tuple[str, ...]
    square_avg: Tensor
    momentum: Tensor | None
    work: Tensor
    views: dict[str, list[Tensor]]  # "square_avg" / "momentum" / "work" -> views, in name order


def split_views(buf: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """buf (N,) -> one view per shape, in order."""
    return [part.view(shape) for part, shape in zip(buf.split([s.numel() for s in shapes]), shapes)]


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
        self._flat: dict[str, _Flat] = {}

    def deltas(self, task: str, grads: Mapping[str, Tensor], *, lr_scale: float = 1.0
               ) -> dict[str, Tensor]:
        """Task `task`'s proposed updates from its gradients; advances only that task's state.

        The same arithmetic as `rmsprop_delta`, operation for operation (so the same numbers).
        A task's state lives in one flat buffer per kind (`_Flat`), so each operation is one
        kernel over all of the task's elements: per-tensor calls (a few hundred parameters x
        ten operations) cost more than the arithmetic on a CPU. The deltas are views into the
        task's workspace: valid until the task's next `deltas` call (apply or add them first)."""
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
        flat = self._flat_state(task, names)
        lr = self.lr[task] * lr_scale
        with torch.no_grad():
            if flat is None:
                delta = self._tensor_deltas(task, names, g, lr)
            else:
                delta = self._flat_deltas(flat, g, lr)
            # delta -= lr * weight_decay * param (weights, ndim > 1, only)
            if self.weight_decay:
                decayed = [i for i, p in enumerate(params) if p.ndim > 1]
                if decayed:
                    torch._foreach_add_([delta[i] for i in decayed],
                                        [params[i].detach() for i in decayed],
                                        alpha=-lr * self.weight_decay)
        return dict(zip(names, delta))

    def _flat_deltas(self, flat: _Flat, g: list[Tensor], lr: float) -> list[Tensor]:
        """`rmsprop_delta`'s operations, each one kernel over the task's buffer where it reads
        no gradient, one per tensor (foreach) where it does: gathering the gradients into a
        flat copy would cost a pass over memory, more than the calls it saves."""
        sq, work, v = flat.square_avg, flat.work, flat.views
        # square_avg = decay * square_avg + (1 - decay) * grad * grad
        sq.mul_(self.decay)
        torch._foreach_addcmul_(v["square_avg"], g, g, value=1.0 - self.decay)
        # direction = grad / (sqrt(square_avg) + eps)  [+ momentum * momentum_buf]
        torch.sqrt(sq, out=work).add_(self.eps)  # the workspace: a fresh buffer costs page faults
        if flat.momentum is not None:
            flat.momentum.mul_(self.momentum)
            torch._foreach_addcdiv_(v["momentum"], g, v["work"])
            direction = flat.momentum
        else:
            for grad, denom in zip(g, v["work"]):
                torch.div(grad, denom, out=denom)
            direction = work
        # delta = -lr * direction, into the workspace (the denominator is no longer needed)
        torch.mul(direction, -lr, out=work)
        return v["work"]

    def _tensor_deltas(self, task: str, names: list[str], g: list[Tensor], lr: float) -> list[Tensor]:
        """The same operations on one tensor per parameter (parameters of mixed dtypes)."""
        state = self.state[task]
        for n in names:
            st = state.setdefault(n, {})
            for kind in self._kinds():
                if kind not in st:
                    st[kind] = torch.zeros_like(self.params[n])
        sts = [state[n] for n in names]
        sq = [st["square_avg"] for st in sts]
        torch._foreach_mul_(sq, self.decay)
        torch._foreach_addcmul_(sq, g, g, value=1.0 - self.decay)
        denom = torch._foreach_sqrt(sq)
        torch._foreach_add_(denom, self.eps)
        direction: list[Tensor] | tuple[Tensor, ...]
        if self.momentum:
            direction = [st["momentum"] for st in sts]
            torch._foreach_mul_(direction, self.momentum)
            torch._foreach_addcdiv_(direction, g, denom)
        else:
            direction = torch._foreach_div(g, denom)
        return list(torch._foreach_mul(direction, -lr))

    def _kinds(self) -> tuple[str, ...]:
        """The state each (task, parameter) keeps."""
        return ("square_avg", "momentum") if self.momentum else ("square_avg",)

    def _flat_state(self, task: str, names: list[str]) -> _Flat | None:
        """The task's flat state laid out for `names` (in order), built on first use and again
        when a step brings another set of names (a parameter without a gradient): the current
        per-name values are copied in, and `self.state` then holds views into the buffers.
        None when the parameters differ in dtype or device (one tensor per parameter then)."""
        flat = self._flat.get(task)
        if flat is not None and flat.names == tuple(names):
            return flat
        params = [self.params[n] for n in names]
        if len({(p.dtype, p.device) for p in params}) != 1:
            return None
        shapes = [p.shape for p in params]
        state = self.state[task]
        kinds = self._kinds()
        buffers = {k: torch.cat([state[n][k].reshape(-1) if n in state and k in state[n]
                                 else p.new_zeros(p.numel()) for n, p in zip(names, params)])
                   for k in kinds}
        buffers["work"] = torch.empty_like(buffers["square_avg"])
        views = {k: split_views(buf, shapes) for k, buf in buffers.items()}
        for k in kinds:
            for n, view in zip(names, views[k]):
                state.setdefault(n, {})[k] = view
        flat = self._flat[task] = _Flat(names=tuple(names), square_avg=buffers["square_avg"],
                                        momentum=buffers.get("momentum"), work=buffers["work"],
                                        views=views)
        return flat

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
            if shared:  # in place into the first task's delta (its workspace, not read again)
                torch._foreach_add_([total[n] for n in shared], [deltas[n] for n in shared])
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
            self._flat.pop(task, None)  # rebuilt from the loaded tensors on the next step
