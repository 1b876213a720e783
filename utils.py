"""Images in (listing, decoding, preprocessing) and labels (reading, matching names).

Preprocessing is defined here: ``Preprocessing`` holds the resize, centre crop and normalisation
a model expects; ``crop_image`` resizes and crops (in the decode processes), ``normalise``
scales a batch of crops on the model's device, and ``prepare_image`` does both for one image.
To change how images are prepared, pass a different ``Preprocessing`` (models.py picks one per
model) or edit ``crop_image`` and ``normalise``.
Colours are RGB everywhere.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
IMAGENET_LABELS_PATH = Path(__file__).resolve().parent / "imagenet1000_labels.txt"


class InputError(Exception):
    """A user mistake in the inputs given (images, labels, a model file), with a message
    that says what to do."""


# ----------------------------------------------------------------------------- images in

@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop a square, scale to [0, 1], normalise per channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def with_crop(self, crop: int) -> "Preprocessing":
        """The same preprocessing for another crop size, the resize scaled with it."""
        return replace(self, crop=crop, resize=round(crop * self.resize / self.crop))


IMAGENET_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                                       std=(0.229, 0.224, 0.225))
_PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
                "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


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


def crop_image(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """The image as the model sees it, before normalisation: resized and centre-cropped,
    (H, W, 3) uint8 RGB. This is what the decode processes hand over (a quarter of float32's
    bytes); the model process normalises it on its own device."""
    resample = _PIL_FILTERS[preprocessing.interpolation]
    width, height = image.size
    scale = preprocessing.resize / min(width, height)
    size = (max(preprocessing.crop, round(width * scale)),
            max(preprocessing.crop, round(height * scale)))
    resized = image.resize(size, resample)
    left = (size[0] - preprocessing.crop) // 2
    top = (size[1] - preprocessing.crop) // 2
    crop = resized.crop((left, top, left + preprocessing.crop, top + preprocessing.crop))
    return np.asarray(crop, dtype=np.uint8)


def prepare_image(image: Image.Image, preprocessing: Preprocessing
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model sees it: (uint8 RGB crop (H, W, 3), float32 input (3, H, W))."""
    import torch
    shown = crop_image(image, preprocessing)
    model_input = normalise(torch.from_numpy(shown[None].copy()), preprocessing,
                            torch.device("cpu"))
    return shown, model_input[0].numpy()


def normalise(shown, preprocessing: Preprocessing, device):
    """(B, H, W, 3) uint8 crops (a torch tensor) -> the (B, 3, H, W) float32 model input on
    ``device``: (value / 255 - mean) / std, torchvision's ToTensor and Normalize.

    A batch run calls this in the model process, on the model's device. The divisor is a
    tensor on the device, not a Python number: CUDA turns division by a CPU scalar into
    multiplication by its reciprocal, which rounds differently from the CPU."""
    import torch
    pixels = shown.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
    full_scale = torch.full((), 255.0, dtype=torch.float32, device=device)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device)[:, None, None]
    return pixels.div_(full_scale).sub_(mean).div_(std)


# ----------------------------------------------------------------------------- labels

def read_labels(labels_path: str | Path, n_classes: int) -> list[str]:
    """Read a ``{0: 'cat', 1: 'dog', ...}`` file safely (``ast.literal_eval``, never eval)."""
    path = Path(labels_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"--labels_path {labels_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--labels_path {labels_path}: cannot read it ({error})") from None
    try:
        labels = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise InputError(f"--labels_path {labels_path}: not a Python dict literal like "
                         f"{{0: 'cat', 1: 'dog'}} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'})") from None
    if not isinstance(labels, dict) or not labels:
        found = "an empty dict" if labels == {} else f"a {type(labels).__name__}"
        raise InputError(f"--labels_path {labels_path}: expected a dict like "
                         f"{{0: 'cat', 1: 'dog'}}, found {found}")
    if any(not isinstance(k, int) or isinstance(k, bool) for k in labels) \
            or sorted(labels) != list(range(len(labels))):
        raise InputError(f"--labels_path {labels_path}: the keys must be the integers "
                         f"0..{len(labels) - 1}, each once")
    if len(labels) != n_classes:
        raise InputError(f"--labels_path {labels_path} has {len(labels)} labels but the model "
                         f"has {n_classes} outputs; give a labels file with {n_classes} entries")
    return [str(labels[i]) for i in range(n_classes)]


def default_labels(n_classes: int) -> list[str]:
    """ImageNet names for a 1000-class model, else ``class i``."""
    if n_classes == 1000:
        return read_labels(IMAGENET_LABELS_PATH, n_classes)
    return [f"class {i}" for i in range(n_classes)]


def name_key(name: str) -> str:
    """Case, underscores and spacing do not matter when names are compared."""
    return ", ".join(" ".join(part.replace("_", " ").split())
                     for part in name.split(",")).lower()


class LabelIndex:
    """Class indices by name: a full label or any of its comma-separated names."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self._by_name: dict[str, int] = {}
        for index, label in enumerate(labels):
            for name in [label] + label.split(","):
                self._by_name.setdefault(name_key(name), index)

    def find(self, name: str | None, allow_index: bool = False) -> int | None:
        """The class a name stands for, else None. With ``allow_index`` a number in range is
        taken as an index, but only when no label is spelt that way."""
        if name is None:
            return None
        found = self._by_name.get(name_key(name))
        if found is None and allow_index and name.strip().isdecimal() \
                and int(name) < len(self.labels):
            found = int(name)
        return found

    def names(self, label: str) -> set[str]:
        """Every way ``label`` may be written: whole, or any of its comma-separated names."""
        return {name_key(name) for name in [label] + label.split(",")}

    def suggestions(self, name: str) -> list[str]:
        import difflib
        keys = difflib.get_close_matches(name_key(name), list(self._by_name), n=6)
        close = dict.fromkeys(self.labels[self._by_name[k]] for k in keys)
        return list(close)[:3]


def first_name(label: str) -> str:
    """'tench, Tinca tinca' -> 'tench'."""
    return label.split(",")[0].strip()
