"""Colour maths for colorization and harmonized inputs: sRGB <-> CIE Lab, the quantized ab
gamut, soft encoding of ab targets, class rebalancing and annealed-mean decoding.

Image tensors are channel-first with the channel at `dim`; every function is batched, keeps the
input's floating dtype and device, and has no state beyond cached constants.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# sRGB (IEC 61966-2-1) linear RGB -> XYZ, D65.
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375],
     [0.2126729, 0.7151522, 0.0721750],
     [0.0193339, 0.1191920, 0.9503041]],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
# The white is the image of RGB (1,1,1), so white maps to a = b = 0 exactly; it equals the D65
# white (0.95047, 1, 1.08883) to 7 digits.
_WHITE = _RGB_TO_XYZ.sum(dim=1)
_DELTA = 6.0 / 29.0
# sRGB surface sweep resolution: the grid-10 cell count is the same from 384 to 2048 points per edge.
_SWEEP_POINTS = 512
# The soft-encoding of a colour target (Zhang et al.): a Gaussian of SOFT_SIGMA ab units over its
# SOFT_NEIGHBORS nearest bins (the paper says 5, Zhang's code 10); the prior is smoothed by the
# same Gaussian. The one owner of these defaults: the colorization task's config takes them.
SOFT_SIGMA = 5.0
SOFT_NEIGHBORS = 5
# Table margin beyond the sRGB ab range: resampled ab maps (bilinear resize, augmentation)
# overshoot the gamut slightly, and those values should still meet a real table cell.
_LUT_MARGIN = 5.0


def _check_channels(x: Tensor, dim: int, n: int, what: str) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"{what} must be a floating tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[dim] != n:
        raise ValueError(f"{what} needs {n} channels at dim {dim}, got shape {tuple(x.shape)}")


def _mix(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    """Apply a 3x3 colour matrix along `dim`."""
    return (x.movedim(dim, -1) @ matrix.to(x).T).movedim(-1, dim)


def _shape_for(vec: Tensor, x: Tensor, dim: int) -> Tensor:
    """Reshape a length-3 vector so it broadcasts along `dim` of x."""
    shape = [1] * x.dim()
    shape[dim] = 3
    return vec.to(x).reshape(shape)


def _srgb_to_linear(c: Tensor) -> Tensor:
    # The clamp keeps pow away from negatives so out-of-range inputs stay finite (and their
    # gradients too); those values take the linear branch anyway.
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: Tensor) -> Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def _lab_f(t: Tensor) -> Tensor:
    eps = _DELTA ** 3
    return torch.where(t > eps, t.clamp_min(eps) ** (1 / 3), t / (3 * _DELTA ** 2) + 4 / 29)


def _lab_f_inv(t: Tensor) -> Tensor:
    return torch.where(t > _DELTA, t ** 3, 3 * _DELTA ** 2 * (t - 4 / 29))


def rgb_to_lab(rgb: Tensor, dim: int = -3) -> Tensor:
    """sRGB in [0, 1] (D65) -> CIE Lab with L in [0, 100]."""
    _check_channels(rgb, dim, 3, "rgb")
    xyz = _mix(_srgb_to_linear(rgb), _RGB_TO_XYZ, dim) / _shape_for(_WHITE, rgb, dim)
    fx, fy, fz = _lab_f(xyz).unbind(dim)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=dim)


def lab_to_rgb(lab: Tensor, dim: int = -3, clip: bool = True) -> Tensor:
    """CIE Lab -> sRGB; out-of-gamut colours are clipped to [0, 1] unless clip=False."""
    _check_channels(lab, dim, 3, "lab")
    L, a, b = lab.unbind(dim)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=dim)
    xyz = _lab_f_inv(f) * _shape_for(_WHITE, lab, dim)
    rgb = _linear_to_srgb(_mix(xyz, _XYZ_TO_RGB, dim))
    return rgb.clamp(0.0, 1.0) if clip else rgb


def lightness(rgb: Tensor, dim: int = -3) -> Tensor:
    """sRGB in [0, 1] -> CIE L in [0, 100], one channel at `dim`: rgb_to_lab's L from Y alone,
    at a third of its cost (harmonized inputs need no a and b)."""
    _check_channels(rgb, dim, 3, "rgb")
    weights = _shape_for(_RGB_TO_XYZ[1] / _WHITE[1], rgb, dim)
    return 116 * _lab_f((_srgb_to_linear(rgb) * weights).sum(dim, keepdim=True)) - 16


def harmonized_input(rgb: Tensor, dim: int = -3) -> Tensor:
    """The paper's harmonization: Lab lightness scaled to [-1, 1], replicated to 3 channels."""
    L = lightness(rgb, dim)
    return (L / 50 - 1).clamp(-1.0, 1.0).repeat_interleave(3, dim=dim)


def rgb_input(rgb: Tensor) -> Tensor:
    """Non-harmonized input normalisation: [0, 1] -> [-1, 1]."""
    return 2 * rgb - 1


@functools.lru_cache(maxsize=4)
def _srgb_surface_ab(n: int) -> Tensor:
    """ab of an n x n sampling of each face of the sRGB cube, (6 n^2, 2) float64.

    The ab projection of the gamut solid equals the projection of its surface (a vertical line
    in L that meets the solid meets its boundary), and the cube's surface maps to that boundary,
    so the faces alone give the full ab footprint at a fraction of a volume sweep's cost.
    """
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    u, v = (g.reshape(-1) for g in torch.meshgrid(t, t, indexing="ij"))
    faces = []
    for axis in range(3):
        for value in (0.0, 1.0):
            cols = [u, v]
            cols.insert(axis, torch.full_like(u, value))
            faces.append(torch.stack(cols, dim=-1))
    return rgb_to_lab(torch.cat(faces), dim=-1)[:, 1:]


def _gamut_cells(grid: int, extent: int, n: int) -> Tensor:
    m = extent // grid  # centres run over grid * [-m, m] on each axis
    cells = torch.round(_srgb_surface_ab(n) / grid).long()  # (N, 2)
    cells = cells[(cells.abs() <= m).all(dim=1)] + m
    # An occupancy grid instead of unique(dim=0): same set, no sort of millions of rows.
    occupied = torch.zeros(2 * m + 1, 2 * m + 1, dtype=torch.bool)
    occupied[cells[:, 0], cells[:, 1]] = True
    return ((occupied.nonzero() - m) * grid).to(torch.float32)  # (Q, 2), sorted by a, then b


@functools.lru_cache(maxsize=8)
def _ab_bins_cached(grid: int, extent: int) -> Tensor:
    return _gamut_cells(grid, extent, _SWEEP_POINTS)


def ab_bins(grid: int = 10, extent: int = 110) -> Tensor:
    """Bin centres (Q, 2) on multiples of `grid` whose cell (nearest-centre square) holds the ab
    of some sRGB colour, |a|, |b| <= extent; sorted by a, then b. grid 10 gives Q = 262: the
    313 bins released by Zhang et al. also hold cells that no sRGB colour reaches."""
    if grid <= 0 or extent <= 0:
        raise ValueError(f"grid and extent must be positive, got {grid}, {extent}")
    return _ab_bins_cached(int(grid), int(extent)).clone()  # callers must not mutate the cache


def _check_ab(ab: Tensor) -> None:
    if not torch.is_floating_point(ab) or ab.dim() < 3 or ab.shape[-3] != 2:
        raise ValueError(f"ab must be a floating (..., 2, H, W) tensor, got {ab.dtype} {tuple(ab.shape)}")


def soft_encode_exact(ab: Tensor, bins: Tensor, sigma: float = SOFT_SIGMA,
                      k: int = SOFT_NEIGHBORS) -> tuple[Tensor, Tensor]:
    """Brute-force soft encoding: the k nearest bins (nearest first) with Gaussian weights
    summing to 1. ab (..., 2, H, W) -> idx, weight (..., k, H, W)."""
    _check_ab(ab)
    if not 1 <= k <= bins.shape[0]:
        raise ValueError(f"k must be in [1, {bins.shape[0]}], got {k}")
    c = bins.to(ab)
    # Two (..., Q, H, W) differences rather than one (..., Q, 2, H, W) block halves peak memory.
    d2 = (ab[..., 0:1, :, :] - c[:, 0, None, None]) ** 2 + (ab[..., 1:2, :, :] - c[:, 1, None, None]) ** 2
    d2_k, idx = torch.topk(d2, k, dim=-3, largest=False, sorted=True)  # (..., k, H, W)
    # Subtracting the nearest distance leaves the normalised weights unchanged and keeps far
    # (clamped, out-of-gamut) points from underflowing to 0/0.
    w = torch.exp(-(d2_k - d2_k[..., 0:1, :, :]) / (2 * sigma ** 2))
    return idx, w / w.sum(dim=-3, keepdim=True)


class SoftEncoder(torch.nn.Module):
    """Soft encoding by table lookup: each `step`-sized ab cell stores the k nearest bins and
    weights of its centre. Cell edges lie on multiples of `step`, so for bins on a grid that is a
    multiple of 2*step the boundaries between neighbouring bins fall on cell edges and the
    nearest bin is exact except where missing gamut-edge bins make diagonal boundaries."""

    lut_idx: Tensor  # buffers: (k, cells) bin indices and weights of every table cell
    lut_weight: Tensor

    def __init__(self, *, bins: Tensor, sigma: float = SOFT_SIGMA, k: int = SOFT_NEIGHBORS,
                 step: float = 1.0):
        super().__init__()
        if bins.dim() != 2 or bins.shape[1] != 2:
            raise ValueError(f"bins must be (Q, 2), got {tuple(bins.shape)}")
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        bins = bins.detach().to("cpu", torch.float32)
        self.num_bins, self.sigma, self.k, self.step = bins.shape[0], float(sigma), int(k), float(step)
        gamut = _srgb_surface_ab(_SWEEP_POINTS)
        lo = torch.minimum(gamut.min(0).values, bins.min(0).values.double()) - _LUT_MARGIN
        hi = torch.maximum(gamut.max(0).values, bins.max(0).values.double()) + _LUT_MARGIN
        lo = torch.floor(lo / step) * step
        n = torch.ceil((hi - lo) / step).long()
        self.lo_a, self.lo_b = float(lo[0]), float(lo[1])
        self.n_a, self.n_b = int(n[0]), int(n[1])
        centre_b = (self.lo_b + (torch.arange(self.n_b, dtype=torch.float64) + 0.5) * step).float()
        idx_rows, w_rows = [], []
        for start in range(0, self.n_a, 32):  # row chunks bound the (Q, rows, n_b) distance block
            rows = torch.arange(start, min(start + 32, self.n_a), dtype=torch.float64)
            centre_a = (self.lo_a + (rows + 0.5) * step).float()
            grid = torch.stack(torch.meshgrid(centre_a, centre_b, indexing="ij"))  # (2, rows, n_b)
            idx, w = soft_encode_exact(grid, bins, sigma=sigma, k=k)  # (k, rows, n_b)
            idx_rows.append(idx)
            w_rows.append(w)
        self.register_buffer("bins", bins)
        self.register_buffer("lut_idx", torch.cat(idx_rows, dim=1).reshape(k, -1))  # (k, n_a*n_b)
        self.register_buffer("lut_weight", torch.cat(w_rows, dim=1).reshape(k, -1))

    def _cells(self, ab: Tensor, *, check_finite: bool = True) -> Tensor:
        """Flat table cell of each pixel, (..., H, W); out-of-range ab is clamped to the edge.

        `check_finite=False` skips the NaN/inf check, a host-device sync: for callers whose ab
        is finite by construction (the training step's targets, from uint8 images)."""
        _check_ab(ab)
        if check_finite and not torch.isfinite(ab).all():
            raise ValueError("ab contains NaN or inf")
        ia = torch.floor((ab[..., 0, :, :] - self.lo_a) / self.step).long().clamp_(0, self.n_a - 1)
        ib = torch.floor((ab[..., 1, :, :] - self.lo_b) / self.step).long().clamp_(0, self.n_b - 1)
        return (ia * self.n_b + ib).to(self.lut_idx.device)

    def encode(self, ab: Tensor, *, check_finite: bool = True) -> tuple[Tensor, Tensor]:
        """ab (..., 2, H, W) -> idx, weight (..., k, H, W), as soft_encode_exact."""
        cells = self._cells(ab, check_finite=check_finite)
        idx = self.lut_idx[:, cells].movedim(0, -3)  # (..., k, H, W)
        weight = self.lut_weight[:, cells].movedim(0, -3)
        return idx.to(ab.device), weight.to(ab.device, ab.dtype)

    def nearest(self, ab: Tensor) -> Tensor:
        """Index of the nearest bin, (..., H, W)."""
        return self.lut_idx[0][self._cells(ab)].to(ab.device)


def dense(idx: Tensor, weight: Tensor, num_bins: int) -> Tensor:
    """Sparse encoding (..., k, H, W) -> dense distribution (..., Q, H, W)."""
    if idx.shape != weight.shape or idx.dim() < 3:
        raise ValueError(
            f"idx and weight must share a (..., k, H, W) shape, got {tuple(idx.shape)}, {tuple(weight.shape)}"
        )
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_bins):
        raise ValueError(f"bin indices must lie in [0, {num_bins})")
    shape = list(idx.shape)
    shape[-3] = num_bins
    return weight.new_zeros(shape).scatter_add_(-3, idx, weight)


def bin_histogram(bin_idx: Tensor, num_bins: int) -> Tensor:
    """Counts (Q,) int64 of bin indices of any shape."""
    if torch.is_floating_point(bin_idx) or torch.is_complex(bin_idx):
        raise TypeError(f"bin_idx must be an integer tensor, got {bin_idx.dtype}")
    flat = bin_idx.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_bins):
        raise ValueError(f"bin indices must lie in [0, {num_bins})")
    return torch.bincount(flat, minlength=num_bins)


def smoothed_prior(counts: Tensor, bins: Tensor, sigma: float = SOFT_SIGMA) -> Tensor:
    """Empirical bin distribution smoothed by a Gaussian over ab distance between bin centres
    (the density of the smoothed histogram sampled at the centres), normalised to sum 1."""
    counts = counts.to(torch.float64)
    if counts.shape != (bins.shape[0],) or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"counts must be (Q,) = ({bins.shape[0]},), non-negative and not all zero")
    c = bins.to(counts)
    kernel = torch.exp(-torch.cdist(c, c) ** 2 / (2 * sigma ** 2))  # (Q, Q)
    p = kernel @ (counts / counts.sum())
    return (p / p.sum()).float()


def rebalance_weights(prior: Tensor, lam: float = 0.5) -> Tensor:
    """Class weights w ∝ ((1 - lam) p + lam / Q)^-1, scaled so that E_p[w] = 1."""
    p = prior.to(torch.float64)
    if p.dim() != 1 or (p < 0).any() or abs(float(p.sum()) - 1) > 1e-4:
        raise ValueError("prior must be a (Q,) non-negative distribution summing to 1")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    w = 1 / ((1 - lam) * p + lam / p.shape[0])
    if not torch.isfinite(w).all():
        raise ValueError("lam = 0 needs a prior without zeros")
    return (w / (p * w).sum()).to(prior.dtype)


def annealed_mean(probs: Tensor, bins: Tensor, T: float = 0.38) -> Tensor:
    """Zhang et al.'s annealed mean: re-temper the bin distribution by 1/T, then take its mean
    ab. probs (..., Q, H, W) -> ab (..., 2, H, W)."""
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    if probs.dim() < 3 or probs.shape[-3] != bins.shape[0]:
        raise ValueError(f"probs must be (..., {bins.shape[0]}, H, W), got {tuple(probs.shape)}")
    logits = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)) / T
    f = torch.softmax(logits, dim=-3)
    return torch.einsum("...qhw,qc->...chw", f, bins.to(f))
