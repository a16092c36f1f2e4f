"""benchmarks/embed.py helpers: the model-only figure runs the pipeline's own forward step on
preprocessed batches, in full batches; the pipeline's warm-up covers two batches."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netsurv.pathology.embed import CohortEmbedder
from netsurv.pathology.encoders import build_encoder

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "embed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("embed_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("embed_bench", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_forward_is_the_pipelines_forward_step(bench, precision):
    enc = build_encoder("test_tiny", weights="random", device="cpu", precision=precision)
    u8 = np.random.default_rng(0).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    got = bench.model_forward(enc)(enc.preprocess(u8))
    with CohortEmbedder(enc, 8) as ce:
        want = ce._forward(torch.from_numpy(u8), len(u8))
    assert got.dtype == np.float32 and got.shape == (5, enc.dim)
    np.testing.assert_array_equal(got, want)


def test_model_forward_checks_the_shape(bench):
    enc = build_encoder("test_tiny", weights="random", device="cpu", precision="fp32")
    fwd = bench.model_forward(enc)
    enc.dim = enc.dim + 1
    with pytest.raises(RuntimeError, match="returned"):
        fwd(enc.preprocess(np.zeros((2, 224, 224, 3), np.uint8)))


def test_model_tile_count_full_batches(bench):
    assert bench.model_tile_count(602, None, 256) == 602  # one slide: its own batches
    assert bench.model_tile_count(7397, 512, 256) == 512
    assert bench.model_tile_count(7397, 600, 256) == 512  # rounded down to full batches
    assert bench.model_tile_count(7397, 100, 256) == 256  # at least one batch
    assert bench.model_tile_count(200, 512, 256) == 200  # never more than there are
    assert bench.model_tile_count(600, 700, 256) == 512


def test_warmup_slides_two_batches(bench):
    assert bench.warmup_slides([602], 256) == 1
    assert bench.warmup_slides([25] * 48, 256) == 21  # 21 * 25 = 525 >= 512
    assert bench.warmup_slides([100, 100], 256) == 2  # fewer tiles: all slides
    assert bench.warmup_slides([], 256) == 0


@pytest.mark.parametrize("mode", ["keep", "no-trim", "default"])
def test_malloc_mode(bench, mode):
    with bench.malloc_mode(mode) as on:
        x = torch.ones(1 << 20)
        del x
    assert on is False if mode == "default" else isinstance(on, bool)
