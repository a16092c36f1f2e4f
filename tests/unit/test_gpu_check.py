"""benchmarks/gpu_check.py: the GPU measurement script runs its code paths on the CPU
(--dry-run), and refuses clearly to run for real without a GPU."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # picklable functions (worker processes)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_covers_every_step(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _module().main(["--dry-run", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["info"]["device"] == "cpu" and res["info"]["dry_run"] is True
    what = [r["what"] for r in res["rows"]]
    assert any(w.startswith("tissue: torch on cpu") for w in what)
    assert any("decode_jpeg" in w for w in what)
    for name in ("efficientnet_lite0_imagenet", "test_tiny"):
        assert f"{name}: pipeline end to end" in what and any(
            w.startswith(f"{name}: model only") for w in what)
    assert all(r["value"] > 0 for r in res["rows"])
    assert "| what | value | unit | note |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_it_stops_with_a_clear_message(capsys):
    assert _module().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
