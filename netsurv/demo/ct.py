"""Synthetic thoracic CT volumes for the demo survival cohort.

Each case is a crop of a thorax (z = axial / cranio-caudal, x = left-right,
y = antero-posterior) containing lung, a few vessels, a chest wall on the low-x
side and one solid lung tumour.  Three latent tumour traits, given as z-scores,
are turned into physical quantities that radiomics features can pick up:

* ``size_z``          -> volume.  Equivalent-sphere diameter
  ``D = 22 mm * exp(0.25 * size_z)``, clipped to 8..45 mm.
* ``irregularity_z``  -> surface shape.  The surface is star-shaped,
  ``r(u) = r0 * (max(1 + a * f(u), 0.45) + spikes(u))`` for a unit direction u,
  where ``f`` is a unit-RMS sum of random low-frequency plane waves on the sphere
  (lobulation, like low-order spherical harmonics) with amplitude
  ``a = 0.03 + 0.10 * exp(0.6 * irregularity_z)`` (capped at 0.4) and
  ``spikes`` are needle-like bumps ``h * exp(-angle / w)`` (spiculae, ~1-3 mm
  thick, 0.6-1.3 r0 long) that fade in one by one once ``irregularity_z``
  exceeds per-spike random thresholds (~0.25..2.5).  The radius is capped at
  0.8 D, and ``r0`` is rescaled so that irregularity does not change the
  volume.
* ``heterogeneity_z`` -> internal texture.  Solid tissue of ~+40 HU plus a
  smooth random field with ``sigma_int = 15 HU * exp(0.5 * heterogeneity_z)``
  (capped at 90 HU) and, from ``heterogeneity_z`` > -1, a central low-density
  (necrotic, up to 40 HU lower) region whose weight grows with the trait.  The
  texture is made zero-mean over the tumour, so the trait changes the spread
  of tumour HU, not its mean.

Background anatomy: lung parenchyma around -810 HU with +-30 HU smooth texture
and a mild dependent (posterior) density gradient; tapered, branching vessels
(+40 HU, ~0.4-2.8 mm radius); chest wall made of skin, subcutaneous fat
(-100 HU), muscle (+45 HU), oblique ribs (+400 HU) and extrapleural fat, with
air (-1000 HU) outside the body.

The ideal continuous image is evaluated at the voxel centres of the *scanner's*
grid (so the geometry follows the scanner) and then degraded by the scanner
model, which is what creates the batch effect ComBat should later remove:

* slice profile: gaussian along z with FWHM = slice thickness (partial volume
  in thick slices);
* noise: white gaussian noise, independent per voxel and per slice, added
  *before* the in-plane reconstruction kernel so that the kernel shapes the
  noise power spectrum exactly as it shapes the image (smooth kernel ->
  correlated, blotchy noise; sharp kernel -> fine-grained noise).  Its
  amplitude is set from the kernel's impulse response so that the final noise
  standard deviation is exactly ``noise_hu``;
* in-plane kernel: gaussian PSF of ``psf_sigma_mm`` plus, for sharp kernels, an
  unsharp-mask edge enhancement of strength ``edge_enhance`` (overshoot at
  edges, as with real lung/bone kernels);
* calibration: a constant ``hu_offset``; then rounding to int16 HU.

``sharpness`` (0 = very smooth, 1 = very sharp) is the single kernel knob;
``psf_sigma_mm`` and ``edge_enhance`` are derived from it by
:func:`_kernel_model` unless a profile sets them explicitly.

Randomness: four integers drawn from the caller's ``rng`` seed independent
sub-streams (anatomy, lung texture, vessels, tumour shape, tumour texture,
noise), so changing a trait with the same seed changes only that trait: the
same anatomy, vessels, tumour position (for a fixed size) and noise realisation
are reused.  This keeps paired comparisons (e.g. smooth vs. irregular) clean.
Outputs are bit-identical for the same seed, independent of the number of BLAS
threads (large reductions run in float64, small ones via einsum).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["SCANNERS", "write_demo_ct"]


def _kernel_model(sharpness: float) -> dict:
    """Kernel sharpness (0..1) -> PSF and noise-power-spectrum parameters."""
    s = float(np.clip(sharpness, 0.0, 1.0))
    return {
        # Smooth kernels blur more (wider PSF), which also makes their noise
        # coarse/blotchy because the same kernel filters the noise ...
        "psf_sigma_mm": 1.0 - 0.6 * s,
        # ... sharp kernels boost mid/high frequencies (unsharp mask): edge
        # overshoot in the image and fine-grained, high-frequency noise.
        "edge_enhance": 0.4 * max(0.0, s - 0.3) / 0.7,
    }


_SCANNER_BASE: dict[str, dict] = {
    "siemens_b30f": dict(
        manufacturer="SIEMENS", model="SOMATOM Definition AS+", kernel="B30f",
        pixel_spacing=0.7, slice_thickness=1.0, noise_hu=12.0, sharpness=0.2,
        hu_offset=0.0,
    ),
    "ge_lung": dict(
        manufacturer="GE MEDICAL SYSTEMS", model="LightSpeed VCT", kernel="LUNG",
        pixel_spacing=0.8, slice_thickness=2.5, noise_hu=35.0, sharpness=0.9,
        hu_offset=15.0,
    ),
    "philips_b": dict(
        manufacturer="Philips", model="Brilliance 64", kernel="B",
        pixel_spacing=0.9, slice_thickness=3.0, noise_hu=20.0, sharpness=0.5,
        hu_offset=-10.0,
    ),
    "canon_fc08": dict(
        manufacturer="CANON_MEC", model="Aquilion ONE", kernel="FC08",
        pixel_spacing=0.78, slice_thickness=2.0, noise_hu=16.0, sharpness=0.05,
        hu_offset=5.0,
    ),
}

SCANNERS: dict[str, dict] = {
    name: {**_kernel_model(p["sharpness"]), **p} for name, p in _SCANNER_BASE.items()
}

# Tissue values (HU) of the ideal image.
_HU_AIR, _HU_FAT, _HU_MUSCLE, _HU_SKIN = -1000.0, -100.0, 45.0, 30.0
_HU_RIB, _HU_VESSEL, _HU_TUMOUR, _HU_NECROSIS_DROP = 400.0, 40.0, 40.0, 40.0
_TUMOUR_FRAME_MM = 50.0  # half-extent of the fixed tumour texture frame


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _soft_step(t, width: float):
    """0 -> 1 ramp of the given width centred on t = 0 (anti-aliased edge)."""
    return np.clip(0.5 + t / width, 0.0, 1.0)


# Knot spacing of the smooth random fields, in units of the gaussian width:
# fine enough for a practically stationary field, coarse enough to be cheap.
_KNOT_STEP = 0.8


def _gauss_basis(coords: np.ndarray, knots: np.ndarray, corr_mm: float) -> np.ndarray:
    w = np.exp(-0.5 * ((coords[:, None] - knots[None, :]) / corr_mm) ** 2)
    # L2-normalised rows => the separable field below has exactly unit variance.
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
    return w


_BLAS_CONTROLLER = None


def _single_thread_blas():
    """Context limiting BLAS to one thread.

    Cases are generated in parallel processes (one per core); multi-threaded
    BLAS on top of that only oversubscribes the cores (measured ~2x slower
    under load).  No-op if threadpoolctl is unavailable.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROLLER = ThreadpoolController()
        except Exception:  # noqa: BLE001 - optional dependency, no BLAS limit  # pragma: no cover
            _BLAS_CONTROLLER = False
    if _BLAS_CONTROLLER is False:
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _apply_separable(g: np.ndarray, wz, wy, wx) -> np.ndarray:
    """out[i,j,k] = sum_abc wz[i,a] wy[j,b] wx[k,c] g[a,b,c] as three matmuls.

    Done in float64: float32 BLAS sums can differ in the last bit with the
    number of BLAS threads, which could flip a rounded HU value; float64 makes
    the output independent of the thread count in practice.
    """
    g = g.astype(np.float64)
    with _single_thread_blas():
        out = g @ wx.T                      # (a, b, nx)
        out = np.matmul(wy, out)            # (a, ny, nx)
        a = out.shape[0]
        out = (wz @ out.reshape(a, -1)).reshape(wz.shape[0], wy.shape[0], wx.shape[0])
    return out.astype(np.float32)


def _smooth_field(rng, z, y, x, corr_mm: float) -> np.ndarray:
    """Unit-variance smooth gaussian random field on the grid (z, y, x) in mm.

    Coarse white noise on knots spaced ~corr apart is interpolated with gaussian
    weights: three small matrix products instead of a full-resolution 3-D
    convolution of full-resolution noise.
    """
    step = _KNOT_STEP * corr_mm
    bases = []
    for c in (z, y, x):
        knots = np.arange(c[0] - 3 * corr_mm, c[-1] + 3 * corr_mm + step, step)
        bases.append(_gauss_basis(c, knots, corr_mm))
    g = rng.standard_normal(tuple(b.shape[1] for b in bases), dtype=np.float32)
    return _apply_separable(g, *bases)


def _framed_field(rng, offsets, corr_mm: float) -> np.ndarray:
    """Smooth field on a fixed cube of +-_TUMOUR_FRAME_MM around the tumour
    centre, evaluated at the given (z, y, x) offsets.  Because the knot set is
    fixed, the realisation does not depend on the bounding-box size (which
    changes with irregularity)."""
    step = _KNOT_STEP * corr_mm
    knots = np.arange(-_TUMOUR_FRAME_MM, _TUMOUR_FRAME_MM + step, step)
    g = rng.standard_normal((knots.size,) * 3, dtype=np.float32)
    bases, keep = [], []
    for c in offsets:
        sel = (knots > c[0] - 4 * corr_mm) & (knots < c[-1] + 4 * corr_mm)
        keep.append(np.flatnonzero(sel))
        bases.append(_gauss_basis(c, knots[sel], corr_mm))
    g = g[np.ix_(*keep)]
    return _apply_separable(g, *bases)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    zc = 1.0 - 2.0 * i / n
    rxy = np.sqrt(1.0 - zc * zc)
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([rxy * np.cos(phi), rxy * np.sin(phi), zc], axis=1)  # (n, 3) xyz


def _unit_vectors(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class _TumourShape:
    """Star-shaped tumour surface r(u) = r0 * rho(u)."""

    def __init__(self, rng, size_z: float, irregularity_z: float):
        n_modes, n_spikes = 12, 10
        # Always draw the same numbers so that the traits only rescale them.
        self.mode_dirs = _unit_vectors(rng, n_modes)
        self.mode_freq = rng.uniform(0.25, 1.0, n_modes) * 2 * np.pi
        self.mode_phase = rng.uniform(0, 2 * np.pi, n_modes)
        self.mode_w = rng.standard_normal(n_modes)
        self.spike_dirs = _unit_vectors(rng, n_spikes)
        spike_h = rng.uniform(0.6, 1.3, n_spikes)
        self.spike_w = rng.uniform(0.04, 0.07, n_spikes)  # angular decay (rad)
        spike_t = rng.uniform(0.25, 2.5, n_spikes)         # trait threshold

        irr = float(irregularity_z)
        self.amp = float(min(0.4, 0.03 + 0.10 * np.exp(0.6 * irr)))
        # Spiculae appear one by one as irregularity crosses their threshold.
        self.spike_h = spike_h * np.clip((irr - spike_t) / 0.75, 0.0, 1.0)

        u = _fibonacci_sphere(8192)
        f = self._modes(u)
        self._f_mean, self._f_rms = float(f.mean()), float(f.std())
        rho = self.rho_from_dots(np.einsum("nc,kc->nk", u, self.mode_dirs),
                                 np.einsum("nc,kc->nk", u, self.spike_dirs))
        self.diameter_mm = float(np.clip(22.0 * np.exp(0.25 * float(size_z)), 8.0, 45.0))
        # No surface point further than 0.8 D from the centre: bounds the
        # evaluation box and keeps large, very irregular tumours inside the FOV.
        self.r_cap = 0.8 * self.diameter_mm
        # Volume of a star-shaped body = 4/3 pi r0^3 mean(rho^3): choose r0 so
        # the volume is set by size alone (fixed point, as the cap depends on r0).
        self.r0 = 0.5 * self.diameter_mm
        for _ in range(4):
            rho_c = np.minimum(rho, self.r_cap / self.r0)
            self.r0 = 0.5 * self.diameter_mm / float(np.mean(rho_c**3)) ** (1 / 3)
        # Upper bound (sparse samples may miss a needle tip).
        self.r_max = min(self.r0 * (float(rho.max()) + float(self.spike_h.max())) * 1.05,
                         self.r_cap)

    def _modes(self, u):
        dots = np.einsum("nc,kc->nk", u, self.mode_dirs)
        return np.einsum("nk,k->n", np.cos(self.mode_freq * dots + self.mode_phase), self.mode_w)

    def rho_from_dots(self, mode_dots, spike_dots):
        # einsum (not BLAS) for the small reductions: thread-count independent.
        dt = mode_dots.dtype
        f = np.einsum("nk,k->n", np.cos(mode_dots * self.mode_freq.astype(dt)
                                        + self.mode_phase.astype(dt)),
                      self.mode_w.astype(dt))
        f = (f - self._f_mean) / self._f_rms  # unit RMS over the sphere
        rho = np.maximum(1.0 + self.amp * f, 0.45)
        active = self.spike_h > 0
        if active.any():
            sd = spike_dots[..., active]
            # angle from the spike axis (1 - cos t ~ t^2 / 2); the cusp-shaped
            # exp(-t / w) profile gives thin, tapering strands, not cones.
            ang = np.sqrt(np.maximum(2.0 * (1.0 - sd), 0.0))
            w = self.spike_w[active].astype(sd.dtype)
            rho = rho + np.einsum("nk,k->n", np.exp(-ang / w),
                                  self.spike_h[active].astype(sd.dtype))
        return rho


# --------------------------------------------------------------------------- #
# main entry point
# --------------------------------------------------------------------------- #
def write_demo_ct(
    image_path,
    mask_path,
    *,
    rng: np.random.Generator,
    size_z: float,
    irregularity_z: float,
    heterogeneity_z: float,
    scanner: str,
    fov_mm: tuple[float, float, float] = (128.0, 128.0, 96.0),
) -> dict:
    """Generate one synthetic CT + tumour mask and write both as NIfTI.

    Parameters
    ----------
    image_path, mask_path
        Output files (``.nii.gz``); parent folders are created.  The CT is
        int16 HU, the mask uint8 (tumour 1, background 0) on the identical
        grid: spacing (pixel_spacing, pixel_spacing, slice_thickness) of the
        scanner, origin at the first voxel centre of a FOV centred on 0,
        identity direction.
    rng
        Source of randomness (four integers are drawn from it).
    size_z, irregularity_z, heterogeneity_z
        Latent tumour traits (z-scores, see the module docstring).
    scanner
        Key of :data:`SCANNERS`.
    fov_mm
        Field of view (x, y, z) in mm; the chest wall lies on the low-x side.

    Returns
    -------
    dict with ``scanner``, ``manufacturer``, ``model``, ``kernel``,
    ``slice_thickness``, ``pixel_spacing``, ``size`` (x, y, z voxels),
    ``tumour_volume_ml`` (mask voxels x voxel volume), ``tumour_diameter_mm``
    (equivalent sphere), ``tumour_mean_hu`` (whole mask, incl. partial-volume
    boundary voxels), ``tumour_core_mean_hu`` (>= 2 mm inside the surface),
    ``tumour_centre_mm`` (x, y, z), ``target_diameter_mm``,
    ``tumour_sigma_int_hu``, ``tumour_lobulation_amp``, ``tumour_n_spicules``.
    """
    if scanner not in SCANNERS:
        raise KeyError(f"unknown scanner {scanner!r}; choose from {sorted(SCANNERS)}")
    if len(fov_mm) != 3 or min(float(v) for v in fov_mm) <= 0:
        raise ValueError(f"fov_mm must be three positive lengths, got {fov_mm!r}")
    prof = SCANNERS[scanner]
    ps, st = float(prof["pixel_spacing"]), float(prof["slice_thickness"])
    fx, fy, fz = (float(v) for v in fov_mm)
    nx, ny, nz = (max(8, int(round(f / s))) for f, s in ((fx, ps), (fy, ps), (fz, st)))
    # Voxel-centre coordinates (mm) of a grid centred on the FOV centre.
    x = ((np.arange(nx) - (nx - 1) / 2) * ps).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2) * ps).astype(np.float32)
    z = ((np.arange(nz) - (nz - 1) / 2) * st).astype(np.float32)

    # Independent sub-streams: changing one trait does not reshuffle the rest.
    seed = np.random.SeedSequence(rng.integers(0, 2**32, size=4).tolist())
    r_anat, r_lung, r_vess, r_shape, r_tex, r_noise = (
        np.random.default_rng(s) for s in seed.spawn(6))

    # ---- anatomy parameters ------------------------------------------------
    skin0 = -fx / 2 + r_anat.uniform(3.0, 10.0)
    body_radius = r_anat.uniform(120.0, 220.0)
    t_fat, t_mus = r_anat.uniform(5.0, 14.0), r_anat.uniform(7.0, 13.0)
    t_ribl, t_epf = r_anat.uniform(7.0, 10.0), r_anat.uniform(1.0, 2.5)
    rib_period, rib_phase = r_anat.uniform(22.0, 30.0), r_anat.uniform(0.0, 30.0)
    rib_slope = r_anat.uniform(0.2, 0.45)
    rib_a, rib_b = r_anat.uniform(3.0, 4.0), r_anat.uniform(4.0, 6.0)
    lung_hu, lung_grad = r_anat.uniform(-825.0, -795.0), r_anat.uniform(10.0, 30.0)
    tumour_u = r_anat.uniform(0.0, 1.0, 3)

    edge_w = ps  # anti-aliasing width of tissue boundaries in the ideal image

    # ---- lung parenchyma: base + dependent gradient + smooth texture --------
    img = _smooth_field(r_lung, z, y, x, corr_mm=3.0)
    img *= 30.0
    img += (lung_hu + lung_grad * (y / fy))[None, :, None].astype(np.float32)

    # ---- chest wall geometry (2-D profile, extruded along z) -----------------
    x_skin = skin0 + (y.astype(np.float64) ** 2) / (2 * body_radius)  # curved wall
    d_wall = (x[None, :] - x_skin[:, None]).astype(np.float32)       # (ny, nx) depth
    d_fat = 1.5
    d_mus = d_fat + t_fat
    d_ribl = d_mus + t_mus
    d_epf = d_ribl + t_ribl
    d_pleura = d_epf + t_epf
    x_lung_min = float(x_skin.max()) + d_pleura  # lung is fully free beyond this x

    # ---- vessels (drawn before the wall so the wall hides any overlap) -------
    _draw_vessels(img, r_vess, x, y, z, x_lo=float(x_skin.min()) + d_pleura, edge_w=edge_w)

    # ---- chest wall composite (only on the slab of x where the wall exists) --
    ix_end = int(np.searchsorted(x, x_lung_min + 2 * edge_w)) + 1
    dw = d_wall[:, :ix_end]
    wall = (_HU_AIR
            + (_HU_SKIN - _HU_AIR) * _soft_step(dw, edge_w)
            + (_HU_FAT - _HU_SKIN) * _soft_step(dw - d_fat, edge_w)
            + (_HU_MUSCLE - _HU_FAT) * _soft_step(dw - d_mus, edge_w)
            + (_HU_FAT - _HU_MUSCLE) * _soft_step(dw - d_epf, edge_w))
    body = 1.0 - _soft_step(dw - d_pleura, edge_w)  # 1 in the wall, 0 in the lung
    slab = img[:, :, :ix_end]
    slab *= (1.0 - body)[None]
    slab += (wall * body)[None]
    # Oblique ribs: elliptical cross-sections in (depth, z) repeating along z.
    d_ribc = d_ribl + 0.5 * t_ribl
    zr = (z[:, None] - rib_slope * y[None, :] - rib_phase) % rib_period
    zr = np.minimum(zr, rib_period - zr)[:, :, None]                # (nz, ny, 1)
    q = ((dw - d_ribc) / rib_a) ** 2
    rib_r = np.sqrt(q[None] + (zr / rib_b) ** 2)                     # 1 on the rim
    rib = _soft_step((1.0 - rib_r) * min(rib_a, rib_b), edge_w)
    slab += rib * (_HU_RIB - slab)

    # ---- tumour ------------------------------------------------------------
    shape = _TumourShape(r_shape, size_z, irregularity_z)
    # Centre: the whole tumour (<= r_cap) inside the FOV and its main body
    # (equivalent sphere + 3 mm) inside the lung; lobes/spiculae may reach the
    # pleura.  Depends on size only, so irregularity/heterogeneity don't move it.
    r_fov = shape.r_cap + 2.0 * edge_w
    lo = np.array([max(x_lung_min + 0.5 * shape.diameter_mm + 3.0, -fx / 2 + r_fov),
                   -fy / 2 + r_fov, -fz / 2 + r_fov])
    hi = np.array([fx / 2 - r_fov, fy / 2 - r_fov, fz / 2 - r_fov])
    # Not enough room (huge tumour / small FOV): the FOV border wins over the
    # wall (the tumour then abuts the pleura); if even the FOV is too small,
    # centre the tumour on that axis.
    for k, half in enumerate((fx / 2, fy / 2, fz / 2)):
        if lo[k] > hi[k]:
            lo[k] = hi[k] = hi[k] if (k == 0 and hi[k] >= r_fov - half) else 0.0
    centre = lo + tumour_u * (hi - lo)  # x, y, z (mm)
    tsl, inside, core, tumour_stats = _draw_tumour(img, shape, centre, r_tex,
                                                   heterogeneity_z, x, y, z, edge_w)
    mask = np.zeros(img.shape, dtype=np.uint8)
    mask[tsl] = inside

    # ---- scanner: slice profile, noise, in-plane reconstruction kernel ------
    # Slice profile with FWHM = slice thickness (sigma in voxels along z).
    img = _slice_profile(img)
    # White noise enters before the kernel, so the kernel colours it; scale
    # it by the kernel's noise gain to end at exactly noise_hu.
    noise_amp = float(prof["noise_hu"]) / _kernel_noise_gain(ps, prof)
    img += noise_amp * r_noise.standard_normal(img.shape, dtype=np.float32)
    img = _inplane_kernel(img, ps, prof)
    img += float(prof["hu_offset"])
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    hu = img.astype(np.int16)

    # ---- write ---------------------------------------------------------------
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing((ps, ps, st))
    ct.SetOrigin((float(x[0]), float(y[0]), float(z[0])))
    ct.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    seg = sitk.GetImageFromArray(mask)
    seg.CopyInformation(ct)
    for p, im in ((image_path, ct), (mask_path, seg)):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(im, str(p), True)

    n_mask = int(inside.sum())
    voxel_ml = ps * ps * st / 1000.0
    vol_ml = n_mask * voxel_ml
    tumour_hu = hu[tsl][inside]
    core_hu = hu[tsl][core]
    return {
        "scanner": scanner,
        "manufacturer": prof["manufacturer"],
        "model": prof["model"],
        "kernel": prof["kernel"],
        "slice_thickness": st,
        "pixel_spacing": ps,
        "size": (nx, ny, nz),
        "tumour_volume_ml": float(vol_ml),
        "tumour_diameter_mm": float((6.0 * vol_ml * 1000.0 / np.pi) ** (1 / 3)),
        "tumour_mean_hu": float(tumour_hu.mean()),
        "tumour_core_mean_hu": float(core_hu.mean()),
        "tumour_centre_mm": tuple(float(c) for c in centre),
        "target_diameter_mm": shape.diameter_mm,
        **tumour_stats,
    }


def _draw_vessels(img, rng, x, y, z, *, x_lo: float, edge_w: float) -> None:
    """Tapered, branching cylinders (+40 HU), each evaluated in its own bbox."""
    x_hi = float(x[-1])
    segs = []
    for _ in range(int(rng.integers(3, 6))):
        p0 = np.array([rng.uniform(x_lo + 5.0, x_hi - 5.0),
                       rng.uniform(y[0], y[-1]), rng.uniform(z[0], z[-1])])
        tilt, az = np.deg2rad(rng.uniform(0, 60)), rng.uniform(0, 2 * np.pi)
        u = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
        length, radius = rng.uniform(40.0, 90.0), rng.uniform(1.2, 2.8)
        segs.append((p0, u, length, radius))
        for _ in range(int(rng.integers(1, 3))):  # branches
            t = rng.uniform(0.3, 0.8) * length
            v = u + rng.normal(0, 0.6, 3)
            v /= np.linalg.norm(v)
            segs.append((p0 + t * u, v, 0.6 * length, 0.6 * radius * (1 - 0.4 * t / length)))
    for p0, u, length, radius in segs:
        p1 = p0 + length * u
        p0, u = [float(v) for v in p0], [float(v) for v in u]  # keep float32 maths
        pad = radius + 2 * edge_w
        ranges = []
        for axis_c, lo_, hi_ in ((z, p0[2], p1[2]), (y, p0[1], p1[1]), (x, p0[0], p1[0])):
            a, b = min(lo_, hi_) - pad, max(lo_, hi_) + pad
            i0, i1 = np.searchsorted(axis_c, a), np.searchsorted(axis_c, b)
            ranges.append((int(i0), int(i1)))
        if any(i1 <= i0 for i0, i1 in ranges):
            continue
        (z0, z1), (y0, y1), (x0, x1) = ranges
        dz = (z[z0:z1] - p0[2])[:, None, None]
        dy = (y[y0:y1] - p0[1])[None, :, None]
        dx = (x[x0:x1] - p0[0])[None, None, :]
        t = np.clip(dx * u[0] + dy * u[1] + dz * u[2], 0.0, length)
        d = np.sqrt((dx - t * u[0]) ** 2 + (dy - t * u[1]) ** 2 + (dz - t * u[2]) ** 2)
        r_t = radius * (1.0 - 0.4 * t / length)  # taper towards the periphery
        m = _soft_step(r_t - d, edge_w).astype(np.float32)
        sub = img[z0:z1, y0:y1, x0:x1]
        sub += m * (_HU_VESSEL - sub)


def _draw_tumour(img, shape: _TumourShape, centre, rng, heterogeneity_z, x, y, z, edge_w):
    """Composite the tumour into img.

    Returns (bbox slices, mask in bbox, core in bbox, stats); the core is the
    part >= 2 mm (radially) below the surface, free of partial volume and PSF
    blur, so its mean shows the tissue value (+ offset, + kernel effects).
    """
    pad = shape.r_max + 2.0 * edge_w
    sl = []
    for axis_c, c in ((z, centre[2]), (y, centre[1]), (x, centre[0])):
        i0 = int(np.searchsorted(axis_c, c - pad))
        i1 = max(int(np.searchsorted(axis_c, c + pad)), i0 + 1)
        sl.append(slice(i0, min(i1, axis_c.size)))
    oz = (z[sl[0]] - centre[2]).astype(np.float32)
    oy = (y[sl[1]] - centre[1]).astype(np.float32)
    ox = (x[sl[2]] - centre[0]).astype(np.float32)
    r = np.sqrt(oz[:, None, None] ** 2 + oy[None, :, None] ** 2 + ox[None, None, :] ** 2)
    r = np.maximum(r, 1e-3)
    # Evaluate r(u) only inside the bounding sphere (about half of the box);
    # elsewhere surf = 0, i.e. outside.
    sel = np.flatnonzero(r.ravel() <= pad)
    pts = np.stack([np.broadcast_to(c, r.shape).ravel()[sel]
                    for c in (ox[None, None, :], oy[None, :, None], oz[:, None, None])],
                   axis=1) / r.ravel()[sel, None]
    # Direction cosines u . d for all modes/spikes.
    rho = shape.rho_from_dots(
        np.einsum("nc,kc->nk", pts, shape.mode_dirs.astype(np.float32)),
        np.einsum("nc,kc->nk", pts, shape.spike_dirs.astype(np.float32)))
    del pts
    surf = np.zeros(r.shape, dtype=np.float32)
    surf.ravel()[sel] = np.minimum(shape.r0 * rho, shape.r_cap)
    inside = r <= surf
    # Keep the largest component (the body): a star shape is connected in the
    # continuum, but sampling can cut thin spicule tips off as islands.
    lab, n = ndimage.label(inside)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        inside = lab == int(sizes.argmax())
    if not inside.any():  # degenerate tiny tumour: at least the centre voxel
        inside[np.unravel_index(int(np.argmin(r)), r.shape)] = True

    # Internal texture: smooth field + central necrosis, both on a fixed frame.
    het = float(heterogeneity_z)
    sigma_int = float(min(15.0 * np.exp(0.5 * het), 90.0))
    n1 = _framed_field(rng, (oz, oy, ox), corr_mm=2.0)
    n2 = _framed_field(rng, (oz, oy, ox), corr_mm=5.0)
    q = float(np.clip((het + 1.0) / 2.5, 0.0, 1.0))
    core_score = n2 + 3.0 * (0.5 - r / np.maximum(surf, 1e-3))
    necrosis = q * 0.5 * (1.0 + np.tanh((core_score - 0.8) / 0.6))  # logistic
    tex = sigma_int * n1 - _HU_NECROSIS_DROP * necrosis
    # Zero-mean over the tumour: heterogeneity adds spread, not a mean shift
    # (otherwise mean HU would become a proxy of the trait).
    tex -= float(tex[inside].mean())
    tum = np.clip(_HU_TUMOUR + tex, -150.0, 250.0)

    m = _soft_step(surf - r, edge_w).astype(np.float32)
    sub = img[sl[0], sl[1], sl[2]]
    sub += m * (tum.astype(np.float32) - sub)

    stats = {"tumour_sigma_int_hu": float(sigma_int),
             "tumour_lobulation_amp": float(shape.amp),
             "tumour_n_spicules": int((shape.spike_h > 0).sum())}
    depth = np.where(inside, surf - r, -1.0)
    core = depth >= min(2.0, float(depth.max()))
    return tuple(sl), inside, core, stats


def _slice_profile(a: np.ndarray) -> np.ndarray:
    """Gaussian along z with FWHM = one slice (sigma = 1/2.355 voxel).

    At this sigma the gaussian truncated at 3 sigma is a 3-tap filter; doing
    it with shifted slices is ~4x faster than a strided correlate1d."""
    w = float(np.exp(-0.5 * 2.355**2))
    c0, c1 = 1.0 / (1.0 + 2.0 * w), w / (1.0 + 2.0 * w)
    out = a * c0
    out[1:] += c1 * a[:-1]
    out[:-1] += c1 * a[1:]
    out[0] += c1 * a[0]    # 'reflect' boundary (edge value repeated)
    out[-1] += c1 * a[-1]
    return out


_EDGE_SIGMA_MM = 1.5  # width of the unsharp-mask surround of sharp kernels


def _inplane_kernel(a: np.ndarray, ps: float, prof: dict) -> np.ndarray:
    """Reconstruction kernel, applied per slice (axes y, x)."""
    s = float(prof["psf_sigma_mm"]) / ps
    out = ndimage.gaussian_filter(a, sigma=(0, s, s), truncate=3.0)
    e = float(prof["edge_enhance"])
    if e > 0.0:
        sw = _EDGE_SIGMA_MM / ps
        wide = ndimage.gaussian_filter(out, sigma=(0, sw, sw), truncate=3.0)
        out *= 1.0 + e
        out -= e * wide
    return out


def _kernel_noise_gain(ps: float, prof: dict) -> float:
    """Std of kernel-filtered unit white noise = L2 norm of the impulse response."""
    k = int(np.ceil(3.0 * (float(prof["psf_sigma_mm"]) + _EDGE_SIGMA_MM) / ps)) + 2
    delta = np.zeros((1, 2 * k + 1, 2 * k + 1), dtype=np.float64)
    delta[0, k, k] = 1.0
    return float(np.sqrt((_inplane_kernel(delta, ps, prof) ** 2).sum()))
