"""Tile encoder registry (timm-based).

>>> from netsurv.pathology.encoders import build_encoder, list_encoders
>>> enc = build_encoder("efficientnet_lite0_imagenet")          # offline default, 1280-d
>>> emb = enc.embed(tiles_uint8)                                # [B,H,W,3] uint8 -> [B,1280]

Each name maps to one unit (model, eval transforms, precision policy, dimension); see
:mod:`netsurv.pathology.encoders.registry` for the entries and weight sources.
"""

from .core import Encoder, EncoderError, EncoderWeightsError, resolve_precision
from .registry import (
    ClsMeanPatch,
    EncoderSpec,
    build_encoder,
    build_encoder_from_config,
    get_spec,
    list_encoders,
    registry_table,
)

__all__ = [
    "ClsMeanPatch",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "EncoderWeightsError",
    "build_encoder",
    "build_encoder_from_config",
    "get_spec",
    "list_encoders",
    "registry_table",
    "resolve_precision",
]
