"""Images in (listing, decoding, preprocessing), labels, and figures out (matplotlib overlays).

Preprocessing is defined here: ``Preprocessing`` holds the resize, centre crop and normalisation
a model expects, and ``prepare_image`` applies it. To change how images are prepared, pass a
different ``Preprocessing`` (models.py picks one per model) or edit ``prepare_image``.
Colours are RGB everywhere.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
IMAGENET_LABELS_PATH = Path(__file__).resolve().parent / "imagenet1000_labels.txt"
OVERLAY_ALPHA = 0.5


class InputError(Exception):
    """A user mistake in the images or labels given, with a message that says what to do."""


# ----------------------------------------------------------------------------- images in

@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop a square, scale to [0, 1], normalise per channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


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


def prepare_image(image: Image.Image, preprocessing: Preprocessing
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model sees it: (uint8 RGB crop (H, W, 3), float32 input (3, H, W))."""
    resample = _PIL_FILTERS[preprocessing.interpolation]
    width, height = image.size
    scale = preprocessing.resize / min(width, height)
    size = (max(preprocessing.crop, round(width * scale)),
            max(preprocessing.crop, round(height * scale)))
    resized = image.resize(size, resample)
    left = (size[0] - preprocessing.crop) // 2
    top = (size[1] - preprocessing.crop) // 2
    crop = resized.crop((left, top, left + preprocessing.crop, top + preprocessing.crop))
    shown = np.asarray(crop, dtype=np.uint8)
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    model_input = ((shown.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return shown, np.ascontiguousarray(model_input)


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


def format_probability(probability: float) -> str:
    """A percentage that stays informative when tiny: 37.7%, 0.0003%, 2.1e-07%."""
    percent = probability * 100.0
    if percent >= 0.1:
        return f"{percent:.1f}%"
    if percent >= 1e-4:
        return np.format_float_positional(percent, precision=1, unique=False,
                                          fractional=False, trim="-") + "%"
    return f"{percent:.1e}%"


# ----------------------------------------------------------------------------- figures out

@functools.lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    """matplotlib's jet colour map as a (256, 3) RGB lookup table."""
    from matplotlib import colormaps
    return (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with the jet colour map, over a uint8 RGB image."""
    colours = _jet_lut()[np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def guided_to_rgb(guided: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) guided gradients -> (..., H, W, 3) uint8 for display.

    Each map is centred on its mean and scaled by its standard deviation (times 0.1 around
    mid-grey), the usual way to make input gradients visible.
    """
    axes = (-3, -2, -1)
    centred = guided - guided.mean(axis=axes, keepdims=True)
    scaled = centred / (centred.std(axis=axes, keepdims=True) + 1e-8) * 0.1 + 0.5
    pixels = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)


class _TextPainter:
    """Black text on white, rasterised by matplotlib's own font engine (FreeType, DejaVu Sans).

    Going to the font directly instead of through a Figure's text artists makes a title cost a
    fraction of a millisecond; lines are cached, since labels and headings repeat.
    """

    def __init__(self, points: float, bold: bool, dpi: int) -> None:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font
        properties = font_manager.FontProperties(family="DejaVu Sans",
                                                 weight="bold" if bold else "normal")
        self._font = FT2Font(font_manager.findfont(properties))
        self._font.set_size(points, dpi)
        self.line_height = int(round(points * dpi / 72 * 1.25))
        self._render = functools.lru_cache(maxsize=4096)(self._render_line)

    def width(self, text: str) -> int:
        self._font.set_text(text, 0.0)
        return int(np.ceil(self._font.get_width_height()[0] / 64))

    def _render_line(self, text: str) -> tuple[np.ndarray, int]:
        """(coverage (h, w) uint8, baseline row) of one line."""
        self._font.set_text(text, 0.0)
        self._font.draw_glyphs_to_bitmap(antialiased=True)
        coverage = np.array(self._font.get_image(), dtype=np.uint8)
        return coverage, coverage.shape[0] - int(round(self._font.get_descent() / 64))

    def paint(self, canvas: np.ndarray, text: str, centre_x: int, baseline_y: int) -> None:
        """Draw one line centred on ``centre_x`` with its baseline on row ``baseline_y``."""
        coverage, baseline = self._render(text)
        height, width = coverage.shape
        top, left = baseline_y - baseline, centre_x - width // 2
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, canvas.shape[0]), min(left + width, canvas.shape[1])
        if y1 <= y0 or x1 <= x0:
            return
        ink = coverage[y0 - top:y1 - top, x0 - left:x1 - left, None]
        region = canvas[y0:y1, x0:x1]
        np.minimum(region, 255 - ink, out=region)


class FigureWriter:
    """Figures as RGB arrays: the image as the model saw it, then one overlay per class.

    Every panel is pasted at the model's own input resolution (no resampling), titles are drawn
    with matplotlib's font engine and colours come from its jet colour map. Nothing is laid out
    again per image, which keeps a figure's cost well below the model's.
    """

    GAP = 8
    BAND = 62
    DPI = 100

    def __init__(self, n_maps: int, panel: int, guided_row: bool = False) -> None:
        self.n_panels = n_maps + 1
        self.panel = panel
        self.guided_row = guided_row
        self.width = self.n_panels * panel + (self.n_panels + 1) * self.GAP
        self.height = panel + self.BAND + self.GAP + (panel + self.GAP if guided_row else 0)
        self._title = _TextPainter(9, bold=False, dpi=self.DPI)
        self._heading = _TextPainter(10, bold=True, dpi=self.DPI)
        self._blank = np.full((self.height, self.width, 3), 255, dtype=np.uint8)

    def _panel_left(self, slot: int) -> int:
        return self.GAP + slot * (self.panel + self.GAP)

    def _wrap(self, text: str) -> list[str]:
        """Greedy word wrap to the panel's width (a word wider than the panel stands alone)."""
        lines: list[str] = []
        for word in text.split():
            if lines and self._title.width(f"{lines[-1]} {word}") <= self.panel - 4:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        return lines

    def _fit(self, title: str) -> list[str]:
        """At most two lines; a long label is shortened, never the probability."""
        lines = self._wrap(title)
        head, _, tail = title.rpartition(" ")
        while len(lines) > 2 and len(head) > 4:
            head = head[:-2].rstrip()
            lines = self._wrap(f"{head}\u2026 {tail}")
        return lines[:2]

    def compose(self, image: np.ndarray, heatmaps: np.ndarray, titles: list[str],
                image_title: str, heading: str = "",
                guided: np.ndarray | None = None) -> np.ndarray:
        """The figure as a (height, width, 3) uint8 RGB array.

        ``image`` is (H, W, 3) uint8 with H = W = ``panel``; ``heatmaps`` is (K, H, W) in [0, 1];
        ``guided`` (K, H, W, 3) uint8 fills a second row (Guided Grad-CAM) under the overlays.
        """
        figure = self._blank.copy()
        if heading:
            self._heading.paint(figure, heading, self.width // 2, 4 + self._heading.line_height
                                - self._heading.line_height // 4)
        panels = [image] + [overlay(image, heatmap) for heatmap in heatmaps]
        line = self._title.line_height
        for slot, (pixels, title) in enumerate(zip(panels, [image_title] + list(titles))):
            left = self._panel_left(slot)
            lines = self._fit(title)
            for row, text in enumerate(lines):
                baseline = self.BAND - 6 - (len(lines) - 1 - row) * line
                self._title.paint(figure, text, left + self.panel // 2, baseline)
            figure[self.BAND:self.BAND + self.panel, left:left + self.panel] = pixels
        if guided is not None:
            self._paint_guided_row(figure, guided)
        return figure

    def _paint_guided_row(self, figure: np.ndarray, guided: np.ndarray) -> None:
        top = self.BAND + self.panel + self.GAP
        centre = self._panel_left(0) + self.panel // 2
        for row, text in enumerate(("Guided", "Grad-CAM")):
            self._title.paint(figure, text, centre, top + self.panel // 2
                              + row * self._title.line_height)
        for slot, pixels in enumerate(guided, start=1):
            left = self._panel_left(slot)
            figure[top:top + self.panel, left:left + self.panel] = pixels


def save_jpeg(figure: np.ndarray, path: Path, quality: int = 90) -> None:
    """Encode an RGB array as JPEG, atomically: a reader never sees a half-written file."""
    from outputs import atomic_path
    with atomic_path(path) as temporary:
        Image.fromarray(figure).save(temporary, format="JPEG", quality=quality)


def show_figure(figure: np.ndarray, title: str) -> None:
    """Open a figure array in a matplotlib window at its own pixel size; wait until closed."""
    import matplotlib.pyplot as plt
    height, width = figure.shape[:2]
    window = plt.figure(figsize=(width / FigureWriter.DPI, height / FigureWriter.DPI),
                        dpi=FigureWriter.DPI, num=title)
    window.figimage(figure)
    plt.show(block=True)
    plt.close(window)


def display_available() -> bool:
    """Whether matplotlib can open windows here (an interactive backend was found)."""
    import matplotlib
    import matplotlib.pyplot  # noqa: F401  (resolves the backend)
    from matplotlib.backends import BackendFilter, backend_registry
    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in {b.lower() for b in interactive}
