"""Acquisition of a phantom: the scan parameters drawn per case (contrast phase, field of view, pixel and
slice spacing, coverage) and image formation (a reconstruction-kernel blur in-plane and along z, then
correlated scanner noise with a CT-like band-pass noise power spectrum, stronger in the body centre).
:func:`reconstruct` and :func:`noise_sigma_map` work on any HU volume, so other generators share them."""

from __future__ import annotations

import numpy as np

from .fields import Points
from .grid import Grid
from .tissues import PHASE_PROBABILITIES, PHASES

#: Output grid of each size: in-plane pixels. Slice spacing and coverage are drawn per case.
SIZES = {"full": 512, "small": 128}


def noise_sigma_map(X: np.ndarray, Y: np.ndarray, sigma: float, half_width: float, half_depth: float) -> np.ndarray:
    """Noise standard deviation (HU) over an axial plane: ``sigma`` at the body outline, about 1.1 x in
    the centre of a body of the given half width and half depth (mm); ``X``/``Y`` are broadcastable mm
    coordinates relative to the body axis."""
    smap = np.float32(sigma) * (0.75 + 0.35 * np.exp(-1.5 * ((X / half_width) ** 2 + (Y / half_depth) ** 2)))
    return smap.astype(np.float32)


def reconstruct(hu: np.ndarray, pixel_mm: float, kernel_a: float, kernel_az: float, smap: np.ndarray, nps_fc: float,
                rng: np.random.Generator) -> None:
    """Image formation in place on ``hu`` (float32, z, y, x): a separable three-tap kernel blur with side
    weight ``kernel_a`` in-plane and ``kernel_az`` along z, then noise of per-pixel standard deviation
    ``smap`` (y, x) whose power spectrum is band-pass around ``nps_fc`` cycles/mm (drawn from a bank of
    noise planes, shifted, flipped and scaled per slice)."""
    nz, ny, nx = hu.shape
    a = np.float32(kernel_a)
    b = np.float32(1 - 2 * kernel_a)
    t = np.empty((ny, nx), np.float32)
    for k in range(nz):
        s = hu[k]
        np.multiply(s, b, out=t)
        t[:, 1:] += a * s[:, :-1]
        t[:, :-1] += a * s[:, 1:]
        t[:, 0] += a * s[:, 0]
        t[:, -1] += a * s[:, -1]
        np.multiply(t, b, out=s)
        s[1:] += a * t[:-1]
        s[:-1] += a * t[1:]
        s[0] += a * t[0]
        s[-1] += a * t[-1]
    az = np.float32(kernel_az)
    if nz > 2 and az > 0:
        prev = hu[0].copy()
        cur = np.empty_like(prev)
        for k in range(1, nz - 1):
            cur[...] = hu[k]
            hu[k] *= 1 - 2 * az
            hu[k] += az * (prev + hu[k + 1])
            prev, cur = cur, prev
    bank = noise_bank(rng, ny, nx, pixel_mm, nps_fc)
    pad = bank.shape[1] - ny
    nb = bank.shape[0]
    choice = rng.integers(0, nb, nz)
    offs = rng.integers(0, pad + 1, (nz, 2))
    flips = rng.integers(0, 4, nz)
    zscale = (1 + 0.06 * rng.standard_normal(nz)).astype(np.float32)
    for k in range(nz):
        n = bank[choice[k], offs[k, 0]:offs[k, 0] + ny, offs[k, 1]:offs[k, 1] + nx]
        if flips[k] & 1:
            n = n[::-1]
        if flips[k] & 2:
            n = n[:, ::-1]
        np.multiply(n, smap, out=t)
        t *= zscale[k]
        hu[k] += t


def noise_bank(rng: np.random.Generator, ny: int, nx: int, pixel_mm: float, nps_fc: float, count: int = 12,
               pad: int = 32) -> np.ndarray:
    """``count`` unit-variance noise planes of (ny + pad, nx + pad) pixels with a CT-like power spectrum
    (rising from a floor, peaking below ``nps_fc`` cycles/mm, falling off above it)."""
    h, w = ny + pad, nx + pad
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy * fy + fx * fx) / pixel_mm  # cycles / mm
    fc = nps_fc
    nps = f * np.exp(-((f / fc) ** 2)) + 0.04 * fc
    amp = np.sqrt(nps).astype(np.float32)
    bank = np.empty((count, h, w), np.float32)
    for i in range(count):
        white = rng.standard_normal((h, w), dtype=np.float32)
        n = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
        n /= n.std() + 1e-6
        bank[i] = n
    return bank


class Acquisition:
    """Scan parameters, image grid and image formation of a procedural case (mixed into :class:`.case.Case`)."""

    def _scan_parameters(self, rng):
        """Contrast phase and scale, field of view, pixel and slice spacing, coverage, noise and kernel."""
        u = rng.uniform
        a = self.anat
        self.phase = str(rng.choice(PHASES, p=PHASE_PROBABILITIES))
        self.contrast = u(0.85, 1.15)
        # in-plane field of view fitted to the patient (sometimes too small: the body edge is cut)
        width = 2 * a.a0 * 1.05
        margin = u(0, 120) if u() < 0.85 else u(-50, -10)
        fov = float(np.clip(width + margin, 0.6 * 512, 0.9 * 512))
        self.fov = fov
        self.pixel_full = round(fov / 512, 4)
        self.circular = u() < 0.35
        self.body_offset = (rng.normal(0, 12), rng.normal(0, 12) - 0.15 * (a.b_post - a.b_ant))
        # slices
        if u() < 0.2:
            sz = u(1.0, 5.0)
        else:
            sz = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                  p=[0.12, 0.10, 0.10, 0.12, 0.16, 0.10, 0.08, 0.22]))
        self.slice_full = round(sz, 3)
        self.slice_small = self.slice_full if self.slice_full >= 3.0 else round(u(3.0, 5.0), 3)
        coverage = u(200, 320)
        self.z_top = u(15, 70)
        self.coverage = coverage
        self.z_centre_lps = u(-450, 50)
        # image formation
        self.noise_sigma = u(8, 20)
        self.nps_fc = u(0.25, 0.45)  # cycles/mm
        self.kernel_a = u(0.10, 0.22)
        self.kernel_az = u(0.04, 0.16)

    def make_grid(self) -> Grid:
        """The image grid of this case at its size (the same patient and field of view at every size)."""
        n = SIZES[self.size]
        s = self.pixel_full * 512 / n
        sz = self.slice_full if self.size == "full" else self.slice_small
        nz = int(min(320, max(3, round(self.coverage / sz))))
        if self.size == "full":
            nz = min(nz, 320)
        z_lo_p = self.z_top - (nz - 1) * sz
        origin_xy = -(n - 1) / 2 * s
        origin_z = self.z_centre_lps - (nz - 1) / 2 * sz
        offset = (self.body_offset[0], self.body_offset[1], origin_z - z_lo_p)
        return Grid((nz, n, n), (s, s, sz), (origin_xy, origin_xy, origin_z), offset)

    def _fov_mask(self, P: Points) -> np.ndarray:
        """Which points of ``P`` (patient frame) the scan sees: slice range, field of view, reconstruction circle."""
        g = self.grid
        z_ok = (P.z >= g.pz[0] + 1) & (P.z <= g.pz[-1] - 1)
        half = (g.shape[2] - 1) / 2 * g.spacing[0]
        lx = P.x + g.offset[0]
        ly = P.y + g.offset[1]
        xy = (np.abs(lx)[None, :] < half - 2) & (np.abs(ly)[:, None] < half - 2)
        if self.circular:
            xy &= (lx[None, :] ** 2 + ly[:, None] ** 2) < (half - 2) ** 2
        return z_ok[:, None, None] & xy[None]

    def _outside_circle(self) -> np.ndarray:
        """(y, x) mask of the pixels outside the reconstruction circle."""
        g = self.grid
        half = g.shape[2] / 2 * g.spacing[0]
        lx = g.px + g.offset[0]
        ly = g.py + g.offset[1]
        return (lx[None, :] ** 2 + ly[:, None] ** 2) > half ** 2

    def _image_formation(self):
        """Kernel blur and scanner noise on the case's HU volume (noise stronger in the body centre)."""
        g, a = self.grid, self.anat
        smap = noise_sigma_map(g.px[None, :], g.py[:, None], self.noise_sigma, a.a0, a.b_ant)
        reconstruct(self.hu, g.spacing[0], self.kernel_a, self.kernel_az, smap, self.nps_fc, self.rng_noise)
