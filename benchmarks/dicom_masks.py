"""DICOM RTSTRUCT / SEG tumour masks against the NIfTI mask they were made from.

    python benchmarks/dicom_masks.py [--cases 3]

For demo tumours (scanners of different pixel spacing, an octant cut away so that the tumour is
asymmetric) the CT is written as a DICOM series and the tumour as

- an RTSTRUCT written by rt-utils (contours through the centres of the boundary voxels),
- an RTSTRUCT whose contours run around the voxels, half a voxel outside those centres
  (marching squares, like a planning system's outline),
- a SEG written by highdicom.

Prints, per case and file, netsurv's pyradiomics voxel volume and mean HU against the NIfTI
mask's, the voxels added / missed, and the seconds :func:`load_case` takes (image: the DICOM
series; first row: with the NIfTI mask, ``--fov-scale`` enlarges the field of view); then the same
RTSTRUCTs filled by other rasterisers (rt-utils' reader, skimage's ``polygon2mask``, and
plastimatch when its wheel is installed), to show why netsurv fills contours itself.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

# benchmarks/radiomics.py would shadow pyradiomics' package; the test module holds the writers
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
from test_dicom_masks import (  # noqa: E402
    MEAN,
    PARAMS,
    VOL,
    _asymmetric,
    contours_around_voxels,
    write_rtstruct,
    write_seg,
    write_series,
)

from netsurv.demo.ct import write_demo_ct  # noqa: E402
from netsurv.radiology import radiomics as R  # noqa: E402
from netsurv.radiology.volumes import load_case  # noqa: E402

CASES = [("philips_b", (64.0, 64.0, 48.0), 3), ("siemens_b30f", (64.0, 64.0, 40.0), 5),
         ("ge_lung", (96.0, 96.0, 60.0), 7)]


def rt_utils_fill(series, rs, sops):
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(str(series), str(rs))
    m = rt.get_roi_mask_by_name("GTV")
    at = {str(s.SOPInstanceUID): i for i, s in enumerate(rt.series_data)}
    return np.stack([m[:, :, at[u]] for u in sops]).astype(bool)


def skimage_fill(img, rs, shape):
    from skimage.draw import polygon2mask

    ds = pydicom.dcmread(rs)
    out = np.zeros(shape, bool)
    for c in ds.ROIContourSequence[0].ContourSequence:
        pts = np.reshape(np.asarray(c.ContourData, float), (-1, 3))
        idx = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in pts])
        out[int(round(idx[:, 2].mean()))] ^= polygon2mask(shape[1:], idx[:, [1, 0]])
    return out


def plastimatch_fill(series, rs, work):
    try:
        from plastimatch import _lookup
    except ImportError:
        return None
    out = work / f"pm-{rs.stem}"
    subprocess.run([str(_lookup("plastimatch")), "convert", "--input", str(rs),
                    "--referenced-ct", str(series), "--output-ss-img", str(out / "ss.nrrd")],
                   check=True, capture_output=True)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ss.nrrd")))
    return (a[..., 0] & 1).astype(bool) if a.ndim == 4 else (a & 1).astype(bool)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--fov-scale", type=float, default=1.0)
    args = ap.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    print(f"{'case':<14}{'voxels':>7}  {'file':<22}{'volume %':>9}{'mean HU':>9}{'extra':>7}"
          f"{'missed':>7}{'s':>7}")
    others = []
    with tempfile.TemporaryDirectory() as tmp:
        for scanner, fov, seed in CASES[:args.cases]:
            d = Path(tmp) / scanner
            write_demo_ct(d / "ct.nii.gz", d / "demo.nii.gz", rng=np.random.default_rng(seed),
                          size_z=0.0, irregularity_z=1.0, heterogeneity_z=1.0, scanner=scanner,
                          fov_mm=tuple(v * args.fov_scale for v in fov))
            img = sitk.ReadImage(str(d / "ct.nii.gz"))
            truth = _asymmetric(sitk.GetArrayFromImage(sitk.ReadImage(str(d / "demo.nii.gz"))))
            m = sitk.GetImageFromArray(truth)
            m.CopyInformation(img)
            sitk.WriteImage(m, str(d / "mask.nii.gz"))
            sops = write_series(img, d / "series")
            files = {"RTSTRUCT (rt-utils)": write_rtstruct(d / "series", sops, {"GTV": truth},
                                                           d / "rs.dcm")}
            files["RTSTRUCT (around)"] = contours_around_voxels(d / "rs.dcm", img, sops, truth,
                                                                d / "rs_around.dcm")
            files["SEG (highdicom)"] = write_seg(d / "series", sops, {"GTV": truth}, d / "seg.dcm")
            ref, _ = R.extract_case(d / "ct.nii.gz", d / "mask.nii.gz", PARAMS)
            t = truth.astype(bool)
            t0 = time.perf_counter()
            load_case(d / "series", d / "mask.nii.gz")
            print(f"{scanner:<14}{int(t.sum()):>7}  {'NIfTI mask':<22}{'':>9}{'':>9}{'':>7}{'':>7}"
                  f"{time.perf_counter() - t0:>7.2f}")
            for name, f in files.items():
                t0 = time.perf_counter()
                got = sitk.GetArrayFromImage(load_case(d / "series", f).mask).astype(bool)
                sec = time.perf_counter() - t0
                feats, _ = R.extract_case(d / "series", f, PARAMS)
                print(f"{scanner:<14}{int(t.sum()):>7}  {name:<22}"
                      f"{100 * (feats[VOL] - ref[VOL]) / ref[VOL]:>+9.2f}"
                      f"{feats[MEAN] - ref[MEAN]:>+9.2f}{int((got & ~t).sum()):>7}"
                      f"{int((~got & t).sum()):>7}{sec:>7.2f}")
            hu = sitk.GetArrayFromImage(img).astype(float)
            fills = (("rt-utils reader",
                      lambda f, d=d, sops=sops: rt_utils_fill(d / "series", f, sops)),
                     ("skimage polygon2mask",
                      lambda f, img=img, shape=t.shape: skimage_fill(img, f, shape)),
                     ("plastimatch", lambda f, d=d: plastimatch_fill(d / "series", f, d)))
            for name in ("RTSTRUCT (rt-utils)", "RTSTRUCT (around)"):
                for who, fill in fills:
                    got = fill(files[name])
                    if got is None:
                        others.append((scanner, name, who, None))
                        continue
                    others.append((scanner, name, who,
                                   (100 * (got.sum() - t.sum()) / t.sum(),
                                    hu[got].mean() - hu[t].mean(),
                                    int((got & ~t).sum()), int((~got & t).sum()))))
    print(f"\nother rasterisers on the same RTSTRUCTs\n{'case':<14}{'file':<22}"
          f"{'rasteriser':<22}{'volume %':>9}{'mean HU':>9}{'extra':>7}{'missed':>7}")
    for scanner, name, who, r in others:
        if r is None:
            print(f"{scanner:<14}{name:<22}{who:<22}  (not installed)")
        else:
            print(f"{scanner:<14}{name:<22}{who:<22}{r[0]:>+9.2f}{r[1]:>+9.2f}{r[2]:>7}{r[3]:>7}")


if __name__ == "__main__":
    main()
