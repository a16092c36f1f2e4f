"""Synthetic H&E whole-slide images for the demo cohort.

Image model
-----------
Brightfield microscopy is absorptive, so colours follow the Beer-Lambert law::

    I_c = I0_c * exp(-(h * H_c + e_eff * E_c + ink * K_c))

with ``I0`` the off-white illumination seen through bare glass, ``H`` and ``E`` unit
optical-density (OD) vectors of haematoxylin and eosin (H from
``skimage.color.rgb_from_hed``, E a slightly bluer eosin, both jittered per slide like a
staining batch), ``h``/``e`` stain concentrations and ``K`` the OD of marker ink.  Eosin is
displaced by chromatin, so ``e_eff = e * (1 - 0.5 * clip(h - 0.3, 0, 1))``.

Concentration fields
--------------------
- tissue: a smooth random field on a coarse map (4-10 µm cells): fragment-scale noise plus
  lobulation and ragged-edge components, kept off the border and out of scanner padding,
  thresholded at the quantile giving 40-55 % tissue; bilinearly upsampled with a ~1.5 µm
  soft edge.  A few irregular fragments with holes result.
- eosin: collagen from a periodic anisotropic noise tile (fibres ~6 x 0.5 µm in bundles
  ~30 x 5 µm, with clefts between bundles) read through a smooth warp so the fibre
  orientation wanders; replaced by pale cytoplasm in tumour-cell "nests" (a smooth field);
  a faint haematoxylin background, stronger in nests.
- nuclei: haematoxylin ellipses with harmonic boundary irregularity, condensed rim,
  chromatin texture and nucleoli; a per-slide bank of pre-rendered stamps (used with their 8
  flips/transposes) is max-composited at Poisson positions inside tissue, clustered by the
  nest field and thinned by a Matérn-II hard core (0.6 mean diameters) to limit overlap.

Latent traits (z-scores, ~N(0, 1)) map monotonically to physical quantities:

- ``density_z``      -> nuclei per mm² of tissue: ``2500 * exp(0.45 z)`` clipped to
  [400, 12000] (the hard core caps very high densities of large nuclei);
- ``size_z``         -> mean nuclear (equivalent) diameter ``7 + 1.2 z`` µm, clipped to [4, 20];
- ``pleomorphism_z`` -> ``s = exp(0.55 z)`` scales the coefficient of variation of nuclear size
  (0.12 s), the spread of axis ratios, boundary irregularity, staining-intensity variation,
  chromatin texture and the frequency of nucleoli.

Geometry is in micrometres and converted with ``mpp``: a 0.25 µm/px slide has twice the
pixels per axis of a 0.5 µm/px slide of the same physical size, with the same nuclei in µm.

Implementation
--------------
All random draws happen up front; rendering is then a pure function of absolute pixel
coordinates, so the slide can be produced in horizontal strips that always agree (also in
the halo rows a blur needs).  Smooth fields are computed at half resolution and quantised
to one byte each for h and e; the pair indexes a 256x256 Beer-Lambert lookup table, and
nuclei are max-composited into the h byte at full resolution.  Strips are streamed to
tifffile tile by tile; the lower pyramid levels (downsample 4, 16, ...) are 4x4 block means
kept in memory.  A 40960² px slide thus needs < 1 GB of RAM.

Ground truth (``truth_path``) is *centre-sampled*: one label per ``truth_downsample``² block,
evaluated at the block centre from the same continuous fields used for rendering:
0 glass, 1 tissue, 2 pen ink, 3 black scanner padding, 4 blurred tissue, with priority
padding > pen > blur > tissue.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = ["write_demo_slide", "density_from_z", "diameter_from_z"]

TILE = 256
STRIP_PIXELS = 8 << 20  # level-0 pixels per strip: temporaries stay below glibc's mmap limit
MID = 2  # smooth fields are rendered at 1/MID of level-0 resolution
H_SCALE = 100.0  # haematoxylin quantisation: 0..2.55 OD in 256 steps
E_SCALE = 128.0  # eosin: 0..1.99 OD in 256 steps
JPEG_Q = 85
ARTEFACTS = ("pen", "padding", "blur")
VENDORS = ("aperio", "generic", "nompp")

# unit OD vectors (natural log); H = skimage.color.rgb_from_hed[0], E a bluer eosin
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.10, 0.85, 0.45])
_INK_OD = {  # marker inks: strong, saturated absorption unlike H&E
    "blue": np.array([2.0, 1.25, 0.22]),
    "green": np.array([1.6, 0.35, 1.25]),
    "black": np.array([2.3, 2.2, 2.0]),
}


def density_from_z(z: float) -> float:
    """Target nuclei per mm² of tissue for a density trait z."""
    return float(np.clip(2500.0 * math.exp(0.45 * z), 400.0, 12000.0))


def diameter_from_z(z: float) -> float:
    """Mean nuclear equivalent diameter (µm) for a size trait z."""
    return float(np.clip(7.0 + 1.2 * z, 4.0, 20.0))


# --------------------------------------------------------------------------- helpers
def _unit(v):
    return v / np.linalg.norm(v)


def _standardise(a):
    a -= a.mean()
    a /= a.std() + 1e-12
    return a


def _gauss_spectrum_noise(rng, shape, transfer):
    white = rng.standard_normal(shape, dtype=np.float32)
    return _standardise(np.fft.irfft2(np.fft.rfft2(white) * transfer.astype(np.float32), s=shape))


def _smooth_noise(rng, shape, sigma):
    """Periodic gaussian-filtered white noise (sigma in cells), std 1: direct convolution
    for small sigma, FFT (cost independent of sigma) otherwise."""
    if sigma < 2.0:
        white = rng.standard_normal(shape, dtype=np.float32)
        return _standardise(ndi.gaussian_filter(white, sigma, mode="wrap"))
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return _gauss_spectrum_noise(rng, shape, np.exp(-2.0 * np.pi**2 * sigma**2 * (fy**2 + fx**2)))


def _aniso_noise(rng, n, s_along, s_across, angle):
    """Periodic n x n noise elongated along ``angle`` (sigmas in px), std 1."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    fa = fx * math.cos(angle) + fy * math.sin(angle)
    fc = -fx * math.sin(angle) + fy * math.cos(angle)
    return _gauss_spectrum_noise(
        rng, (n, n), np.exp(-2.0 * np.pi**2 * ((s_along * fa) ** 2 + (s_across * fc) ** 2)))


def _axis_weights(p_px, mpp, cell_um, m):
    """Bilinear (index, weight) of full-res pixel coordinates on a map axis of m cells."""
    f = np.clip(np.asarray(p_px, np.float64) * mpp / cell_um - 0.5, 0.0, m - 1.0)
    i0 = np.minimum(f.astype(np.int64), m - 2)
    return i0, (f - i0).astype(np.float32)


def _interp_grid(arr, ry, rx):
    """Bilinear interpolation of a map on the grid ry x rx (from _axis_weights), ys sorted.

    Columns are interpolated on the few map rows involved; rows are then filled block by
    block (one block per map row interval) with broadcasting, avoiding full-size gathers."""
    (i0, wy), (j0, wx) = ry, rx
    lo, hi = int(i0[0]), int(i0[-1]) + 2
    sub = arr[lo:hi]
    c0 = np.take(sub, j0, axis=1)
    d = np.take(sub, j0 + 1, axis=1)
    d -= c0
    d *= wx
    c0 += d  # column-interpolated map rows lo..hi-1
    dr = c0[1:] - c0[:-1]
    out = np.empty((len(i0), len(j0)), np.float32)
    starts = np.flatnonzero(np.r_[True, i0[1:] != i0[:-1]])
    ends = np.r_[starts[1:], len(i0)]
    for a, b in zip(starts.tolist(), ends.tolist()):
        i = int(i0[a]) - lo
        blk = out[a:b]
        np.multiply(wy[a:b, None], dr[i][None, :], out=blk)
        blk += c0[i]
    return out


def _interp_points(arr, ry, rx):
    (i0, wy), (j0, wx) = ry, rx
    return ((arr[i0, j0] * (1 - wx) + arr[i0, j0 + 1] * wx) * (1 - wy)
            + (arr[i0 + 1, j0] * (1 - wx) + arr[i0 + 1, j0 + 1] * wx) * wy)


def _sines(params, x):
    """Smooth 1-D function: sum of sinusoids (amplitude, period, phase)."""
    out = np.zeros(len(x))
    for amp, per, ph in params:
        out += amp * np.sin(2 * np.pi * x / per + ph)
    return out


def _block_mean4(a):
    """4x4 block mean of an (h, w, 3) uint8 array (edge-padded to a multiple of 4)."""
    h, w, c = a.shape
    ph, pw = -h % 4, -w % 4
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
        h, w = h + ph, w + pw
    acc = a[0::4].astype(np.uint16)
    for k in range(1, 4):
        acc += a[k::4]
    acc = acc.reshape(h // 4, w // 4, 4 * c)  # 4 horizontal neighbours side by side
    out = acc[:, :, 0:c] + acc[:, :, c:2 * c]
    out += acc[:, :, 2 * c:3 * c]
    out += acc[:, :, 3 * c:]
    out += 8
    out >>= 4
    return out.astype(np.uint8)


def _block_mean(a, k):
    """k x k block mean (float32) of an (h, w, c) array with h, w multiples of k."""
    h, w, c = a.shape
    acc = a[0::k].astype(np.float32)
    for i in range(1, k):
        acc += a[i::k]
    acc = acc.reshape(h // k, w // k, k * c)
    out = acc[:, :, 0:c].copy()
    for j in range(1, k):
        out += acc[:, :, j * c:(j + 1) * c]
    out *= 1.0 / (k * k)
    return out


def _upsample_cols(a, k):
    """Bilinear upsampling along axis 1 of (n, m, c) block values to (n, m*k, c) pixels
    (block centres -> pixel centres, edges clamped), by broadcasting: no gathers."""
    n, m, c = a.shape
    ap = np.concatenate([a[:, :1], a, a[:, -1:]], axis=1)
    base = ap[:, 1:m + 1]
    d_lo = base - ap[:, :m]
    d_hi = ap[:, 2:] - base
    out = np.empty((n, m, k, c), np.float32)
    for r in range(k):
        o = (r + 0.5) / k - 0.5
        np.multiply(d_hi if o >= 0 else d_lo, o, out=out[:, :, r])
        out[:, :, r] += base
    return out.reshape(n, m * k, c)


def _segment_distance(segs, ys, xs, reach):
    """Distance (px) from grid points ys x xs (sorted 1-D, px) to a polyline, +inf beyond
    ``reach``; only each segment's bounding box is visited."""
    d = np.full((len(ys), len(xs)), np.inf, np.float32)
    for (ay, ax), (by, bx) in segs:
        ia, ib = np.searchsorted(ys, [min(ay, by) - reach, max(ay, by) + reach])
        ja, jb = np.searchsorted(xs, [min(ax, bx) - reach, max(ax, bx) + reach])
        if ia >= ib or ja >= jb:
            continue
        py = (ys[ia:ib] - ay)[:, None]
        px = (xs[ja:jb] - ax)[None, :]
        vy, vx = by - ay, bx - ax
        t = np.clip((py * vy + px * vx) / max(vy * vy + vx * vx, 1e-9), 0.0, 1.0)
        dist = np.sqrt((py - t * vy) ** 2 + (px - t * vx) ** 2).astype(np.float32)
        np.minimum(d[ia:ib, ja:jb], dist, out=d[ia:ib, ja:jb])
    return d


# --------------------------------------------------------------------------- slide model
class _Slide:
    """All random draws of one slide (in __init__) and rendering as pure functions of
    absolute pixel coordinates."""

    def __init__(self, rng, W, H, mpp, density_z, size_z, pleomorphism_z, artefacts):
        self.W, self.H, self.mpp = W, H, mpp
        self.Wp = -(-W // TILE) * TILE  # rendered extent: whole tiles
        self.Hp = -(-H // TILE) * TILE
        W_um, H_um = W * mpp, H * mpp
        pxm = MID * mpp  # µm per mid-resolution pixel

        # ---- stain appearance (per-slide batch variation)
        self.I0 = np.array([242.0, 240.0, 241.0]) + rng.uniform(-2.0, 2.0, 3)
        self.h_od = _unit(_H_OD + rng.normal(0, 0.03, 3))
        self.e_od = _unit(_E_OD + rng.normal(0, 0.03, 3))
        self.e0 = rng.uniform(0.45, 0.65)  # stroma eosin
        self.hb0 = rng.uniform(0.06, 0.10)  # faint haematoxylin background
        self.h_nuc = rng.uniform(1.15, 1.4)  # mean nuclear haematoxylin

        # ---- padding bands: (edge, width px)
        self.pads = []
        if "padding" in artefacts:
            edges = np.array(["top", "bottom", "left", "right"])
            for e in rng.choice(edges, size=int(rng.integers(1, 3)), replace=False):
                frac = rng.uniform(0.05, 0.12)
                self.pads.append((str(e), int(round(frac * (H if e in ("top", "bottom") else W)))))

        # ---- coarse maps (4-10 µm cells): tissue, nests, stain variation, fibre warp
        c = max(4.0, max(W_um, H_um) / 2048.0)
        mh, mw = max(2, math.ceil(H_um / c)), max(2, math.ceil(W_um / c))
        self.cell, self.mh, self.mw = c, mh, mw
        L = min(W_um, H_um)
        sig_b = max(0.09 * L, 3 * c) / c
        g_b = 1.0 / (math.sqrt(2.0) * sig_b)  # typical gradient of a standardised field
        # fragments + lobulation (~40 µm boundary displacement) + ragged edge (~12 µm)
        F = _smooth_noise(rng, (mh, mw), sig_b)
        F += (40.0 / c) * g_b * _smooth_noise(rng, (mh, mw), max(25.0 / c, 2.0))
        F += (12.0 / c) * g_b * _smooth_noise(rng, (mh, mw), max(6.0 / c, 1.5))
        yy = (np.arange(mh) + 0.5) * c
        xx = (np.arange(mw) + 0.5) * c
        dist_b = np.minimum(np.minimum(yy, H_um - yy)[:, None], np.minimum(xx, W_um - xx)[None, :])
        F -= 1.5 * np.clip(1.0 - dist_b / (0.06 * L), 0.0, 1.0).astype(np.float32)
        usable = np.ones((mh, mw), bool)
        for edge, bw in self.pads:  # a scanner pads where there is no slide: no tissue there
            b_um = bw * mpp + 20.0
            if edge == "top":
                usable &= (yy > b_um)[:, None]
            elif edge == "bottom":
                usable &= (yy < H_um - b_um)[:, None]
            elif edge == "left":
                usable &= (xx > b_um)[None, :]
            else:
                usable &= (xx < W_um - b_um)[None, :]
        target = rng.uniform(0.40, 0.55)  # tissue fraction of the whole slide
        q = min(0.92, target / max(usable.mean(), 1e-6))
        thr = float(np.quantile(F[usable], 1.0 - q))
        F[~usable] = min(float(F.min()), thr) - 5.0
        gy, gx = np.gradient(F)
        near = np.abs(F - thr) < 0.1
        g = float(np.median(np.hypot(gy, gx)[near])) if near.sum() > 10 else g_b
        # T > 0 is tissue; T is in units of the ~1.5 µm soft-edge width
        self.T = ((F - thr) / (g / c * 1.5)).astype(np.float32)
        del F, gy, gx
        self.nest = _smooth_noise(rng, (mh, mw), max(35.0 / c, 1.0))  # tumour-cell nests
        self.nestw = np.clip(0.4 * self.nest - 0.1, 0.0, 1.0)
        self.svar = _smooth_noise(rng, (mh, mw), max(120.0 / c, 1.0))  # staining unevenness
        self.warp = _smooth_noise(rng, (mh, mw), max(30.0 / c, 1.0)) * (18.0 / pxm)

        # ---- periodic mid-resolution tiles: collagen (anisotropic) and fine grain
        self.tt = tt = 512 if max(W_um, H_um) / pxm <= 2048 else 1024
        ang = rng.uniform(0, np.pi)
        fib = _aniso_noise(rng, tt, 6.0 / pxm, 0.5 / pxm, ang)
        bund = _aniso_noise(rng, tt, 30.0 / pxm, 5.0 / pxm, ang + rng.normal(0, 0.2))
        iso = _smooth_noise(rng, (tt, tt), 0.4 / pxm)
        fv = 0.66 + 0.2 * np.tanh(fib) + 0.12 * bund + 0.04 * iso
        fv *= 0.25 + 0.75 / (1.0 + np.exp(-6.0 * (bund + 1.6)))  # clefts between bundles
        self.fibv = np.clip(fv, 0.1, 1.4).astype(np.float32).ravel()
        del fib, bund, iso, fv
        # slow 1-D shears of the tile lookup hide its period (slopes <= ~0.3)
        self.shear_x = [(0.05 * p / pxm, p / pxm, rng.uniform(0, 2 * np.pi))
                        for p in rng.uniform(1500, 4000, 2)]
        self.shear_y = [(0.05 * p / pxm, p / pxm, rng.uniform(0, 2 * np.pi))
                        for p in rng.uniform(1500, 4000, 2)]
        self.fine = _smooth_noise(rng, (256, 256), 0.35 / pxm + 0.3)

        self._make_nuclei(rng, density_z, size_z, pleomorphism_z)

        # ---- blur region: an ellipse holding 15-25 % of the tissue
        self.blur = None
        tissue_cells = self.T > 0
        if "blur" in artefacts and tissue_cells.any():
            cand = np.flatnonzero(tissue_cells.ravel())
            k = cand[rng.integers(len(cand))]
            cy, cx = (k // mw + 0.5) * c, (k % mw + 0.5) * c  # µm
            ratio, ang = rng.uniform(0.55, 1.0), rng.uniform(0, np.pi)
            frac = rng.uniform(0.16, 0.24)
            sigma = rng.uniform(4.0, 8.0) / mpp
            Y, X = yy[:, None] - cy, xx[None, :] - cx
            u = X * np.cos(ang) + Y * np.sin(ang)
            v = (-X * np.sin(ang) + Y * np.cos(ang)) / ratio
            # major semi-axis whose ellipse contains `frac` of the tissue cells
            R = float(np.sqrt(np.quantile((u * u + v * v)[tissue_cells], frac)))
            kb = max(4, 2 * int(round(sigma / 4.0)))  # even blur block, ~sigma/2
            halo = 4.0 * sigma + 2 * kb  # gaussian support + interpolation
            ext = R / mpp + 10.0 / mpp + halo
            self.blur = dict(cy=cy / mpp, cx=cx / mpp, ra=R / mpp, rb=R * ratio / mpp, ang=ang,
                             sigma=sigma, k=kb, halo=int(math.ceil(halo / kb)) * kb,
                             x0=max(0, int((cx / mpp - ext) // kb) * kb),
                             x1=int(math.ceil((cx / mpp + ext) / kb)) * kb,
                             y0=cy / mpp - ext, y1=cy / mpp + ext)

        # ---- pen: a wavy marker stroke through a tissue point, running onto glass
        self.pen = None
        if "pen" in artefacts:
            colour = str(rng.choice(np.array(list(_INK_OD))))
            width_um = rng.uniform(60.0, 120.0)
            if tissue_cells.any():
                cand = np.flatnonzero(tissue_cells.ravel())
                k = cand[rng.integers(len(cand))]
                py, px = (k // mw + 0.5) * c, (k % mw + 0.5) * c
            else:
                py, px = H_um / 2, W_um / 2
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(0.5, 0.9) * math.hypot(W_um, H_um)
            n = max(8, int(length / (0.5 * width_um)))
            t = np.linspace(-0.5, 0.5, n) + rng.uniform(-0.2, 0.2)
            wig = sum(rng.uniform(0.02, 0.06) * length
                      * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in (0.6, 1.3))
            ys = py + t * length * np.sin(ang) + wig * np.cos(ang)
            xs = px + t * length * np.cos(ang) - wig * np.sin(ang)
            pts = np.stack([ys, xs], 1) / mpp
            self.pen = dict(colour=colour, od=_INK_OD[colour] * rng.uniform(0.85, 1.0),
                            hw=0.5 * width_um / mpp, edge=2.0 / mpp,
                            segs=[(tuple(pts[i]), tuple(pts[i + 1])) for i in range(n - 1)])

        # ---- Beer-Lambert colour of every quantised (h, e) pair, as packed 3-byte RGB
        h = (np.arange(256) / H_SCALE)[:, None, None]
        e = (np.arange(256) / E_SCALE)[None, :, None]
        e_eff = e * (1.0 - 0.5 * np.clip(h - 0.3, 0.0, 1.0))
        rgb = self.I0 * np.exp(-(h * self.h_od + e_eff * self.e_od))
        self.lut = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
                                        .reshape(-1, 3)).view("V3").ravel()

    # ------------------------------------------------------------------ nuclei
    def _make_nuclei(self, rng, density_z, size_z, pleo_z):
        mpp = self.mpp
        self.density_target = density_from_z(density_z)
        self.diam_target = diameter_from_z(size_z)
        s = math.exp(0.55 * pleo_z)
        size_cv = float(np.clip(0.12 * s, 0.04, 0.45))
        ecc_sd = float(np.clip(0.12 * s, 0.03, 0.40))
        irr = float(np.clip(0.03 * s, 0.01, 0.15))
        int_cv = float(np.clip(0.08 * s, 0.03, 0.30))
        chrom = float(np.clip(0.18 * math.sqrt(s), 0.10, 0.45))
        p_nucleolus = float(np.clip(0.15 * s, 0.02, 0.80))

        # Poisson candidates thinned by tissue and by the nest field (clustering), then a
        # Matérn-II hard core; the candidate rate compensates the hard-core loss.
        area_mm2 = self.W * self.H * (mpp * 1e-3) ** 2
        r_um = 0.6 * self.diam_target
        a_mm2 = math.pi * (r_um * 1e-3) ** 2
        lam0 = -math.log(1.0 - min(self.density_target * a_mm2, 0.85)) / a_mm2
        tissue = self.T > 0
        gain = 0.8
        cmax = math.exp(gain * 2.5)
        mean_c = float(np.exp(gain * self.nest[tissue]).mean()) if tissue.any() else 1.0
        n_cand = int(rng.poisson(lam0 * area_mm2 * cmax / mean_c))
        ys = rng.uniform(0, self.H, n_cand)
        xs = rng.uniform(0, self.W, n_cand)
        u = rng.uniform(0, cmax, n_cand)
        ry = _axis_weights(ys, mpp, self.cell, self.mh)
        rx = _axis_weights(xs, mpp, self.cell, self.mw)
        keep = u < np.exp(gain * _interp_points(self.nest, ry, rx))
        ry, rx = (ry[0][keep], ry[1][keep]), (rx[0][keep], rx[1][keep])
        ys, xs = ys[keep], xs[keep]
        keep = _interp_points(self.T, ry, rx) > 0
        ys, xs = ys[keep], xs[keep]
        marks = rng.uniform(size=len(ys))
        if len(ys) > 1:
            pairs = cKDTree(np.stack([ys, xs], 1)).query_pairs(r_um / mpp, output_type="ndarray")
            if len(pairs):
                i, j = pairs[:, 0], pairs[:, 1]
                alive = np.ones(len(ys), bool)
                alive[np.where(marks[i] > marks[j], i, j)] = False
                ys, xs = ys[alive], xs[alive]
        n = len(ys)
        order = np.argsort(ys, kind="stable")
        self.ny = ys[order].astype(np.int64)
        self.nx = xs[order].astype(np.int64)

        # stamp bank drawn from the slide's nuclear trait distribution
        nb = int(np.clip(n // 20, 256, 2048))
        sig_ln = math.sqrt(math.log1p(size_cv**2))
        d = self.diam_target * np.exp(rng.normal(-0.5 * sig_ln**2, sig_ln, nb))
        d = np.clip(d, max(2.5, 0.4 * self.diam_target), min(45.0, 3.5 * self.diam_target))
        q = np.clip(1.0 - np.abs(rng.normal(0, ecc_sd, nb)) - 0.08, 0.35, 1.0)
        # larger nuclei are paler: the same chromatin spread over more volume
        inten = (self.h_nuc * np.clip(rng.normal(1, int_cv, nb), 0.5, 1.6)
                 * (d / self.diam_target) ** -0.25)
        self.stamps = self._render_bank(rng, d, q, inten, irr, chrom, p_nucleolus)
        self.reach = max(st[0].shape[0] for st in self.stamps) // 2 + 1
        self.nk = rng.integers(0, nb, n)[order]
        self.nt = rng.integers(0, 8, n)[order]  # one of the 8 flips/transposes
        self.bank_d = d
        self.n_nuclei = n

    def _render_bank(self, rng, d_um, q, inten, irr, chrom, p_nucleolus):
        """Quantised haematoxylin stamps (uint8, odd squares), rendered in size batches."""
        mpp = self.mpp
        nb = len(d_um)
        order = np.argsort(d_um)
        stamps = [None] * nb
        theta = rng.uniform(0, np.pi, nb)
        harm_a = np.clip(rng.normal(0, irr, (nb, 3)), -2 * irr, 2 * irr)  # harmonics k = 2, 3, 4
        harm_p = rng.uniform(0, 2 * np.pi, (nb, 3))
        rim = rng.uniform(0.15, 0.35, nb)  # chromatin condensed at the nuclear membrane
        n_nucl = rng.binomial(2, p_nucleolus / 2, nb)
        nucl_pos = rng.uniform(-0.45, 0.45, (nb, 2, 2))
        sub = rng.uniform(-0.5, 0.5, (nb, 2))  # sub-pixel centre
        for start in range(0, nb, 64):
            idx = order[start:start + 64]
            r_px = 0.5 * d_um[idx] / mpp
            a = r_px / np.sqrt(q[idx])  # area-preserving semi-axes
            b = r_px * np.sqrt(q[idx])
            half = int(math.ceil(a.max() * (1 + 6 * irr) + 2))  # |sum of harmonics| <= 6 irr
            S = 2 * half + 1
            g = np.arange(S, dtype=np.float32) - half
            Y = g[None, :, None] - sub[idx, 0, None, None]
            X = g[None, None, :] - sub[idx, 1, None, None]
            ct, st = np.cos(theta[idx])[:, None, None], np.sin(theta[idx])[:, None, None]
            u = (X * ct + Y * st) / a[:, None, None]
            v = (-X * st + Y * ct) / b[:, None, None]
            rho = np.sqrt(u * u + v * v)
            phi = np.arctan2(v, u)
            rb = 1.0 + sum(harm_a[idx, k, None, None]
                           * np.cos((k + 2) * phi + harm_p[idx, k, None, None]) for k in range(3))
            dpx = (rb - rho) * np.sqrt(a * b)[:, None, None]  # ~ px inside the border
            alpha = np.clip(dpx / 0.8 + 0.5, 0.0, 1.0)
            tex = ndi.gaussian_filter(rng.standard_normal((len(idx), S, S)).astype(np.float32),
                                      (0, 0.35 / mpp, 0.35 / mpp))
            tex /= tex.std() + 1e-12
            val = 1.0 + chrom * tex + rim[idx, None, None] * np.exp(-((dpx * mpp / 0.6) ** 2))
            for m in range(2):  # nucleoli: dark dots of ~1 µm
                on = (n_nucl[idx] > m)[:, None, None]
                du = u - nucl_pos[idx, m, 0, None, None]
                dv = v - nucl_pos[idx, m, 1, None, None]
                rr = (du * du + dv * dv) * (a[:, None, None] * mpp) ** 2  # ~µm²
                val += on * 0.8 * np.exp(-rr / 0.45)
            val *= alpha * inten[idx, None, None]
            qv = np.clip(val * H_SCALE + 0.5, 0, 255).astype(np.uint8)
            for n_, k in enumerate(idx):
                nz = np.argwhere(qv[n_])  # crop to the support, keeping the centre
                rad = int(np.abs(nz - half).max()) if len(nz) else 0
                win = slice(half - rad, half + rad + 1)
                s0 = np.ascontiguousarray(qv[n_, win, win])
                stamps[k] = [s0, s0[::-1], s0[:, ::-1], s0[::-1, ::-1],
                             s0.T, s0.T[::-1], s0.T[:, ::-1], s0.T[::-1, ::-1]]
        return stamps

    # ------------------------------------------------------------------ fields
    def _grid(self, ys, xs):
        return (_axis_weights(ys, self.mpp, self.cell, self.mh),
                _axis_weights(xs, self.mpp, self.cell, self.mw))

    def tissue_at(self, ys, xs):
        """Tissue field on a grid of full-res pixel coordinates (> 0: tissue)."""
        return _interp_grid(self.T, *self._grid(ys, xs))

    def pen_distance(self, ys, xs):
        p = self.pen
        return _segment_distance(p["segs"], ys, xs, p["hw"] + 2 * p["edge"])

    def blur_rho(self, ys, xs):
        """Normalised elliptic radius of the blur region (< 1 inside)."""
        b = self.blur
        Y = (np.asarray(ys, np.float32) - b["cy"])[:, None]
        X = (np.asarray(xs, np.float32) - b["cx"])[None, :]
        ca, sa = math.cos(b["ang"]), math.sin(b["ang"])
        u = (X * ca + Y * sa) / b["ra"]
        v = (-X * sa + Y * ca) / b["rb"]
        return np.sqrt(u * u + v * v)

    def pad_mask(self, ys, xs):
        ys, xs = np.asarray(ys), np.asarray(xs)
        m = np.zeros((len(ys), len(xs)), bool)
        for edge, bw in self.pads:
            if edge == "top":
                m[ys < bw] = True
            elif edge == "bottom":
                m[ys >= self.H - bw] = True
            elif edge == "left":
                m[:, xs < bw] = True
            else:
                m[:, xs >= self.W - bw] = True
        return m

    # ------------------------------------------------------------------ rendering
    def render(self, r0, r1, c0, c1):
        """Stained tissue (no artefacts) as RGB uint8 for rows [r0, r1) x cols [c0, c1),
        all even; any range, also beyond the slide."""
        tt = self.tt
        hm, wm = (r1 - r0) // MID, (c1 - c0) // MID
        mrows = np.arange(r0 // MID, r0 // MID + hm)
        mcols = np.arange(c0 // MID, c0 // MID + wm)
        yc = MID * mrows + MID / 2.0  # mid-pixel centres in full-res px
        xc = MID * mcols + MID / 2.0
        ry, rx = self._grid(yc, xc)

        alpha = _interp_grid(self.T, ry, rx)
        alpha += 0.5
        np.clip(alpha, 0.0, 1.0, out=alpha)  # soft tissue mask
        nestw = _interp_grid(self.nestw, ry, rx)
        fine = np.take(np.take(self.fine, mrows % 256, axis=0), mcols % 256, axis=1)
        # collagen: the fibre tile read through a smooth warp (wandering orientation) and
        # slow 1-D shears (no visible period)
        oy = _interp_grid(self.warp, ry, rx).astype(np.int32)
        oy += (mrows + _sines(self.shear_y, mrows)).astype(np.int32)[:, None]
        oy &= tt - 1
        oy *= tt
        ox = mcols[None, :] + _sines(self.shear_x, mrows).astype(np.int64)[:, None]
        ox = ox.astype(np.int32)
        ox &= tt - 1
        oy += ox
        del ox
        fib = np.take(self.fibv, oy)
        del oy
        fib += (0.5 - fib) * nestw  # nests: pale cytoplasm instead of fibres
        e = _interp_grid(self.svar, ry, rx)
        e *= 0.12
        e += 1.0
        e *= fib
        e *= alpha
        e *= self.e0 * E_SCALE
        del fib
        h = nestw
        h *= 0.9
        h += 1.0 + 0.25 * fine
        h *= alpha
        h *= self.hb0 * H_SCALE
        fine *= 0.5
        fine += 1.0  # + rounding: a dither of ~0.5 quantisation steps (glass noise)
        e += fine
        h += fine
        del alpha, fine
        m = np.clip(h, 0, 255).astype(np.uint16)
        m <<= 8
        m |= np.clip(e, 0, 255).astype(np.uint8)
        del e, h
        # upsample: each mid value becomes a 2x2 block ([v, v] pairs as one uint32)
        hh, ww = r1 - r0, c1 - c0
        idx = np.empty((hh, ww), np.uint16)
        idx.view(np.uint32).reshape(hm, MID, wm)[:] = (m.astype(np.uint32) * 0x10001)[:, None, :]
        del m
        # nuclei: max-composited into the haematoxylin byte at full resolution
        hbyte = 1 if sys.byteorder == "little" else 0
        self._stamp_nuclei(idx.view(np.uint8)[:, hbyte::2], r0, c0)
        return np.take(self.lut, idx).view(np.uint8).reshape(hh, ww, 3)

    def _stamp_nuclei(self, buf, r0, c0):
        hh, ww = buf.shape
        a, b = np.searchsorted(self.ny, [r0 - self.reach, r0 + hh + self.reach])
        stamps = self.stamps
        for cy, cx, k, t in zip(self.ny[a:b].tolist(), self.nx[a:b].tolist(),
                                self.nk[a:b].tolist(), self.nt[a:b].tolist()):
            st = stamps[k][t]
            s = st.shape[0]
            y0 = cy - (s >> 1) - r0
            x0 = cx - (s >> 1) - c0
            y1, x1 = y0 + s, x0 + s
            if y0 < 0 or x0 < 0 or y1 > hh or x1 > ww:
                if y1 <= 0 or x1 <= 0 or y0 >= hh or x0 >= ww:
                    continue
                st = st[max(0, -y0):s - max(0, y1 - hh), max(0, -x0):s - max(0, x1 - ww)]
                y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, hh), min(x1, ww)
            sub = buf[y0:y1, x0:x1]
            np.maximum(sub, st, out=sub)

    def blur_region(self, reg, ya, xa, lo, hi):
        """Defocus rows [lo, hi) of a region (in place) whose origin (ya, xa) and size are
        multiples of the blur block k; the other rows are context (halo).

        The gaussian runs on k x k block means (k ~ sigma / 2) and is bilinearly upsampled:
        < 0.5 grey levels (mean) from a full-resolution gaussian at a fraction of the cost.
        Blocks are aligned to absolute coordinates, so neighbouring strips agree.  Work is
        done band by band (k rows) and only where the blend weight is non-zero; inside the
        ellipse the blurred value is written directly, only the ~10 µm soft rim is blended."""
        b = self.blur
        k = b["k"]
        hk, wk = reg.shape[0] // k, reg.shape[1] // k
        small = _block_mean(reg, k)
        s_eff = math.sqrt(max(b["sigma"] ** 2 - k * k / 6.0, 0.25)) / k
        small = ndi.gaussian_filter(small, (s_eff, s_eff, 0), mode="nearest")
        rho = self.blur_rho(ya + (np.arange(hk) + 0.5) * k, xa + (np.arange(wk) + 0.5) * k)
        rim = 10.0 / self.mpp / min(b["ra"], b["rb"])
        w = np.clip((1.0 - rho) / rim + 0.5, 0.0, 1.0).astype(np.float32)
        # block type seen by bilinear interpolation: 0 untouched, 1 rim, 2 fully blurred
        typ = np.where(ndi.maximum_filter(w, 3, mode="nearest") > 0.0, 1, 0).astype(np.int8)
        typ[ndi.minimum_filter(w, 3, mode="nearest") >= 1.0] = 2
        if not typ.any():
            return
        # only bands of rows [lo, hi) and block columns that the ellipse touches
        ib0, ib1 = lo // k, -(-hi // k)
        cols = np.flatnonzero(typ[ib0:ib1].any(0))
        if len(cols) == 0:
            return
        ja, jb = max(cols[0] - 1, 0), min(cols[-1] + 2, wk)  # +1 block of context
        ia, ib = max(ib0 - 1, 0), min(ib1 + 1, hk)
        # upsample columns once (1/k of the full-res work), rows band by band
        cu = _upsample_cols(small[ia:ib, ja:jb], k)
        cw = _upsample_cols(w[ia:ib, ja:jb, None], k)
        typ = typ[:, ja:jb]
        xoff = ja * k
        half = k // 2  # rows of a band above / below the block centre
        offs = ((np.arange(k) + 0.5) / k - 0.5).astype(np.float32)
        for i in range(ib0, ib1):
            t = typ[i]
            if not t.any():
                continue
            cut = np.flatnonzero(t[1:] != t[:-1]) + 1
            bounds = [0, *cut.tolist(), len(t)]
            runs = [(s_, e_) for s_, e_ in zip(bounds[:-1], bounds[1:]) if t[s_]]
            base, wbase = cu[i - ia], cw[i - ia]
            for r0, r1, nb in ((i * k, i * k + half, max(i - 1, 0)),
                               (i * k + half, (i + 1) * k, min(i + 1, hk - 1))):
                r0, r1 = max(r0, lo), min(r1, hi)
                if r0 >= r1:
                    continue
                o = offs[r0 - i * k:r1 - i * k, None, None]
                sgn = 1.0 if nb > i else -1.0
                for s_, e_ in runs:
                    x0, x1 = s_ * k, e_ * k
                    val = cu[nb - ia, x0:x1] - base[x0:x1]
                    val = val * (o * sgn)
                    val += base[x0:x1] + 0.5
                    dst = reg[r0:r1, xoff + x0:xoff + x1]
                    if t[s_] == 1:  # soft rim: blend with the sharp image
                        wv = (cw[nb - ia, x0:x1] - wbase[x0:x1]) * (o * sgn)
                        wv += wbase[x0:x1]
                        f = dst.astype(np.float32)
                        f -= val
                        f *= 1.0 - wv
                        val += f
                    np.copyto(dst, val, casting="unsafe")

    def finish(self, rgb, r0, c0):
        """Pen ink and scanner padding, on top of everything (in place)."""
        hh, ww = rgb.shape[:2]
        if self.pen is not None:
            # ink is one more absorber: multiply by its transmittance; evaluated at mid
            # resolution and applied to the 2x2 full-res pixels
            p = self.pen
            yc = r0 + MID * np.arange(hh // MID) + MID / 2.0
            xc = c0 + MID * np.arange(ww // MID) + MID / 2.0
            a = np.clip((p["hw"] - self.pen_distance(yc, xc)) / p["edge"] + 0.5, 0.0, 1.0)
            mi, mj = np.nonzero(a > 0.004)
            if len(mi):  # slightly uneven ink load (marker nib)
                nib = self.fine[(mi + r0 // MID) % 256, (mj + c0 // MID) % 256]
                dens = a[mi, mj] * (0.96 + 0.04 * nib)
                trans = np.exp(-dens[:, None] * p["od"][None, :]).astype(np.float32)
                for dy in range(MID):
                    for dx in range(MID):
                        rr, cc = MID * mi + dy, MID * mj + dx
                        px = rgb[rr, cc].astype(np.float32)
                        px *= trans
                        px += 0.5
                        rgb[rr, cc] = px.astype(np.uint8)
        for edge, bw in self.pads:
            if edge == "top":
                rgb[:max(0, bw - r0)] = 0
            elif edge == "bottom":
                rgb[max(0, self.H - bw - r0):] = 0
            elif edge == "left":
                rgb[:, :max(0, bw - c0)] = 0
            else:
                rgb[:, max(0, self.W - bw - c0):] = 0

    def strips(self):
        """Yield (s0, rgb) for consecutive level-0 strips covering Hp x Wp."""
        rows = int(np.clip(STRIP_PIXELS // self.Wp // TILE, 1, 8)) * TILE
        b = self.blur
        wc = max(self.Wp, b["x1"]) if b else self.Wp
        for s0 in range(0, self.Hp, rows):
            s1 = min(s0 + rows, self.Hp)
            rgb = self.render(s0, s1, 0, wc)
            if b and s0 - b["halo"] < b["y1"] and s1 + b["halo"] > b["y0"]:
                # the blur needs unblurred neighbours above/below: render halo rows over
                # the blur's columns only
                k, x0, x1 = b["k"], b["x0"], b["x1"]
                ya = max(0, (s0 - b["halo"]) // k * k)
                yb = -(-(s1 + b["halo"]) // k) * k
                parts = [rgb[:, x0:x1]]
                if ya < s0:
                    parts.insert(0, self.render(ya, s0, x0, x1))
                if yb > s1:
                    parts.append(self.render(s1, yb, x0, x1))
                reg = np.concatenate(parts, axis=0)
                self.blur_region(reg, ya, x0, s0 - ya, s1 - ya)
                rgb[:, x0:x1] = reg[s0 - ya:s1 - ya]
                del reg, parts
            rgb = rgb[:, :self.Wp]
            self.finish(rgb, s0, 0)
            yield s0, rgb


def _levels(W, H):
    """Pyramid downsamples 1, 4, 16, ... while the short side stays >= one tile (so any
    slide >= 1024 px has at least two levels)."""
    ds = [1]
    d = 4
    while min(-(-W // d), -(-H // d)) >= TILE:
        ds.append(d)
        d *= 4
    return ds


def write_demo_slide(path, *, rng: np.random.Generator, density_z: float, size_z: float,
                     pleomorphism_z: float, mpp: float = 0.5, width_um: float = 1536.0,
                     height_um: float = 1536.0, artefacts: tuple[str, ...] = (),
                     vendor: str = "aperio", truth_path=None, truth_downsample: int = 16) -> dict:
    """Write one synthetic H&E slide as a pyramidal tiled-JPEG (Q85, 256² tiles) BigTIFF.

    RGB input is stored the way tifffile does by default for JPEG (YCbCr 4:2:0, like most
    scanners); level 0 is the first page, downsampled levels follow as further tiled pages.

    Parameters
    ----------
    path: output file (``.tiff``; openslide detects the format from the content).
    rng: the only source of randomness (same seed -> identical file).
    density_z, size_z, pleomorphism_z: latent tumour traits (z-scores), see the module doc.
    mpp: µm per level-0 pixel; level 0 is ``round(width_um / mpp)`` x ``round(height_um / mpp)``.
    artefacts: any of ``"pen"`` (marker stroke, 60-120 µm, blue/green/black ink),
        ``"padding"`` (black scanner padding along one or two edges, 5-12 % each) and
        ``"blur"`` (out-of-focus ellipse over 15-25 % of the tissue, sigma 4-8 µm).
    vendor: ``"aperio"`` (Aperio ImageDescription + resolution tags: openslide vendor
        ``aperio``), ``"generic"`` (resolution tags in cm only: ``generic-tiff``) or
        ``"nompp"`` (no resolution: openslide reports no ``openslide.mpp-x``).
    truth_path: optional uint8 PNG of labels 0 glass, 1 tissue, 2 pen, 3 padding,
        4 blurred tissue; one pixel per ``truth_downsample``² block, centre-sampled.

    Returns a dict with ``width``, ``height``, ``mpp``, ``vendor``, ``levels`` ((w, h) per
    level), ``tissue_fraction`` (tissue blocks / all blocks of the truth grid, tissue under
    ink included), ``n_nuclei``, ``nuclear_density_per_mm2`` (nuclei drawn / tissue mm²),
    ``mean_nuclear_diameter_um`` (of the nuclei drawn) and ``artefacts``.
    """
    import tifffile

    artefacts = tuple(artefacts)
    bad = set(artefacts) - set(ARTEFACTS)
    if bad:
        raise ValueError(f"unknown artefacts {sorted(bad)}; allowed: {ARTEFACTS}")
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; allowed: {VENDORS}")
    if not mpp > 0:
        raise ValueError("mpp must be > 0")
    W, H = int(round(width_um / mpp)), int(round(height_um / mpp))
    if min(W, H) < 64:
        raise ValueError(f"slide too small: {W}x{H} px")
    if int(truth_downsample) < 1:
        raise ValueError("truth_downsample must be >= 1")

    sl = _Slide(rng, W, H, mpp, density_z, size_z, pleomorphism_z, artefacts)
    downs = _levels(W, H)
    level_dims = [(-(-W // d), -(-H // d)) for d in downs]
    # level 1 is accumulated from level-0 strips, deeper levels from the level above
    lvl1 = np.empty((sl.Hp // 4, sl.Wp // 4, 3), np.uint8) if len(downs) > 1 else None
    ntx = -(-W // TILE)

    def tiles(lvl1):  # row-major tile order, as tifffile expects; fills lvl1 on the way
        for s0, rgb in sl.strips():
            if lvl1 is not None:
                lvl1[s0 // 4:(s0 + len(rgb)) // 4] = _block_mean4(rgb)
            for ty in range(0, min(len(rgb), H - s0), TILE):
                for tx in range(ntx):
                    yield rgb[ty:ty + TILE, tx * TILE:(tx + 1) * TILE]

    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_Q},
                  tile=(TILE, TILE), metadata=None, maxworkers=1)

    def resolution(d):
        if vendor == "nompp":
            return {}
        r = 1e4 / (mpp * d)  # pixels per centimetre
        return dict(resolution=(r, r), resolutionunit="CENTIMETER")

    with tifffile.TiffWriter(Path(path), bigtiff=True) as tw:
        extra = {}
        if vendor == "aperio":
            mag = int(round(10.0 / mpp))  # 20x at 0.5 µm/px, 40x at 0.25
            extra["description"] = (f"Aperio Image Library v12.0.15\r\n{W}x{H} [0,0 {W}x{H}] "
                                    f"(256x256) JPEG Q={JPEG_Q}|AppMag = {mag}|MPP = {mpp}")
        tw.write(tiles(lvl1), shape=(H, W, 3), dtype=np.uint8, **common, **resolution(1), **extra)
        prev = lvl1
        for li, d in enumerate(downs[1:], start=1):
            if li > 1:
                prev = _block_mean4(prev)
            w, h = level_dims[li]
            tw.write(prev[:h, :w], subfiletype=1, **common, **resolution(d))
    del lvl1, prev

    # ---- centre-sampled ground truth and summary statistics
    ds = int(truth_downsample)
    ty = np.arange(-(-H // ds)) * ds + ds / 2.0
    tx = np.arange(-(-W // ds)) * ds + ds / 2.0
    tissue = sl.tissue_at(ty, tx) > 0
    labels = tissue.astype(np.uint8)
    if sl.blur is not None:
        labels[tissue & (sl.blur_rho(ty, tx) < 1.0)] = 4
    if sl.pen is not None:
        labels[sl.pen_distance(ty, tx) < sl.pen["hw"]] = 2
    if sl.pads:
        labels[sl.pad_mask(ty, tx)] = 3
    if truth_path is not None:
        from PIL import Image

        Image.fromarray(labels).save(truth_path)
    tissue_fraction = float(tissue.mean())
    tissue_mm2 = tissue_fraction * W * H * (mpp * 1e-3) ** 2
    n = sl.n_nuclei
    return {
        "width": W,
        "height": H,
        "mpp": float(mpp),
        "vendor": vendor,
        "levels": level_dims,
        "tissue_fraction": tissue_fraction,
        "n_nuclei": int(n),
        "nuclear_density_per_mm2": float(n / tissue_mm2) if tissue_mm2 > 0 else 0.0,
        "mean_nuclear_diameter_um": float(sl.bank_d[sl.nk].mean()) if n else float("nan"),
        "artefacts": list(artefacts),
    }
