"""Config groups: `model` = classical Cox estimators, `net` = deep networks (a run is deep iff it
is set), one top-k key `selection.k`; the old layout (model=abmil, tabular.k) stops with a
message naming the new group / key, and a run saved with it still loads for prediction."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from netsurv.evaluation.groups import (
    ConfigGroupError,
    check_groups,
    is_deep,
    net_top_k,
    upgrade_saved,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
                     for p in (CONFIGS / "experiment").rglob("*.yaml"))
NETS = sorted(p.stem for p in (CONFIGS / "net").glob("*.yaml"))


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_the_groups_hold_one_schema_each():
    assert NETS == ["abmil", "maxpool", "meanpool", "transmil"]
    for p in (CONFIGS / "model").glob("*.yaml"):
        spec = OmegaConf.load(p)
        # a classical estimator, or the stub that points an old `model=<net>` at `net=<net>`
        assert "estimator" in spec or spec == {"_moved_": f"net={p.stem}"}, p.name
        assert "kind" not in spec and "mil" not in spec
    for n in NETS:
        spec = OmegaConf.load(CONFIGS / "net" / f"{n}.yaml")
        assert set(spec) == {"mil"}, n


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_is_classical_or_deep_with_the_one_top_k(experiment):
    cfg = _cfg(f"experiment={experiment}")
    check_groups(cfg)
    deep = not experiment.startswith("seed/")  # seed/: the founding study's classical models
    assert is_deep(cfg) is deep
    assert "_target_" in cfg.model.estimator          # the classical model (offset / baseline)
    assert "_target_" in cfg.offset.model.estimator
    assert cfg.tabular.get("k") is None               # selection.k is the only top-k
    k = OmegaConf.to_container(cfg.selection.k)
    if deep:
        assert "_target_" in cfg.net.mil
        assert net_top_k(cfg) == 10 and sorted(map(str, k)) == ["10", "20", "5", "all"]
    else:
        assert cfg.get("net") is None
        assert k == [5, 10, 20, "all"]


@pytest.mark.parametrize("net", NETS)
def test_net_makes_a_run_deep(net):
    cfg = _cfg("experiment=seed/radiomics", f"net={net}", "selection.k=7")
    check_groups(cfg)
    assert is_deep(cfg) and net_top_k(cfg) == 7
    assert not is_deep(_cfg("experiment=radiomics", "~net"))  # ~net: a classical run


@pytest.mark.parametrize("overrides,names", [
    (["model=abmil"], ["net=abmil", "`model` takes the classical"]),
    (["experiment=pathomics", "model=transmil"], ["net=transmil"]),
    (["model@offset.model=meanpool"], ["net=meanpool", "model@offset.model"]),
    (["experiment=radiomics", "tabular.k=5"], ["tabular.k", "selection.k=5"]),
    (["selection.k=[]"], ["selection.k=[]"]),
    (["selection.k=0"], ["selection.k=0", "positive integer or 'all'"]),
    (["selection.k=[5,most]"], ["'most'"]),
])
def test_old_names_and_bad_top_k_fail_naming_the_new_ones(overrides, names):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigGroupError) as e:
        check_groups(cfg)
    for n in names:
        assert n in str(e.value)


@pytest.mark.parametrize("override,name", [("model=abmil", "use `net=abmil`"),
                                           ("tabular.k=5", "use selection.k=5")])
def test_what_a_user_sees_on_the_command_line(tmp_path, override, name):
    env = {**os.environ, "NETSURV_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), override,
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert name in p.stdout + p.stderr
    assert not (tmp_path / "cache").exists()  # stopped before any stage


OLD_DEEP = {"model": {"kind": "deep", "mil": {"_target_": "netsurv.models.mil.ABMIL", "dim": 8}},
            "offset": {"model": {"estimator": {"_target_": "netsurv.survival.coxnet.CoxNet"}}},
            "tabular": {"dim": 4, "k": 10}, "selection": {"k": [5, 10, 20, "all"]}}


def test_a_run_saved_with_the_old_layout_still_loads(tmp_path):
    from netsurv.evaluation.predict import run_config

    OmegaConf.save(OmegaConf.create(OLD_DEEP), tmp_path / "config.yaml")
    cfg = run_config(tmp_path)
    assert is_deep(cfg) and cfg.net.mil.dim == 8
    assert cfg.model.estimator._target_.endswith("CoxNet")
    old_classical = OmegaConf.create({"model": {"estimator": {"_target_": "x.CoxNet"}}})
    assert not is_deep(upgrade_saved(old_classical))
    broken = OmegaConf.create({"model": {"kind": "deep"}})
    with pytest.raises(ConfigGroupError, match="train it again"):
        upgrade_saved(broken)
