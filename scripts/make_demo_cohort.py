"""Generate the synthetic demo cohort: python scripts/make_demo_cohort.py [data.demo.seed=1 ...]."""
import hydra
from omegaconf import DictConfig

from netsurv.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_demo_cohort")
@user_errors  # bad input data: one line + where the full log is
def main(cfg: DictConfig) -> None:
    from netsurv.tasks.cohort import resolve_cohort

    resolve_cohort(cfg.data, force=cfg.force)


if __name__ == "__main__":
    main()
