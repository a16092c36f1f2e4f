"""Train and evaluate a survival model: python scripts/train.py experiment=clinical [overrides]."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from netsurv.tasks.train import run

    metrics = run(cfg)
    return metrics["cindex"]["mean"]  # returned for sweepers (optuna maximises it)


if __name__ == "__main__":
    main()
