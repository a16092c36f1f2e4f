"""What :mod:`.volumes` and :mod:`.dicom_masks` share: the error of an unusable CT case and
the comparison of image grids (a module of its own so that neither imports the other)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


class VolumeError(ValueError):
    """A CT case cannot be used; the message names the file and the reason."""


def geometry(img: sitk.Image) -> dict:
    """Size, spacing, origin and direction of ``img``, rounded for display in error messages."""
    return {"size": tuple(img.GetSize()), "spacing": tuple(round(s, 6) for s in img.GetSpacing()),
            "origin": tuple(round(o, 4) for o in img.GetOrigin()),
            "direction": tuple(round(d, 6) for d in img.GetDirection())}


def geometry_mismatch(image: sitk.Image, mask: sitk.Image, tol: float = 1e-3) -> list[str]:
    """Differences beyond ``tol`` (relative for spacing, mm for origin, absolute for direction)."""
    diffs = []
    if image.GetSize() != mask.GetSize():
        diffs.append("size")
    if not np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=tol, atol=0):
        diffs.append("spacing")
    if not np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0,
                       atol=max(tol, tol * min(image.GetSpacing()))):
        diffs.append("origin")
    if not np.allclose(image.GetDirection(), mask.GetDirection(), atol=tol):
        diffs.append("direction")
    return diffs
