"""Preprocessing: the crop a model sees equals its own library's transforms, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from gradcam_cli.preprocessing import Preprocessing, crop_image, normalize, resized_size

SIZES = [(500, 375), (640, 427), (301, 517), (333, 299), (1024, 683), (257, 999), (700, 350),
         (224, 224), (225, 300)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("resize, crop, interpolation", [
    (256, 224, "bilinear"), (232, 224, "bilinear"), (342, 299, "bilinear"),
    (255, 224, "bicubic"), (224, 224, "nearest")])
def test_the_crop_equals_torchvisions_resize_and_center_crop(resize: int, crop: int,
                                                             interpolation: str) -> None:
    """torchvision truncates the longer side and rounds the crop's offset half to even; a
    pixel off either way shifts every map (the tool rounded both before, and differed from
    torchvision on 21 of 28 of these sizes)."""
    mode = transforms.InterpolationMode(interpolation)
    reference = transforms.Compose([transforms.Resize(resize, interpolation=mode),
                                    transforms.CenterCrop(crop)])
    preprocessing = Preprocessing(resize, crop, (0, 0, 0), (1, 1, 1), interpolation)
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        np.testing.assert_array_equal(crop_image(image, preprocessing),
                                      np.asarray(reference(image)), err_msg=f"{width}x{height}")


def test_squash_resizes_both_sides_and_floor_offsets_as_hugging_face_does() -> None:
    """A fixed-size resize ignores the aspect ratio; Hugging Face floors the crop's offset."""
    preprocessing = Preprocessing(256, 224, (0, 0, 0), (1, 1, 1), squash=True,
                                  crop_offset="floor")
    image = random_image(500, 375)
    assert resized_size(image.size, preprocessing) == (256, 256)
    squashed = np.asarray(image.resize((256, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(crop_image(image, preprocessing), squashed[16:240, 16:240])
    odd = Preprocessing(227, 224, (0, 0, 0), (1, 1, 1), squash=True, crop_offset="floor")
    np.testing.assert_array_equal(
        crop_image(image, odd), np.asarray(image.resize((227, 227), Image.Resampling.BILINEAR))
        [1:225, 1:225])


def test_a_bgr_model_gets_its_channels_reversed() -> None:
    """(value / 255 - mean) / std on the channels in B, G, R order; the mean and std are the
    model's own, in its channel order."""
    shown = torch.from_numpy(np.asarray(random_image(8, 8))[None].copy())
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    pixels = shown.permute(0, 3, 1, 2).float() / 255
    by_hand = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    flipped = (pixels.flip(1) - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    cpu = torch.device("cpu")
    torch.testing.assert_close(normalize(shown, Preprocessing(8, 8, mean, std), cpu), by_hand)
    torch.testing.assert_close(normalize(shown, Preprocessing(8, 8, mean, std, bgr=True), cpu),
                               flipped)
