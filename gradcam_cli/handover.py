"""What one stage of a run hands the next, as plain data.

* ``DecodedBatch``: decode processes -> model process (through the DataLoader, in shared
  memory): the crops of a batch of images as the model sees them, and the files that did not
  decode.
* ``ImageJob`` (with a ``FigureJob`` per layer): model process -> render processes: all a
  figure needs as arrays and strings, so a render process never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class DecodedBatch:
    """A batch of decoded images: their positions in the run's share of images, their crops
    as one (B, H, W, 3) uint8 tensor (None when no file decoded), and (position, error) for
    each file that did not decode."""

    positions: list[int]
    shown: torch.Tensor | None
    failed: list[tuple[int, str]]

    def pin_memory(self) -> DecodedBatch:
        """The DataLoader's hook for custom batches (pin_memory=True on CUDA)."""
        return replace(self, shown=None if self.shown is None else self.shown.pin_memory())


@dataclass
class FigureJob:
    """One figure of one image: its file, the maps as uint8 colour indices, the titles."""

    path: Path
    maps: np.ndarray                  # (K, H, W) uint8: round(map * 255), as the overlay uses
    titles: list[str]
    heading: str
    guided: np.ndarray | None = None   # (K, H, W, 3) uint8: the Guided Grad-CAM row


@dataclass
class ImageJob:
    """Every file of one image: its figures (one per layer) and, with --save_raw, its npz."""

    index: int
    image_title: str
    shown: np.ndarray                 # (H, W, 3) uint8: the image as the model saw it
    layout: tuple[int, int, bool]     # FigureWriter's (n_maps, panel, guided_row)
    figures: list[FigureJob]
    raw_path: Path | None = None
    raw_maps: dict[str, np.ndarray] = field(default_factory=dict)
    classes: np.ndarray | None = None
    probabilities: np.ndarray | None = None

    def paths(self) -> list[Path]:
        """Every file this job writes."""
        return [f.path for f in self.figures] + ([self.raw_path] if self.raw_path else [])
