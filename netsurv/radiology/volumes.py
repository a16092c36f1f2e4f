"""Read CT volumes and tumour masks (DICOM series, NIfTI, NRRD, MHA; masks also DICOM RTSTRUCT
and SEG, see :mod:`netsurv.radiology.dicom_masks`) and make them agree.

pyradiomics fails late and cryptically on the classic problems (geometry mismatch, masks
labelled 255, empty masks), so every case is checked here first and fails with a reason that
names the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .grid import VolumeError, geometry, geometry_mismatch  # also imported from here

ROLE_FIX = {
    "image": "replace them with a valid intensity (e.g. -1024 HU, air) or leave the case out of "
             "ct.csv",
    "mask": "set them to 0 (background) or to the label",
}


def read_volume(path, role: str = "image") -> sitk.Image:
    """A file readable by SimpleITK, or a folder holding one DICOM series.

    Non-finite voxels (NaN, +-inf) fail with :class:`VolumeError` naming the file and ``role``
    ("image" or "mask"): pyradiomics would otherwise fail late and cryptically, or, for NIfTI,
    SimpleITK silently reads them as 0 (see :func:`non_finite_voxels`)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: {role} file or folder does not exist")
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise VolumeError(f"{path}: folder holds no DICOM series")
            if len(ids) > 1:
                raise VolumeError(f"{path}: folder holds {len(ids)} DICOM series {list(ids)}; "
                                  "put each series in its own folder")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except VolumeError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every reader failure as RuntimeError
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{path}: cannot be read as an image ({first})") from exc
    n, first = non_finite_voxels(path, img)
    if n:
        raise VolumeError(
            f"{path}: {role} holds {n} non-finite voxel(s) (NaN or inf), the first at voxel index "
            f"(x, y, z) = {first}; {ROLE_FIX.get(role, 'fix the file')}")
    return img


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz"))


def non_finite_voxels(path, img: sitk.Image) -> tuple[int, tuple[int, ...] | None]:
    """(count, first voxel index in ITK (x, y, z) order) of NaN/inf voxels of ``img`` read from
    ``path``.

    Integer pixel types cannot hold them.  SimpleITK's NIfTI reader (ITK before PR #6683)
    replaces every non-finite value with 0, which hides them, so float NIfTI files are checked as
    stored, with nibabel; NRRD, MHA/MHD and the others keep them, and are checked on the array
    SimpleITK read."""
    path = Path(path)
    if path.is_file() and _is_nifti(path):
        import nibabel as nib

        try:
            stored = nib.load(str(path))
            if stored.get_data_dtype().kind not in "fc":  # integer storage: always finite
                return 0, None
            arr = np.asanyarray(stored.dataobj)  # nibabel's (i, j, k) = ITK's (x, y, z)
            bad = ~np.isfinite(arr)
            if bad.any():
                return int(bad.sum()), tuple(int(v) for v in np.argwhere(bad)[0][:3])
            return 0, None
        except Exception:  # noqa: BLE001 - a NIfTI variant nibabel cannot read: use SimpleITK's
            pass
    if img.GetPixelIDValue() not in (sitk.sitkFloat32, sitk.sitkFloat64,
                                     sitk.sitkVectorFloat32, sitk.sitkVectorFloat64):
        return 0, None
    arr = sitk.GetArrayViewFromImage(img)  # numpy (z, y, x) order
    bad = ~np.isfinite(arr)
    if not bad.any():
        return 0, None
    first = np.argwhere(bad)[0]
    return int(bad.sum()), tuple(int(v) for v in first[:img.GetDimension()][::-1])


@dataclass
class Case:
    """A CT image with its binary region-of-interest mask, as :func:`load_case` returns it.

    Attributes
    ----------
    image : SimpleITK.Image
        The 3-D image.
    mask : SimpleITK.Image
        Binary uint8 mask (1 = region of interest) with the image's geometry.
    notes : list of str
        What was adjusted on the way (resampled mask, label 255 accepted, DICOM mask notes ...).
    provenance : dict
        For DICOM RTSTRUCT / SEG masks: ``mask_kind``, ``roi``, ``roi_number``, ``mask`` (file)
        and ``rasteriser``; empty otherwise.
    """

    image: sitk.Image
    mask: sitk.Image          # binary uint8, 1 = region of interest, same geometry as image
    notes: list[str] = field(default_factory=list)
    # DICOM RTSTRUCT/SEG masks: mask_kind, roi, roi_number, mask (file), rasteriser; else empty
    provenance: dict = field(default_factory=dict)


def load_case(image_path, mask_path, *, label: int = 1, resample_mask: bool = False,
              tol: float = 1e-3, roi=None) -> Case:
    """Read image and mask, reconcile geometry, and binarise the mask on ``label``.

    - a DICOM RTSTRUCT or SEG mask (told by its SOP class) is rasterised on the image, which
      must be the DICOM series it references; ``roi`` names the ROI/segment (name or number;
      may be empty when the file holds one); ``label`` does not apply to it;
    - geometry mismatch: resample the mask onto the image grid (nearest neighbour) when
      ``resample_mask``; otherwise fail giving both geometries;
    - a binary mask labelled 255 is accepted for ``label=1`` (with a note);
    - a mask without the label, or empty after resampling, fails with the labels it holds.
    """
    from .dicom_masks import dicom_mask_kind, read_dicom_mask

    image = read_volume(image_path, "image")
    kind = dicom_mask_kind(mask_path)
    notes: list[str] = []
    provenance: dict = {}
    if kind:
        if image.GetDimension() != 3:
            raise VolumeError(f"{image_path}: expected a 3-D volume, got {image.GetDimension()}-D")
        dm = read_dicom_mask(mask_path, image_path, image, kind, roi)
        mask, notes, provenance, label = dm.mask, list(dm.notes), dm.provenance, 1
    else:
        mask = read_volume(mask_path, "mask")
    if image.GetDimension() != 3 or mask.GetDimension() != 3:
        raise VolumeError(f"{image_path} / {mask_path}: expected 3-D volumes, got "
                          f"{image.GetDimension()}-D image and {mask.GetDimension()}-D mask")
    diffs = geometry_mismatch(image, mask, tol)
    if diffs:
        if not resample_mask:
            raise VolumeError(
                f"{mask_path}: mask geometry differs from image {image_path} in {diffs}: image "
                f"{geometry(image)} vs mask {geometry(mask)}. Fix the mask or set "
                "radiology.resample_mask=true to resample it onto the image (nearest neighbour)."
            )
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             mask.GetPixelID())
        notes.append(f"mask resampled onto the image grid (differed in {diffs})")
    arr = sitk.GetArrayViewFromImage(mask)
    if arr.dtype in (np.uint8, np.uint16):
        present = [int(v) for v in np.flatnonzero(np.bincount(arr.ravel())) if v != 0]
    else:  # np.unique sorts the whole volume: several times slower than a bincount
        present = [int(v) for v in np.unique(arr) if v != 0]
    use = label
    if label not in present:
        if label == 1 and present == [255]:
            use = 255
            notes.append("binary mask labelled 255: using 255 as the region of interest")
        elif not present and provenance:
            raise VolumeError(f"{mask_path}: mask is empty ({provenance['mask_kind']} "
                              f"{'segment' if kind == 'SEG' else 'ROI'} "
                              f"{provenance['roi_number']} {provenance['roi']!r} rasterises to "
                              "no voxel of the image)")
        elif not present:
            raise VolumeError(f"{mask_path}: mask is empty (no non-zero voxel"
                              f"{' after resampling' if diffs else ''})")
        else:
            raise VolumeError(f"{mask_path}: label {label} not present; the mask holds labels "
                              f"{present[:20]}. Set the 'label' column in ct.csv or "
                              "radiology.label.")
    others = [v for v in present if v != use]
    if others:
        notes.append(f"mask holds other labels {others[:20]}: only label {use} is used")
    if present == [1] and mask.GetPixelID() == sitk.sitkUInt8:
        binary = mask  # already a binary uint8 mask: the common case, nothing to compute
    else:
        binary = sitk.Cast(sitk.BinaryThreshold(mask, use, use, 1, 0), sitk.sitkUInt8)
    binary.CopyInformation(image)
    return Case(image=image, mask=binary, notes=notes, provenance=provenance)
