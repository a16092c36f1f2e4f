"""Score new patients with a finished run: python scripts/predict.py run=<run dir> data.root=<cohort>."""
import hydra
from omegaconf import DictConfig

from netsurv.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
@user_errors  # bad input data: one line + where the full log is
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from netsurv.evaluation.predict import predict

    out = cfg.output_dir or HydraConfig.get().runtime.output_dir
    s = predict(cfg.run, cfg.data, out, embeddings_dir=cfg.embeddings_dir)
    line = f"{s['n_scored']} of {s['n_patients']} patients scored ({s['combine']})"
    if "cindex" in s:
        ci = s["cindex_bootstrap_ci95"]
        line += f" · {s['endpoint']} C-index {s['cindex']:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f})"
    print(line, flush=True)
    print(f"outputs: {out}", flush=True)


if __name__ == "__main__":
    main()
