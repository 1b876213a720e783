"""Command-line contract of main.py: figures, summary.csv, image handling, exit codes, errors.

Most tests call ``cli.main(argv)`` in-process with a tiny random model made of torch.nn
modules only (it loads without --trust_model and has three Conv2d layers and five classes);
a few end-to-end tests use the built-in EfficientNet-Lite0 on the sample photos in data/.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_cli import cli, launch, torchrun_group

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
IMAGENET_LABELS = ROOT / "imagenet1000_labels.txt"
N_SAMPLES = 5  # the photos in data/, one per class folder
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
SUMMARY_COLUMNS = ["index", "path", "folder_label", "top1", "top1_prob", "top2", "top2_prob",
                   "top3", "top3_prob", "lowest", "lowest_prob", "figures"]
FLAGS = ["--model_path", "--conv2d_backcount", "--images_path", "--save_dir", "--n_images",
         "--imageNet_labels", "--labels_path", "--show", "--arch", "--trust_model", "--device",
         "--list_layers"]
TINY_CONVS = 3
TINY_CLASSES = 5


# ----------------------------------------------------------------------------- helpers

@dataclass
class Result:
    """What one run of the tool gave: its exit code and what it wrote."""

    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.out.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def call_main(argv: list[str]) -> Result:
    """Run ``cli.main(argv)`` in-process, capturing stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(arg) for arg in argv])
    return Result(code, out.getvalue(), err.getvalue())


def final_counts(line: str) -> tuple[int, int]:
    """(processed, skipped) read from the run's final line, in either word order."""
    numbers = []
    for word in ("processed", "skipped"):
        found = (re.search(rf"{word}[:=\s]*(\d+)", line)
                 or re.search(rf"(\d+)\s+(?:images?(?:\(s\))?\s+)?{word}", line))
        assert found, f"no '{word}' count in the final line {line!r}"
        numbers.append(int(found.group(1)))
    return numbers[0], numbers[1]


def read_summary(save_dir: Path) -> list[dict[str, str]]:
    """summary.csv's rows, after checking its header."""
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames[:len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS
        assert all("_peak_" in name for name in reader.fieldnames[len(SUMMARY_COLUMNS):])
        return list(reader)


def jpgs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.jpg")}


def assert_valid_jpeg(path: Path) -> None:
    """PIL opens the file, says it is a JPEG, and verify() finds nothing wrong."""
    assert path.is_file(), f"{path.name} missing"
    with Image.open(path) as image:
        assert image.format == "JPEG"
        image.verify()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def overlay_band(path: Path) -> np.ndarray:
    """The middle of the overlay panels: below the titles, right of the first (image) panel."""
    figure = pixels(path)
    height, width = figure.shape[:2]
    return figure[int(0.30 * height):int(0.85 * height), int(0.22 * width):]


def assert_single_error_line(result: Result, *fragments: str) -> None:
    """Exit 2, one stderr line starting 'main.py: error:', no traceback, naming fragments."""
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("main.py: error:"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def random_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_images(folder: Path, names: list[str]) -> list[Path]:
    """Small random RGB images, one per name (format from the suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(seed=seed).save(path)
        paths.append(path)
    return paths


def huge_header_png() -> bytes:
    """A corrupt PNG whose header claims 30000 x 30000 pixels over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch.save()d nn.Sequential: three Conv2d layers, five classes, random weights."""
    import torch
    from torch import nn
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, TINY_CLASSES))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder root with three small images in two class folders."""
    root = tmp_path_factory.mktemp("images")
    write_images(root, ["cats/a.png", "cats/b.jpg", "dogs/c.png"])
    return root


@pytest.fixture(scope="module")
def builtin_all(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """The built-in model on every sample photo, once for the module."""
    save_dir = tmp_path_factory.mktemp("builtin") / "results"
    result = call_main(["--images_path", DATA, "--n_images", "all", "--save_dir", save_dir])
    return result, save_dir


# ----------------------------------------------------------------------------- built-in model

@pytest.mark.slow
def test_builtin_model_writes_a_valid_jpeg_per_sample_image(builtin_all: tuple[Result, Path]
                                                            ) -> None:
    """Default model, --n_images all: exit 0, image0..4.jpg are JPEGs, final line sums up."""
    result, save_dir = builtin_all
    assert result.code == 0, result.err
    for index in range(N_SAMPLES):
        assert_valid_jpeg(save_dir / f"image{index}.jpg")
    assert jpgs(save_dir) == {f"image{i}.jpg" for i in range(N_SAMPLES)}
    assert final_counts(result.last_line) == (N_SAMPLES, 0)
    assert str(save_dir) in result.last_line


def test_builtin_summary_has_plausible_predictions(builtin_all: tuple[Result, Path]) -> None:
    """summary.csv: a row per photo in sorted order; the cat and the espresso are recognised."""
    _, save_dir = builtin_all
    rows = read_summary(save_dir)
    assert [row["index"] for row in rows] == [str(i) for i in range(N_SAMPLES)]
    assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
    by_path = {row["path"]: row for row in rows}
    cat = by_path["tabby/chelsea.png"]
    assert cat["folder_label"] == "tabby"
    assert CAT_CLASSES & {cat["top1"], cat["top2"], cat["top3"]}
    coffee = by_path["espresso/coffee.png"]
    assert coffee["top1"] == "espresso"
    assert coffee["figures"] == "image0.jpg"
    for row in rows:
        top = [float(row[f"top{r}_prob"]) for r in (1, 2, 3)]
        lowest = float(row["lowest_prob"])
        assert all(0.0 <= p <= 1.0 for p in top + [lowest]), row
        assert top[0] >= top[1] >= top[2] > lowest, row
        assert sum(top) + lowest <= 1.0 + 1e-5, row


def test_figures_of_different_images_differ_and_are_wide(builtin_all: tuple[Result, Path]
                                                         ) -> None:
    """A figure is a row of panels (width > 3x height); two images give different figures."""
    _, save_dir = builtin_all
    first, second = pixels(save_dir / "image0.jpg"), pixels(save_dir / "image1.jpg")
    height, width = first.shape[:2]
    assert width > 3 * height
    assert height >= 150
    assert first.shape == second.shape
    assert np.abs(first - second).mean() > 5.0


@pytest.mark.slow
def test_spec_usage_one_layer_three_images_with_show(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """First usage of the spec: image0..2.jpg, one 'no display' warning, exit 0."""
    monkeypatch.chdir(ROOT)
    save_dir = tmp_path / "results"
    result = call_main(["--conv2d_backcount", "1", "--images_path", "data", "--labels_path",
                        "imagenet1000_labels.txt", "--n_images", "3", "--show",
                        "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {"image0.jpg", "image1.jpg", "image2.jpg"}
    warnings = [line for line in result.err_lines if "display" in line.lower()]
    assert len(warnings) == 1, result.err
    assert "warning" in warnings[0].lower()
    assert final_counts(result.last_line) == (3, 0)


@pytest.mark.slow
def test_spec_usage_three_layers_with_show(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Second usage of the spec: layer1/3/4.jpg for the first image, with different maps."""
    monkeypatch.chdir(ROOT)
    save_dir = tmp_path / "results"
    result = call_main(["--conv2d_backcount", "1", "3", "4", "--images_path", "data",
                        "--labels_path", "imagenet1000_labels.txt", "--show",
                        "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {"layer1.jpg", "layer3.jpg", "layer4.jpg"}
    bands = {b: overlay_band(save_dir / f"layer{b}.jpg") for b in (1, 3, 4)}
    for one, other in ((1, 3), (1, 4), (3, 4)):
        assert np.abs(bands[one] - bands[other]).mean() > 1.0, (one, other)
    rows = read_summary(save_dir)
    assert len(rows) == 1
    assert rows[0]["figures"].split(";") == ["layer1.jpg", "layer3.jpg", "layer4.jpg"]


def test_list_layers_builtin_model() -> None:
    """--list_layers: backcounts N..1 in the first column, _conv_head (1, 1280, 7, 7) last."""
    result = call_main(["--list_layers"])
    assert result.code == 0, result.err
    rows = [line.split() for line in result.out.splitlines()
            if line.strip() and line.split()[0].isdigit()]
    backcounts = [int(row[0]) for row in rows]
    assert len(backcounts) > 1
    assert backcounts == list(range(len(backcounts), 0, -1))
    last_conv = [line for line in result.out.splitlines() if line.split()[0] == "1"][0]
    assert last_conv.split()[1] == "_conv_head"
    assert "(1, 1280, 7, 7)" in last_conv
    # modules after the last conv with a 4-D output are listed too, without a backcount
    after = result.out.splitlines()[-1].split()
    assert after[0] == "-" and after[1] == "_avg_pooling" and "(1, 1280, 1, 1)" in \
        result.out.splitlines()[-1]


# ----------------------------------------------------------------------------- tiny model runs

def test_list_layers_counts_every_conv_in_run_order(tiny_model: Path) -> None:
    """Each Conv2d once, in run order, numbered back from the last, with its output shape."""
    result = call_main(["--model_path", tiny_model, "--list_layers"])
    assert result.code == 0, result.err
    rows = [line.split(None, 3) for line in result.out.splitlines()
            if line.strip() and line.split()[0].isdigit()]
    assert [(row[0], row[1], row[2]) for row in rows] == [("3", "0", "Conv2d"),
                                                          ("2", "2", "Conv2d"),
                                                          ("1", "4", "Conv2d")]
    assert [row[3].strip() for row in rows] == ["(1, 4, 111, 111)", "(1, 8, 55, 55)",
                                                "(1, 8, 53, 53)"]


def test_several_layers_and_images_name_figures_by_image_and_layer(
        tiny_model: Path, image_folder: Path, tmp_path: Path) -> None:
    """Two layers x two images: image{i}_layer{b}.jpg; labels from --labels_path in the csv."""
    labels = tmp_path / "labels.txt"
    labels.write_text(repr({i: f"thing{i}" for i in range(TINY_CLASSES)}), encoding="utf-8")
    save_dir = tmp_path / "deep" / "er" / "out"  # created, parents too
    result = call_main(["--model_path", tiny_model, "--images_path", image_folder,
                        "--conv2d_backcount", "1", "2", "--n_images", "2",
                        "--labels_path", labels, "--save_dir", save_dir])
    assert result.code == 0, result.err
    expected = {f"image{i}_layer{b}.jpg" for i in (0, 1) for b in (1, 2)}
    assert jpgs(save_dir) == expected
    for name in expected:
        assert_valid_jpeg(save_dir / name)
    rows = read_summary(save_dir)
    assert [row["path"] for row in rows] == ["cats/a.png", "cats/b.jpg"]
    assert [row["folder_label"] for row in rows] == ["cats", "cats"]
    assert rows[1]["figures"].split(";") == ["image1_layer1.jpg", "image1_layer2.jpg"]
    for row in rows:
        assert {row["top1"], row["top2"], row["top3"], row["lowest"]} <= \
            {f"thing{i}" for i in range(TINY_CLASSES)}
    assert final_counts(result.last_line) == (2, 0)


def test_broken_files_are_skipped_named_and_keep_their_indices(tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """A text .jpg, a truncated and an empty PNG are skipped by name; the rest keep indices."""
    folder = tmp_path / "mixed"
    write_images(folder, ["a.png", "c.jpg", "z.png"])
    (folder / "bad.jpg").write_text("this is not an image\n", encoding="utf-8")
    (folder / "empty.png").write_bytes(b"")
    (folder / "trunc.png").write_bytes((DATA / "tabby" / "chelsea.png").read_bytes()[:100])
    # sorted: a.png 0, bad.jpg 1, c.jpg 2, empty.png 3, trunc.png 4, z.png 5
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", folder, "--n_images", "all",
                        "--save_dir", save_dir])
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    for name in ("bad.jpg", "empty.png", "trunc.png"):
        assert any(name in line and "warning" in line.lower() for line in result.err_lines), \
            f"no warning naming {name}: {result.err}"
    for name in ("a.png", "c.jpg", "z.png"):
        assert name not in result.err
    assert jpgs(save_dir) == {"image0.jpg", "image2.jpg", "image5.jpg"}
    rows = read_summary(save_dir)
    assert [(row["index"], row["path"]) for row in rows] == [("0", "a.png"), ("2", "c.jpg"),
                                                              ("5", "z.png")]
    assert all(row["folder_label"] == "" for row in rows)
    assert all(row["top1"].startswith("class ") for row in rows)  # default labels
    assert final_counts(result.last_line) == (3, 3)
    assert str(save_dir) in result.last_line


def test_corrupt_header_claiming_a_huge_size_is_skipped(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """A PNG whose header claims 30000x30000 pixels is a broken file: skipped, not a crash."""
    folder = tmp_path / "bomb"
    write_images(folder, ["a.png"])
    (folder / "huge.png").write_bytes(huge_header_png())
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", folder, "--n_images", "all",
                        "--save_dir", save_dir])
    assert result.code == 1, result.err
    assert any("huge.png" in line for line in result.err_lines), result.err
    assert jpgs(save_dir) == {"image0.jpg"}
    assert final_counts(result.last_line) == (1, 1)


def test_every_image_mode_is_processed(tiny_model: Path, tmp_path: Path) -> None:
    """L, LA, RGBA, P (with transparency), 16-bit I;16, 1-bit and CMYK images all run."""
    folder = tmp_path / "modes"
    folder.mkdir()
    base = random_image(size=(40, 30))
    base.convert("L").save(folder / "gray.png")
    base.convert("LA").save(folder / "gray_alpha.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.png", transparency=0)
    base.convert("1").save(folder / "bilevel.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    gradient = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    Image.fromarray(gradient).save(folder / "deep.png")
    with Image.open(folder / "deep.png") as check:
        assert check.mode.startswith("I")
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", folder, "--n_images", "all",
                        "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {f"image{i}.jpg" for i in range(7)}
    assert final_counts(result.last_line) == (7, 0)


def test_load_rgb_rescales_16_bit_from_the_full_range(tmp_path: Path) -> None:
    """A 0..65535 gradient becomes 0..255 gray (rescaled), not a band clipped at 255."""
    from gradcam_cli.images import load_rgb
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    image = load_rgb(path)
    assert image.mode == "RGB"
    values = np.asarray(image)
    assert values.dtype == np.uint8
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()
    row = values[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all()
    assert np.abs(row - np.linspace(0, 255, 256)).max() <= 1
    assert (row == 255).sum() <= 2


def test_load_rgb_composites_transparency_over_white(tmp_path: Path) -> None:
    """RGBA and palette transparency end up over white; opaque pixels keep their colour."""
    from gradcam_cli.images import load_rgb
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 255                 # red everywhere ...
    rgba[:, :4, 3] = 0                 # ... fully transparent on the left,
    rgba[:, 4:8, 3] = 128              # half transparent in the middle,
    rgba[:, 8:, 3] = 255               # opaque on the right
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    values = np.asarray(load_rgb(path)).astype(int)
    assert values.shape == (8, 12, 3)
    assert (values[:, :4] == 255).all()
    assert (np.abs(values[:, 4:8] - [255, 127, 127]) <= 1).all()
    assert (values[:, 8:] == [255, 0, 0]).all()

    palette = Image.new("P", (12, 8), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])        # index 0 black, index 1 blue
    palette.paste(1, (6, 0, 12, 8))
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    values = np.asarray(load_rgb(path)).astype(int)
    assert (values[:, :6] == 255).all()             # transparent black -> white
    assert (values[:, 6:] == [0, 0, 255]).all()


def test_load_rgb_expands_grayscale_and_palette(tmp_path: Path) -> None:
    """'L' and 'P' images come back as RGB with the same colours."""
    from gradcam_cli.images import load_rgb
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    gray.save(tmp_path / "gray.png")
    values = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert values.shape == (8, 8, 3)
    assert (values == np.asarray(gray)[..., None]).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.save(tmp_path / "palette.png")
    assert (np.asarray(load_rgb(tmp_path / "palette.png")) == [10, 200, 30]).all()


def test_flat_folder_is_processed_in_sorted_order(tiny_model: Path, tmp_path: Path) -> None:
    """A flat folder: indices follow the sorted file names, no folder label."""
    folder = tmp_path / "flat"
    write_images(folder, ["b.png", "a.png", "c.jpg"])
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", folder, "--n_images", "all",
                        "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {"image0.jpg", "image1.jpg", "image2.jpg"}
    rows = read_summary(save_dir)
    assert [(row["index"], row["path"], row["folder_label"]) for row in rows] == [
        ("0", "a.png", ""), ("1", "b.png", ""), ("2", "c.jpg", "")]


def test_single_image_file(tiny_model: Path, tmp_path: Path) -> None:
    """--images_path naming one file: that image alone, as image0.jpg."""
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path",
                        DATA / "tripod" / "camera.png", "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {"image0.jpg"}
    assert_valid_jpeg(save_dir / "image0.jpg")
    assert len(read_summary(save_dir)) == 1
    assert final_counts(result.last_line) == (1, 0)


def test_n_images_larger_than_count_warns_and_processes_all(tiny_model: Path,
                                                            image_folder: Path,
                                                            tmp_path: Path) -> None:
    """--n_images 10 with three images: a warning, then all three, exit 0."""
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", image_folder,
                        "--n_images", "10", "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert any("warning" in line.lower() and "10" in line for line in result.err_lines), \
        result.err
    assert jpgs(save_dir) == {"image0.jpg", "image1.jpg", "image2.jpg"}
    assert final_counts(result.last_line) == (3, 0)


def test_n_images_default_is_one(tiny_model: Path, image_folder: Path, tmp_path: Path) -> None:
    """Without --n_images only the first image of the sorted listing is explained."""
    save_dir = tmp_path / "out"
    result = call_main(["--model_path", tiny_model, "--images_path", image_folder,
                        "--save_dir", save_dir])
    assert result.code == 0, result.err
    assert jpgs(save_dir) == {"image0.jpg"}


@pytest.mark.slow
def test_show_without_display_in_a_headless_process(tiny_model: Path, image_folder: Path,
                                                    tmp_path: Path) -> None:
    """--show with no display and no MPLBACKEND: one warning, figures saved, no hang."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    save_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--model_path", str(tiny_model),
         "--images_path", str(image_folder), "--n_images", "2", "--show",
         "--save_dir", str(save_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "display" in line.lower()]
    assert len(warnings) == 1, done.stderr
    assert jpgs(save_dir) == {"image0.jpg", "image1.jpg"}


# ----------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_bad_n_images_is_a_usage_error(value: str, image_folder: Path, tmp_path: Path) -> None:
    """--n_images must be a positive integer or 'all'."""
    result = call_main(["--images_path", image_folder, "--n_images", value,
                        "--save_dir", tmp_path / "out"])
    assert_single_error_line(result, "--n_images")
    assert not (tmp_path / "out").exists()


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _no_images(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("hello", encoding="utf-8")
    (folder / "sub" / "table.csv").write_text("a,b\n", encoding="utf-8")
    return folder


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken"
    path.write_text("a file, not a folder", encoding="utf-8")
    return path


USAGE_ERRORS = {
    "missing folder": (lambda tmp, imgs: ["--images_path", tmp / "nowhere"], ["nowhere"]),
    "empty folder": (lambda tmp, imgs: ["--images_path", _empty(tmp)], ["empty"]),
    "no image files": (lambda tmp, imgs: ["--images_path", _no_images(tmp)], ["docs"]),
    "backcount 0": (lambda tmp, imgs: ["--images_path", imgs, "--conv2d_backcount", "0"],
                    ["1..3"]),
    "backcount -1": (lambda tmp, imgs: ["--images_path", imgs, "--conv2d_backcount", "-1"],
                     ["1..3"]),
    "backcount too large": (lambda tmp, imgs: ["--images_path", imgs,
                                               "--conv2d_backcount", "1", "4"], ["1..3"]),
    "unknown device": (lambda tmp, imgs: ["--images_path", imgs, "--device", "tpu"],
                       ["--device"]),
    "both label options": (lambda tmp, imgs: ["--images_path", imgs, "--imageNet_labels",
                                              "--labels_path", IMAGENET_LABELS], []),
    "unknown flag": (lambda tmp, imgs: ["--images_path", imgs, "--colour", "red"],
                     ["--colour"]),
    "too many decode processes": (lambda tmp, imgs: ["--images_path", imgs, "--workers",
                                                     "1000"], ["--workers", "1000", "64"]),
    "too many render processes": (lambda tmp, imgs: ["--images_path", imgs,
                                                     "--render_workers", "65"],
                                  ["--render_workers", "65", "64"]),
    "missing labels file": (lambda tmp, imgs: ["--images_path", imgs,
                                               "--labels_path", tmp / "labels.txt"],
                            ["labels.txt"]),
    "labels for another model": (lambda tmp, imgs: ["--images_path", imgs, "--labels_path",
                                                    IMAGENET_LABELS], ["1000"]),
    "save_dir is a file": (lambda tmp, imgs: ["--images_path", imgs,
                                              "--save_dir", _a_file(tmp)], ["--save_dir"]),
    "missing model file": (lambda tmp, imgs: ["--images_path", imgs,
                                              "--model_path", tmp / "nothing.pt"],
                           ["nothing.pt"]),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2_with_one_line(case: str, tiny_model: Path, image_folder: Path,
                                           tmp_path: Path) -> None:
    """Each user mistake: exit 2, a single 'main.py: error:' line saying what is wrong."""
    make_argv, fragments = USAGE_ERRORS[case]
    argv = ["--model_path", tiny_model, "--save_dir", tmp_path / "out"] \
        + make_argv(tmp_path, image_folder)  # later flags win over these defaults
    assert_single_error_line(call_main(argv), *fragments)


@pytest.mark.slow
def test_builtin_backcount_range_matches_list_layers(tmp_path: Path) -> None:
    """Out of range on the built-in model: the message's 1..N is --list_layers' N."""
    listing = call_main(["--list_layers"])
    n_layers = max(int(line.split()[0]) for line in listing.out.splitlines()
                   if line.strip() and line.split()[0].isdigit())
    result = call_main(["--conv2d_backcount", str(n_layers + 1), "--images_path", DATA,
                        "--save_dir", tmp_path / "out"])
    assert_single_error_line(result, f"1..{n_layers}")


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device_is_a_usage_error(device: str, tiny_model: Path, image_folder: Path,
                                             tmp_path: Path) -> None:
    """--device cuda / mps on a machine without one: exit 2, one line naming the device."""
    import torch
    available = torch.cuda.is_available() if device == "cuda" \
        else torch.backends.mps.is_available()
    if available:
        pytest.skip(f"this machine has {device}")
    result = call_main(["--model_path", tiny_model, "--images_path", image_folder,
                        "--device", device, "--save_dir", tmp_path / "out"])
    assert_single_error_line(result, device)


# ----------------------------------------------------------------------------- --help

def test_help_lists_every_flag_with_its_default() -> None:
    """--help: exit 0, every flag named, the defaults shown."""
    result = call_main(["--help"])
    assert result.code == 0
    for flag in FLAGS:
        assert flag in result.out, flag
    text = " ".join(result.out.split())
    for default in ("data", "results", "auto", "efficientnet-lite0"):
        assert default in text, default
    assert "default" in text.lower()


def test_help_does_not_import_torch() -> None:
    """`python -X importtime main.py --help` imports no torch module (so --help is fast)."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "main.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--list_layers" in done.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    assert imported, "no -X importtime output"
    heavy = [name for name in imported
             if name.split(".")[0] in ("torch", "torchvision")]
    assert heavy == [], heavy


@pytest.mark.slow
def test_one_image_with_the_builtin_model_imports_no_torchvision_or_pyplot(
        tmp_path: Path) -> None:
    """Start-up stays lean: explaining one image with the built-in model imports neither
    torchvision (seconds of imports it does not use) nor the figure code's matplotlib pyplot."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "main.py"),
                           "--images_path", str(ROOT / "data" / "tabby" / "chelsea.png"),
                           "--device", "cpu", "--quiet", "--save_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "torch" in imported  # the output is read correctly
    assert not {name for name in imported
                if name.split(".")[0] == "torchvision" or name == "matplotlib.pyplot"}
    assert (tmp_path / "image0.jpg").is_file()


@pytest.fixture
def machine(monkeypatch):
    """Pretend this process may run on ``cores`` CPUs (affinity), under an optional cgroup
    quota, with the whole machine 4 times larger (which must never be used)."""
    def pretend(cores: int, quota: int | None = None, local_world: int | None = None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)),
                            raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 4 * cores)
        monkeypatch.setattr(torchrun_group, "cpu_quota", lambda: quota)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        if local_world is not None:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    return pretend


@pytest.mark.parametrize("cores, local_world, decode, render", [
    (16, 1, 8, 7), (32, 1, 8, 8), (8, 1, 4, 3), (4, 1, 2, 1), (2, 1, 1, 1), (1, 1, 0, 1),
    (16, 2, 4, 3), (16, 8, 1, 1)])
def test_helper_process_defaults_share_the_cores_this_process_may_use(
        machine, cores: int, local_world: int, decode: int, render: int) -> None:
    """Decode and render processes are sized from the cores this process may run on, split
    between torchrun's local processes: half decode (at most 8), the rest after the model
    renders (1 to 8), and neither a decode nor a render process for one image."""
    machine(cores, local_world=local_world)
    assert launch.default_workers(100) == decode
    assert launch.default_render_workers(100, decode) == render
    assert launch.default_workers(1) == launch.default_render_workers(1, 0) == 0


def test_cores_per_process_honours_quota_world_size_and_missing_affinity(machine,
                                                                         monkeypatch) -> None:
    """A CPU quota caps the pinned CPUs; WORLD_SIZE stands in for a missing LOCAL_WORLD_SIZE;
    without an affinity call (macOS, Windows) the machine's count is used."""
    machine(16, quota=3)
    assert torchrun_group.cores_per_process() == 3
    machine(16, quota=64)
    assert torchrun_group.cores_per_process() == 16
    machine(16)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert torchrun_group.cores_per_process() == 4
    machine(6)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert torchrun_group.cores_per_process() == 24  # os.cpu_count(), as pretended


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "250000 100000\n"}, 3), ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None), ({"cpu.max": "100000 0\n"}, None), ({}, None)])
def test_cpu_quota_reads_cgroup_v2_then_v1(tmp_path: Path, files: dict, expected) -> None:
    """cgroup v2's cpu.max, else v1's cfs quota and period, rounded up to whole CPUs; no
    quota, or a file that cannot be read or parsed, gives None."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert torchrun_group.cpu_quota(tmp_path) == expected
