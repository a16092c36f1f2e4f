"""The :class:`Encoder` unit, its preprocessing and weight-loading helpers.

An :class:`Encoder` bundles everything needed to turn RGB tiles into embeddings:
the network (eval mode, ``[B, 3, S, S] -> [B, D]``), the eval transform (input size,
mean/std, interpolation, resize/crop policy), the precision policy and the embedding
dimension.  Nothing in this module touches the network at import time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


class EncoderError(RuntimeError):
    """Base error for encoder construction problems."""


class EncoderWeightsError(EncoderError):
    """Weights could not be found, fetched or loaded (message says how to fix it)."""


#: CPU flags that mean native bf16 arithmetic (x86: AMX-BF16, AVX512-BF16).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: Environment variable that replaces the CPU flags read from /proc/cpuinfo (space- or
#: comma-separated; empty or "none" = no flags).  It is the one seam through which tests (and
#: users) pin what ``precision=auto`` resolves to on CPU, whatever the machine:
#: ``NETSURV_CPU_FLAGS=none`` -> fp32, ``NETSURV_CPU_FLAGS=avx512_bf16`` -> bf16.
CPU_FLAGS_ENV = "NETSURV_CPU_FLAGS"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags: ``$NETSURV_CPU_FLAGS`` when set, else the first ``flags`` line of
    ``cpuinfo`` (Linux x86); an empty set where neither exists (other OS / architectures)."""
    env = os.environ.get(CPU_FLAGS_ENV)
    if env is not None:
        flags = frozenset(env.replace(",", " ").lower().split())
        return flags - {"none"}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16, see :func:`cpu_flags`).

    Only there is bf16 autocast a speed-up for CNN inference on CPU: measured on an AVX2-only
    EPYC lite0 ran 2.5-3.6 img/s in bf16 vs 14 (fp32) and 24 (fp32 channels-last); a CPU with
    native bf16 ran 190 vs 85 img/s."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``auto``/``None`` -> ``bf16`` on CUDA and on CPUs with native bf16, else ``fp32``
    (the CPU check goes through :func:`cpu_flags`, so ``NETSURV_CPU_FLAGS`` decides it).

    bf16 autocast keeps lite0 embeddings within cosine 0.9989 of fp32 (benchmarks/embed.py);
    without native bf16 it is emulated and 4-6x slower than fp32, so ``auto`` avoids it there.
    Explicit values are kept.
    """
    precision = "auto" if precision is None else str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if torch.device(device).type == "cuda":
            return "bf16"
        return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"
    return precision


@dataclass
class Encoder:
    """One tile encoder: model + eval transforms + precision policy + dimension.

    ``model`` is in eval mode and maps a normalised float batch ``[B, 3, S, S]`` to
    ``[B, dim]`` embeddings (or ``[B, 1000]`` logits when built with
    ``keep_classifier=True``).  Use :meth:`preprocess` then :meth:`forward`, or
    :meth:`embed` for both.
    """

    name: str
    model: nn.Module = field(repr=False)
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_source: str
    precision: str
    device: torch.device
    arch: str = ""
    crop_pct: float = 1.0
    channels_last: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ transforms
    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``[B,H,W,3]`` / ``[B,3,H,W]`` (or one image ``[H,W,3]``/``[3,H,W]``)
        -> float32 ``[B,3,S,S]`` on ``self.device``, normalised with ``mean``/``std``.

        Resize/crop policy (timm's eval transform): the shorter side is resized
        (antialiased, ``interpolation``) to ``R = round(S / crop_pct)`` unless it is ``R``
        already, and the centre ``S x S`` is cropped.  With the default ``crop_pct = 1.0`` a
        square tile is resized to ``S x S`` (whole field of view kept) and a tile that is
        already ``S x S`` is only normalised; with ``crop_pct = 224/256`` (Prov-GigaPath's
        Resize(256) + CenterCrop(224)) a 224-px tile is enlarged to 256 and cropped too.

        uint8 images are resized as uint8, as the reference transforms do (PIL / torchvision
        on uint8 images: the resized pixels are rounded; within 2 grey levels of PIL's bicubic
        resize, 0.006 on average, where a float resize differs by 0.3 levels on average).  On CPU this runs
        torch's uint8 antialiased kernels (about 4x cheaper than the float path per 256-px
        tile); elsewhere the float result is rounded and clamped the same way.
        """
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images)
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a 4-D image batch, got shape {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: torch's channels-last layout
        elif x.shape[1] != 3:
            raise ValueError(f"{self.name}: cannot find the RGB channel axis in shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            scale = 255.0  # folded into the normalisation below (one pass fewer over the batch)
        elif x.is_floating_point():  # already in [0, 1]
            scale = 1.0
            x = x.to(self.device, dtype=torch.float32)
        else:
            raise TypeError(f"{self.name}: expected uint8 (0-255) or float (0-1) images, got {x.dtype}")
        size = self.resize_to(*x.shape[-2:])
        if size is not None:
            x = _resize(x, size, self.interpolation, self.device)
        s = self.input_size
        nh, nw = x.shape[-2:]
        if (nh, nw) != (s, s):
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top : top + s, left : left + s]
        if x.dtype == torch.uint8:
            x = x.to(self.device, non_blocking=True)
        # channels-last encoders get NHWC memory straight away (HWC tiles already are: no copies)
        cl = self.channels_last
        y = x.to(torch.float32, memory_format=torch.channels_last if cl else torch.contiguous_format)
        # normalised in place in one pass, x * (1/std) + (-mean/std), over rows of the memory
        # as it lies: NHWC rows [W*3] against the per-channel factors repeated W times (a
        # broadcast over a 3-long last axis vectorises badly: 3x slower), NCHW planes [H*W]
        inv_std = 1.0 / (torch.tensor(self.std, device=y.device) * scale)
        shift = -torch.tensor(self.mean, device=y.device) * scale * inv_std
        if cl:
            w = y.shape[-1]
            v = y.permute(0, 2, 3, 1).view(-1, w * 3)  # NHWC memory is contiguous: a view
            torch.addcmul(shift.repeat(w), v, inv_std.repeat(w), out=v)
        else:
            v = y.view(y.shape[0], 3, -1)
            torch.addcmul(shift.view(1, 3, 1), v, inv_std.view(1, 3, 1), out=v)
        return y

    def resize_to(self, h: int, w: int) -> tuple[int, int] | None:
        """(height, width) an ``h x w`` image is resized to before the centre crop, or None
        when it is used as it is (see :meth:`preprocess`)."""
        short = int(round(self.input_size / self.crop_pct))
        if h <= w:
            nh, nw = short, max(short, int(round(w * short / h)))
        else:
            nh, nw = max(short, int(round(h * short / w))), short
        return None if (nh, nw) == (h, w) else (nh, nw)

    # ------------------------------------------------------------------ inference
    def autocast(self):
        """Autocast context for this encoder's precision policy (no-op for fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float batch -> float32 ``[B, dim]`` (under the precision policy)."""
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(x)
        return out.float()

    __call__ = forward

    def embed(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 tiles -> float32 embeddings ``[B, dim]`` (preprocess + forward)."""
        return self.forward(self.preprocess(images))

    def transform_config(self) -> dict[str, Any]:
        """Everything that defines the embedding space (for provenance files)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            # uint8 tiles are resized as uint8 (rounded), as PIL / torchvision do; embeddings
            # made before this (float resize) are recomputed
            "resize_dtype": "uint8",
            "precision": self.precision,
            "weights_source": self.weights_source,
        }


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Antialiased resize of a uint8 or float (``[0, 1]``) batch; bicubic overshoot is clamped
    back to the pixel range.  uint8 stays uint8 (rounded): on CPU through torch's uint8
    kernels, elsewhere (``device``: where the batch is resized) by :func:`_resize_rounded`."""
    mode = interpolation.lower()
    if mode not in ("bilinear", "bicubic", "area", "nearest", "nearest-exact"):
        raise ValueError(f"unsupported interpolation {interpolation!r}")
    if x.dtype != torch.uint8:
        out = F.interpolate(x, size=size, mode=mode, **_aa(mode))
        return out.clamp_(0.0, 1.0) if mode in ("bilinear", "bicubic") else out
    dev = torch.device(device) if device is not None else x.device
    if dev.type == "cpu" and mode != "area":  # uint8 in, uint8 out (rounded, clamped)
        return _resize_uint8_cpu(x, size, mode)
    return _resize_rounded(x.to(dev, non_blocking=True), size, mode)


_RESIZE_POOL: dict = {}  # (pid, threads) -> ThreadPoolExecutor


def _resize_uint8_cpu(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """torch's uint8 antialiased resize, over chunks of the batch in parallel threads.

    The uint8 kernels run on one thread whatever ``torch.set_num_threads`` says (0.133 ms per
    256-px tile with 1 or 2 threads); the images are independent and the kernel releases the
    GIL, so ``torch.get_num_threads()`` threads each resize a chunk (0.081 ms per tile on 2).
    Pixels are identical to one call on the whole batch."""
    n = min(torch.get_num_threads(), len(x) // 8)
    if n < 2:
        return F.interpolate(x, size=size, mode=mode, **_aa(mode))
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), n)  # a forked child must not use its parent's (absent) threads
    pool = _RESIZE_POOL.get(key)
    if pool is None:
        pool = _RESIZE_POOL[key] = ThreadPoolExecutor(n, thread_name_prefix="tile-resize")
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    out = torch.empty((len(x), x.shape[1], *size), dtype=x.dtype, memory_format=fmt)
    bounds = np.linspace(0, len(x), n + 1).astype(int)

    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def one(i):
        a, b = bounds[i], bounds[i + 1]
        with torch.inference_mode(inference):
            out[a:b].copy_(F.interpolate(x[a:b], size=size, mode=mode, **_aa(mode)))

    list(pool.map(one, range(n)))
    return out


def _aa(mode: str) -> dict:
    return dict(align_corners=False, antialias=True) if mode in ("bilinear", "bicubic") else {}


def _resize_rounded(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 resize through float (devices without uint8 resize kernels, and ``area``):
    rounded and clamped to uint8 as torch's CPU uint8 kernels and PIL do, so that a tile gives
    the same pixels on every device within two grey levels (0.2 on average: those kernels use
    fixed-point weights)."""
    out = F.interpolate(x.float(), size=size, mode=mode, **_aa(mode))
    return out.round_().clamp_(0.0, 255.0).to(torch.uint8)


# ---------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | Path, encoder_name: str) -> dict[str, torch.Tensor]:
    """Load a local state dict safely (``weights_only=True`` or safetensors).

    Accepts a bare state dict or one wrapped under ``state_dict`` / ``model`` /
    ``teacher``; strips a leading ``module.`` (DDP) prefix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderWeightsError(
            f"encoder {encoder_name!r}: weights file not found: {str(p)!r} "
            f"(set encoder.weights to an existing .pth/.pt/.bin/.safetensors checkpoint)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # re-raised with context
        raise EncoderWeightsError(
            f"encoder {encoder_name!r}: could not read checkpoint {str(p)!r} "
            f"(only plain tensor state dicts / safetensors are accepted, loaded with "
            f"weights_only=True): {type(e).__name__}: {e}"
        ) from e
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderWeightsError(
            f"encoder {encoder_name!r}: {str(p)!r} does not contain a state dict of tensors"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], encoder_name: str, source: str) -> None:
    """Strict load with a readable error listing missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or bad_shape:
        raise EncoderWeightsError(
            f"encoder {encoder_name!r}: checkpoint {source!r} does not match the architecture: "
            f"{len(missing)} missing keys {_head(missing)}, {len(unexpected)} unexpected keys "
            f"{_head(unexpected)}, {len(bad_shape)} shape mismatches {_head(bad_shape)}"
        )
    module.load_state_dict(dict(sd), strict=True)


def load_in_order(module: nn.Module, sd: Mapping[str, torch.Tensor], encoder_name: str, source: str) -> None:
    """Copy ``sd`` into ``module`` by position (parameters AND buffers, in registration
    order), for checkpoints whose key names differ but whose layout is identical.
    Every pair is shape-checked; any count/shape/dtype-kind mismatch raises."""
    own = module.state_dict()
    if len(own) != len(sd):
        raise EncoderWeightsError(
            f"encoder {encoder_name!r}: checkpoint {source!r} has {len(sd)} tensors, "
            f"the model has {len(own)}; cannot map by order"
        )
    new = {}
    for i, ((k_model, v_model), (k_ckpt, v_ckpt)) in enumerate(zip(own.items(), sd.items())):
        if tuple(v_model.shape) != tuple(v_ckpt.shape) or v_model.is_floating_point() != v_ckpt.is_floating_point():
            raise EncoderWeightsError(
                f"encoder {encoder_name!r}: tensor #{i} mismatch mapping {source!r} by order: "
                f"checkpoint {k_ckpt} {tuple(v_ckpt.shape)} {v_ckpt.dtype} vs model {k_model} "
                f"{tuple(v_model.shape)} {v_model.dtype}"
            )
        new[k_model] = v_ckpt.to(v_model.dtype)
    module.load_state_dict(new, strict=True)


def _head(items: list[str], n: int = 8) -> str:
    if not items:
        return "[]"
    more = f", ... (+{len(items) - n})" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"
