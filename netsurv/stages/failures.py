"""The one failures table of every stage: its columns, one writer and one reader.

Every stage that works item by item (tiling, embedding, pathomics, radiomics, the bag index of
a training run) writes ``failures.csv`` with the same columns, :data:`FAILURE_COLUMNS`:

``stage``
    the stage that failed the item: ``tiling``, ``embedding``, ``morphology``,
    ``radiomics`` or ``bags``
``patient_id``, ``item_id``
    the patient and the item (slide id, or the patient id for a CT case)
``path``
    the input file (the slide, the CT image, the feature file)
``error_type``, ``error``
    the exception's type (or a stage's own name for the problem) and its message
``status``
    ``failed``; or ``noted`` for an item that succeeded with notes worth reading (radiomics)
``reason``
    one line for people (printed in summaries and warnings); unless a stage gives its own,
    the error prefixed with its type
``slide_id``
    the slide (WSI stages; empty for CT cases)
``notes``
    notes of a ``noted`` item (radiomics: mask labelled 255, other labels, mask resampled,
    DICOM ROI used)
``mask``, ``mask_kind``, ``roi``, ``rasteriser``
    the mask of a CT case, and for a DICOM RTSTRUCT/SEG mask its kind, the ROI used and what
    rasterised it (radiomics; empty elsewhere)

Cells that do not apply are empty.  :func:`read_failures` reads any stage's table (and the
layouts of older netsurv versions) into these columns.
"""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["FAILURE_COLUMNS", "failure_row", "failures_frame", "write_failures",
           "read_failures"]

FAILURE_COLUMNS = ["stage", "patient_id", "item_id", "path", "error_type", "error", "status",
                   "reason", "slide_id", "notes", "mask", "mask_kind", "roi", "rasteriser"]


def _blank(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def failure_row(stage: str, item_id, *, patient_id="", path="", error_type: str = "",
                error: str = "", status: str = "failed", reason: str | None = None,
                slide_id="", **extra) -> dict:
    """One row of the failures table.

    Parameters
    ----------
    stage : str
        The stage that failed the item (``tiling``, ``embedding``, ``morphology``,
        ``radiomics``, ``bags``).
    item_id
        The item's id (slide id; patient id for a CT case).
    patient_id, path, slide_id
        The item's patient, input file and slide (empty where they do not apply).
    error_type, error : str
        Type and message of the error.
    status : str
        ``failed`` (default) or ``noted`` (the item succeeded with notes).
    reason : str or None
        One line for people; None: ``error`` prefixed with ``error_type`` (``error`` alone
        when it already starts with its type, or when there is no type).
    **extra
        Other columns of :data:`FAILURE_COLUMNS` (``notes``, ``mask``, ``mask_kind``, ``roi``,
        ``rasteriser``).

    Returns
    -------
    dict
        The row, with every column of :data:`FAILURE_COLUMNS`.

    Raises
    ------
    ValueError
        For a keyword that is not a column of the table.
    """
    unknown = sorted(set(extra) - set(FAILURE_COLUMNS))
    if unknown:
        raise ValueError(f"failure_row: {unknown} are not columns of the failures table "
                         f"{FAILURE_COLUMNS}")
    error_type, error = str(_blank(error_type)), str(_blank(error))
    if reason is None:
        if not error_type or error.startswith(f"{error_type}:"):
            reason = error
        else:
            reason = f"{error_type}: {error}"
    row = dict.fromkeys(FAILURE_COLUMNS, "")
    row.update({k: _blank(v) for k, v in extra.items()})
    row.update(stage=stage, patient_id=_blank(patient_id), item_id=_blank(item_id),
               path=_blank(path), error_type=error_type, error=error, status=status,
               reason=reason, slide_id=_blank(slide_id))
    return row


def failures_frame(rows=()):
    """The failures table of ``rows`` with exactly :data:`FAILURE_COLUMNS`.

    Parameters
    ----------
    rows : iterable of dict, or pandas.DataFrame
        Rows made by :func:`failure_row` (or a table already in this layout, e.g. another
        stage's failures to be listed again).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`FAILURE_COLUMNS` in that order, empty cells as ``""``; an empty table
        still has the columns.

    Raises
    ------
    ValueError
        When a row holds a column that is not in the schema.
    """
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        df = rows
    else:
        rows = list(rows)
        df = pd.DataFrame(rows, columns=list(dict.fromkeys(
            [*FAILURE_COLUMNS, *(k for r in rows for k in r)])))
    extra = [c for c in df.columns if c not in FAILURE_COLUMNS]
    if extra:
        raise ValueError(f"failures table: columns {extra} are not in the schema "
                         f"{FAILURE_COLUMNS}")
    df = df.reindex(columns=FAILURE_COLUMNS).astype(object)
    return df.where(df.notna(), "").reset_index(drop=True)


def write_failures(path, rows) -> Path:
    """Write a failures table atomically (readers see the old or the new file).

    Parameters
    ----------
    path : str or Path
        The ``failures.csv`` to write.
    rows : iterable of dict, or pandas.DataFrame
        As for :func:`failures_frame`.

    Returns
    -------
    Path
        ``path``.
    """
    from .cache import write_csv

    return write_csv(path, failures_frame(rows))


# columns of older layouts -> the schema's
_LEGACY = {"image": "path"}


def read_failures(path, status: str | None = None):
    """Read a ``failures.csv`` written by any stage.

    Parameters
    ----------
    path : str or Path
        The file, or the stage folder holding ``failures.csv``.
    status : str or None
        Keep only the rows with this ``status`` (``failed`` or ``noted``); None: all rows.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`FAILURE_COLUMNS`, every cell a string (empty cells ``""``); an empty
        table when the file does not exist (no run yet).  Tables of older netsurv versions
        (e.g. the bag index's ``slide_id, patient_id, path, reason``) are brought to these
        columns: ``item_id`` from ``slide_id``, ``error`` from ``reason``, ``status``
        ``failed``.
    """
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        p = p / "failures.csv"
    if not p.is_file():
        return failures_frame()
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return failures_frame()
    for old, new in _LEGACY.items():
        if old in df.columns and new not in df.columns:
            df = df.rename(columns={old: new})
    df = df.reindex(columns=FAILURE_COLUMNS, fill_value="").fillna("")
    if len(df):
        df["item_id"] = df["item_id"].where(df["item_id"] != "", df["slide_id"])
        df["error"] = df["error"].where(df["error"] != "", df["reason"])
        df["status"] = df["status"].where(df["status"] != "", "failed")
    if status is not None:
        df = df[df["status"] == status]
    return df.reset_index(drop=True)
