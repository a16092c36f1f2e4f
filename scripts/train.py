"""Train and evaluate a survival model: python scripts/train.py experiment=clinical [overrides]."""
import hydra
from omegaconf import DictConfig

from netsurv.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@user_errors  # bad input data: one line + where the full log is
def main(cfg: DictConfig) -> float | None:
    from netsurv.tasks.train import run, sweep_objective

    metrics = run(cfg)
    return sweep_objective(cfg, metrics)  # for sweepers: optuna maximises it


if __name__ == "__main__":
    main()
