import math

import pytest
import torch

from mtssl.models.lasso import TapMix
from mtssl.optim import PerTaskRMSProp, rmsprop_delta


def taps(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"u{i}": torch.randn(4, 2, 3, 3, generator=g) for i in range(n)}


def test_lasso_starts_as_the_naive_net():
    t = taps()
    assert torch.equal(TapMix(num_taps=3)(t), t["u2"])
    assert torch.equal(TapMix(num_taps=3, mode="naive")(t), t["u2"])


def test_loss_and_penalty_cannot_be_lowered_by_shrinking_alpha():
    # Every head normalises its input, so a raw alpha row's scale was invisible to the task
    # while L1 fell with it: the lasso shrank alpha for free instead of choosing units.
    t = taps()
    mix = TapMix(num_taps=3)
    with torch.no_grad():
        mix.alpha.copy_(torch.tensor([0.3, -0.2, 0.9]))
    out, pen = mix(t), mix.penalty()
    with torch.no_grad():
        mix.alpha.mul_(0.1)
    assert torch.allclose(mix(t), out, atol=1e-6)
    assert torch.allclose(mix.penalty(), pen)
    assert mix.penalty() > 1.0  # three units read: above the one-hot minimum of exactly 1
    assert torch.isclose(TapMix(num_taps=3).penalty(), torch.tensor(1.0))


def test_l1_concentrates_alpha_on_the_useful_unit():
    t = taps()
    target = t["u0"]  # only the first unit is useful; the init reads only the last
    mix = TapMix(num_taps=3)
    opt = torch.optim.SGD(mix.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        loss = (mix(t) - target).pow(2).mean() + 0.02 * mix.penalty()
        loss.backward()
        opt.step()
    a = mix.coefficients().detach()
    assert abs(a[2]) < 0.05 and abs(a[1]) < 0.05  # from 1.0 and 0.0
    assert a[0] > 0.99

    # The penalty alone makes a spread row sparse instead of small.
    pure = TapMix(num_taps=3)
    with torch.no_grad():
        pure.alpha.copy_(torch.tensor([0.5, 0.6, 0.55]))
    opt = torch.optim.SGD(pure.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        pure.penalty().backward()
        opt.step()
    a = pure.coefficients().detach().abs()
    assert a.max() > 0.95 and (a < 0.2).sum() == 2
    assert pure.alpha.detach().norm() > 0.5  # the raw row did not just shrink


def hand_rmsprop(g, v, lr, decay, eps):
    v = decay * v + (1 - decay) * g * g
    return -lr * g / (math.sqrt(v) + eps), v


def test_per_task_rmsprop_matches_hand_computed_two_task_update():
    shared = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    head_a = torch.nn.Parameter(torch.tensor([0.5]))
    params = {"w": shared, "head_a": head_a}
    opt = PerTaskRMSProp(params=params, owners={"a": ["w", "head_a"], "b": ["w"]},
                         lr={"a": 0.1, "b": 0.01}, decay=0.9, eps=1e-3, momentum=0.0)
    grads = [({"w": torch.tensor([0.3, -0.1]), "head_a": torch.tensor([2.0])},
              {"w": torch.tensor([-4.0, 0.5])}),
             ({"w": torch.tensor([0.2, 0.2]), "head_a": torch.tensor([-1.0])},
              {"w": torch.tensor([1.0, 1.0])})]
    w, h = [1.0, -2.0], 0.5
    va, vb, vh = [0.0, 0.0], [0.0, 0.0], 0.0
    for ga, gb in grads:
        opt.step({"a": ga, "b": gb})
        for i in range(2):  # each task's state sees only its own gradients
            da, va[i] = hand_rmsprop(ga["w"][i].item(), va[i], 0.1, 0.9, 1e-3)
            db, vb[i] = hand_rmsprop(gb["w"][i].item(), vb[i], 0.01, 0.9, 1e-3)
            w[i] += da + db
        dh, vh = hand_rmsprop(ga["head_a"].item(), vh, 0.1, 0.9, 1e-3)
        h += dh
        assert shared.tolist() == pytest.approx(w, rel=1e-6)
        assert head_a.item() == pytest.approx(h, rel=1e-6)
    assert opt.state["b"]["w"]["square_avg"].tolist() == pytest.approx(vb, rel=1e-6)


def test_tasks_cannot_touch_other_tasks_parameters():
    params = {"w": torch.nn.Parameter(torch.zeros(2)), "head_a": torch.nn.Parameter(torch.zeros(1))}
    opt = PerTaskRMSProp(params=params, owners={"a": ["w", "head_a"], "b": ["w"]},
                         lr={"a": 0.1, "b": 0.1})
    with pytest.raises(KeyError, match="does not own"):
        opt.step({"b": {"head_a": torch.ones(1)}})


def test_momentum_and_state_round_trip():
    g = torch.tensor([0.5])
    delta1, v, m = rmsprop_delta(g, torch.zeros(1), torch.zeros(1), lr=0.1, decay=0.9, eps=0.0,
                                 momentum=0.9)
    delta2, _, _ = rmsprop_delta(g, v, m, lr=0.1, decay=0.9, eps=0.0, momentum=0.9)
    r1 = 0.5 / math.sqrt(0.1 * 0.25)
    r2 = 0.5 / math.sqrt(0.9 * 0.1 * 0.25 + 0.1 * 0.25)
    assert delta1.item() == pytest.approx(-0.1 * r1)
    assert delta2.item() == pytest.approx(-0.1 * (0.9 * r1 + r2))

    p = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = PerTaskRMSProp(params=p, owners={"a": ["w"]}, lr={"a": 0.1}, momentum=0.9)
    opt.step({"a": {"w": torch.ones(3)}})
    clone = PerTaskRMSProp(params=p, owners={"a": ["w"]}, lr={"a": 0.1}, momentum=0.9)
    clone.load_state_dict(opt.state_dict())
    d1 = opt.deltas("a", {"w": torch.ones(3)})
    d2 = clone.deltas("a", {"w": torch.ones(3)})
    assert torch.equal(d1["w"], d2["w"])


def reference_deltas(opt_state: dict, params: dict, grads: dict, *, lr: float, decay: float,
                     eps: float, momentum: float, weight_decay: float) -> dict:
    """The per-parameter rule, one `rmsprop_delta` call per tensor (the optimizer's reference)."""
    out = {}
    for name, grad in grads.items():
        p = params[name]
        st = opt_state.setdefault(name, {"square_avg": torch.zeros_like(p)})
        if momentum and "momentum" not in st:
            st["momentum"] = torch.zeros_like(p)
        out[name], st["square_avg"], mom = rmsprop_delta(
            grad, st["square_avg"], st.get("momentum"), lr=lr, decay=decay, eps=eps,
            momentum=momentum, param=p.detach(), weight_decay=weight_decay if p.ndim > 1 else 0.0)
        if mom is not None:
            st["momentum"] = mom
    return out


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2), (0.0, 1e-2)])
def test_foreach_rmsprop_equals_the_per_parameter_reference(momentum, weight_decay):
    """Synchronous `step` (deltas summed over tasks) and asynchronous `deltas` + `apply` (the
    coordinator's path) both give exactly the numbers of one `rmsprop_delta` per parameter."""
    g = torch.Generator().manual_seed(0)
    # Odd sizes beside tiny ones: the flat buffers' vector loops cross parameter boundaries.
    shapes = {"conv": (4, 3, 3, 3), "bias": (4,), "fc": (5, 4), "head_a": (3, 2), "alpha": (4,),
              "wide": (37, 29)}
    owners = {"a": ["conv", "bias", "fc", "head_a", "alpha", "wide"], "b": ["conv", "bias", "fc"]}
    lr = {"a": 1e-2, "b": 3e-3}
    kw = dict(decay=0.9, eps=1e-3, momentum=momentum, weight_decay=weight_decay)
    init = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    params = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
    ref = {n: v.clone() for n, v in init.items()}
    opt = PerTaskRMSProp(params=params, owners=owners, lr=lr, **kw)
    ref_state = {t: {} for t in owners}
    for step in range(4):
        scale = 0.5 + 0.25 * step
        # Some steps leave a parameter without a gradient (allow_unused): it is left out.
        grads = {t: {n: torch.randn(shapes[n], generator=g) * 10 ** step for n in names
                     if not (step == 1 and n == "fc")} for t, names in owners.items()}
        if step < 2:  # synchronous round
            opt.step(grads, lr_scale=scale)
            total = {}
            for t, gs in grads.items():
                for n, d in reference_deltas(ref_state[t], ref, gs, lr=lr[t] * scale, **kw).items():
                    total[n] = total[n] + d if n in total else d
            for n, d in total.items():
                ref[n] = ref[n] + d
        else:  # asynchronous: each task's update applied as it arrives
            for t, gs in grads.items():
                deltas = opt.deltas(t, gs, lr_scale=scale)
                want = reference_deltas(ref_state[t], ref, gs, lr=lr[t] * scale, **kw)
                assert deltas.keys() == want.keys()
                for n in want:
                    assert torch.equal(deltas[n], want[n]), (step, t, n)
                opt.apply(deltas)
                for n, d in want.items():
                    ref[n] = ref[n] + d
        for n in shapes:
            assert torch.equal(params[n].detach(), ref[n]), (step, n)
    for t in owners:
        for n, st in ref_state[t].items():
            for k, v in st.items():
                assert torch.equal(opt.state[t][n][k], v), (t, n, k)
    assert opt.steps == {"a": 4, "b": 4}


@pytest.mark.parametrize("dtypes", ["same", "mixed"])
def test_resumed_optimizer_continues_exactly(tmp_path, dtypes):
    """State saved mid-run (views into the flat buffers) and loaded into a fresh optimizer gives
    the same parameters as the uninterrupted run; parameters of mixed dtypes take the
    per-tensor path and must agree as well."""
    g = torch.Generator().manual_seed(1)
    shapes = {"w": (6, 5), "b": (6,), "h": (7, 3)}
    owners = {"a": ["w", "b", "h"], "b": ["w", "b"]}
    kw = dict(lr={"a": 1e-2, "b": 3e-3}, decay=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-2)
    init = {n: torch.randn(s, generator=g, dtype=torch.float64 if dtypes == "mixed" and n == "h"
                           else torch.float32) for n, s in shapes.items()}
    grads = [{t: {n: torch.randn(shapes[n], generator=g).to(init[n].dtype) for n in names}
              for t, names in owners.items()} for _ in range(6)]

    def run(split: int | None) -> dict:
        params = {n: torch.nn.Parameter(v.clone()) for n, v in init.items()}
        opt = PerTaskRMSProp(params=params, owners=owners, **kw)
        for i, step in enumerate(grads):
            if i == split:
                torch.save(opt.state_dict(), tmp_path / "opt.pt")
                opt = PerTaskRMSProp(params=params, owners=owners, **kw)
                opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
            opt.step(step)
        return {n: p.detach().clone() for n, p in params.items()}

    straight, resumed = run(None), run(3)
    for n in shapes:
        assert torch.equal(straight[n], resumed[n]), n
