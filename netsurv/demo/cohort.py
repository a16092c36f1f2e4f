"""Synthetic demo cohort with known ground-truth risk (a cohort folder like a user's).

Generative model, per patient:
- clinical: age, sex, smoking, WHO histology (typical/atypical carcinoid, LCNEC, SCLC) and stage;
  histology drives smoking, stage and the latent tumour traits, as in real lung NETs;
- latent tumour traits (z-scores): CT-visible ``ct_size``, ``ct_irregularity``,
  ``ct_heterogeneity`` and WSI-visible ``wsi_density``, ``wsi_nuclear_size``,
  ``wsi_pleomorphism``; they are rendered into the images by :mod:`.ct` and
  :mod:`.wsi`;
- true risk = linear predictor over clinical variables and traits (``truth.csv``), so every modality
  alone carries part of the signal and the oracle C-index is the ceiling any model can reach;
- OS and PFS from Weibull proportional-hazards models sharing that linear predictor; PFS ends at
  progression or death, so PFS <= OS by construction; administrative plus drop-out censoring.

Images are written in parallel processes, each from its own child seed, so the output is
identical whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

GENERATOR_VERSION = "3"  # bump when the generative model changes: invalidates cached cohorts

HISTOLOGY = {
    # name: (prevalence, log-hazard, trait shift for wsi_density/pleomorphism, ct_size shift)
    "typical_carcinoid": (0.40, -0.36, -0.4, -0.3),
    "atypical_carcinoid": (0.17, -0.06, -0.1, 0.0),
    "large_cell_neuroendocrine_carcinoma": (0.15, 0.21, 0.3, 0.3),
    "small_cell_carcinoma": (0.28, 0.33, 0.5, 0.4),
}
SMOKING = ("never", "former", "current", "passive")
STAGES = ("I", "II", "III", "IV")

# Linear predictor coefficients; scaled so that each block (clinical, CT, WSI) has a comparable
# share of the risk variance and the oracle C-index is ~0.78 on 83 patients.
BETA = {
    "age_per_10y": 0.12,
    "male": 0.09,
    "smoking": {"never": 0.0, "former": 0.06, "current": 0.15, "passive": 0.03},
    "stage": {"I": -0.20, "II": 0.0, "III": 0.18, "IV": 0.36},
    "ct_size": 0.30,
    "ct_irregularity": 0.27,
    "ct_heterogeneity": 0.22,
    "wsi_density": 0.34,
    "wsi_nuclear_size": 0.10,
    "wsi_pleomorphism": 0.28,
}
WEIBULL_SHAPE = 1.2
MEDIAN_OS_MONTHS = 60.0      # at linear predictor 0
PROGRESSION_HAZARD_RATIO = 1.0  # progression hazard relative to death hazard
IMAGING_LAG_MONTHS = 24.0       # PFS is censored at the last scan, up to this long before OS


def _choice(rng, options, p, n):
    return np.asarray(options, dtype=object)[rng.choice(len(options), size=n, p=p)]


def simulate_patients(n_patients: int = 83, seed: int = 0) -> pd.DataFrame:
    """Clinical variables, latent traits, true risk and OS/PFS for ``n_patients``."""
    rng = np.random.default_rng([seed, 1])
    names = list(HISTOLOGY)
    prev = np.array([HISTOLOGY[h][0] for h in names])
    hist = _choice(rng, names, prev / prev.sum(), n_patients)
    aggressive = np.isin(hist, names[2:])

    age = np.clip(rng.normal(62, 10, n_patients) + 4 * aggressive, 28, 88).round()
    sex = np.where(rng.random(n_patients) < 0.5 + 0.1 * aggressive, "M", "F")
    p_smoke_indolent = [0.45, 0.30, 0.15, 0.10]
    p_smoke_aggressive = [0.07, 0.38, 0.50, 0.05]
    smoking = np.array([
        _choice(rng, SMOKING, p_smoke_aggressive if a else p_smoke_indolent, 1)[0] for a in aggressive
    ], dtype=object)
    stage_score = rng.normal(0, 1, n_patients) + 1.2 * aggressive
    stage = np.asarray(STAGES, dtype=object)[np.digitize(stage_score, [-0.3, 0.5, 1.3])]

    shift_w = np.array([HISTOLOGY[h][2] for h in hist])
    shift_c = np.array([HISTOLOGY[h][3] for h in hist])
    traits = {
        "ct_size": 0.6 * shift_c + 0.3 * (stage_score - 0.5) + rng.normal(0, 0.9, n_patients),
        "ct_irregularity": 0.4 * shift_c + rng.normal(0, 1, n_patients),
        "ct_heterogeneity": 0.3 * shift_c + rng.normal(0, 1, n_patients),
        "wsi_density": shift_w + rng.normal(0, 0.7, n_patients),
        "wsi_nuclear_size": 0.5 * shift_w + rng.normal(0, 0.9, n_patients),
        "wsi_pleomorphism": 0.8 * shift_w + rng.normal(0, 0.8, n_patients),
    }

    eta = (
        np.array([HISTOLOGY[h][1] for h in hist])
        + BETA["age_per_10y"] * (age - 62) / 10
        + BETA["male"] * (sex == "M")
        + np.array([BETA["smoking"][s] for s in smoking])
        + np.array([BETA["stage"][s] for s in stage])
        + sum(BETA[k] * v for k, v in traits.items())
    )

    # Weibull PH: S(t) = exp(-lam * exp(eta) * t^k); invert with uniforms.
    k = WEIBULL_SHAPE
    lam = np.log(2) / MEDIAN_OS_MONTHS**k
    t_death = (-np.log(rng.random(n_patients)) / (lam * np.exp(eta))) ** (1 / k)
    t_prog = (-np.log(rng.random(n_patients)) / (PROGRESSION_HAZARD_RATIO * lam * np.exp(eta))) ** (1 / k)
    # accrual over 8 years, analysis at year 10 -> administrative censoring 24..120 months,
    # plus 10 % losses to follow-up at a uniform time
    censor = rng.uniform(24, 120, n_patients)
    lost = rng.random(n_patients) < 0.10
    censor = np.where(lost, rng.uniform(3, censor), censor)

    os_time = np.minimum(t_death, censor)
    os_event = (t_death <= censor).astype(int)
    # progression is only seen on imaging, whose last date precedes the vital-status check
    censor_pfs = np.maximum(censor - rng.uniform(0, IMAGING_LAG_MONTHS, n_patients), 0.5)
    t_pfs = np.minimum(t_prog, t_death)
    pfs_time = np.minimum(t_pfs, censor_pfs)
    pfs_event = (t_pfs <= censor_pfs).astype(int)

    # a few unknown smoking histories, as in real registries
    smoking = smoking.copy()
    smoking[rng.random(n_patients) < 0.04] = None

    ids = [f"NET{i + 1:03d}" for i in range(n_patients)]
    df = pd.DataFrame({
        "patient_id": ids,
        "age": age.astype(int),
        "sex": sex,
        "smoking": smoking,
        "histology": hist,
        "stage": stage,
        "os_time": np.round(os_time, 2),
        "os_event": os_event,
        "pfs_time": np.round(pfs_time, 2),
        "pfs_event": pfs_event,
        "true_risk": eta,
        **traits,
    })
    return df


CLINICAL_COLUMNS = ["patient_id", "age", "sex", "smoking", "histology", "stage",
                    "os_time", "os_event", "pfs_time", "pfs_event"]


def _params_key(params: dict) -> str:
    blob = json.dumps({**params, "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_slide_job(job: dict) -> dict:
    from .wsi import write_demo_slide

    rng = np.random.default_rng(job.pop("seed"))
    return write_demo_slide(rng=rng, **job)


def _write_ct_job(job: dict) -> dict:
    from .ct import write_demo_ct

    rng = np.random.default_rng(job.pop("seed"))
    return write_demo_ct(rng=rng, **job)


def _run_jobs(fn, jobs: list[dict], n_jobs: int) -> list[dict]:
    from netsurv.stages import process_pool

    if n_jobs <= 1 or len(jobs) <= 1:
        return [fn(dict(j)) for j in jobs]
    with process_pool(n_jobs) as pool:  # workers die with this process
        return list(pool.map(fn, [dict(j) for j in jobs], chunksize=1))


SIZES = {
    # slide physical size (µm) at 0.5 and 0.25 µm/px; "large" is for benchmarks (40960² px)
    "small": {0.5: 1536.0, 0.25: 1024.0},
    "large": {0.5: 20480.0, 0.25: 10240.0},
}


def plan_cohort(n_patients: int = 83, seed: int = 0, size: str = "small", *,
                missing_ct: float = 0.10, missing_wsi: float = 0.10, two_slides: float = 0.15,
                artefact_rate: float = 0.12, fine_mpp_rate: float = 0.15):
    """Decide everything about the cohort without writing images: patients, which modalities
    each has, slides (mpp, vendor, artefacts, traits) and CT scans (scanner, traits).

    Returns ``(patients, slide_jobs, ct_jobs)``; job paths are relative to the cohort folder.
    """
    from .ct import SCANNERS

    if size not in SIZES:
        raise ValueError(f"demo size={size!r} unknown; use one of {sorted(SIZES)}")
    for name, frac in [("missing_ct", missing_ct), ("missing_wsi", missing_wsi),
                       ("two_slides", two_slides), ("artefact_rate", artefact_rate),
                       ("fine_mpp_rate", fine_mpp_rate)]:
        if not 0 <= frac <= 1:
            raise ValueError(f"demo {name}={frac} must be a fraction in [0, 1]")
    df = simulate_patients(n_patients, seed)
    rng = np.random.default_rng([seed, 2])
    n = len(df)
    has_ct = rng.random(n) >= missing_ct
    has_wsi = rng.random(n) >= missing_wsi
    # never drop both imaging modalities of one patient: the demo should exercise fusion
    has_wsi[~has_ct & ~has_wsi] = True
    n_slides = np.where(has_wsi, 1 + (rng.random(n) < two_slides), 0)
    child = np.random.SeedSequence([seed, 3])

    slide_jobs = []
    for i, row in df.iterrows():
        for s in range(n_slides[i]):
            sid = f"{row.patient_id}-S{s + 1}"
            fine = rng.random() < fine_mpp_rate
            mpp = 0.25 if fine else 0.5
            u = rng.random()
            kinds = ("pen", "padding", "blur")
            artefacts = (kinds[int(u // artefact_rate)],) if u < 3 * artefact_rate else ()
            # a second block from the same tumour: same traits up to sampling variation
            jitter = rng.normal(0, 0.15, 3) if s else np.zeros(3)
            slide_jobs.append(dict(
                patient_id=row.patient_id, slide_id=sid, path=f"slides/{sid}.tiff",
                seed=child.spawn(1)[0],
                density_z=float(row.wsi_density + jitter[0]),
                size_z=float(row.wsi_nuclear_size + jitter[1]),
                pleomorphism_z=float(row.wsi_pleomorphism + jitter[2]),
                mpp=mpp, width_um=SIZES[size][mpp], height_um=SIZES[size][mpp],
                artefacts=artefacts, vendor="generic" if fine else "aperio",
                truth_path=f"truth/slides/{sid}.png",
            ))

    scanner_names = sorted(SCANNERS)
    ct_jobs = []
    for i, row in df.iterrows():
        if not has_ct[i]:
            continue
        ct_jobs.append(dict(
            patient_id=row.patient_id,
            image_path=f"ct/{row.patient_id}_ct.nii.gz",
            mask_path=f"ct/{row.patient_id}_mask.nii.gz",
            seed=child.spawn(1)[0],
            size_z=float(row.ct_size),
            irregularity_z=float(row.ct_irregularity),
            heterogeneity_z=float(row.ct_heterogeneity),
            scanner=scanner_names[rng.integers(len(scanner_names))],
        ))
    return df, slide_jobs, ct_jobs


def make_demo_cohort(
    root,
    *,
    n_patients: int = 83,
    seed: int = 0,
    size: str = "small",
    missing_ct: float = 0.10,
    missing_wsi: float = 0.10,
    two_slides: float = 0.15,
    artefact_rate: float = 0.12,
    fine_mpp_rate: float = 0.15,
    n_jobs: int | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Generate the demo cohort into ``root`` unless an identical one is already there.

    The cohort is built in a sibling temporary folder (a name unique to this process) and
    renamed into place, so an interrupted generation never leaves a half cohort that looks
    complete. A folder holding a cohort that is not a demo cohort (a ``clinical.csv`` without
    the ``.complete`` marker) is never touched.  Generation holds a lock beside ``root``:
    when several processes (the ranks of a job, or independent jobs) start on a fresh cache,
    one generates and the others wait for it and then reuse its cohort.
    """
    from netsurv.stages import clean_stale_temps, folder_lock

    root = Path(root).expanduser().resolve()
    params = dict(n_patients=n_patients, seed=seed, size=size, missing_ct=missing_ct,
                  missing_wsi=missing_wsi, two_slides=two_slides, artefact_rate=artefact_rate,
                  fine_mpp_rate=fine_mpp_rate)
    key = _params_key(params)
    if not force and _complete_key(root) == key:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(root.parent, f"{root.name}.demo",
                     message=f"netsurv demo: waiting for another process generating {root}"):
        if not force and _complete_key(root) == key:
            return root  # generated by the process we waited for
        if not (root / ".complete").is_file() and root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a netsurv demo cohort; choose "
                                  "another data.root for the demo")
        clean_stale_temps(root.parent, prefix=root.name)
        _generate(root, params, key, n_jobs, verbose)
    return root


def _complete_key(root: Path):
    try:
        return json.loads((root / ".complete").read_text()).get("key")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, AttributeError):
        return "unreadable"  # a damaged marker: the cohort is generated again


def _generate(root: Path, params: dict, key: str, n_jobs, verbose: bool) -> None:
    from netsurv.stages import temp_path

    df, slide_jobs, ct_jobs = plan_cohort(**params)
    t0 = time.perf_counter()
    n_jobs = n_jobs or min(2, os.cpu_count() or 1)
    tmp = temp_path(root)
    try:
        _write_cohort(tmp, root, df, slide_jobs, ct_jobs, params, key, n_jobs, verbose, t0)
        if root.exists():
            # swap: the old cohort is moved aside first, so `root` is never a half-deleted
            # folder (os.replace cannot replace a non-empty directory)
            old = temp_path(root, ".old")
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
        print(f"netsurv demo: done in {time.perf_counter() - t0:.1f} s, {mb:.0f} MB on disk",
              flush=True)


def _write_cohort(tmp: Path, root: Path, df, slide_jobs, ct_jobs, params, key, n_jobs,
                  verbose, t0) -> None:
    for sub in ("slides", "ct", "truth/slides"):
        (tmp / sub).mkdir(parents=True)
    if verbose:
        print(f"netsurv demo: generating {len(df)} patients, {len(slide_jobs)} slides, "
              f"{len(ct_jobs)} CT scans into {root} ({n_jobs} processes)", flush=True)
    slide_info = _run_jobs(_write_slide_job, [
        {k: v for k, v in j.items() if k not in ("patient_id", "slide_id")}
        | {"path": str(tmp / j["path"]), "truth_path": str(tmp / j["truth_path"])}
        for j in slide_jobs], n_jobs)
    ct_info = _run_jobs(_write_ct_job, [
        {k: v for k, v in j.items() if k != "patient_id"}
        | {"image_path": str(tmp / j["image_path"]), "mask_path": str(tmp / j["mask_path"])}
        for j in ct_jobs], n_jobs)

    df[CLINICAL_COLUMNS].to_csv(tmp / "clinical.csv", index=False)
    truth_cols = ["patient_id", "true_risk"] + [c for c in df.columns if c.startswith(("ct_", "wsi_"))]
    df[truth_cols].to_csv(tmp / "truth.csv", index=False)
    pd.DataFrame([{k: j[k] for k in ("patient_id", "slide_id", "path")} for j in slide_jobs]
                 ).to_csv(tmp / "slides.csv", index=False)
    pd.DataFrame([{
        "patient_id": j["patient_id"], "image": j["image_path"], "mask": j["mask_path"],
        "scanner": info["scanner"], "manufacturer": info["manufacturer"],
        "kernel": info["kernel"], "slice_thickness": info["slice_thickness"],
        "pixel_spacing": info["pixel_spacing"],
    } for j, info in zip(ct_jobs, ct_info)]).to_csv(tmp / "ct.csv", index=False)

    st = pd.DataFrame([{k: v for k, v in info.items() if k != "levels"} for info in slide_info])
    st.insert(0, "slide_id", [j["slide_id"] for j in slide_jobs])
    st.insert(0, "patient_id", [j["patient_id"] for j in slide_jobs])
    st["truth_mask"] = [j["truth_path"] for j in slide_jobs]
    st["artefacts"] = [";".join(a) for a in st["artefacts"]]
    st.to_csv(tmp / "truth" / "slides.csv", index=False)
    ctt = pd.DataFrame([{k: (v if np.isscalar(v) else json.dumps(list(v))) for k, v in info.items()}
                        for info in ct_info])
    ctt.insert(0, "patient_id", [j["patient_id"] for j in ct_jobs])
    ctt.to_csv(tmp / "truth" / "ct.csv", index=False)

    (tmp / ".complete").write_text(json.dumps(
        {"key": key, "params": params, "version": GENERATOR_VERSION,
         "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
