"""Measure nuclear morphology (pathomics) for every slide of a cohort (cached, parallel,
resumable); slides without tile coords are tiled first."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_pathomics")
def main(cfg: DictConfig) -> None:
    from netsurv.tasks.pathomics import run

    run(cfg)


if __name__ == "__main__":
    main()
