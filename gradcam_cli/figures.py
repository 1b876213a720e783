"""Figures out: heatmap overlays, titles and the composed figure, as RGB pixel arrays.

Pure drawing: numpy arrays in, numpy arrays out. Writing them to disk is ``outputs.py``'s job,
so nothing here touches files (``show_figure`` opens a window for --show).
Colours are RGB everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

OVERLAY_ALPHA = 0.5
TITLE_POINTS = 9      # panel titles and the guided row's label, regular
HEADING_POINTS = 10   # the heading over the figure, bold


def format_probability(probability: float) -> str:
    """A percentage that stays informative when tiny: 37.7%, 0.0003%, 2.1e-07%."""
    percent = probability * 100.0
    if percent >= 0.1:
        return f"{percent:.1f}%"
    if percent >= 1e-4:
        return np.format_float_positional(percent, precision=1, unique=False,
                                          fractional=False, trim="-") + "%"
    return f"{percent:.1e}%"


@functools.lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    """matplotlib's jet colour map as a (256, 3) RGB lookup table."""
    from matplotlib import colormaps
    return (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _blend_tables(alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per RGB channel, a flat 65536-entry uint8 table: [colour index << 8 | image value].

    Each entry is the float32 blend ``(1 - alpha) * value + alpha * jet + 0.5``, clipped and
    truncated, computed once with the same operations a per-pixel float blend would use, so
    a lookup gives exactly the pixels of that blend at a fraction of its cost.
    """
    values = np.arange(256, dtype=np.float32)[None, :, None]
    blended = (1.0 - alpha) * values + alpha * _jet_lut()[:, None, :]
    table = np.clip(blended + 0.5, 0, 255).astype(np.uint8)  # (index, value, channel)
    return tuple(np.ascontiguousarray(table[..., c]).reshape(-1) for c in range(3))


def colour_indices(heatmaps: np.ndarray) -> np.ndarray:
    """[0, 1] heatmaps -> uint8 jet colour indices; uint8 input is taken as indices already.

    Maps can travel between processes in this form, a quarter of float32's bytes, and still
    give the same figure.
    """
    if heatmaps.dtype == np.uint8:
        return heatmaps
    scaled = heatmaps * 255.0  # the same float steps as np.clip(h * 255 + 0.5, 0, 255), in place
    scaled += 0.5
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _half_blend_colours() -> np.ndarray | None:
    """jet as (256, 3) uint8 whole numbers, where they make the alpha 0.5 blend exact.

    With alpha 0.5, the float blend is floor((value + jet + 1) / 2), which for whole-number
    ``jet`` is the rounded-up mean of two uint8s, (a | b) - ((a ^ b) >> 1): a few uint8 passes
    and no float at all. Used only if it reproduces every entry of the float blend.
    """
    colours = np.floor(_jet_lut()).astype(np.uint8)
    values = np.arange(256, dtype=np.uint8)[None, :, None]
    mean = (values | colours[:, None, :]) - ((values ^ colours[:, None, :]) >> 1)
    exact = np.stack([t.reshape(256, 256) for t in _blend_tables(0.5)], axis=-1)
    return colours if np.array_equal(mean, exact) else None


def _blend_into(out: np.ndarray, image: np.ndarray, indices: np.ndarray, alpha: float) -> None:
    """Write the overlay of colour ``indices`` (H, W) uint8 on ``image`` (H, W, 3) uint8 into
    ``out`` (H, W, 3) uint8: exactly the float32 blend of ``overlay``'s formula."""
    colours = _half_blend_colours() if alpha == 0.5 else None
    if colours is not None:
        jet = colours.take(indices, axis=0)
        np.subtract(image | jet, (image ^ jet) >> 1, out=out)
        return
    shifted = indices.astype(np.uint16) << 8
    planes = np.moveaxis(image, -1, 0).astype(np.uint16)
    for channel, table in enumerate(_blend_tables(alpha)):
        out[..., channel] = table.take(shifted | planes[channel])


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a heatmap, coloured with the jet colour map, over a uint8 RGB image.

    ``heatmap`` is (H, W) in [0, 1], or uint8 colour indices (see ``colour_indices``); both
    give the same pixels.
    """
    out = np.empty(image.shape, dtype=np.uint8)
    _blend_into(out, image, colour_indices(heatmap), float(alpha))
    return out


@functools.lru_cache(maxsize=2)
def font_path(bold: bool) -> Path:
    """DejaVu Sans (regular or bold) as matplotlib ships it: one file whatever fonts the
    system has, so titles look the same on every machine. Where a matplotlib was packaged
    without its fonts, its font manager finds DejaVu Sans (or its nearest) on the system."""
    import matplotlib
    path = (Path(matplotlib.get_data_path()) / "fonts" / "ttf"
            / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"))
    if path.is_file():
        return path
    from matplotlib import font_manager
    return Path(font_manager.findfont(font_manager.FontProperties(
        family="DejaVu Sans", weight="bold" if bold else "normal")))


class _Font:
    """One text style: a Pillow FreeType font at ``points`` and ``dpi`` (a float pixel size),
    its line step, and ``draw``, which puts a line's baseline on a given row.

    Pillow lays lines out with libraqm where it finds it (bidirectional text, shaping), else
    with its basic layout. ``draw`` puts a line RAISE rows above the baseline row it is given,
    where matplotlib's FT2Font, which drew the titles before, put them: the layout's rows
    (band, heading and guided label) are unchanged.
    """

    RAISE = 1

    def __init__(self, points: float, bold: bool, dpi: int) -> None:
        from PIL import ImageFont
        pixels = points * dpi / 72
        self.font = ImageFont.truetype(str(font_path(bold)), pixels)
        self.line_height = round(pixels * 1.25)

    def width(self, text: str) -> float:
        """The line's advance in pixels, as wide as ``draw`` lays it out."""
        return self.font.getlength(text)

    def draw(self, draw, text: str, centre_x: int, baseline_y: int) -> None:
        """Black ``text`` on ``draw``'s image, centred on ``centre_x``."""
        draw.text((centre_x, baseline_y - self.RAISE), text, fill=(0, 0, 0), font=self.font,
                  anchor="ms")


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


class FigureWriter:
    """Figures as RGB arrays: the image as the model saw it, then one overlay per class.

    Every panel is pasted at the model's own input resolution (no resampling), titles are drawn
    by Pillow (FreeType) in matplotlib's copy of DejaVu Sans, black on white, and colours come
    from matplotlib's jet colour map. Nothing is laid out again per image, which keeps a
    figure's cost well below the model's.
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
        self._title = _Font(TITLE_POINTS, bold=False, dpi=self.DPI)
        self._heading = _Font(HEADING_POINTS, bold=True, dpi=self.DPI)
        self._blank = np.full((self.height, self.width, 3), 255, dtype=np.uint8)
        self._headings: dict[str, str] = {}
        self._bands: dict = {}  # heading -> the band with it drawn (a PIL image)

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

    def _band_with(self, heading: str):
        """A white band with ``heading`` drawn, made once per heading: every figure of a
        layer and method has the same one, so only the titles are drawn per figure."""
        band = self._bands.get(heading)
        if band is None:
            from PIL import Image, ImageDraw
            band = Image.new("RGB", (self.width, self.BAND), (255, 255, 255))
            if heading:
                step = self._heading.line_height
                self._heading.draw(ImageDraw.Draw(band), self._fit_heading(heading),
                                   self.width // 2, 4 + step - step // 4)
            if len(self._bands) >= 64:
                self._bands.clear()
            self._bands[heading] = band
        return band

    def _fit_heading(self, heading: str) -> str:
        """The heading, shortened with an ellipsis where a narrow figure (one or two panels)
        would cut it off at both edges; headings repeat, so each is fitted once."""
        fitted = self._headings.get(heading)
        if fitted is None:
            fitted, room = heading, self.width - 2 * self.GAP
            while self._heading.width(fitted) > room and len(fitted) > 8:
                fitted = fitted[:-2].rstrip() + "\u2026"
                fitted = fitted.replace("\u2026\u2026", "\u2026")
            self._headings[heading] = fitted
        return fitted

    def compose(self, image: np.ndarray, heatmaps: np.ndarray, titles: list[str],
                image_title: str, heading: str = "",
                guided: np.ndarray | None = None) -> np.ndarray:
        """The figure as a (height, width, 3) uint8 RGB array.

        ``image`` is (H, W, 3) uint8 with H = W = ``panel``; ``heatmaps`` is (K, H, W) in [0, 1]
        or uint8 colour indices (``colour_indices``), which give the same figure;
        ``guided`` (K, H, W, 3) uint8 fills a second row (Guided Grad-CAM) under the overlays.
        """
        figure = self._blank.copy()
        self._paint_band(figure, titles, image_title, heading)
        self._paste_panels(figure, image, heatmaps)
        if guided is not None:
            self._paint_guided_row(figure, guided)
        return figure

    def _paint_band(self, figure: np.ndarray, titles: list[str], image_title: str,
                    heading: str) -> None:
        """The band above the panels: the heading, then each panel's title, centred on the
        panel, its last line's baseline 6 px above the panels, drawn into one white image that
        is copied straight into the figure (RGB: a greyscale one costs more to spread over
        three channels than its text to draw)."""
        from PIL import ImageDraw
        band = self._band_with(heading).copy()
        draw = ImageDraw.Draw(band)
        step = self._title.line_height
        for slot, title in enumerate([image_title] + list(titles)):
            lines = self._fit(title)
            centre = self._panel_left(slot) + self.panel // 2
            for row, text in enumerate(lines):
                self._title.draw(draw, text, centre,
                                 self.BAND - 6 - (len(lines) - 1 - row) * step)
        figure[:self.BAND] = np.asarray(band)

    def _paste_panels(self, figure: np.ndarray, image: np.ndarray,
                      heatmaps: np.ndarray) -> None:
        """The image, then each heatmap's overlay, blended straight into the figure."""
        rows = slice(self.BAND, self.BAND + self.panel)
        figure[rows, self.GAP:self.GAP + self.panel] = image
        for slot, indices in enumerate(colour_indices(np.asarray(heatmaps)), start=1):
            left = self._panel_left(slot)
            _blend_into(figure[rows, left:left + self.panel], image, indices, OVERLAY_ALPHA)

    def _paint_guided_row(self, figure: np.ndarray, guided: np.ndarray) -> None:
        from PIL import Image, ImageDraw
        top = self.BAND + self.panel + self.GAP
        # The label's cell: under the image, with the gaps around it (white), to the figure's
        # bottom edge, so a small panel's label is not cut at the panel's own edges.
        right, bottom = self._panel_left(1), self.height
        cell = Image.new("RGB", (right, bottom - top), (255, 255, 255))
        draw = ImageDraw.Draw(cell)
        centre = self._panel_left(0) + self.panel // 2
        for row, text in enumerate(("Guided", "Grad-CAM")):
            self._title.draw(draw, text, centre, self.panel // 2 + row * self._title.line_height)
        figure[top:bottom, :right] = np.asarray(cell)
        for slot, pixels in enumerate(guided, start=1):
            left = self._panel_left(slot)
            figure[top:top + self.panel, left:left + self.panel] = pixels


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
    import matplotlib.pyplot  # resolves the backend
    from matplotlib.backends import BackendFilter, backend_registry
    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return matplotlib.get_backend().lower() in {b.lower() for b in interactive}
