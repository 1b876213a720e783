"""Images in: listing an image folder and decoding each file to 8-bit RGB.

``list_images`` gives every image of --images_path a stable index (sorted by path, folder by
folder like torchvision's ImageFolder) and its folder class; ``load_rgb`` decodes one file,
whatever its mode. Preprocessing for the model is preprocessing.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")


@dataclass(frozen=True)
class ImageEntry:
    """One image of the run: its index in the sorted listing, path, and ImageFolder class."""

    index: int
    path: Path
    relative: str
    folder_label: str | None


def list_images(images_path: str | Path) -> list[ImageEntry]:
    """Image files under ``images_path``, sorted by relative path so indices are stable.

    ``images_path`` is an ImageFolder root (one subfolder per class), a flat folder of images,
    or a single image file. Files are chosen by extension; whether they decode is checked later.
    """
    root = Path(images_path)
    if not root.exists():
        raise InputError(f"--images_path {images_path}: no such file or folder")
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"--images_path {images_path}: not an image file "
                             f"(expected one of {', '.join(IMAGE_EXTENSIONS)})")
        return [ImageEntry(0, root, root.name, None)]
    files = sorted((p for p in root.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(root).parts)
    if not files:
        raise InputError(f"--images_path {images_path}: no images found (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)} files in it and its subfolders)")
    entries = []
    for index, path in enumerate(files):
        parts = path.relative_to(root).parts
        entries.append(ImageEntry(index, path, "/".join(parts),
                                  parts[0] if len(parts) > 1 else None))
    return entries


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully and make it 8-bit RGB, whatever its mode.

    Grayscale and palette images are expanded, transparency is composited over white, and 16-
    or 32-bit images are rescaled from their full range (a plain ``convert`` would clip them).
    Raises ``OSError`` (or ``ValueError``) for a file that is not a readable image.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            values = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
            if image.mode == "F":
                top = max(float(values.max()), 1e-12)
            gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
