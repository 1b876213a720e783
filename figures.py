"""Figures out: heatmap overlays, titles and the composed figure, as RGB pixel arrays.

Pure drawing: numpy arrays in, numpy arrays out. Writing them to disk is ``outputs.py``'s job,
so nothing here touches files (``show_figure`` opens a window for --show).
Colours are RGB everywhere.
"""

from __future__ import annotations

import functools

import numpy as np

OVERLAY_ALPHA = 0.5


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


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with the jet colour map, over a uint8 RGB image.
    A uint8 heatmap is taken as already quantised: round(map * 255), the colour index."""
    index = heatmap if heatmap.dtype == np.uint8 else \
        np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colours = _jet_lut()[index]
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
