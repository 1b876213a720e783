"""Figures out: heatmap overlays, titles and the composed figure, as RGB pixel arrays.

Pure drawing: numpy arrays in, numpy arrays out. Writing them to disk is ``outputs.py``'s job,
so nothing here touches files (``show_figure`` opens a window for --show).
Colours are RGB everywhere.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Run:
    """A piece of a line drawn alone: its coverage, its bbox's vertical extent (26.6 fixed
    point) and the pen position of its last glyph, which is the joining space: whole pixels
    and the 1/64 pixel phase left over."""

    coverage: np.ndarray
    y_max: int
    y_min: int
    space_pen: int
    phase: int


@dataclass(frozen=True)
class _Tail:
    """A line's part after its last space, cut from a line whose space pen had a given phase:
    its columns from ``offset`` pixels right of the space's whole pixel, with the row of that
    line's bbox top."""

    coverage: np.ndarray
    y_max: int
    offset: int


# Bidi classes that can reorder a line's glyphs across its spaces (right-to-left scripts,
# explicit embeddings and isolates): such lines are always drawn whole.
_REORDERING = frozenset({"R", "AL", "AN", "RLE", "RLO", "RLI", "LRE", "LRO", "LRI", "FSI",
                         "PDF", "PDI"})


def _joinable(text: str) -> bool:
    """Whether a line may be drawn as parts: no right-to-left run, which can reorder glyphs
    across a space, and no combining mark, whose shaping depends on the script of the
    characters around it (so a part drawn alone can be shaped otherwise)."""
    if text.isascii():
        return True
    return not any(unicodedata.bidirectional(c) in _REORDERING
                   or unicodedata.category(c) in ("Mn", "Mc", "Me") for c in text)


_DIGITS = "0123456789"
_INNER_DIGIT = re.compile(r"(?<=[ -~])[0-9](?=[ -~])")  # a digit between two ASCII characters


class _TextPainter:
    """Black text on white, rasterised by matplotlib's own font engine (FreeType, DejaVu Sans).

    Going to the font directly instead of through a Figure's text artists makes a title cost a
    fraction of a millisecond. Lines are cached, since labels and headings repeat, and so are
    widths. Every title carries its own probability, so widths are cached under a key where
    each digit between two ASCII characters reads 0: where the font gives every digit the same
    advance and no kerning against ASCII (checked when the painter is made), the key and the
    text have the same width, and word wrapping rarely asks the font again.
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
        self._run = functools.lru_cache(maxsize=8192)(self._run_uncached)
        self._widths: dict[str, int] = {}
        self._tails: dict[tuple[int, str], _Tail | None] = {}
        self._digits_alike = self._digits_interchangeable()

    def _measure(self, text: str) -> int:
        self._font.set_text(text, 0.0)
        return int(np.ceil(self._font.get_width_height()[0] / 64))

    def _digits_interchangeable(self) -> bool:
        """Whether swapping one digit for another inside an ASCII string keeps its width."""
        from matplotlib.ft2font import Kerning
        if len({self._measure(f"a{d}a") for d in _DIGITS}) != 1:
            return False
        index = self._font.get_char_index
        neighbours = [index(code) for code in range(32, 127)]
        for digit in (index(ord(d)) for d in _DIGITS):
            for other in neighbours:
                if (self._font.get_kerning(digit, other, Kerning.DEFAULT)
                        or self._font.get_kerning(other, digit, Kerning.DEFAULT)):
                    return False
        return True

    def _width_key(self, text: str) -> str:
        return _INNER_DIGIT.sub("0", text) if self._digits_alike else text

    def width(self, text: str) -> int:
        key = self._width_key(text)
        width = self._widths.get(key)
        if width is None:
            if len(self._widths) >= 65536:
                self._widths.clear()
            width = self._widths[key] = self._measure(text)
        return width

    def _render_line(self, text: str) -> tuple[np.ndarray, int]:
        """(coverage (h, w) uint8, baseline row) of one line.

        A title's label and probability repeat in other combinations, so a line is joined
        from its part up to the last space and the part after it, each drawn once. The font
        lays a line out additively, so the parts keep their glyphs' 1/64 pixel phases where
        the space sits on a whole pixel. Where it does not, the part after the space is cut
        from the font's own drawing of the line, checked, and kept for that phase (None kept
        where the check failed: such lines are always drawn whole).
        """
        head, space, tail = text.rpartition(" ")
        if not (space and head and tail and _joinable(text)):
            return self._draw(text)
        front, back = self._run(head + " "), self._run(" " + tail)
        if front is None or back is None:
            return self._draw(text)
        key = (front.phase, tail)
        part = _Tail(back.coverage, back.y_max, 0) if front.phase == 0 else self._tails.get(key)
        if part is not None:
            joined = self._join(front, part, back)
            if joined is not None:
                return joined
        line = self._draw(text)
        if front.phase != 0 and (part is not None or key not in self._tails):
            if len(self._tails) >= 65536:
                self._tails.clear()
            self._tails[key] = self._cut_tail(line, front, back)
        return line

    def _draw(self, text: str) -> tuple[np.ndarray, int]:
        """The font's own rendering of a whole line."""
        self._font.set_text(text, 0.0)
        self._font.draw_glyphs_to_bitmap(antialiased=True)
        coverage = np.array(self._font.get_image(), dtype=np.uint8)
        return coverage, coverage.shape[0] - int(round(self._font.get_descent() / 64))

    def _run_uncached(self, text: str) -> _Run | None:
        """``text`` (with a space at one end) drawn alone, or None where it cannot be joined."""
        positions = self._font.set_text(text, 0.0)
        if self._font.get_bitmap_offset()[0] != 0 or len(positions) != len(text):
            return None  # ink left of the pen's start, or glyphs shaped across characters
        self._font.draw_glyphs_to_bitmap(antialiased=True)
        descent = self._font.get_descent()
        pen = int(positions[-1, 0])
        return _Run(np.array(self._font.get_image(), dtype=np.uint8),
                    y_max=self._font.get_width_height()[1] - descent, y_min=-descent,
                    space_pen=pen // 64, phase=pen % 64)

    def _cut_tail(self, line: tuple[np.ndarray, int], front: _Run, back: _Run) -> _Tail | None:
        """The part of ``line`` right of ``front``'s ink, if it holds all of the part after
        the space and the line is exactly ``front`` with it beside; else None.

        Drawn at a phase above 0, the part's ink lies no further left than drawn alone (at
        phase 0, ``back``), so a cut that starts no later than that keeps all of it."""
        coverage, baseline = line
        inked = np.flatnonzero(front.coverage.any(axis=0))
        column = max(int(inked[-1]) + 1 if inked.size else 0, front.space_pen)
        back_inked = np.flatnonzero(back.coverage.any(axis=0))
        if back_inked.size and column > front.space_pen + int(back_inked[0]):
            return None
        cut = _Tail(coverage[:, column:].copy(), max(front.y_max, back.y_max),
                    offset=column - front.space_pen)
        rebuilt = self._join(front, cut, back)
        if rebuilt is None or rebuilt[1] != baseline or not np.array_equal(rebuilt[0], coverage):
            return None
        return cut

    def _join(self, front: _Run, part: _Tail, back: _Run) -> tuple[np.ndarray, int] | None:
        """The line ``front`` + ``part`` (placed ``part.offset`` pixels right of the space's
        whole pixel), as the font would draw it; None where the part reaches outside it or
        both ink one pixel (then the font draws it). ``back``, the run after the space drawn
        alone, gives the line's vertical extent.

        The font places every glyph at a whole pixel: column = glyph left - bbox xMin (0 where
        the line has a space and no ink left of the pen), row = floor(bbox yMax) + 1 - glyph
        top, in a (yMax - yMin) / 64 + 2 by (xMax - xMin) / 64 + 2 image. So each part's pixels
        move by whole pixels into the line's image.
        """
        column = front.space_pen + part.offset
        parts = [(front.coverage, front.y_max, 0), (part.coverage, part.y_max, column)]
        y_max, y_min = max(front.y_max, back.y_max), min(front.y_min, back.y_min)
        height = (y_max - y_min) // 64 + 2
        width = max(front.coverage.shape[1], column + part.coverage.shape[1])
        line = np.zeros((height, width), dtype=np.uint8)
        for coverage, top, column in parts:
            row = y_max // 64 - top // 64
            inside = coverage[:max(height - row, 0)]
            if row < 0 or inside.sum() != coverage.sum():
                return None
            region = line[row:row + inside.shape[0], column:column + inside.shape[1]]
            if np.logical_and(region, inside).any():  # two parts ink one pixel
                return None
            region |= inside
        return line, height - int(round(-y_min / 64))

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

        ``image`` is (H, W, 3) uint8 with H = W = ``panel``; ``heatmaps`` is (K, H, W) in [0, 1]
        or uint8 colour indices (``colour_indices``), which give the same figure;
        ``guided`` (K, H, W, 3) uint8 fills a second row (Guided Grad-CAM) under the overlays.
        """
        figure = self._blank.copy()
        if heading:
            self._heading.paint(figure, heading, self.width // 2, 4 + self._heading.line_height
                                - self._heading.line_height // 4)
        line = self._title.line_height
        for slot, title in enumerate([image_title] + list(titles)):
            lines = self._fit(title)
            for row, text in enumerate(lines):
                baseline = self.BAND - 6 - (len(lines) - 1 - row) * line
                self._title.paint(figure, text, self._panel_left(slot) + self.panel // 2,
                                  baseline)
        self._paste_panels(figure, image, heatmaps)
        if guided is not None:
            self._paint_guided_row(figure, guided)
        return figure

    def _paste_panels(self, figure: np.ndarray, image: np.ndarray,
                      heatmaps: np.ndarray) -> None:
        """The image, then each heatmap's overlay, blended straight into the figure."""
        rows = slice(self.BAND, self.BAND + self.panel)
        figure[rows, self.GAP:self.GAP + self.panel] = image
        for slot, indices in enumerate(colour_indices(np.asarray(heatmaps)), start=1):
            left = self._panel_left(slot)
            _blend_into(figure[rows, left:left + self.panel], image, indices, OVERLAY_ALPHA)

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
