"""Resolve the ``data`` config to a loaded cohort, generating the demo cohort on first use.

May be called on every rank of a job and by concurrent jobs: the demo cohort is generated once
(:func:`netsurv.demo.cohort.make_demo_cohort` holds a lock), the others wait for it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import Cohort, CohortError, load_cohort


def resolve_cohort(data_cfg: DictConfig, *, force: bool = False) -> Cohort:
    """Load the cohort of ``data_cfg.root``, generating the demo cohort there first if configured.

    With a ``demo`` entry the demo cohort is generated into ``root`` unless an identical one is
    already there; a user cohort (a ``clinical.csv`` without the demo's ``.complete`` marker) is
    loaded as it is.

    Parameters
    ----------
    data_cfg : DictConfig
        The run's ``data`` config (``root``, optional ``demo`` generation options).
    force : bool, default False
        Regenerate the demo cohort even if an identical one exists (once, by rank 0, in a
        multi-process job).

    Returns
    -------
    Cohort
        The loaded cohort.

    Raises
    ------
    CohortError
        If ``root`` has no ``clinical.csv`` and no demo cohort is configured.
    """
    root = Path(str(data_cfg.root)).expanduser()
    demo = data_cfg.get("demo")
    user_cohort = (root / "clinical.csv").is_file() and not (root / ".complete").is_file()
    if demo is not None and not user_cohort:
        from netsurv.demo.cohort import make_demo_cohort
        from netsurv.stages import rank_zero, stage_env

        kwargs = OmegaConf.to_container(demo, resolve=True)
        if force and stage_env().world_size > 1:  # regenerated once, by rank 0
            rank_zero(lambda: make_demo_cohort(root, force=True, **kwargs), what="demo cohort")
            force = False
        # ranks and concurrent jobs: one generates (under a lock), the others wait and reuse it
        make_demo_cohort(root, force=force, **kwargs)
    elif not (root / "clinical.csv").is_file():
        raise CohortError(
            f"{root}: no clinical.csv; point data.root at a cohort folder (see the README's 'Your own cohort') "
            "or use data=demo"
        )
    return load_cohort(root)
