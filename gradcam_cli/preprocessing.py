"""Preprocessing: how an image becomes the model's input.

``Preprocessing`` holds the resize, centre crop and normalization a model expects (models.py
picks one per model; --resize, --crop, --mean and --std override it). ``crop_image`` resizes
and crops (in the decode processes), ``normalize`` scales a batch of crops on the model's
device, and ``prepare_image`` does both for one image. Colours are RGB everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop a square, scale to [0, 1], normalize per channel.

    ``resize`` is the shorter side's new length (torchvision's ``Resize(int)``), or with
    ``squash`` both sides' (a fixed-size resize that ignores the aspect ratio, as Hugging
    Face's ViT-style image processors and timm's ``crop_mode='squash'`` do). The crop's
    offset is rounded as torchvision's ``CenterCrop`` rounds it (``crop_offset="round"``)
    or floored as Hugging Face's ``center_crop`` does (``"floor"``): they differ by a pixel
    for some sizes. ``bgr``: the model takes its channels in BGR order (the crop shown stays
    RGB). Any affine pixel scaling (a processor's rescale factor or offset) is folded into
    ``mean`` and ``std``, which are on [0, 1] pixels."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    squash: bool = False
    crop_offset: str = "round"
    bgr: bool = False

    def with_crop(self, crop: int) -> Preprocessing:
        """The same preprocessing for another crop size, the resize scaled with it."""
        return replace(self, crop=crop, resize=round(crop * self.resize / self.crop))


IMAGENET_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                                       std=(0.229, 0.224, 0.225))
_PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def crop_image(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """The image as the model sees it, before normalization: resized and centre-cropped,
    (H, W, 3) uint8 RGB. This is what the decode processes hand over (a quarter of float32's
    bytes); the model process normalizes it on its own device."""
    crop = preprocessing.crop
    size = resized_size(image.size, preprocessing)
    resized = image.resize(size, _PIL_FILTERS[preprocessing.interpolation])
    left, top = (_offset(length - crop, preprocessing.crop_offset) for length in size)
    return np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def resized_size(size: tuple[int, int], preprocessing: Preprocessing) -> tuple[int, int]:
    """(width, height) after the resize: the shorter side to ``resize`` and the longer one
    scaled and truncated, as torchvision and Hugging Face compute it; never below the crop."""
    if preprocessing.squash:
        side = max(preprocessing.crop, preprocessing.resize)
        return side, side
    width, height = size
    short, long = sorted((width, height))
    new_long = int(preprocessing.resize * long / short)
    new = (preprocessing.resize, new_long) if width <= height else (new_long, preprocessing.resize)
    return max(preprocessing.crop, new[0]), max(preprocessing.crop, new[1])


def _offset(extra: int, rounding: str) -> int:
    """The crop's offset from the resized image's edge: half the extra length, rounded as
    torchvision rounds it (half to even) or floored as Hugging Face does."""
    return extra // 2 if rounding == "floor" else int(round(extra / 2.0))


def prepare_image(image: Image.Image, preprocessing: Preprocessing
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model sees it: (uint8 RGB crop (H, W, 3), float32 input (3, H, W))."""
    import torch
    shown = crop_image(image, preprocessing)
    model_input = normalize(torch.from_numpy(shown[None].copy()), preprocessing,
                            torch.device("cpu"))
    return shown, model_input[0].numpy()


def normalize(shown, preprocessing: Preprocessing, device):
    """(B, H, W, 3) uint8 crops (a torch tensor) -> the (B, 3, H, W) float32 model input on
    ``device``: (value / 255 - mean) / std, torchvision's ToTensor and Normalize (channels
    reversed first for a BGR model).

    A batch run calls this in the model process, on the model's device. The divisor is a
    tensor on the device, not a Python number: CUDA turns division by a CPU scalar into
    multiplication by its reciprocal, which rounds differently from the CPU."""
    import torch
    pixels = shown.to(device, non_blocking=True).permute(0, 3, 1, 2)
    if preprocessing.bgr:
        pixels = pixels.flip(1)
    pixels = pixels.contiguous().float()
    full_scale = torch.full((), 255.0, dtype=torch.float32, device=device)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device)[:, None, None]
    return pixels.div_(full_scale).sub_(mean).div_(std)
