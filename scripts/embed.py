"""Tile embeddings for every slide of a cohort (tiles first where needed; resumable, atomic)."""
import hydra
from omegaconf import DictConfig

from netsurv.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="embed")
@user_errors  # bad input data: one line + where the full log is
def main(cfg: DictConfig) -> None:
    from netsurv.tasks.embed import run

    run(cfg)


if __name__ == "__main__":
    main()
