"""Tumour masks as DICOM RTSTRUCT (written by rt-utils, and with planning-system-like contours
around the voxels) and DICOM SEG (highdicom) on a DICOM CT series made from a demo case:
netsurv's features from each match the NIfTI mask's, the mask lands on the right voxels (an
asymmetric tumour, so a flip or a one-slice shift would show, on an axial and a prone (x and y
reversed) series whose files are named in reverse slice order), and the errors name the files,
UIDs and ROIs."""
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from netsurv.demo.ct import write_demo_ct
from netsurv.radiology import radiomics as R
from netsurv.radiology.dicom_masks import dicom_mask_kind
from netsurv.radiology.volumes import VolumeError, load_case

PARAMS = {"name": "firstorder-shape", "label": 1, "resample_mask": False,
          "settings": {"binWidth": 25}, "image_types": {"Original": {}},
          "features": ["firstorder", "shape"]}
VOL, MEAN = "original_shape_VoxelVolume", "original_firstorder_Mean"


def write_series(img: sitk.Image, folder, *, patient="P0"):
    """``img`` as a DICOM CT series written by SimpleITK, files named in reverse slice order;
    returns the SOP Instance UIDs by volume slice."""
    folder.mkdir(parents=True)
    uids = {"series": generate_uid(), "study": generate_uid(), "for": generate_uid()}
    d = img.GetDirection()
    iop = "\\".join(f"{v:g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    sp, n, sops = img.GetSpacing(), img.GetDepth(), []
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for z in range(n):
        sl = img[:, :, z]
        sops.append(generate_uid())
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": sops[-1], "0020|000e": uids["series"], "0020|000d": uids["study"],
                "0020|0052": uids["for"], "0010|0010": f"Demo^{patient}", "0010|0020": patient,
                "0010|0030": "19700101", "0010|0040": "O", "0008|0020": "20260101",
                "0008|0030": "120000", "0008|0050": "1", "0020|0010": "1", "0008|0090": "",
                "0020|0011": "1", "0020|0013": str(z + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in pos), "0020|0037": iop,
                "0018|0050": f"{sp[2]:g}", "0028|0030": f"{sp[1]:.6f}\\{sp[0]:.6f}",
                "0028|1052": "0", "0028|1053": "1"}
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        w.SetFileName(str(folder / f"{n - z:04d}.dcm"))
        w.Execute(sl)
    return sops


def _sources(folder, sops):
    by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted(folder.iterdir()))}
    return [by_uid[u] for u in sops]


def write_rtstruct(folder, sops, masks: dict, path):
    """RTSTRUCT drawn by rt-utils on the series ``folder`` with ROIs ``name -> (z, y, x) mask``."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_new(str(folder))
    order = [str(s.SOPInstanceUID) for s in rt.series_data]  # rt-utils' slice order
    at = {u: k for k, u in enumerate(sops)}
    for name, m in masks.items():
        # rt-utils wants (rows, columns, its slices) in its own slice order
        rt.add_roi(mask=np.stack([m[at[u]] for u in order], axis=-1).astype(bool), name=name)
    rt.ds.save_as(path)
    return path


def contours_around_voxels(rs, img: sitk.Image, sops, mask, path):
    """Copy of RTSTRUCT ``rs`` whose first ROI's contours run around the voxels of ``mask``, half
    a voxel outside the boundary voxels' centres (marching squares), as a planning system's."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from skimage.measure import find_contours

    ds = pydicom.dcmread(rs)
    items = []
    for z in range(mask.shape[0]):
        for c in find_contours(np.pad(mask[z], 1).astype(float), 0.5):
            pts = [img.TransformContinuousIndexToPhysicalPoint((float(x - 1), float(y - 1),
                                                                float(z))) for y, x in c[:-1]]
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ref.ReferencedSOPInstanceUID = sops[z]
            it = Dataset()
            it.ContourImageSequence = Sequence([ref])
            it.ContourGeometricType = "CLOSED_PLANAR"
            it.NumberOfContourPoints = len(pts)
            it.ContourData = [f"{v:.4f}" for p in pts for v in p]
            items.append(it)
    ds.ROIContourSequence[0].ContourSequence = Sequence(items)
    ds.save_as(path)
    return path


def write_seg(folder, sops, masks: dict, path, fractional=False):
    """SEG written by highdicom from the series ``folder``, one segment per ``label -> mask``."""
    import highdicom as hd

    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT",
                                                       "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, label in enumerate(masks)]
    arr = np.stack([m.astype(np.float32 if fractional else np.uint8) for m in masks.values()],
                   axis=-1)
    seg = hd.seg.Segmentation(
        source_images=_sources(folder, sops), pixel_array=arr,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else
        hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="netsurv tests", manufacturer_model_name="tests",
        software_versions="0", device_serial_number="0")
    seg.save_as(path)
    return path


def _asymmetric(mask: np.ndarray) -> np.ndarray:
    """The demo tumour with the octant (high x, high y, high z) of its bounding box cut away."""
    z, y, x = np.nonzero(mask)
    out = mask.copy()
    out[int(np.median(z)):, int(np.median(y)):, int(np.median(x)):] = 0
    return out


@pytest.fixture(scope="module", params=["axial", "prone"])
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dicom-{request.param}")
    write_demo_ct(d / "ct.nii.gz", d / "demo_mask.nii.gz", rng=np.random.default_rng(3),
                  size_z=0.0, irregularity_z=1.0, heterogeneity_z=1.0, scanner="philips_b",
                  fov_mm=(64.0, 64.0, 48.0))
    img = sitk.ReadImage(str(d / "ct.nii.gz"))
    if request.param == "prone":  # x and y reversed: the image rows/columns run the other way
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        sitk.WriteImage(img, str(d / "ct.nii.gz"))
    truth = _asymmetric(sitk.GetArrayFromImage(sitk.ReadImage(str(d / "demo_mask.nii.gz"))))
    m = sitk.GetImageFromArray(truth)
    m.CopyInformation(img)
    sitk.WriteImage(m, str(d / "mask.nii.gz"))
    sops = write_series(img, d / "series")
    write_rtstruct(d / "series", sops, {"GTV": truth}, d / "rs.dcm")
    contours_around_voxels(d / "rs.dcm", img, sops, truth, d / "rs_around.dcm")
    write_seg(d / "series", sops, {"GTV": truth}, d / "seg.dcm")
    return {"dir": d, "series": d / "series", "sops": sops, "truth": truth,
            "nifti": d / "mask.nii.gz", "rs": d / "rs.dcm", "rs_around": d / "rs_around.dcm",
            "seg": d / "seg.dcm"}


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_rtstruct_and_seg_give_the_nifti_masks_features(case):
    ref, _ = R.extract_case(case["dir"] / "ct.nii.gz", case["nifti"], PARAMS)
    truth = case["truth"].astype(bool)
    # the tumour is asymmetric: a flip or a one-slice shift would change the mask a lot
    for moved in (truth[:, :, ::-1], truth[:, ::-1], truth[::-1], np.roll(truth, 1, axis=0)):
        assert _dice(truth, moved) < 0.9
    for key in ("rs", "rs_around", "seg"):
        c = load_case(case["series"], case[key])
        got = sitk.GetArrayFromImage(c.mask).astype(bool)
        assert c.provenance["mask_kind"] == ("SEG" if key == "seg" else "RTSTRUCT")
        assert c.provenance["roi"] == "GTV" and c.provenance["roi_number"] == 1
        if key == "seg":
            np.testing.assert_array_equal(got, truth)
        else:
            assert _dice(got, truth) > 0.97
        feats, notes = R.extract_case(case["series"], case[key], PARAMS)
        assert notes == []
        dv = (feats[VOL] - ref[VOL]) / ref[VOL]
        dhu = feats[MEAN] - ref[MEAN]
        print(f"{case['dir'].name} {key}: volume {feats[VOL]:.2f} vs {ref[VOL]:.2f} mm3 "
              f"({100 * dv:+.2f} %), mean HU {feats[MEAN]:.2f} vs {ref[MEAN]:.2f} ({dhu:+.3f})")
        if key == "seg":  # the same voxels; spacing went through DICOM's decimal text
            assert feats[VOL] == pytest.approx(ref[VOL], rel=1e-6)
        assert abs(dv) <= 0.03 and abs(dhu) <= 2.0


def test_seg_frames_without_source_images_are_placed_by_position(case, tmp_path):
    ds = pydicom.dcmread(case["seg"])
    for f in ds.PerFrameFunctionalGroupsSequence:
        del f.DerivationImageSequence
    ds.save_as(tmp_path / "noref.dcm")
    c = load_case(case["series"], tmp_path / "noref.dcm")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(c.mask), case["truth"])
    assert c.notes == ["SEG frames of segment 1 'GTV' name no image of the series: placed by "
                       "their position"]


def test_rtstruct_mask_equals_rt_utils_own_reading(case):
    # an independent reader on the contours rt-utils wrote (its fill is exact on its own
    # contours, which run through the boundary voxels' centres)
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(str(case["series"]), str(case["rs"]))
    theirs = rt.get_roi_mask_by_name("GTV")  # (rows, columns, slices in rt-utils' order)
    at = {str(s.SOPInstanceUID): i for i, s in enumerate(rt.series_data)}
    theirs = np.stack([theirs[:, :, at[u]] for u in case["sops"]])
    ours = sitk.GetArrayFromImage(load_case(case["series"], case["rs"]).mask)
    np.testing.assert_array_equal(ours, theirs)


def test_fill_contour_convention_and_holes():
    from netsurv.radiology.dicom_masks import fill_contour

    # a square through the centres of voxels 2..5 and one around them: the same 16 voxels,
    # in either orientation
    through = np.array([[2, 2], [5, 2], [5, 5], [2, 5]], float)
    around = through + np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    want = np.zeros((8, 9), bool)
    want[2:6, 2:6] = True
    for poly in (through, around, through[::-1], around[::-1]):
        np.testing.assert_array_equal(fill_contour(poly, (8, 9)), want)
    # a triangle: centres strictly inside plus those on its edges
    tri = fill_contour(np.array([[0, 0], [6, 0], [0, 6]], float), (8, 9))
    r, c = np.mgrid[:8, :9]
    np.testing.assert_array_equal(tri, (r + c <= 6))
    assert not fill_contour(np.array([[20, 20], [25, 20], [25, 25]], float), (8, 9)).any()


def test_kind_is_told_by_sop_class_not_name(case, tmp_path):
    renamed = tmp_path / "contours.nii.gz"  # an RTSTRUCT whatever its name says
    renamed.write_bytes(case["rs"].read_bytes())
    assert dicom_mask_kind(renamed) == "RTSTRUCT" and dicom_mask_kind(case["seg"]) == "SEG"
    assert dicom_mask_kind(case["nifti"]) is None
    ct_slice = next(case["series"].iterdir())
    with pytest.raises(VolumeError, match=r"mask is a DICOM 'CT Image Storage' file .* RTSTRUCT "
                                          r"or SEG file"):
        load_case(case["series"], ct_slice)
    with pytest.raises(VolumeError, match=r"a DICOM RTSTRUCT mask is drawn on a DICOM series, but "
                                          r"the image .*ct\.nii\.gz is a file"):
        load_case(case["dir"] / "ct.nii.gz", case["rs"])


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Axial demo case whose RTSTRUCT/SEG hold several ROIs (two named GTV in the RTSTRUCT), one
    of them outside the image, and a second series of the same pixels."""
    d = tmp_path_factory.mktemp("dicom-multi")
    write_demo_ct(d / "ct.nii.gz", d / "m.nii.gz", rng=np.random.default_rng(1), size_z=0.0,
                  irregularity_z=0.0, heterogeneity_z=0.0, scanner="philips_b",
                  fov_mm=(64.0, 64.0, 24.0))
    img = sitk.ReadImage(str(d / "ct.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "m.nii.gz")))
    half = truth.copy()
    half[:, :, : truth.shape[2] // 2] = 0
    sops = write_series(img, d / "series")
    other = write_series(img, d / "other")
    rs = write_rtstruct(d / "series", sops, {"GTV": truth, "Lung": half, "gtv": half,
                                             "Far": truth}, d / "rs.dcm")
    ds = pydicom.dcmread(rs)
    for c in ds.ROIContourSequence[3].ContourSequence:  # "Far": moved 1 m off the image
        c.ContourData = [v + 1000.0 if i % 3 == 0 else v for i, v in enumerate(c.ContourData)]
    ds.save_as(rs)
    seg = write_seg(d / "series", sops, {"GTV": truth, "Node": half}, d / "seg.dcm")
    return {"dir": d, "series": d / "series", "other": d / "other", "truth": truth,
            "half": half, "rs": rs, "seg": seg, "other_sops": other}


def _mask(c):
    return sitk.GetArrayFromImage(c.mask)


def test_roi_choice(multi):
    s, rs, seg = multi["series"], multi["rs"], multi["seg"]
    with pytest.raises(VolumeError, match=r"rs\.dcm: the RTSTRUCT holds 4 ROIs \(1 'GTV', 2 "
                                          r"'Lung', 3 'gtv', 4 'Far'\); set the 'roi' column"):
        load_case(s, rs)
    with pytest.raises(VolumeError, match=r"no ROI 'Liver' in the RTSTRUCT; it holds 1 'GTV', 2 "
                                          r"'Lung', 3 'gtv', 4 'Far'"):
        load_case(s, rs, roi="Liver")
    with pytest.raises(VolumeError, match=r"2 ROIs of the RTSTRUCT match roi 'Gtv' \(1 'GTV', 3 "
                                          r"'gtv'\); set 'roi' to the number"):
        load_case(s, rs, roi="Gtv")  # no exact match: the case-insensitive one is ambiguous
    np.testing.assert_array_equal(_mask(load_case(s, rs, roi="GTV")), multi["truth"])
    np.testing.assert_array_equal(_mask(load_case(s, rs, roi="3")), multi["half"])
    assert load_case(s, rs, roi="lung").provenance["roi"] == "Lung"
    with pytest.raises(VolumeError, match=r"rs\.dcm: mask is empty \(RTSTRUCT ROI 4 'Far' "
                                          r"rasterises to no voxel of the image\)"):
        load_case(s, rs, roi="Far")
    with pytest.raises(VolumeError, match=r"seg\.dcm: the SEG holds 2 segments \(1 'GTV', 2 "
                                          r"'Node'\)"):
        load_case(s, seg)
    with pytest.raises(VolumeError, match=r"no segment 'Lung' in the SEG; it holds 1 'GTV', "
                                          r"2 'Node'"):
        load_case(s, seg, roi="Lung")
    np.testing.assert_array_equal(_mask(load_case(s, seg, roi="node")), multi["half"])
    c = load_case(s, seg, roi=2)
    np.testing.assert_array_equal(_mask(c), multi["half"])
    assert c.provenance["rasteriser"].startswith("highdicom ")


def test_fractional_seg_is_thresholded_at_half(multi, tmp_path):
    # probabilities: 0.8 on the half tumour, 0.3 on the rest of it
    p = np.where(multi["half"] > 0, 0.8, np.where(multi["truth"] > 0, 0.3, 0.0))
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(multi["series"]))]
    f = write_seg(multi["series"], sops, {"GTV": p}, tmp_path / "frac.dcm", fractional=True)
    c = load_case(multi["series"], f)
    np.testing.assert_array_equal(_mask(c), multi["half"])
    assert c.notes == ["fractional SEG: segment 1 'GTV' thresholded at 0.5"]


def test_mask_of_another_series_fails_naming_both_files_and_uids(multi):
    for key, kind in (("rs", "RTSTRUCT"), ("seg", "SEG")):
        with pytest.raises(VolumeError) as ei:
            load_case(multi["other"], multi[key], roi="GTV")
        msg = str(ei.value)
        assert msg.startswith(f"{multi[key]}: this {kind} was not drawn on the image series "
                              f"{multi['other']} (they differ in frame of reference and series)")
        ref = pydicom.dcmread(next(multi["series"].iterdir()), stop_before_pixels=True)
        img = pydicom.dcmread(next(multi["other"].iterdir()), stop_before_pixels=True)
        for uid in (ref.SeriesInstanceUID, ref.FrameOfReferenceUID, img.SeriesInstanceUID,
                    img.FrameOfReferenceUID):
            assert str(uid) in msg


def test_contours_are_placed_by_position_whatever_they_reference(multi, tmp_path):
    ds = pydicom.dcmread(multi["rs"])
    seq = ds.ROIContourSequence[0].ContourSequence
    for c in seq:  # an optional attribute: placed by where the contour lies
        del c.ContourImageSequence
    ds.save_as(tmp_path / "noref.dcm")
    c = load_case(multi["series"], tmp_path / "noref.dcm", roi="GTV")
    np.testing.assert_array_equal(_mask(c), multi["truth"])
    assert c.notes == []
    ds = pydicom.dcmread(multi["rs"])
    seq = ds.ROIContourSequence[0].ContourSequence
    seq[0].ContourImageSequence[0].ReferencedSOPInstanceUID = \
        seq[-1].ContourImageSequence[0].ReferencedSOPInstanceUID
    ds.save_as(tmp_path / "misref.dcm")
    c = load_case(multi["series"], tmp_path / "misref.dcm", roi="GTV")
    np.testing.assert_array_equal(_mask(c), multi["truth"])
    assert c.notes == ["1 contour(s) of ROI 1 'GTV' reference another slice than the one they "
                       "lie on: placed where they lie"]
    seq[0].ContourData = [v + 0.5 * 3.0 if i % 3 == 2 else v  # half a slice off its plane
                          for i, v in enumerate(seq[0].ContourData)]
    ds.save_as(tmp_path / "between.dcm")
    with pytest.raises(VolumeError, match=r"between\.dcm: a contour of ROI 1 'GTV' does not lie "
                                          r"on a slice of the series"):
        load_case(multi["series"], tmp_path / "between.dcm", roi="GTV")


def test_stage_records_provenance_and_failures(multi, tmp_path):
    ct = pd.DataFrame([
        {"patient_id": "RS", "image": str(multi["series"]), "mask": str(multi["rs"]),
         "roi": "GTV"},
        {"patient_id": "SEG", "image": str(multi["series"]), "mask": str(multi["seg"]),
         "roi": "GTV"},
        {"patient_id": "AMBIG", "image": str(multi["series"]), "mask": str(multi["rs"]),
         "roi": None},
        {"patient_id": "NODE", "image": str(multi["series"]), "mask": str(multi["seg"]),
         "roi": 2.0},
    ])
    out = tmp_path / "out"
    table, fails = R.extract_cohort(ct, PARAMS, out, progress=False)
    assert sorted(table.patient_id) == ["NODE", "RS", "SEG"] and "roi" not in table.columns
    assert fails.patient_id.tolist() == ["AMBIG"] and "holds 4 ROIs" in fails.reason[0]
    report = pd.read_csv(out / "failures.csv", keep_default_na=False).set_index("patient_id")
    assert report.loc["RS", "status"] == "noted" and report.loc["RS", "mask_kind"] == "RTSTRUCT"
    assert report.loc["RS", "rasteriser"].startswith("netsurv fill_contour 1 (matplotlib ")
    assert report.loc["RS", "notes"] == (f"RTSTRUCT ROI 1 'GTV' of {multi['rs']} rasterised by "
                                         f"{report.loc['RS', 'rasteriser']}")
    assert report.loc["NODE", "roi"] == "Node" and report.loc["NODE", "mask_kind"] == "SEG"
    doc = json.loads(next((out / "cases").glob("NODE-*.json")).read_text())["data"]
    assert doc["provenance"]["roi_number"] == 2 and doc["provenance"]["mask"] == str(multi["seg"])


def test_ct_csv_roi_column_stays_text(tmp_path):
    from netsurv.cohort.schema import load_ct

    (tmp_path / "ct.csv").write_text("patient_id,image,mask,roi,scanner\nP1,s1,rs1.dcm,007,A\n"
                                     "P2,s2,seg2.dcm,,A\nP3,s3,m3.nii.gz,GTV ,B\n")
    ct = load_ct(tmp_path / "ct.csv", tmp_path, {"P1", "P2", "P3"}, check_files=False)
    assert ct["roi"].tolist()[0] == "007" and ct["roi"].tolist()[2] == "GTV"
    assert [R._roi_of(r, None) for r in ct.to_dict("records")] == ["007", None, "GTV"]
    assert R._roi_of({"roi": None}, "GTV") == "GTV" and R._roi_of({"roi": 2.0}, None) == "2"
