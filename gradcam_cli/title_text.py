"""Title text: lines drawn by matplotlib's own font engine, pixel for pixel, at a fraction
of its cost.

A figure has a dozen short lines (the image's path, a label and a probability per class, a
heading). Asking the font for every one costs about a millisecond each, so ``TextPainter``
keeps what repeats: word widths (digits read alike), whole lines, and the parts of a line on
either side of its last space, joined only where the join is exactly the font's own drawing.
"""

from __future__ import annotations

import functools
import itertools
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Iterator

import numpy as np


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


class TextPainter:
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
        self._probes: dict[int, str | None] = {}
        self._kerned: dict[int, list[str]] | None = None
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
        from the font's drawing of a short probe line whose space has the same phase (or,
        failing that, of the line itself), checked, and kept for that phase (None kept where
        the line's own check failed: such lines are always drawn whole).
        """
        head, space, tail = text.rpartition(" ")
        if not (space and head and tail and _joinable(text)):
            return self._draw(text)
        front, back = self._run(head + " "), self._run(" " + tail)
        if front is None or back is None or not back.coverage.any():
            # An inkless last word (a thin space, a zero-width joiner) makes the part claim a
            # column the font's own line does not have: such lines are drawn whole.
            return self._draw(text)
        key = (front.phase, tail)
        if front.phase == 0:
            part = _Tail(back.coverage, back.y_max, 0)
        else:
            part = self._tails.get(key)
            if part is None and key not in self._tails:
                part = self._tail_from_probe(front.phase, tail, back)
                if part is not None:
                    self._keep_tail(key, part)
        if part is not None:
            joined = self._join(front, part, back)
            if joined is not None:
                return joined
        line = self._draw(text)
        if front.phase != 0 and (part is not None or key not in self._tails):
            cut = self._cut_tail(line, front, back)
            if cut is not None or part is None:  # a part that failed only here is kept
                self._keep_tail(key, cut)
        return line

    def _keep_tail(self, key: tuple[int, str], part: _Tail | None) -> None:
        if len(self._tails) >= 65536:
            self._tails.clear()
        self._tails[key] = part

    def _tail_from_probe(self, phase: int, tail: str, back: _Run) -> _Tail | None:
        """The part ``tail`` as drawn after a space of ``phase``, cut from a probe line (a
        kerned pair or two, a space, ``tail``): a third of a title's glyphs to draw."""
        probe = self._probe_head(phase)
        if probe is None:
            return None
        return self._cut_tail(self._draw(f"{probe} {tail}"), self._run(probe + " "), back)

    def _probe_head(self, phase: int) -> str | None:
        """A short text whose run ends in a space at ``phase``/64 pixel: one kerned pair, or
        two apart, checked with the font; None where no candidate gives that phase."""
        if phase not in self._probes:
            candidates = itertools.islice(self._probe_candidates(phase), 8)
            self._probes[phase] = next(
                (text for text in candidates
                 if (run := self._run(text + " ")) is not None and run.phase == phase), None)
        return self._probes[phase]

    def _probe_candidates(self, phase: int) -> Iterator[str]:
        """Texts whose kerning adds up to ``phase`` (mod 64): first single pairs, then two."""
        if self._kerned is None:
            self._kerned = self._kerned_pairs()
        yield from self._kerned.get(phase, [])[:3]
        for first, pairs in self._kerned.items():
            for second in self._kerned.get((phase - first) % 64, [])[:1]:
                yield f"{pairs[0]} {second}"

    def _kerned_pairs(self) -> dict[int, list[str]]:
        """Letter pairs the font kerns, by the 1/64 pixel phase their kerning leaves."""
        from matplotlib.ft2font import Kerning
        index = {c: self._font.get_char_index(ord(c)) for c in string.ascii_letters}
        pairs: dict[int, list[str]] = {}
        for left, right in itertools.product(string.ascii_letters, repeat=2):
            kerning = self._font.get_kerning(index[left], index[right], Kerning.UNFITTED)
            if kerning % 64:
                pairs.setdefault(kerning % 64, []).append(left + right)
        return pairs

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
