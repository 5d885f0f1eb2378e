"""Each task: its sampler's geometry and skips, its loss, and that the loss falls on a fixed batch."""

import numpy as np
import pytest
import torch

from mtssl.data.embedded import embedded_photos, synthetic_motion_clips
from mtssl.data.images import ArrayImages, FolderImages
from mtssl.data.stream import TaskStream
from mtssl.models.lasso import TapMix
from mtssl.models.resnet_v2 import ResNetV2Trunk
from mtssl.optim import PerTaskRMSProp
from mtssl.tasks import TASKS
from mtssl.tasks.base import SkipSample, TrunkInfo
from mtssl.tasks.exemplar import triplet_loss
from mtssl.tasks.relative_position import NEIGHBOURS

TRUNK = TrunkInfo(channels=64, width=0.0625, output_stride=8, norm="batch")
SMALL = {
    "relative_position": dict(patch_size=16, gap=8, jitter=2, min_pixels=6000, max_pixels=12000),
    "colorization": dict(input_size=32),
    "exemplar": dict(image_size=48, patch_size=16),
    "motion_segmentation": dict(frame_size=(32, 48)),
}


def task_cfg(task, **kw):
    return TASKS[task].config_cls(**{**SMALL[task], **kw})


def fixed_batch(task, n=8):
    cfg = task_cfg(task)
    source = embedded_photos() if TASKS[task].source == "images" else synthetic_motion_clips(
        num_clips=2, frames_per_clip=4, size=(48, 64))[0]
    sampler = TASKS[task].build_sampler(cfg, TRUNK, TASKS[task].harmonize)
    stream = TaskStream(source=source, sampler=sampler, batch_size=n, seed=0, stream_id=0)
    batch = stream.batch(0)
    batch.pop("skipped")
    return cfg, batch


@pytest.mark.parametrize("task", list(TASKS))
def test_loss_is_finite_and_falls_on_a_fixed_batch(task):
    torch.manual_seed(0)
    cfg, batch = fixed_batch(task)
    assert batch[TASKS[task].input_key].shape[-3] == 3  # images the benchmarks feed the trunk
    trunk = ResNetV2Trunk(units=(1, 1, 2), width=0.0625, output_stride=8)
    head = TASKS[task].build_head(cfg, TRUNK)
    mix = TapMix(num_taps=2)
    if task == "colorization":
        head.calibrate([batch])
    modules = torch.nn.ModuleDict({"trunk": trunk, "head": head, "mix": mix})
    params = dict(modules.named_parameters())
    opt = PerTaskRMSProp(params=params, owners={task: list(params)}, lr={task: 2e-3},
                         momentum=0.9, eps=1e-3)
    losses = []
    for _ in range(12):
        out = head(batch, lambda x: mix(trunk(x).taps))
        assert torch.isfinite(out.loss)
        losses.append(out.loss.item())
        grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
        opt.step({task: {n: g for n, g in zip(params, grads) if g is not None}})
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    metric, chance = next(iter(out.chance.items()))  # the primary pretext metric and its chance
    assert 0 <= out.metrics[metric] <= 1 and 0 <= chance <= 1


def coordinate_image(h=120, w=160):
    """R encodes x, G encodes y, so a patch says where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)


def test_relative_position_label_matches_geometry():
    img = coordinate_image()
    cfg = task_cfg("relative_position", min_pixels=img.shape[0] * img.shape[1],
                   max_pixels=img.shape[0] * img.shape[1], color_drop=False, pairs=3,
                   normalize_patches=False, downsample_prob=0.0)
    sampler = TASKS["relative_position"].build_sampler(cfg, TRUNK, False)
    step = cfg.patch_size + cfg.gap
    seen = set()
    for seed in range(20):
        s = sampler(img, np.random.default_rng(seed))
        assert s["patches"].shape[0] == 1 + cfg.pairs and s["label"].shape == (cfg.pairs,)
        assert len(set(s["label"].tolist())) == cfg.pairs  # distinct neighbours of one centre
        corners = ((s["patches"][:, :2, 0, 0] + 1) / 2 * 255).round()  # (1 + pairs, [x, y])
        for k, label in enumerate(s["label"]):
            dx, dy = corners[1 + k] - corners[0]
            dr, dc = NEIGHBOURS[int(label)]
            assert abs(dx - dc * step) <= 2 * cfg.jitter and abs(dy - dr * step) <= 2 * cfg.jitter
            seen.add(int(label))
    assert seen == set(range(8))


def test_relative_position_skips_only_images_the_grid_never_fits():
    """The stream marks a skipped image unusable for good, so a skip must not depend on one draw:
    an image the grid fits in at only part of the area range is always used (at an area in that
    part), and one it fits in at none of it is always skipped."""
    cfg = task_cfg("relative_position", min_pixels=5000, max_pixels=20000)  # grid span 68 px
    sampler = TASKS["relative_position"].build_sampler(cfg, TRUNK, False)
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (60, 120, 3), dtype=np.uint8)  # the grid fits above 9,248 px
    for seed in range(50):
        assert sampler(wide, np.random.default_rng(seed))["patches"].shape[0] == 1 + cfg.pairs
    tiny = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)  # needs 2.3x enlargement (max 2x)
    for seed in range(5):
        with pytest.raises(SkipSample, match="too_small"):
            sampler(tiny, np.random.default_rng(seed))


def test_relative_position_patches_are_normalised_and_pixelated_on_request():
    photo = embedded_photos().load(0)

    def patches(prob: float) -> torch.Tensor:
        sampler = TASKS["relative_position"].build_sampler(
            task_cfg("relative_position", downsample_prob=prob), TRUNK, True)
        return torch.cat([torch.from_numpy(sampler(photo, np.random.default_rng(i))["patches"])
                          for i in range(4)])  # (4 * 9, 3, P, P)

    def roughness(p: torch.Tensor) -> float:  # neighbouring pixels' mean difference
        return (p[:, 0, :, 1:] - p[:, 0, :, :-1]).abs().mean().item()

    sharp, pixelated = patches(0.0), patches(1.0)
    for p in (sharp, pixelated):
        assert torch.allclose(p.mean(dim=(1, 2, 3)), torch.zeros(len(p)), atol=1e-4)
        assert torch.allclose(p.std(dim=(1, 2, 3)), torch.ones(len(p)), atol=0.05)
    assert roughness(pixelated) < 0.8 * roughness(sharp)


def test_colour_dropping_keeps_one_channel_per_patch():
    photo = embedded_photos().load(0)  # astronaut: every channel varies
    sampler = TASKS["relative_position"].build_sampler(
        task_cfg("relative_position", normalize_patches=False, downsample_prob=0.0), TRUNK, False)
    kept = []
    for seed in range(4):
        p = torch.from_numpy(sampler(photo, np.random.default_rng(seed))["patches"])  # (9, 3, P, P)
        spread = p.flatten(2).std(2)  # (9, 3)
        loud = spread > 20 * spread.min(1, keepdim=True).values
        assert (loud.sum(1) == 1).all(), spread  # one channel kept, the other two faint noise
        kept.append(loud.float().argmax(1))
    # each patch draws its own channel: a grid whose nine patches all kept one is 1 in 6,561
    assert all(len(set(k.tolist())) > 1 for k in kept)


def test_harmonized_patches_are_lightness_only():
    cfg = task_cfg("relative_position")
    s = TASKS["relative_position"].build_sampler(cfg, TRUNK, True)(
        embedded_photos().load(0), np.random.default_rng(0))
    p = s["patches"]
    assert np.array_equal(p[:, 0], p[:, 1]) and np.array_equal(p[:, 1], p[:, 2])


def test_samplers_skip_what_they_cannot_use():
    tiny = np.zeros((10, 12, 3), np.uint8)
    grey = np.repeat(np.random.default_rng(0).integers(0, 255, (80, 80, 1), dtype=np.uint8), 3, 2)
    rng = np.random.default_rng(0)
    for task in ("relative_position", "colorization", "exemplar"):
        sampler = TASKS[task].build_sampler(task_cfg(task), TRUNK, False)
        with pytest.raises(SkipSample, match="too_small"):
            sampler(tiny, rng)
    with pytest.raises(SkipSample, match="grayscale"):
        TASKS["colorization"].build_sampler(task_cfg("colorization"), TRUNK, True)(grey, rng)
    with pytest.raises(SkipSample, match="too_small"):
        TASKS["motion_segmentation"].build_sampler(task_cfg("motion_segmentation"), TRUNK, False)(
            (tiny, np.zeros((10, 12), np.float32)), rng)


def test_stream_skips_and_counts_bad_items_once(tmp_path):
    photo = embedded_photos().load(0)
    from PIL import Image
    Image.fromarray(photo).save(tmp_path / "good.png")
    Image.fromarray(photo[:10, :10]).save(tmp_path / "tiny.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    sampler = TASKS["exemplar"].build_sampler(task_cfg("exemplar"), TRUNK, False)
    stream = TaskStream(source=FolderImages(tmp_path), sampler=sampler, batch_size=4, seed=0,
                        stream_id=0)
    skipped = [item for b in range(6) for item in stream.batch(b)["skipped"]]
    reasons = {name.rsplit("/", 1)[-1]: why for name, why in skipped}
    assert len(skipped) == 3 and reasons["tiny.png"] == "too_small"
    assert set(reasons) == {"tiny.png", "corrupt.jpg", "empty.png"}


@pytest.mark.parametrize("pick_id", [None, 3000])  # own picks; shared picks (data.shared_draws)
def test_stream_is_deterministic_and_shards_split_batches(pick_id):
    sampler = TASKS["exemplar"].build_sampler(task_cfg("exemplar"), TRUNK, False)
    full = TaskStream(source=embedded_photos(), sampler=sampler, batch_size=4, seed=3, stream_id=2,
                      pick_id=pick_id)
    halves = [TaskStream(source=embedded_photos(), sampler=sampler, batch_size=4, seed=3,
                         stream_id=2, shard=(k, 2), pick_id=pick_id) for k in range(2)]
    whole = full.batch(5)["views"]
    joined = torch.cat([h.batch(5)["views"] for h in halves])
    assert torch.equal(whole, joined)
    assert torch.equal(whole, full.batch(5)["views"])
    assert not torch.equal(whole, full.batch(6)["views"])


def test_triplet_loss_known_values():
    a = torch.eye(3)
    loss, acc = triplet_loss(a, a.clone(), margin=0.5, negatives="hardest")
    assert loss.item() == pytest.approx(0.0) and acc == 1.0  # d_pos 0, d_neg 2
    loss, acc = triplet_loss(a, a[[1, 2, 0]], margin=0.5, negatives="hardest")
    # each anchor's own positive is at distance 2, while another row's positive equals the
    # anchor (distance 0): that is the hardest negative, so the loss is 2 - 0 + 0.5
    assert loss.item() == pytest.approx(2.5) and acc == 0.0
    loss, _ = triplet_loss(a, a.clone(), margin=3.0, negatives="random")
    assert loss.item() == pytest.approx(1.0)  # 0 - 2 + 3 for every anchor


def test_semihard_negatives_skip_those_closer_than_the_positive():
    anchor, positive = torch.tensor([[0.0], [0.5], [20.0]]), torch.tensor([[1.0], [3.0], [21.0]])
    # Squared distances. Anchor 0: positive 1; negatives 0.25 (anchor 1), 9, 400, 441.
    # Anchor 1: positive 6.25; negatives 0.25, 0.25, 380.25, 420.25. Anchor 2: positive 1;
    # nearest negative 289. Margin 10.
    hardest, _ = triplet_loss(anchor, positive, margin=10.0, negatives="hardest")
    assert hardest.item() == pytest.approx(((1 - 0.25 + 10) + (6.25 - 0.25 + 10) + 0) / 3)
    semi, _ = triplet_loss(anchor, positive, margin=10.0, negatives="semihard")
    assert semi.item() == pytest.approx(((1 - 9 + 10) + 0 + 0) / 3)
    # With no negative farther than the positive, semihard takes the farthest one.
    a = torch.eye(3)
    loss, _ = triplet_loss(a, a[[1, 2, 0]], margin=0.5, negatives="semihard")
    assert loss.item() == pytest.approx(2.0 - 2.0 + 0.5)


def test_colorization_calibration_sets_rebalancing():
    cfg, batch = fixed_batch("colorization")
    head = TASKS["colorization"].build_head(cfg, TRUNK)
    assert torch.all(head.class_weights == 1)
    head.calibrate([batch])
    w, p = head.class_weights, head.prior
    assert (p * w).sum().item() == pytest.approx(1.0, abs=1e-4)
    assert w[p.argmax()] < 1 < w[p.argmin()]  # common colours down-weighted, rare ones up


def test_relative_position_learns_a_layout_readable_from_colour():
    """A coordinate-coded image makes the answer readable from the patches' colours, so a
    working sampler + head + loss must beat chance (1/8) quickly; a broken label, pairing or
    head stays at chance."""
    from mtssl.models.lasso import TapMix
    cfg = task_cfg("relative_position", gap=0, jitter=0, color_drop=False, min_pixels=40000,
                   max_pixels=60000, normalize_patches=False, downsample_prob=0.0)
    yy, xx = np.mgrid[0:250, 0:250]
    img = np.stack([xx * 255 // 250, yy * 255 // 250, np.zeros_like(xx)], -1).astype(np.uint8)
    sampler = TASKS["relative_position"].build_sampler(cfg, TRUNK, False)
    stream = TaskStream(source=ArrayImages([("coordinates", img)]), sampler=sampler,
                        batch_size=4, seed=0, stream_id=0)  # 4 grids x 8 pairs
    torch.manual_seed(0)
    trunk = ResNetV2Trunk(units=(1, 1, 2), width=0.0625, output_stride=8)
    head, mix = TASKS["relative_position"].build_head(cfg, TRUNK), TapMix(num_taps=2)
    modules = torch.nn.ModuleList([trunk, head, mix])
    opt = torch.optim.Adam(modules.parameters(), lr=1e-3)
    accs = []
    for step in range(300):
        batch = stream.batch(step)
        batch.pop("skipped")
        out = head(batch, lambda x: mix(trunk(x).taps))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        accs.append(out.metrics["acc"])
    assert np.mean(accs[-30:]) > 0.3, np.mean(accs[-30:])


def test_colorization_skill_is_zero_for_the_best_constant_and_high_for_the_targets():
    cfg, batch = fixed_batch("colorization")
    head = TASKS["colorization"].build_head(cfg, TRUNK)
    head.calibrate([batch])
    idx, weight = head.targets(batch["ab"], (4, 4))
    rebalance = head.class_weights[idx[:, 0]]
    q = len(head.bins)

    def skill(logits):
        logp = torch.log_softmax(logits, dim=1)
        loss = (rebalance * -(weight * logp.gather(1, idx)).sum(1)).mean()
        return head.scores(logits, idx, weight, rebalance, loss)["metrics"]["skill"]

    mass = torch.zeros(q).index_add_(0, idx.flatten(), (weight * rebalance[:, None]).flatten())
    constant = (mass / mass.sum()).clamp_min(1e-12).log()[None, :, None, None].expand(
        len(idx), q, 4, 4)
    assert skill(constant) == pytest.approx(0.0, abs=1e-5)
    targets = torch.full((len(idx), q, 4, 4), 1e-6).scatter_add(1, idx, weight).log()
    assert skill(targets) > 0.5
    assert skill(torch.zeros(len(idx), q, 4, 4)) < 0  # uniform: worse than the constant
