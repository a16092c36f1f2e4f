"""Load and validate a cohort folder (the contract is in the README, 'Your own cohort').

Every error names the file, the line (1-based, the header is line 1), the patient or slide and
the column, and says how to fix it: cohort tables are hand-edited and exported from
spreadsheets, and a bare ``KeyError`` three stages later is the usual failure mode of peer tools.

Tables are read the way spreadsheets write them: UTF-8 with or without byte-order mark, UTF-16
with one, or else a legacy 8-bit encoding (read as Windows-1252 / Latin-1, with a warning); comma-,
semicolon- or tab-separated (the delimiter is the one the header line uses), and in semicolon- or
tab-separated files numbers may have a decimal comma.  Leading and trailing whitespace of every
value is removed (with a warning naming what changed), so "M " and "M" are one level.  A line with
more values than the header (an unquoted decimal comma, or a value holding the delimiter) is an
error naming the line, never a silent column shift.

A slide or CT file that does not exist, or a slide without a path, does not stop the cohort: it is
named in a warning, slides keep the reason in a ``problem`` column, and the stages that need the
file record that item as failed while the others go on.  :func:`require_items` fails only when no
usable item of a modality a run needs is left.
"""
from __future__ import annotations

import codecs
import csv
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ENDPOINTS = ("os", "pfs")
CLINICAL_REQUIRED = ("patient_id", "os_time", "os_event", "pfs_time", "pfs_event")
SLIDES_REQUIRED = ("patient_id", "slide_id")  # + "path" for every stage that reads the slide
CT_REQUIRED = ("patient_id", "image", "mask")
# text by contract: never converted to numbers ("007" stays "007")
TEXT_COLUMNS = ("patient_id", "slide_id", "path", "image", "mask", "roi")  # roi: "007" or "GTV"
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "vertical bar"}
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+(?:[eE][+-]?\d+)?$")


class CohortError(ValueError):
    """A cohort table violates the data contract; the message says where and how to fix it."""


class CohortWarning(UserWarning):
    """Suspicious but usable cohort data (e.g. PFS longer than OS, whitespace around values)."""


@dataclass
class Cohort:
    """A validated cohort, as :func:`load_cohort` returns it.

    Attributes
    ----------
    root : pathlib.Path
        The cohort folder.
    clinical : pandas.DataFrame
        clinical.csv, indexed by ``patient_id`` (str).
    slides : pandas.DataFrame or None
        slides.csv (``patient_id``, ``slide_id``, ``path``, optional ``mpp``, ``problem``).
    ct : pandas.DataFrame or None
        ct.csv (``patient_id``, ``image``, ``mask`` with absolute paths, acquisition columns).
    features : dict of str to pandas.DataFrame
        Feature tables by name, each indexed by ``patient_id``.
    truth : pandas.DataFrame or None
        truth.csv (demo cohorts only): ``true_risk`` indexed by ``patient_id``.
    """

    root: Path
    clinical: pd.DataFrame                     # indexed by patient_id (str)
    slides: pd.DataFrame | None = None         # patient_id, slide_id, path (absolute)?, mpp?, problem
    ct: pd.DataFrame | None = None             # patient_id, image, mask (absolute), acquisition cols
    features: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> table by patient_id
    truth: pd.DataFrame | None = None          # demo only: patient_id -> true_risk

    @property
    def patients(self) -> list[str]:
        """Patient ids in clinical.csv order (the order of every per-patient array)."""
        return list(self.clinical.index)

    def endpoint(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(time, event) arrays in ``self.patients`` order for ``target`` in {'os', 'pfs'}."""
        if target not in ENDPOINTS:
            raise CohortError(f"target={target!r} is not an endpoint; use one of {ENDPOINTS}")
        t = self.clinical[f"{target}_time"].to_numpy(float)
        e = self.clinical[f"{target}_event"].to_numpy(int)
        return t, e


# ----------------------------------------------------------------------------------- reading
def line_of(df: pd.DataFrame, key) -> int | None:
    """Line in the source file of row ``key`` (index label) of a table read by this module."""
    return df.attrs.get("lines", {}).get(key)


def source_of(df: pd.DataFrame) -> str | None:
    """Path of the file a table was read from (kept in ``DataFrame.attrs``)."""
    return df.attrs.get("source")


def _decode(path: Path, raw: bytes) -> str:
    if raw[:4] == b"PK\x03\x04":
        raise CohortError(f"{path}: this is an Excel workbook (or another zip file), not a CSV "
                          "text file; in Excel use File > Save As > 'CSV UTF-8 (comma delimited)'")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")  # Excel's "Unicode text"
    if b"\x00" in raw[:4096]:
        raise CohortError(f"{path}: unknown text encoding (the file holds NUL bytes: UTF-16 "
                          "without byte-order mark, or not a text file); save it as 'CSV UTF-8'")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        try:
            text, enc = raw.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "Latin-1"
        bad = text[exc.start:exc.start + 1] if len(text) > exc.start else "?"
        warnings.warn(
            f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); read with the "
            f"{enc} (Latin-1) encoding, in which that byte is {bad!r}. If names look wrong, save "
            "the file with the 'CSV UTF-8' encoding.", CohortWarning, stacklevel=4)
        return text


def _delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _records(path: Path, text: str, sep: str) -> list[int]:
    """Start line of every record after the header (blank records included, as pandas reads
    them with ``skip_blank_lines=False``); fails on a record with more values than the header."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    header, starts, start = None, [], 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if header is None:
            header = row
            continue
        starts.append(line)
        extra = row[len(header):]
        if extra and any(v.strip() for v in extra):
            raw = text.split("\n")[line - 1]
            where = (f"{path}, line {line}: {len(row)} values but the header (line 1) has "
                     f"{len(header)} columns, so a value holds the delimiter {sep!r} "
                     f"({DELIMITERS[sep]})")
            fix_text = f"quote text that holds it (\"a{sep} b\")"
            # an integer followed by a digits-only value: "12,5" split in two?
            split_number = sep == "," and any(
                re.fullmatch(r"\s*[+-]?\d+", a) and re.fullmatch(r"\d+\s*", b)
                for a, b in zip(row, row[1:]))
            if split_number:
                raise CohortError(
                    f"{where}: probably a number with a decimal comma (e.g. 12,5). Write it with a "
                    "decimal point (12.5) or save the file with ';' as the delimiter (if it is "
                    f"text, quote it: \"a{sep} b\"). Line {line}: {raw[:120]!r}")
            raise CohortError(f"{where}: {fix_text} or remove the delimiter from it. Line {line}: "
                              f"{raw[:120]!r}")
    return starts


def _numbers(s: pd.Series, decimal_comma: bool) -> pd.Series | None:
    """``s`` as numbers when every non-empty value is one, else None."""
    vals = s.dropna().astype(str)
    if decimal_comma:
        vals = vals.map(lambda v: v.replace(",", ".") if _DECIMAL_COMMA.match(v) else v)
    num = pd.to_numeric(vals, errors="coerce")
    if num.notna().all() and len(vals):
        return num.reindex(s.index)
    return None


def read_table(path) -> pd.DataFrame:
    """Read one cohort CSV (see the module docstring for what is accepted).

    The frame keeps its source in ``attrs``: ``source`` (path) and ``lines`` (index -> line),
    read back with :func:`source_of` / :func:`line_of`; blank lines and rows without any value
    are dropped."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    text = _decode(path, path.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")
    lead = len(text) - len(text.lstrip("\n"))  # blank lines above the header
    text = text.lstrip("\n")
    header = text.split("\n", 1)[0]
    sep = _delimiter(header)
    if sep != ",":
        log.info("%s: read as a %s-separated file%s", path, DELIMITERS[sep],
                 " (numbers may use a decimal comma)" if sep in ";\t" else "")
    starts = _records(path, text, sep)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=True,
                         skip_blank_lines=False, index_col=False)
    except Exception as exc:  # pandas raises a zoo of parser errors
        raise CohortError(f"{path}: cannot be read as a {DELIMITERS[sep]}-separated table "
                          f"({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    if len(starts) != len(df):  # the two readers disagree (odd quoting): approximate lines
        starts = list(range(2, len(df) + 2))
    lines = {i: s + lead for i, s in zip(df.index, starts)}

    changed = {}
    for c in df.columns:
        col = df[c]
        stripped = col.str.strip()
        stripped = stripped.where(stripped != "", None)
        diff = col.notna() & (stripped != col)
        if diff.any() and c not in TEXT_COLUMNS and stripped[diff].notna().any():
            i = df.index[diff & stripped.notna()][0]
            changed[c] = (col[i], lines[i])
        df[c] = stripped
    df = df.loc[df.notna().any(axis=1)].copy()  # blank lines, rows of empty cells (Excel)
    dec = sep in ";\t"
    for c in df.columns:
        if c in TEXT_COLUMNS:
            continue
        num = _numbers(df[c], dec)
        if num is not None:
            df[c] = num
    if changed:
        ex = "; ".join(f"{c!r}: {v!r} on line {n}" for c, (v, n) in list(changed.items())[:5])
        warnings.warn(
            f"{path}: removed leading/trailing whitespace from values of column(s) "
            f"{list(changed)} (first {ex}), so that e.g. 'M ' and 'M' are the same level",
            CohortWarning, stacklevel=3)
    df.attrs["source"] = str(path)
    df.attrs["lines"] = {i: lines[i] for i in df.index}
    return df


# ------------------------------------------------------------------------------- validation
def _line(df: pd.DataFrame, i) -> int:
    n = line_of(df, i)
    return int(i) + 2 if n is None else n


def _lines(df: pd.DataFrame, idx, k: int = 10) -> list[int]:
    return [_line(df, i) for i in list(idx)[:k]]


def _require_columns(df: pd.DataFrame, required, path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = ""
        if len(df.columns) == 1 and any(d in df.columns[0] for d in ";\t,|"):
            hint = " The header line looks like one column: check the delimiter."
        raise CohortError(
            f"{path}, line 1 (header): missing required column(s) {missing}; found columns "
            f"{list(df.columns)}. Add the column(s) (required: {list(required)}; see the README, "
            f"'Your own cohort').{hint}"
        )


def _check_ids(df: pd.DataFrame, path: Path, col: str = "patient_id") -> None:
    blank = df[col].isna()
    if blank.any():
        raise CohortError(f"{path}: empty '{col}' on line(s) {_lines(df, df.index[blank])}; "
                          "every row needs an id.")
    # ids name the per-patient / per-slide files of the stages (features, bags, tiles): a path
    # separator or '.'/'..' would write outside the stage's folder
    ids = df[col].astype(str).str.strip()
    bad = ids.str.contains(r"[/\\\x00-\x1f]", regex=True) | ids.isin([".", ".."])
    if bad.any():
        raise CohortError(f"{path}: '{col}' {sorted(set(ids[bad]))[:5]} on line(s) "
                          f"{_lines(df, df.index[bad])} cannot be used: ids name files, so they "
                          "may not contain '/', '\\' or control characters, nor be '.' or '..'.")


def _check_unique(df: pd.DataFrame, path: Path, col: str, hint: str) -> None:
    dup = df[col].duplicated(keep=False)
    if dup.any():
        ids = sorted(set(df.loc[dup, col]))
        raise CohortError(f"{path}: duplicate {col} {ids[:10]} (lines "
                          f"{_lines(df, df.index[dup])}); {hint}")


def _not_a_number(value) -> str:
    hint = ""
    if isinstance(value, str) and _DECIMAL_COMMA.match(value.strip()):
        hint = (" It has a decimal comma: write a decimal point (e.g. "
                f"{value.strip().replace(',', '.')}), or save the file ';'-separated.")
    return hint


def _validate_endpoints(df: pd.DataFrame, path: Path, endpoints=ENDPOINTS) -> None:
    for ep in endpoints:
        tcol, ecol = f"{ep}_time", f"{ep}_event"
        t = pd.to_numeric(df[tcol], errors="coerce")
        bad = t.isna() & df[tcol].notna()
        if bad.any():
            i = df.index[bad][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column '{tcol}' is not numeric for patient "
                f"{df.at[i, 'patient_id']!r} (value {df.at[i, tcol]!r}); times must be numbers "
                f"in months.{_not_a_number(df.at[i, tcol])}"
            )
        if t.isna().any():
            i = df.index[t.isna()][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column '{tcol}' is empty for patient "
                f"{df.at[i, 'patient_id']!r}; give the follow-up time in months (censored "
                "patients too)."
            )
        inf = np.isinf(t)
        if inf.any():
            i = df.index[inf][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column '{tcol}' is {t[i]:g} (not finite) "
                f"for patient {df.at[i, 'patient_id']!r}; give the follow-up time in months, "
                "the time of the event or of the last contact."
            )
        neg = t < 0
        if neg.any():
            i = df.index[neg][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column '{tcol}' is negative ({t[i]}) for patient "
                f"{df.at[i, 'patient_id']!r}; times are months since baseline."
            )
        e = pd.to_numeric(df[ecol], errors="coerce")
        bad = ~e.isin([0, 1])
        if bad.any():
            found = sorted({str(v) for v in df.loc[bad, ecol].tolist()})
            pats = df.loc[bad, "patient_id"].tolist()[:5]
            what = "death" if ep == "os" else "progression or death"
            raise CohortError(
                f"{path}: column '{ecol}' must be 0 or 1 (1 = {what} observed, 0 = censored); "
                f"found {found} for patient(s) {pats} (first on line "
                f"{_line(df, df.index[bad][0])})."
            )
        df[tcol] = t.astype(float)
        df[ecol] = e.astype(int)


def _index_by_patient(df: pd.DataFrame) -> pd.DataFrame:
    lines = {df.at[i, "patient_id"]: _line(df, i) for i in df.index}
    out = df.set_index("patient_id", drop=True)
    out.attrs["lines"] = lines
    return out


def load_clinical(path: Path, *, outcomes: bool = True) -> pd.DataFrame:
    """``outcomes=False`` (scoring new patients): only ``patient_id`` is required; the endpoints
    whose two columns are present are validated as usual."""
    df = read_table(path)
    _require_columns(df, CLINICAL_REQUIRED if outcomes else CLINICAL_REQUIRED[:1], path)
    _check_ids(df, path)
    _check_unique(df, path, "patient_id", "one row per patient — put per-slide or per-scan "
                  "data in slides.csv / ct.csv.")
    present = [ep for ep in ENDPOINTS if {f"{ep}_time", f"{ep}_event"} <= set(df.columns)]
    _validate_endpoints(df, path, present)
    if len(present) < 2:
        return _index_by_patient(df)
    longer = df["pfs_time"] > df["os_time"] + 1e-9
    if longer.any():
        pats = df.loc[longer, "patient_id"].tolist()
        warnings.warn(
            f"{path}: pfs_time > os_time for {len(pats)} patient(s) {pats[:10]} (lines "
            f"{_lines(df, df.index[longer])}); progression cannot be observed after death or "
            "last follow-up — check these rows.",
            CohortWarning,
            stacklevel=3,
        )
    return _index_by_patient(df)


def _resolve(root: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (root / p)


def _check_patients_known(df: pd.DataFrame, known: set[str], path: Path) -> None:
    unknown = ~df["patient_id"].isin(known)
    if unknown.any():
        ids = sorted(set(df.loc[unknown, "patient_id"]))
        raise CohortError(
            f"{path}: {len(ids)} patient_id(s) not in clinical.csv: {ids[:10]} "
            f"(first on line {_line(df, df.index[unknown][0])}); add them to clinical.csv or "
            "remove these rows."
        )


def _warn_problems(path: Path, what: str, problems: list[str], n: int, root: Path) -> None:
    if not problems:
        return
    head = (f"none of the {n} {what}(s) can be used" if len(problems) == n else
            f"{len(problems)} of {n} {what}(s) cannot be used and are recorded as failed by the "
            "stages that read them, the others go on")
    warnings.warn(f"{path}: {head}: {'; '.join(problems[:5])}"
                  f"{' ...' if len(problems) > 5 else ''} (paths are relative to {root} or "
                  "absolute)", CohortWarning, stacklevel=3)


def _slide_note(df: pd.DataFrame, i) -> str:
    sid, v = df.at[i, "slide_id"], df.at[i, "path"]
    if v is None or pd.isna(v):
        return f"line {_line(df, i)}: slide {sid!r} has no path"
    return f"line {_line(df, i)}: file {v} of slide {sid!r} does not exist"


def load_slides(path: Path, root: Path, known: set[str], check_files: bool = True) -> pd.DataFrame:
    """slides.csv with absolute paths; ``path`` is optional (embeddings computed elsewhere need
    only patient_id and slide_id).  A ``problem`` column holds, per slide, why its file cannot be
    read (no path, file not found), or None; such slides are left to the stages to record."""
    df = read_table(path)
    _require_columns(df, SLIDES_REQUIRED, path)
    _check_ids(df, path)
    _check_ids(df, path, "slide_id")
    _check_unique(df, path, "slide_id", "slide ids must be unique.")
    _check_patients_known(df, known, path)
    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"], errors="coerce")
        bad = (df["mpp"].notna() & mpp.isna()) | (mpp <= 0) | np.isinf(mpp)
        if bad.any():
            i = df.index[bad][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column 'mpp' for slide {df.at[i, 'slide_id']!r} "
                f"is {df.at[i, 'mpp']!r}; give µm per pixel at level 0 (e.g. 0.25) or leave it "
                f"empty.{_not_a_number(df.at[i, 'mpp'])}"
            )
        df["mpp"] = mpp
    has_paths = "path" in df.columns
    if not has_paths:  # fine when the embeddings come from elsewhere: no warning
        df["path"] = None
    problems, notes = [], []
    for i in df.index:
        sid, v = df.at[i, "slide_id"], df.at[i, "path"]
        msg = None
        if pd.isna(v):
            msg = f"no path for slide {sid} in slides.csv (line {_line(df, i)})"
            df.at[i, "path"] = None
        else:
            p = _resolve(root, v)
            df.at[i, "path"] = str(p)
            if check_files and not p.exists():
                msg = (f"slides.csv line {_line(df, i)}, column 'path': file {p} of slide {sid} "
                       f"does not exist (paths are relative to {root} or absolute)")
        problems.append(msg)
        if msg:
            notes.append(_slide_note(df, i))
    df["problem"] = problems
    if has_paths:
        _warn_problems(path, "slide", notes, len(df), root)
    return _reset(df)


def _reset(df: pd.DataFrame) -> pd.DataFrame:
    lines = [_line(df, i) for i in df.index]
    out = df.reset_index(drop=True)
    out.attrs["lines"] = dict(enumerate(lines))
    return out


def load_ct(path: Path, root: Path, known: set[str], check_files: bool = True) -> pd.DataFrame:
    """ct.csv with absolute paths.  A missing image or mask file is named in a warning and left
    to the radiomics stage, which records that case as failed and goes on with the others."""
    df = read_table(path)
    _require_columns(df, CT_REQUIRED, path)
    _check_ids(df, path)
    _check_patients_known(df, known, path)
    notes = []
    for col in ("image", "mask"):
        empty = df[col].isna()
        if empty.any():
            i = df.index[empty][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column '{col}' is empty for patient "
                f"{df.at[i, 'patient_id']!r}; drop the row if the patient has no CT."
            )
        df[col] = [str(_resolve(root, v)) for v in df[col]]
    if "label" in df.columns:
        lab = pd.to_numeric(df["label"], errors="coerce")
        bad = (df["label"].notna() & lab.isna()) | (lab < 1) | (lab % 1 != 0)
        if bad.any():
            i = df.index[bad][0]
            raise CohortError(
                f"{path}, line {_line(df, i)}: column 'label' is {df.at[i, 'label']!r} for "
                f"patient {df.at[i, 'patient_id']!r}; give the mask's integer label of the "
                "region of interest (e.g. 1) or leave it empty for the default.")
    if check_files:
        for i in df.index:  # one note per case (a case with neither file counts once)
            gone = [f"column '{c}': file {df.at[i, c]}" for c in ("image", "mask")
                    if not Path(df.at[i, c]).exists()]
            if gone:
                notes.append(f"line {_line(df, i)}, patient {df.at[i, 'patient_id']!r}, "
                             f"{' and '.join(gone)} {'do' if len(gone) > 1 else 'does'} not exist")
        _warn_problems(path, "CT case", notes, len(df), root)
    return _reset(df)


def load_feature_table(path: Path, known: set[str]) -> pd.DataFrame:
    """Read and validate a feature table: ``patient_id`` plus numeric columns, one row per patient.

    Parameters
    ----------
    path
        The CSV file.
    known
        Patient ids of clinical.csv; every row's ``patient_id`` must be one of them.

    Returns
    -------
    pandas.DataFrame
        The table indexed by ``patient_id``.

    Raises
    ------
    CohortError
        If ``patient_id`` is missing or duplicated, names a patient not in ``known``, or a
        feature column is not numeric.
    """
    df = read_table(path)
    _require_columns(df, ["patient_id"], path)
    _check_ids(df, path)
    _check_unique(df, path, "patient_id", "one row per patient.")
    _check_patients_known(df, known, path)
    for c in df.columns:
        if c == "patient_id" or pd.api.types.is_numeric_dtype(df[c]):
            continue
        num = pd.to_numeric(df[c], errors="coerce")
        i = df.index[num.isna() & df[c].notna()][0]
        raise CohortError(
            f"{path}, line {_line(df, i)}: feature column {c!r} is not numeric (value "
            f"{df.at[i, c]!r} for patient {df.at[i, 'patient_id']!r}); feature tables hold "
            f"patient_id plus numeric columns only (move metadata elsewhere; empty = missing)."
            f"{_not_a_number(df.at[i, c])}"
        )
    return _index_by_patient(df)


def load_cohort(root, *, check_files: bool = True, outcomes: bool = True) -> Cohort:
    """Load ``root``/clinical.csv and whichever optional tables exist, validating all of them
    (``outcomes=False``: the outcome columns of clinical.csv are optional)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} does not exist (set data.root=...)")
    clinical = load_clinical(root / "clinical.csv", outcomes=outcomes)
    known = set(clinical.index)
    cohort = Cohort(root=root, clinical=clinical)
    if (root / "slides.csv").is_file():
        cohort.slides = load_slides(root / "slides.csv", root, known, check_files)
    if (root / "ct.csv").is_file():
        cohort.ct = load_ct(root / "ct.csv", root, known, check_files)
    fdir = root / "features"
    if fdir.is_dir():
        for p in sorted(fdir.glob("*.csv")):
            cohort.features[p.stem] = load_feature_table(p, known)
    if (root / "truth.csv").is_file():
        cohort.truth = load_truth(root / "truth.csv", known)
    return cohort


def load_truth(path: Path, known: set[str]) -> pd.DataFrame:
    """truth.csv (demo and simulated cohorts): one finite ``true_risk`` per patient of
    clinical.csv, indexed by ``patient_id``; the oracle C-index is computed from it."""
    df = read_table(path)
    _require_columns(df, ["patient_id", "true_risk"], path)
    _check_ids(df, path)
    _check_unique(df, path, "patient_id", "one true risk per patient.")
    _check_patients_known(df, known, path)
    risk = pd.to_numeric(df["true_risk"], errors="coerce")
    bad = ~np.isfinite(risk.to_numpy(float))
    if bad.any():
        i = df.index[bad][0]
        raise CohortError(f"{path}, line {_line(df, i)}: column 'true_risk' is "
                          f"{str(df.at[i, 'true_risk'])!r} for patient {df.at[i, 'patient_id']!r}; "
                          "it must be a finite number.")
    df["true_risk"] = risk.astype(float)
    return _index_by_patient(df)


# ------------------------------------------------------------------------------ usable items
def require_items(cohort: Cohort, table: str, *, need_files: bool = True) -> pd.DataFrame:
    """The usable rows of ``table`` ("slides" or "ct"), or a :class:`CohortError` when the file
    is absent or none of its rows is usable.

    Call it where a run knows it needs a modality (before its stage runs): rows that are not
    usable are only recorded as failed by the stages, so without this check a run whose every
    slide path is wrong would end in an empty modality far from the cause.  ``need_files=False``
    (slides whose embeddings were computed elsewhere) accepts slides without a path."""
    if table not in ("slides", "ct"):
        raise ValueError(f"table must be 'slides' or 'ct', got {table!r}")
    df = getattr(cohort, table)
    path = cohort.root / f"{table}.csv"
    if df is None or len(df) == 0:
        raise CohortError(f"{path}: {'no such file' if df is None else 'no rows'}; this run needs "
                          f"{'whole-slide images' if table == 'slides' else 'CT scans'} (see the "
                          "README, 'Your own cohort').")
    if table == "slides":
        if not need_files:
            return df
        bad = df["problem"].notna() if "problem" in df.columns else df["path"].isna()
        why = [_slide_note(df, i) for i in df.index[bad]]
    else:
        bad = pd.Series([not (Path(a).exists() and Path(m).exists())
                         for a, m in zip(df["image"], df["mask"])], index=df.index)
        why = [f"line {_line(df, i)}: {df.at[i, 'image']} or {df.at[i, 'mask']} does not exist"
               for i in df.index[bad]]
    if bad.all():
        raise CohortError(
            f"{path}: none of the {len(df)} row(s) can be used ({'; '.join(map(str, why[:3]))}"
            f"{' ...' if len(why) > 3 else ''}); fix the paths (relative to {cohort.root} or "
            "absolute).")
    return df.loc[~bad]
