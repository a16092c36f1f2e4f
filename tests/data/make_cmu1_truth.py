"""Build the reference tissue/dye label map of CMU-1-Small-Region.svs (``cmu1_truth.png``).

Run from the repository root: ``python tests/data/make_cmu1_truth.py [--overlay out.png]``.

Independent of netsurv's tissue rules on purpose: it classifies the full-resolution pixels
(0.499 µm/px) with scikit-image's HSV and an optical-density floor, then pools them into
16 x 16 px blocks (8 µm), the grid the tests compare tiles with.  The label map was then
reviewed region by region against the slide (see README.md in this folder).

Labels: 0 glass, 1 tissue, 2 marking dye (the teal margin ink).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hsv

HERE = Path(__file__).resolve().parent
SLIDE = HERE / "CMU-1-Small-Region.svs"
TRUTH = HERE / "cmu1_truth.png"
BLOCK = 16

# hand edits after review, in blocks (row0, row1, col0, col1) -> label; none were needed for
# this slide (see README.md), the hook stays so a later review can record its edits here
EDITS: list[tuple[tuple[int, int, int, int], int]] = []


def pixel_classes(rgb: np.ndarray):
    """(stained, dye) bool maps of the level-0 pixels."""
    sm = ndi.gaussian_filter(rgb.astype(np.float32), (1.5, 1.5, 0))  # JPEG chroma noise
    od = -np.log((sm + 1.0) / 256.0).sum(-1)  # summed RGB optical density; glass ~0.04
    hsv = rgb2hsv(np.clip(sm / 255.0, 0, 1))
    hue, sat = hsv[..., 0] * 360.0, hsv[..., 1]
    stained = (od > 0.25) & (sat > 0.08)
    # teal/green/blue dye: green brighter than red (hue 140-235 degrees), clearly saturated;
    # H&E (pink eosin, purple haematoxylin) has hue 240-360 / 0-30 on this slide
    dye = stained & (hue >= 140) & (hue < 235) & (sat > 0.2)
    return stained & ~dye, dye


def block_fractions(m: np.ndarray) -> np.ndarray:
    H, W = m.shape
    hb, wb = -(-H // BLOCK), -(-W // BLOCK)
    p = np.zeros((hb * BLOCK, wb * BLOCK), np.float32)
    p[:H, :W] = m
    return p.reshape(hb, BLOCK, wb, BLOCK).mean((1, 3))


def labels(rgb: np.ndarray) -> np.ndarray:
    tis, dye = pixel_classes(rgb)
    ft, fd = block_fractions(tis), block_fractions(dye)
    t = ft >= 0.2  # a block with >= 20 % stained pixels (loose dermis has gaps)
    t |= ndi.binary_closing(t, np.ones((3, 3)), border_value=0)  # bridge 8 µm gaps
    lab, _ = ndi.label(t)
    keep = np.bincount(lab.ravel()) >= 10  # fragments >= 10 blocks (~640 µm²)
    keep[0] = False
    t = keep[lab]
    holes = ndi.binary_fill_holes(t) & ~t
    lab, _ = ndi.label(holes)
    small = np.bincount(lab.ravel()) < 30  # clefts < ~2000 µm² are part of the tissue
    small[0] = False
    t |= small[lab]
    out = np.zeros(t.shape, np.uint8)
    out[t] = 1
    out[(fd >= 0.25) & (fd > ft)] = 2  # dye-dominated blocks
    for (r0, r1, c0, c1), v in EDITS:
        out[r0:r1, c0:c1] = v
    return out


def overlay(rgb: np.ndarray, lab: np.ndarray, ds: int = 4) -> np.ndarray:
    """The slide at 1/ds with tissue outlined green and dye blocks hatched orange."""
    h, w = lab.shape
    img = np.asarray(Image.fromarray(rgb).resize((w * BLOCK // ds, h * BLOCK // ds),
                                                 Image.BOX)).copy()
    up = np.repeat(np.repeat(lab, BLOCK // ds, 0), BLOCK // ds, 1)[:img.shape[0], :img.shape[1]]
    t = up == 1
    img[t & ~ndi.binary_erosion(t)] = (0, 200, 0)
    chk = (np.add.outer(np.arange(up.shape[0]), np.arange(up.shape[1])) % 3) == 0
    img[(up == 2) & chk] = (255, 160, 0)
    return img


def main():
    import openslide

    ap = argparse.ArgumentParser()
    ap.add_argument("--overlay", type=Path, default=None)
    a = ap.parse_args()
    with openslide.OpenSlide(str(SLIDE)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    lab = labels(rgb)
    Image.fromarray(lab).save(TRUTH, optimize=True)
    print(f"{TRUTH}: {lab.shape}, tissue {(lab == 1).sum()} blocks "
          f"({(lab == 1).sum() * (BLOCK * 0.499) ** 2 / 1e6:.3f} mm2), dye {(lab == 2).sum()}")
    if a.overlay:
        Image.fromarray(overlay(rgb, lab)).save(a.overlay)


if __name__ == "__main__":
    main()
