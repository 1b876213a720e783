"""A model with a data-dependent bug, for tests/test_faults.py (loaded with --trust_model)."""

from __future__ import annotations

import torch
from torch import nn


class FailsOnWhite(nn.Module):
    """A tiny CNN whose forward raises for a white image (ImageNet normalization maps white
    to more than 2 in every channel), as a custom model with a bug on some inputs would."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                                      nn.Conv2d(4, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.amin(dim=(1, 2, 3)) > 2.0).any()):
            raise ValueError("this model cannot take a white image")
        return self.head(self.features(x))
