"""Figure pixels: the composed figures match reference figures drawn by the earlier renderer.

The PNG files in tests/figures/ were drawn by figures.py as of commit 7db66bd (a per-pixel
float32 blend, and the font asked for every width), with this one-liner:

    git show 7db66bd:figures.py > /tmp/figures_7db66bd.py && python tests/test_figures.py /tmp/figures_7db66bd.py

The current renderer caches widths and blends through lookup tables; it must give the same
pixels exactly (PNG is lossless, so no tolerance is needed). The inputs are made with exact
integer and float arithmetic only, so they are the same on every machine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_cli.title_text import TextPainter

REFERENCES = Path(__file__).resolve().parent / "figures"

RANKS = ["1. tiger cat 38.1%", "2. tabby 20.4%", "3. Egyptian cat 12.9%",
         "lowest: African hunting dog 6.6e-05%"]
LONG = ["1. Rhodesian ridgeback hound of the southern African plains and hills 0.0003%",
        "2. tiny 2.1e-07%",
        "3. against Chesapeake Bay retriever, a long-haired hunting dog 100.0%",
        "lowest: supercalifragilisticexpialidociousnessword 0.1%"]
SHARED = [f"{t} (peak {p:.3g})" for t, p in zip(RANKS, [0.0123, 4.5e-06, 1.0, 0.000178])]
NON_LATIN = ["1. кошка тигровая 38.1%", "2. γάτα 12.5%", "3. chat tigré 9.9%",
             "lowest: גמל 0.0051%"]

CASES = {  # name: (panel, titles, image title, heading, guided row)
    "ranks": (224, RANKS, "tabby/chelsea.png", "Grad-CAM at layer 1 (_conv_head)", False),
    "long_labels": (224, LONG, "a folder with spaces/and a rather long file name.jpeg",
                    "Counterfactual Grad-CAM++ at layer-features.28", False),
    "shared_scale": (224, SHARED, "flat/0001.png", "HiResCAM at layer 3", False),
    "non_latin": (224, NON_LATIN, "кошки/фото.png", "LayerCAM at layer 1", False),
    "guided_small": (96, RANKS, "tabby/chelsea.png", "Grad-CAM at layer 1", True),
}


def case_inputs(panel: int, n_maps: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, heatmaps (K, H, W) float32 in [0, 1], guided (K, H, W, 3) uint8),
    made with exact arithmetic so every machine gets the same bits."""
    y, x = np.mgrid[0:panel, 0:panel].astype(np.int64)
    bx, by = x * 8 // panel, y * 8 // panel  # 8 x 8 blocks keep the PNG files small
    image = np.stack([bx * 255 // 7, by * 255 // 7, (bx + by) % 2 * 200 + 20],
                     axis=-1).astype(np.uint8)
    heatmaps = []
    for k in range(n_maps):
        cx, cy = panel * (k + 1) // (n_maps + 1), panel * (n_maps - k) // (n_maps + 1)
        rings = ((x - cx) ** 2 + (y - cy) ** 2) * 16 // (panel * panel // 4)  # 0, 1, 2, ...
        heatmaps.append(np.clip(np.float32(1) - rings.astype(np.float32) / np.float32(16),
                                0, 1).astype(np.float32))
    guided = np.stack([np.stack([bx * (k + 3) * 9 % 256, by * (k + 5) * 9 % 256,
                                 (bx ^ by) * 30 % 256], axis=-1)
                       for k in range(n_maps)]).astype(np.uint8)
    return image, np.stack(heatmaps), guided


def draw(figures_module, name: str, uint8_maps: bool = False) -> np.ndarray:
    """Compose the named case with the given figures module."""
    panel, titles, image_title, heading, guided_row = CASES[name]
    image, heatmaps, guided = case_inputs(panel, len(titles))
    if uint8_maps:
        heatmaps = np.clip(heatmaps * 255.0 + 0.5, 0, 255).astype(np.uint8)
    writer = figures_module.FigureWriter(n_maps=len(titles), panel=panel, guided_row=guided_row)
    return writer.compose(image, heatmaps, titles, image_title, heading,
                          guided=guided if guided_row else None)


def reference(name: str) -> np.ndarray:
    return np.asarray(Image.open(REFERENCES / f"{name}.png").convert("RGB"))


@pytest.fixture(scope="module")
def figures_module():
    from gradcam_cli import figures
    return figures


@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_matches_the_earlier_renderer_exactly(figures_module, name: str) -> None:
    """Same pixels as the reference: layout, wrapping, ellipsis, probabilities, overlays."""
    drawn = draw(figures_module, name)
    expected = reference(name)
    assert drawn.shape == expected.shape
    differing = np.argwhere((drawn != expected).any(axis=-1))
    assert differing.size == 0, f"{len(differing)} pixels differ, first at {differing[:3]}"


@pytest.mark.parametrize("name", ["ranks", "guided_small"])
def test_uint8_colour_indices_give_the_float_maps_figure(figures_module, name: str) -> None:
    """Render processes get uint8 maps; the figure must not change."""
    assert np.array_equal(draw(figures_module, name, uint8_maps=True), reference(name))


def test_repeated_titles_with_other_probabilities_still_match(figures_module) -> None:
    """Widths come from a cache keyed with digits set to 0: a second figure whose titles differ
    only in their digits must wrap exactly as a fresh writer would."""
    panel, titles, image_title, heading, _ = CASES["long_labels"]
    image, heatmaps, _ = case_inputs(panel)
    writer = figures_module.FigureWriter(n_maps=4, panel=panel)
    writer.compose(image, heatmaps, titles, image_title, heading)
    other = [t.replace("0.0003%", "9.8765%").replace("0.1%", "71.4%") for t in titles]
    fresh = figures_module.FigureWriter(n_maps=4, panel=panel)
    fresh._title._digits_alike = False  # the plain path: every width asked of the font
    assert np.array_equal(writer.compose(image, heatmaps, other, image_title, heading),
                          fresh.compose(image, heatmaps, other, image_title, heading))


def test_digit_free_width_keys_keep_the_font_width(figures_module) -> None:
    """The width cache's key (inner digits read 0) measures the same as the text itself."""
    painter = TextPainter(9, bold=False, dpi=100)
    assert painter._digits_alike
    texts = ["1. tiger cat 38.1%", "lowest: African hunting dog 6.6e-05%", "1.000)",
             "(peak 0.0123)", "9%", "x7y", "27.3% (peak 4.56e-06)", "γάτα 12.5%", "7 a 1",
             "bay 42 3", "0.0003%", "100.0%", "F-16 jet"]
    for text in texts:
        assert painter._measure(painter._width_key(text)) == painter._measure(text), text


def test_lines_joined_from_cached_parts_equal_the_fonts_own_drawing(figures_module) -> None:
    """A title line is drawn as its cached label part and its probability part, joined at the
    space: for real labels (every 7th ImageNet label, whole and first name), with ranks,
    probabilities and peaks, the pixels and baseline equal the font's drawing of the line."""
    from gradcam_cli.labels import default_labels
    painter = TextPainter(9, bold=False, dpi=100)
    lines = []
    for i, label in enumerate(default_labels(1000)[::7]):
        probability = figures_module.format_probability(0.9 ** (i % 120))
        lines += [f"{i % 3 + 1}. {label.split(',')[0]} {probability}", label,
                  f"against {label.split(',')[0]} {probability} (peak {0.37 ** i:.3g})"]
    lines += ["2. γάτα 12.5%", "кошка 0.0051%", "lowest: גמל 0.0051%",  # right-to-left and
              "3\u0301 x", "66\u0301 z", "café 4.0%",  # combining marks: drawn whole
              "tabby \u2009", "Eώ*3/}g \u2009", "ά0γ \u200d", "x \u200b", "dog \u3000",
              "AV \u00a0"]  # an inkless last word: drawn whole
    for line in lines:
        joined, baseline = painter._render_line(line)
        whole, whole_baseline = painter._draw(line)
        assert baseline == whole_baseline and np.array_equal(joined, whole), line


@pytest.mark.parametrize("points, bold", [(9, False), (10, True)])  # titles, headings
def test_probability_parts_cut_at_a_space_off_the_pixel_grid_equal_the_fonts_drawing(
        points: float, bold: bool) -> None:
    """Where a label ends off the pixel grid (kerning), the probability part is cut from the
    font's drawing of a short probe line whose space has the same 1/64 pixel phase, and joined
    to every label ending at that phase: every ImageNet label's first name with four
    probabilities equals the font's own line, in the titles' and the headings' painters, and
    the parts, cut from probe lines, are reused across labels."""
    from gradcam_cli.labels import default_labels
    painter = TextPainter(points, bold=bold, dpi=100)
    cut_lines = []
    drawn = painter._draw
    painter._draw = lambda text: cut_lines.append(text) or drawn(text)
    lines = [f"{rank}. {label.split(',')[0]} {probability}"
             for probability in ("4.0%", "37.7%", "0.0051%", "1.7e-59%")
             for rank, label in zip(["1", "2", "3", "lowest:"] * 250, default_labels(1000))]
    for line in lines:
        joined, baseline = painter._render_line(line)
        whole, whole_baseline = drawn(line)
        assert baseline == whole_baseline and np.array_equal(joined, whole), line
    fronts = {line: painter._run(line.rpartition(" ")[0] + " ") for line in lines}
    off_grid = [line for line, front in fronts.items() if front is not None and front.phase]
    assert len(off_grid) > 300
    assert len(off_grid) - len(cut_lines) > len(off_grid) // 5  # parts reused across lines
    # Parts come from short probe lines (a kerned pair or two and the probability), not from
    # drawing the title itself: only a few off-grid titles were drawn whole.
    assert len(set(off_grid) & set(cut_lines)) < len(off_grid) // 20
    assert all(len(text) < 20 for text in set(cut_lines) - set(lines))


def test_overlay_matches_the_float_blend_for_every_index_and_value(figures_module) -> None:
    """Every (colour index, image value) pair, per channel, equals the float32 formula."""
    lut = figures_module._jet_lut()
    index, value = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.repeat(value.astype(np.uint8)[..., None], 3, axis=-1)
    heatmap = index.astype(np.uint8)
    expected = np.clip(0.5 * image.astype(np.float32) + 0.5 * lut[heatmap] + 0.5, 0, 255)
    assert np.array_equal(figures_module.overlay(image, heatmap), expected.astype(np.uint8))
    as_float = (index / 255.0).astype(np.float32)
    assert np.array_equal(figures_module.overlay(image, as_float), expected.astype(np.uint8))


def test_overlay_at_another_alpha_matches_the_float_blend(figures_module) -> None:
    """Alphas other than 0.5 go through the per-channel tables: still the float32 formula."""
    lut = figures_module._jet_lut()
    index, value = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.stack([value, 255 - value, (value * 7) % 256], axis=-1).astype(np.uint8)
    heatmap = index.astype(np.uint8)
    blended = 0.7 * image.astype(np.float32) + 0.3 * lut[heatmap]
    expected = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(figures_module.overlay(image, heatmap, alpha=0.3), expected)


def write_references(figures_path: str) -> None:
    """Draw every case with the figures module at ``figures_path`` into tests/figures/."""
    spec = importlib.util.spec_from_file_location("reference_figures", figures_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    REFERENCES.mkdir(exist_ok=True)
    for name in CASES:
        Image.fromarray(draw(module, name)).save(REFERENCES / f"{name}.png", optimize=True)
        print(REFERENCES / f"{name}.png")


if __name__ == "__main__":
    write_references(sys.argv[1])
