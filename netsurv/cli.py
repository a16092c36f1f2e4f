"""Entry points: an error in the user's own data reaches the console as one line.

A bad clinical.csv, an unreadable slide or a CT mask full of NaN is the user's to fix, and the
message (file, line, patient, column, what to do) is all they need; a 20-line Hydra traceback
with that message on its last line hides it.  So every ``scripts/*.py`` entry point wraps its
task function::

    @hydra.main(version_base="1.3", config_path="../configs", config_name="train")
    @user_errors
    def main(cfg): ...

and, for a *user error* (:data:`USER_ERRORS`, matched on the exception or its ``__cause__``
chain):

* single run: the traceback goes to the job's log file (Hydra's ``<job>.log`` in the run
  directory, when the job logs to a file) and the console shows
  ``error: <message>`` plus ``full log: <file>``; the process exits with status 1.  The job is
  still a failed job for Hydra's callbacks (the error is raised as a
  ``CompactHydraException``, which Hydra prints without a traceback);
* multirun (``-m``, local or SLURM launchers): the original exception propagates unchanged, so
  the sweep records the job as failed (its ``JobReturn`` holds the exception) and goes on; the
  one-line message goes to the console and the traceback to the job's log file;
* under SLURM (``SLURM_JOB_ID`` set) the traceback is also written to stderr, i.e. the job's
  SLURM log;
* ``HYDRA_FULL_ERROR=1`` (or a debugger) leaves everything to Hydra: full traceback.

Any other exception is a bug, and keeps Hydra's usual traceback.  Scripts without Hydra
(``report.py``, ``results_table.py``) use :func:`run_plain`.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["USER_ERRORS", "UserError", "find_user_error", "handle_user_error", "run_plain",
           "user_errors"]

log = logging.getLogger("netsurv")

#: Exceptions raised by bad user input, by module -> class names.  Matched only when the module
#: is already imported (an exception of a class never imported cannot occur), so this module
#: imports none of them.  Add a class here when a new module gains a user-facing error.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "netsurv.cohort.schema": ("CohortError",),
    "netsurv.radiology.volumes": ("VolumeError",),
    "netsurv.pathology.slides": ("SlideError",),
    "netsurv.survival.metrics": ("MetricError",),
    "netsurv.pathology.encoders.core": ("EncoderWeightsError",),
    "netsurv.cohort.splits": ("SplitError",),     # e.g. too few events for the protocol
    "netsurv.training.bags": ("BagError",),       # unreadable features from TRIDENT/CLAM
}


def _user_classes() -> tuple[type, ...]:
    out = []
    for mod, names in USER_ERRORS.items():
        m = sys.modules.get(mod)
        out += [getattr(m, n) for n in names if m is not None and hasattr(m, n)]
    return tuple(out)


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """``exc`` or the first exception of its explicit ``raise ... from`` chain that is a user
    error, else None.  (The implicit ``__context__`` is not followed: an error raised while
    handling a user error is a bug of its own.)"""
    classes = _user_classes()
    seen = set()
    while exc is not None and id(exc) not in seen and classes:
        seen.add(id(exc))
        if isinstance(exc, classes):
            return exc
        exc = exc.__cause__
    return None


def _full_error_requested() -> bool:
    from hydra._internal.utils import is_under_debugger

    return os.environ.get("HYDRA_FULL_ERROR") == "1" or is_under_debugger()


def _log_files() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _to_log_files(exc: BaseException) -> list[str]:
    """Write the traceback to the job's log file(s) only (not to the console handlers)."""
    files = _log_files()
    if files:
        rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s: %s",
                             (type(exc).__name__, exc), (type(exc), exc, exc.__traceback__))
        for h in files:
            h.handle(rec)
            h.flush()
    return [h.baseFilename for h in files]


def _one_line(exc: BaseException, files: list[str]) -> str:
    msg = str(exc).strip() or type(exc).__name__
    where = f"\nfull log: {files[0]}" if files else ""
    return f"error: {msg}{where}"


def _hydra_mode():
    """'RUN', 'MULTIRUN', or None outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().mode.name if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra config in this process
        return None


try:
    from hydra.errors import CompactHydraException as _Compact
except ImportError:  # pragma: no cover - hydra is a dependency
    _Compact = Exception


class UserError(_Compact):
    """A user error converted for a single Hydra run: Hydra prints ``str()`` without traceback
    and exits with status 1; the original exception is its ``__cause__``."""


def handle_user_error(exc: BaseException) -> None:
    """Report ``exc`` if it is (or was caused by) a user error.

    Raises :class:`UserError` in a single Hydra run; returns normally otherwise (the caller then
    re-raises ``exc`` unchanged: a bug, ``HYDRA_FULL_ERROR=1``, no Hydra job, or a multirun job,
    which Hydra must record as failed with its own exception)."""
    user = find_user_error(exc)
    if user is None or _full_error_requested():
        return
    mode = _hydra_mode()
    if mode is None:
        return
    files = _to_log_files(exc)
    if os.environ.get("SLURM_JOB_ID"):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    line = _one_line(user, files)
    if mode == "MULTIRUN":
        print(line, file=sys.stderr, flush=True)
        return
    raise UserError(line) from exc


def user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a ``@hydra.main`` task function (put it below ``@hydra.main``)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as exc:
            handle_user_error(exc)
            raise

    return wrapper


def run_plain(main: Callable[[], Any], *, also: tuple[type, ...] = (FileNotFoundError,)) -> Any:
    """Run a script's ``main()`` (no Hydra): a user error, or one of ``also`` (e.g. a folder
    given on the command line that does not exist), is printed as one line and the process exits
    with status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback instead."""
    try:
        return main()
    except Exception as exc:
        user = find_user_error(exc) or (exc if isinstance(exc, also) else None)
        if user is None or _full_error_requested():
            raise
        print(f"error: {str(user).strip() or type(user).__name__}\n"
              "(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)
