"""timm models: the preprocessing of a whole timm model from its own data config."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..preprocessing import Preprocessing


def timm_preprocessing(config) -> Preprocessing | None:
    """A timm model's evaluation preprocessing from its ``pretrained_cfg`` dict, if complete."""
    if not isinstance(config, Mapping):
        return None
    try:
        size = config["input_size"]
        crop = int(size[-1]) if int(size[-1]) == int(size[-2]) else None
        crop_pct = float(config.get("crop_pct") or 0.875)
        mean = tuple(float(v) for v in config["mean"])
        std = tuple(float(v) for v in config["std"])
        interpolation = str(config.get("interpolation") or "bilinear")
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if crop is None or len(mean) != 3 or len(std) != 3 or interpolation not in (
            "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        return None
    return Preprocessing(resize=max(crop, math.floor(crop / crop_pct)), crop=crop,
                         mean=mean, std=std, interpolation=interpolation)
