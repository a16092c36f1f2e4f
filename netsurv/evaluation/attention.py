"""``attention.h5``: the tile attention of MIL models, written by training
(:func:`netsurv.evaluation.runner.run_split` through :func:`replace_split`, and
:func:`netsurv.evaluation.predict.predict_cohort`) and read by the report
(:mod:`netsurv.report.heatmap`).

A deep run writes ``attention.h5`` into its run directory (:func:`write_attention`; read by
:func:`read_attention`)::

    /<split>/<patient_id>            group, one per patient and split
        coords     (N, 2) int64      level-0 pixel (x, y) of each tile's top-left corner
        slide      (N,)   int        index into the group attribute ``slide_ids``
        attention  (N,)   float      attention weight of each tile
        attrs: slide_ids (list of str), patch_size_level0 (list, one per slide: tile side in
               level-0 px), read_mpp (µm/px the tiles were read at), risk (float), role
               ("train" / "test")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PatientAttention", "read_attention", "write_attention", "replace_split",
           "attention_record"]


@dataclass
class PatientAttention:
    """The tile attention of one patient in one split, as stored in ``attention.h5``.

    ``coords``, ``slide`` and ``attention`` hold one entry per tile (level-0 pixel top-left
    corner, index into ``slide_ids``, attention weight); ``patch_size_level0`` gives the tile
    side in level-0 pixels per slide and ``read_mpp`` the resolution the tiles were read at.
    ``risk`` is the model's risk for the patient and ``role`` ``"train"`` or ``"test"``.
    """
    split: str
    patient_id: str
    coords: np.ndarray                      # (N, 2) int64, level-0 px, top-left
    slide: np.ndarray                       # (N,) index into slide_ids
    attention: np.ndarray                   # (N,) float
    slide_ids: list[str]
    patch_size_level0: list[int]
    read_mpp: float
    risk: float = float("nan")
    role: str = ""

    def tiles_of(self, i: int):
        """(coords, attention) of slide ``i``."""
        m = self.slide == i
        return self.coords[m], self.attention[m]


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_attention(path, split: str | None = None, patients=None) -> list[PatientAttention]:
    """All (or the chosen ``split`` / ``patients``) records of an ``attention.h5``."""
    import h5py

    wanted = None if patients is None else {str(p) for p in patients}
    out = []
    with h5py.File(path, "r") as f:
        for s in f:
            if split is not None and s != split:
                continue
            for pid, g in f[s].items():
                if wanted is not None and pid not in wanted:
                    continue
                a = g.attrs
                sids = [_str(v) for v in np.atleast_1d(a["slide_ids"])]
                ps = np.atleast_1d(a["patch_size_level0"]).astype(int).tolist()
                if len(ps) == 1 and len(sids) > 1:
                    ps = ps * len(sids)
                out.append(PatientAttention(
                    split=s, patient_id=pid,
                    coords=np.asarray(g["coords"][()], np.int64).reshape(-1, 2),
                    slide=np.asarray(g["slide"][()], int).ravel(),
                    attention=np.asarray(g["attention"][()], float).ravel(),
                    slide_ids=sids, patch_size_level0=ps, read_mpp=float(a["read_mpp"]),
                    risk=float(a.get("risk", np.nan)), role=_str(a.get("role", ""))))
    return out


def write_attention(path, records, mode: str = "a") -> None:
    """Write :class:`PatientAttention` records (the format above; replaces existing groups)."""
    import h5py

    with h5py.File(path, mode) as f:
        for r in records:
            name = f"{r.split}/{r.patient_id}"
            if name in f:
                del f[name]
            g = f.create_group(name)
            g.create_dataset("coords", data=np.asarray(r.coords, np.int64).reshape(-1, 2))
            g.create_dataset("slide", data=np.asarray(r.slide, np.int64))
            g.create_dataset("attention", data=np.asarray(r.attention, np.float32))
            g.attrs["slide_ids"] = [str(s) for s in r.slide_ids]
            g.attrs["patch_size_level0"] = [int(p) for p in r.patch_size_level0]
            g.attrs["read_mpp"] = float(r.read_mpp)
            g.attrs["risk"] = float(r.risk)
            g.attrs["role"] = str(r.role)


def replace_split(path, split: str, records: list) -> None:
    """The split's group of attention.h5, replaced as a whole (a refit split may have other
    test patients than a stale group left by an earlier config)."""
    import h5py

    path = Path(path)
    if path.exists():
        with h5py.File(path, "a") as f:
            if split in f:
                del f[split]
    if records:
        write_attention(path, records)


def attention_record(bag, split: str, patient_id: str, attention, risk: float = float("nan"),
                     role: str = ""):
    """The :class:`PatientAttention` of one patient for
    ``attention.h5``: the tiles of slides with coordinates (``bag``: a :class:`Bag` or
    :class:`StoredBag`; ``attention``: one weight per tile of the whole bag).  None when no
    tile has coordinates (features without coords: no heatmap)."""
    attention = np.asarray(attention, np.float32)
    if len(attention) != bag.n_tiles:
        raise ValueError(f"patient {patient_id}: {len(attention)} attention weights for a bag "
                         f"of {bag.n_tiles} tiles")
    has = bag.has_coords
    keep = (np.ones(bag.n_tiles, bool) if has is None or all(has)
            else np.asarray(has, bool)[bag.slide])
    if not keep.any():
        return None
    return PatientAttention(split, patient_id, bag.coords[keep], bag.slide[keep],
                            attention[keep], list(bag.slide_ids), list(bag.patch_size_level0),
                            float(bag.read_mpp), float(risk), str(role))
