import math
import pickle

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab as sk_rgb2lab

from mtssl import colour as C


def _random_rgb(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bins():
    return C.ab_bins()


@pytest.fixture(scope="module")
def encoder(bins):
    return C.SoftEncoder(bins=bins)


@pytest.fixture(scope="module")
def gamut_ab():
    """ab of random in-gamut colours, (2, 120, 120)."""
    return C.rgb_to_lab(_random_rgb(3, 120, 120, seed=1))[1:]


# --- Lab conversion -----------------------------------------------------------------------------

def test_white_and_black():
    lab = C.rgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), dim=-1)
    torch.testing.assert_close(lab, torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-4, rtol=0)


def test_primaries_match_published_values():
    # D65 sRGB primaries in Lab (Lindbloom's colour calculator).
    expected = torch.tensor([[53.2408, 80.0925, 67.2032],
                             [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602]])
    torch.testing.assert_close(C.rgb_to_lab(torch.eye(3), dim=-1), expected, atol=2e-3, rtol=0)


def test_matches_skimage_on_random_colours():
    rgb = _random_rgb(2, 3, 16, 16)
    ours = C.rgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    # skimage uses a 6-digit matrix; the residual difference is a few hundredths at most.
    np.testing.assert_allclose(ours, sk_rgb2lab(rgb.permute(0, 2, 3, 1).numpy()), atol=0.02)


def test_round_trip_float32():
    rgb = _random_rgb(4, 3, 32, 32)
    lab = C.rgb_to_lab(rgb)
    assert lab.dtype == torch.float32 and lab.shape == rgb.shape
    assert (C.lab_to_rgb(lab) - rgb).abs().max() < 1e-3
    assert (C.rgb_to_lab(C.lab_to_rgb(lab, clip=False)) - lab).abs().max() < 1e-3


def test_dim_argument_and_unbatched():
    rgb = _random_rgb(2, 3, 5, 7)
    ref = C.rgb_to_lab(rgb)
    torch.testing.assert_close(C.rgb_to_lab(rgb.movedim(1, -1), dim=-1), ref.movedim(1, -1))
    torch.testing.assert_close(C.rgb_to_lab(rgb[0]), ref[0])
    torch.testing.assert_close(C.lab_to_rgb(ref.movedim(1, -1), dim=-1), C.lab_to_rgb(ref).movedim(1, -1))


def test_out_of_gamut_lab_clips_only_when_asked():
    lab = torch.tensor([[50.0, 120.0, -120.0]])  # far outside sRGB
    raw = C.lab_to_rgb(lab, dim=-1, clip=False)
    assert torch.isfinite(raw).all() and ((raw < 0) | (raw > 1)).any()
    clipped = C.lab_to_rgb(lab, dim=-1)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="3 channels"):
        C.rgb_to_lab(torch.rand(2, 4, 8, 8))
    with pytest.raises(TypeError):
        C.rgb_to_lab(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_harmonized_input():
    rgb = _random_rgb(2, 3, 9, 9)
    h = C.harmonized_input(rgb)
    assert h.shape == rgb.shape and h.min() >= -1 and h.max() <= 1
    assert torch.equal(h[:, 0], h[:, 1]) and torch.equal(h[:, 0], h[:, 2])
    torch.testing.assert_close(h[:, 0], C.rgb_to_lab(rgb)[:, 0] / 50 - 1)
    ends = C.harmonized_input(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), dim=-1)
    torch.testing.assert_close(ends, torch.tensor([[1.0] * 3, [-1.0] * 3]), atol=1e-5, rtol=0)


def test_lightness_is_lab_l_at_any_dim():
    rgb = _random_rgb(2, 3, 9, 9)
    torch.testing.assert_close(C.lightness(rgb), C.rgb_to_lab(rgb)[:, :1])
    last = rgb.movedim(1, -1)
    torch.testing.assert_close(C.lightness(last, dim=-1), C.rgb_to_lab(last, dim=-1)[..., :1])
    with pytest.raises(ValueError, match="3 channels"):
        C.lightness(rgb[:, :2])


def test_rgb_input():
    torch.testing.assert_close(C.rgb_input(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


# --- ab gamut bins ------------------------------------------------------------------------------

def test_bin_count_and_layout(bins):
    print(f"ab_bins(): Q = {bins.shape[0]}")
    # Cells reached by sRGB number 262 (stable from 384 to 2048 sweep points per edge, and
    # matched by skimage below); Zhang et al.'s released 313 include centres such as (-90, 50)
    # that lie over 11 ab units from every sRGB colour, so the range brackets 262, not 313.
    assert 255 <= bins.shape[0] <= 270
    assert bins.dtype == torch.float32 and bins.shape[1] == 2
    assert torch.equal(bins, torch.round(bins / 10) * 10) and bins.abs().max() <= 110
    assert len({tuple(b) for b in bins.tolist()}) == bins.shape[0]
    # Stable: a coarser sweep finds the same cells.
    assert torch.equal(C._gamut_cells(10, 110, 384), bins)


def test_bins_match_independent_skimage_sweep(bins):
    """Every cell holding the ab of a colour on the sRGB cube's faces (skimage's conversion, a
    different sampling) is a bin, and every bin holds such a colour."""
    t = np.linspace(0, 1, 450)
    u, v = (g.ravel() for g in np.meshgrid(t, t, indexing="ij"))
    faces = [np.insert(np.stack([u, v], 1), axis, value, axis=1) for axis in range(3) for value in (0.0, 1.0)]
    ab = sk_rgb2lab(np.concatenate(faces)[None])[0][:, 1:]
    cells = {tuple(c) for c in (np.round(ab / 10) * 10).astype(int).tolist()}
    assert cells == {tuple(b) for b in bins.long().tolist()}


def test_every_srgb_colour_falls_in_a_bin(bins):
    ab = C.rgb_to_lab(_random_rgb(300_000, 3, seed=2), dim=-1)[:, 1:]
    cells = torch.round(ab / 10).long() + 11
    occupied = torch.zeros(23, 23, dtype=torch.bool)
    occupied[(bins / 10).long()[:, 0] + 11, (bins / 10).long()[:, 1] + 11] = True
    assert occupied[cells[:, 0], cells[:, 1]].all()


def test_ab_bins_returns_a_copy():
    b = C.ab_bins()
    b.fill_(0)
    assert C.ab_bins().abs().sum() > 0


# --- soft encoding ------------------------------------------------------------------------------

def test_soft_encode_exact(bins, gamut_ab):
    idx, w = C.soft_encode_exact(gamut_ab[None], bins)
    assert idx.shape == w.shape == (1, 5, 120, 120) and idx.dtype == torch.long
    torch.testing.assert_close(w.sum(1), torch.ones(1, 120, 120))
    d = torch.cdist(gamut_ab.reshape(2, -1).T, bins)  # (N, Q)
    assert torch.equal(idx[0, 0].reshape(-1), d.argmin(1))
    assert (w[:, :-1] >= w[:, 1:] - 1e-6).all()  # nearest first


def test_soft_encode_at_interior_bin_centre(bins):
    # At a centre with 4 neighbours 10 away (and the 5th nearest at 10*sqrt(2) excluded by k=5),
    # the weights are exp(-d^2 / 50) normalised: [1, e^-2 x 4] / (1 + 4 e^-2).
    ab = torch.tensor([0.0, 0.0]).reshape(2, 1, 1)
    idx, w = C.soft_encode_exact(ab, bins)
    assert bins[idx[0, 0, 0]].abs().sum() == 0
    z = 1 + 4 * math.exp(-2)
    expected = torch.tensor([1 / z] + [math.exp(-2) / z] * 4)
    torch.testing.assert_close(w[:, 0, 0], expected)


def test_lut_agrees_with_exact(bins, encoder, gamut_ab):
    assert encoder.num_bins == bins.shape[0]
    ie, we = C.soft_encode_exact(gamut_ab, bins)
    il, wl = encoder.encode(gamut_ab)
    assert il.shape == ie.shape and il.dtype == torch.long and wl.dtype == torch.float32
    assert (il[0] == ie[0]).float().mean() > 0.999
    assert torch.equal(encoder.nearest(gamut_ab), il[0])
    torch.testing.assert_close(wl.sum(0), torch.ones(120, 120))
    l1 = (C.dense(il, wl, len(bins)) - C.dense(ie, we, len(bins))).abs().sum(0)
    assert l1.mean() < 0.1, l1.mean()
    # A finer table converges to the exact encoding.
    fine = C.SoftEncoder(bins=bins, step=0.5)
    il2, wl2 = fine.encode(gamut_ab)
    l1_fine = (C.dense(il2, wl2, len(bins)) - C.dense(ie, we, len(bins))).abs().sum(0)
    assert l1_fine.mean() < 0.7 * l1.mean()


def test_lut_batched_shapes_and_clamping(encoder):
    ab = torch.zeros(2, 3, 2, 4, 5)
    ab[..., 0, :, :] = 1000.0  # far outside the table: clamped, still a valid encoding
    idx, w = encoder.encode(ab)
    assert idx.shape == (2, 3, 5, 4, 5) and torch.isfinite(w).all()
    assert encoder.nearest(ab).shape == (2, 3, 4, 5)
    edge = torch.zeros(2, 1, 1)
    edge[0] = encoder.lo_a + (encoder.n_a - 0.5) * encoder.step
    assert torch.equal(encoder.encode(edge)[0][:, 0, 0], idx[0, 0, :, 0, 0])
    with pytest.raises(ValueError, match="NaN"):
        encoder.encode(torch.full((2, 1, 1), float("nan")))
    with pytest.raises(ValueError):
        encoder.encode(torch.zeros(3, 4, 4))


def test_encoder_pickles(encoder, gamut_ab):
    clone = pickle.loads(pickle.dumps(encoder))
    for a, b in zip(clone.encode(gamut_ab), encoder.encode(gamut_ab)):
        assert torch.equal(a, b)


def test_dense():
    idx = torch.tensor([[0, 2], [1, 2]]).reshape(2, 2, 1)  # (k=2, H=2, W=1)
    w = torch.tensor([[0.7, 0.6], [0.3, 0.4]]).reshape(2, 2, 1)
    d = C.dense(idx, w, 3)
    expected = torch.tensor([[0.7, 0.0], [0.3, 0.0], [0.0, 1.0]]).reshape(3, 2, 1)
    torch.testing.assert_close(d, expected)
    with pytest.raises(ValueError):
        C.dense(idx + 5, w, 3)


# --- prior, rebalancing, decoding ---------------------------------------------------------------

def test_bin_histogram():
    counts = C.bin_histogram(torch.tensor([[0, 2, 2], [2, 4, 0]]), 6)
    assert counts.tolist() == [2, 0, 3, 0, 1, 0]
    with pytest.raises(ValueError):
        C.bin_histogram(torch.tensor([6]), 6)


def test_smoothed_prior(bins):
    q = bins.shape[0]
    centre = int(((bins - torch.tensor([0.0, 0.0])).abs().sum(1) == 0).nonzero())
    counts = torch.zeros(q)
    counts[centre] = 7
    p = C.smoothed_prior(counts, bins, sigma=5.0)
    assert abs(float(p.sum()) - 1) < 1e-5 and (p >= 0).all()
    right = int(((bins - torch.tensor([10.0, 0.0])).abs().sum(1) == 0).nonzero())
    torch.testing.assert_close(p[right] / p[centre], torch.tensor(math.exp(-2)))
    # A vanishing kernel leaves the empirical distribution.
    counts = torch.arange(q, dtype=torch.float32) % 5
    torch.testing.assert_close(C.smoothed_prior(counts, bins, sigma=0.1), counts / counts.sum())


def test_rebalance_weights():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    w = C.rebalance_weights(p, lam=0.5)
    torch.testing.assert_close((p * w).sum(), torch.tensor(1.0))
    assert (w[1:] > w[:-1]).all()  # rarer bins weigh more
    expected = 1 / (0.5 * p + 0.5 / 4)
    torch.testing.assert_close(w, expected / (p * expected).sum())
    torch.testing.assert_close(C.rebalance_weights(torch.full((313,), 1 / 313)), torch.ones(313))
    torch.testing.assert_close(C.rebalance_weights(p, lam=1.0), torch.ones(4))
    with pytest.raises(ValueError):
        C.rebalance_weights(torch.tensor([0.5, 0.6]))


def test_annealed_mean(bins):
    q = bins.shape[0]
    probs = torch.full((2, q, 3, 3), 1e-3)
    probs[0, 17] = 1.0
    probs[1, 200] = 1.0
    probs = probs / probs.sum(1, keepdim=True)
    ab = C.annealed_mean(probs, bins, T=0.01)
    assert ab.shape == (2, 2, 3, 3)
    torch.testing.assert_close(ab[0, :, 1, 1], bins[17], atol=1e-3, rtol=0)
    torch.testing.assert_close(ab[1, :, 0, 2], bins[200], atol=1e-3, rtol=0)
    # T = 1 is the plain mean.
    mean = torch.einsum("bqhw,qc->bchw", probs, bins)
    torch.testing.assert_close(C.annealed_mean(probs, bins, T=1.0), mean, atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        C.annealed_mean(probs, bins, T=0.0)
