"""Tissue segmentation + tile coords for every slide of a cohort (resumable, atomic)."""
import hydra
from omegaconf import DictConfig

from netsurv.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="tile")
@user_errors  # bad input data: one line + where the full log is
def main(cfg: DictConfig) -> None:
    from netsurv.tasks.tile import run

    run(cfg)


if __name__ == "__main__":
    main()
