"""Batch runs: raw maps, resume, atomic outputs, progress, accuracy, and torchrun splitting."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcam_cli import batch_run, cli, image_loader, render_pool, summary
from gradcam_cli.gradcam import conv_layers_in_run_order, grad_cam, top_and_lowest
from gradcam_cli.images import list_images, load_rgb
from gradcam_cli.models import load_model
from gradcam_cli.preprocessing import Preprocessing, normalize, prepare_image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def read_summary(save_dir: Path) -> list[dict[str, str]]:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def run_cli(*args: str) -> int:
    """The CLI on the CPU, so its numbers compare with the CPU engine references below at
    1e-5 also on a GPU machine (CUDA's TF32 convolutions differ by about 1e-3)."""
    return cli.main(["--images_path", str(DATA), "--quiet", "--workers", "0",
                      "--device", "cpu", *args])


def outputs_in(save_dir: Path) -> set[str]:
    return {p.relative_to(save_dir).as_posix() for p in save_dir.rglob("*") if p.is_file()}


def assert_same_run(first: Path, second: Path) -> None:
    """Same files, same summary (probabilities to 1e-5), same raw maps (to 1e-5)."""
    assert outputs_in(first) == outputs_in(second)
    assert_same_rows(read_summary(first), read_summary(second))
    for name in (n for n in outputs_in(first) if n.endswith(".npz")):
        raw_a, raw_b = np.load(first / name), np.load(second / name)
        assert set(raw_a.files) == set(raw_b.files)
        np.testing.assert_array_equal(raw_a["classes"], raw_b["classes"])
        for key in raw_a.files:
            np.testing.assert_allclose(raw_a[key], raw_b[key], atol=1e-5, rtol=0)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def assert_same_rows(rows_a: list[dict[str, str]], rows_b: list[dict[str, str]]) -> None:
    """Equal summaries; numbers (probabilities, peaks) may differ in float rounding between
    batch compositions, so they are compared to 1e-4 relative."""
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for key in a:
            x, y = _number(a[key]), _number(b[key])
            if key in ("index", "path") or x is None or y is None:
                assert a[key] == b[key], key
            else:
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference: one process, every image of data/, raw maps, two layers."""
    save_dir = tmp_path_factory.mktemp("single")
    assert run_cli("--n_images", "all", "--save_dir", str(save_dir), "--save_raw",
                   "--conv2d_backcount", "1", "2") == 0
    return save_dir


@pytest.mark.slow
def test_raw_maps_hold_the_engine_output_classes_and_probs(single_run: Path) -> None:
    """raw/image{i}.npz equals the engine's raw=True maps for that image, top-3 + lowest."""
    loaded_model = load_model(None)
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    model.eval()
    entries = list_images(DATA)
    images = torch.from_numpy(np.stack(
        [prepare_image(load_rgb(e.path), preprocessing)[1] for e in entries]))
    convs, _ = conv_layers_in_run_order(model, images[:1])
    scores, raw = grad_cam(model, images, [convs[-1].module, convs[-2].module], top_and_lowest,
                           raw=True)
    classes = top_and_lowest(scores)
    probabilities = torch.softmax(scores, 1).gather(1, classes)
    rows = read_summary(single_run)
    for entry in entries:
        saved = np.load(single_run / "raw" / f"image{entry.index}.npz")
        assert saved["layer1"].dtype == np.float32 and saved["layer1"].shape == (4, 7, 7)
        np.testing.assert_allclose(saved["layer1"], raw[0][entry.index].numpy(), atol=1e-5)
        np.testing.assert_allclose(saved["layer2"], raw[1][entry.index].numpy(), atol=1e-5)
        np.testing.assert_array_equal(saved["classes"], classes[entry.index].numpy())
        np.testing.assert_allclose(saved["probs"], probabilities[entry.index].numpy(),
                                   rtol=1e-4)
        row = rows[entry.index]
        assert float(row["top1_prob"]) == pytest.approx(float(saved["probs"][0]), rel=1e-4)
        assert row["figures"] == f"image{entry.index}_layer1.jpg;image{entry.index}_layer2.jpg"


@pytest.mark.slow
def test_batch_size_and_workers_do_not_change_the_results(single_run: Path,
                                                          tmp_path: Path) -> None:
    """Batches of 2 decoded by 2 worker processes give what one batch in-process gave."""
    save_dir = tmp_path / "other"
    assert cli.main(["--images_path", str(DATA), "--quiet", "--n_images", "all",
                      "--save_dir", str(save_dir), "--save_raw", "--conv2d_backcount", "1", "2",
                      "--batch_size", "2", "--workers", "2", "--device", "cpu"]) == 0
    assert_same_run(single_run, save_dir)


@pytest.mark.slow
def test_accuracy_is_printed_when_folders_are_labels(single_run: Path, tmp_path: Path,
                                                     capsys) -> None:
    """data/'s folders are ImageNet labels: top-1 and top-3 accuracy agree with summary.csv."""
    assert run_cli("--n_images", "all", "--save_dir", str(tmp_path)) == 0
    rows = read_summary(tmp_path)
    top1 = np.mean([r["folder_label"] == r["top1"] for r in rows])
    top3 = np.mean([r["folder_label"] in (r["top1"], r["top2"], r["top3"]) for r in rows])
    out = capsys.readouterr().out
    assert f"top-1 {top1:.1%}, top-3 {top3:.1%}" in out
    assert top1 == pytest.approx(0.6) and top3 == pytest.approx(1.0)


@pytest.mark.slow
def test_no_accuracy_for_a_flat_folder(tmp_path: Path, capsys) -> None:
    """Without ImageFolder class names there is nothing to score against."""
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "cat.png").write_bytes((DATA / "tabby" / "chelsea.png").read_bytes())
    assert cli.main(["--images_path", str(flat), "--save_dir", str(tmp_path / "out"),
                      "--quiet", "--workers", "0"]) == 0
    assert "top-1" not in capsys.readouterr().out


@pytest.mark.slow
def test_skip_existing_redoes_only_what_is_missing(tmp_path: Path) -> None:
    """A rerun rewrites the one deleted figure, leaves the others untouched, keeps all rows."""
    assert run_cli("--n_images", "3", "--save_dir", str(tmp_path), "--save_raw") == 0
    before = read_summary(tmp_path)
    (tmp_path / "image1.jpg").unlink()
    stamps = {name: os.stat(tmp_path / name).st_mtime_ns
              for name in ("image0.jpg", "image2.jpg", "raw/image0.npz")}
    assert run_cli("--n_images", "3", "--save_dir", str(tmp_path), "--save_raw",
                   "--skip_existing") == 0
    assert (tmp_path / "image1.jpg").exists()
    assert all(os.stat(tmp_path / name).st_mtime_ns == stamp for name, stamp in stamps.items())
    assert_same_rows(read_summary(tmp_path), before)


@pytest.mark.slow
def test_an_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path: Path, monkeypatch,
                                                                capsys,
                                                                interrupt_rendering) -> None:
    """Ctrl-C after two images: no temporary or truncated file; --skip_existing finishes."""
    original = interrupt_rendering(2)
    assert run_cli("--n_images", "all", "--save_dir", str(tmp_path), "--save_raw",
                   "--render_workers", "0") == 130
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"image0.jpg", "image1.jpg"}
    assert [int(r["index"]) for r in read_summary(tmp_path)] == [0, 1]
    err = capsys.readouterr().err
    assert "interrupted (SIGINT); 2 of 5 images done" in err and "--skip_existing" in err
    monkeypatch.setattr(render_pool, "render_image", original)
    assert run_cli("--n_images", "all", "--save_dir", str(tmp_path), "--save_raw",
                   "--skip_existing") == 0
    assert "processed 3 image(s), skipped 0, 2 already done" in capsys.readouterr().out
    rows = read_summary(tmp_path)
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3, 4]
    assert not list(tmp_path.glob(".summary*"))


@pytest.mark.slow
def test_plain_progress_lines_without_a_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    """stderr is not a terminal under pytest: plain progress lines, none with --quiet."""
    monkeypatch.setattr(batch_run.Progress, "PLAIN_EVERY_S", 0.0)
    assert cli.main(["--images_path", str(DATA), "--n_images", "all", "--batch_size", "2",
                      "--workers", "0", "--save_dir", str(tmp_path)]) == 0
    lines = [text for text in capsys.readouterr().err.splitlines()
             if text.startswith("progress:")]
    assert lines[-1].startswith("progress: 5/5 images") and "images/s" in lines[-1]
    assert run_cli("--n_images", "all", "--save_dir", str(tmp_path)) == 0
    assert "progress:" not in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_a_single_process(single_run: Path,
                                                       tmp_path: Path) -> None:
    """2 CPU processes (gloo) split the images by index and write what one process writes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(ROOT / "main.py"), "--images_path", str(DATA),
               "--n_images", "all", "--save_dir", str(tmp_path), "--save_raw", "--quiet",
               "--conv2d_backcount", "1", "2", "--device", "cpu", "--workers", "0"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "processed 5 image(s), skipped 0" in done.stdout
    assert done.stdout.count("processed") == 1  # only the first process reports
    assert_same_run(single_run, tmp_path)


@pytest.mark.slow
def test_skip_existing_redoes_everything_when_the_options_change(tmp_path: Path,
                                                                 capsys) -> None:
    """Outputs made with other options are not kept: the rows always fit the header."""
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--skip_existing") == 0
    capsys.readouterr()
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--skip_existing",
                   "--classes", "tabby") == 0
    captured = capsys.readouterr()
    assert "other options" in captured.err and "processed 2 image(s)" in captured.out
    rows = read_summary(tmp_path)
    assert all(None not in row and row["class1"] == "tabby" for row in rows)


@pytest.mark.slow
def test_skip_existing_redoes_everything_when_the_preprocessing_changes(tmp_path: Path,
                                                                       capsys) -> None:
    """--resize changes every map, so outputs made without it are not kept."""
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path)) == 0
    before = read_summary(tmp_path)
    capsys.readouterr()
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--skip_existing",
                   "--resize", "320") == 0
    captured = capsys.readouterr()
    assert "other options" in captured.err and "processed 2 image(s)" in captured.out
    after = read_summary(tmp_path)
    assert [r["path"] for r in after] == [r["path"] for r in before]
    assert [r["top1_peak_layer1"] for r in after] != [r["top1_peak_layer1"] for r in before]


@pytest.mark.slow
def test_skip_existing_keeps_outputs_made_with_the_same_classes(tmp_path: Path,
                                                                capsys) -> None:
    """Settings held in tuples (--classes) match their recorded selves: nothing is redone."""
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--classes", "tabby") == 0
    capsys.readouterr()
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--skip_existing",
                   "--classes", "tabby") == 0
    captured = capsys.readouterr()
    assert "other options" not in captured.err
    assert "processed 0 image(s), skipped 0, 2 already done" in captured.out


@pytest.mark.slow
def test_an_unreadable_old_summary_is_ignored_with_a_warning(tmp_path: Path, capsys) -> None:
    """A summary.csv re-saved in another encoding does not stop a resumed run."""
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path)) == 0
    (tmp_path / "summary.csv").write_bytes(b"index,path\n0,caf\xe9\n")
    capsys.readouterr()
    assert run_cli("--n_images", "2", "--save_dir", str(tmp_path), "--skip_existing") == 0
    assert "ignoring" in capsys.readouterr().err
    assert len(read_summary(tmp_path)) == 2


@pytest.mark.slow
def test_skipped_files_are_named_in_the_run_result(tmp_path: Path, monkeypatch) -> None:
    """RunResult.skipped keeps each skipped file's relative path and reason, for reports."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes((DATA / "tabby" / "chelsea.png").read_bytes())
    (folder / "b.jpg").write_text("not an image")
    totals = []
    original = summary.finish

    def keep_total(*args, **kwargs):
        totals.append(original(*args, **kwargs))
        return totals[-1]

    monkeypatch.setattr(summary, "finish", keep_total)
    assert cli.main(["--images_path", str(folder), "--n_images", "all", "--quiet",
                      "--workers", "0", "--device", "cpu",
                      "--save_dir", str(tmp_path / "out")]) == 1
    (total,) = totals
    assert (total.processed, total.unreadable) == (1, 1)
    assert [name for name, _ in total.skipped] == ["b.jpg"]
    assert total.skipped[0][1].startswith("not a readable image (")


@pytest.mark.parametrize("preprocessing", [
    Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    Preprocessing(248, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")])
def test_the_loader_gives_prepare_image_inputs_to_the_bit(preprocessing) -> None:
    """The decode processes hand over uint8 crops and the model process normalizes them:
    the bits of (value / 255 - mean) / std in numpy float32 for every pixel value and channel,
    and for the real images of data/ through the DataLoader (two decode processes) the crops
    and inputs of utils.prepare_image, which decodes in the model process."""
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None, None], 3, axis=3)
    every_value = np.ascontiguousarray(np.broadcast_to(every_value, (1, 256, 256, 3)))
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    expected = ((every_value.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    got = normalize(torch.from_numpy(every_value), preprocessing, torch.device("cpu"))
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)

    entries = list_images(DATA)
    loader = image_loader.make_loader(entries, preprocessing, batch_size=2, workers=2,
                                      device=torch.device("cpu"))
    seen = 0
    for batch in loader:
        inputs = normalize(batch.shown, preprocessing, torch.device("cpu"))
        for b, position in enumerate(batch.positions):
            shown, model_input = prepare_image(load_rgb(entries[position].path), preprocessing)
            np.testing.assert_array_equal(batch.shown[b].numpy(), shown)
            np.testing.assert_array_equal(inputs[b].numpy(), model_input)
            seen += 1
    assert seen == len(entries)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more than 2 cores' worth
def test_helper_processes_never_outnumber_their_work(monkeypatch, tmp_path: Path) -> None:
    """A decode process beyond the number of batches, or a render process beyond the number
    of images, would only cost its start and memory: 3 images in batches of 2 start 2 decode
    processes and 3 render processes (2 per process under torchrun with 2), whatever the flags
    ask for."""
    entries = list_images(DATA)[:3]
    preprocessing = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for batch_size, workers, expected in ((2, 8, 2), (2, 1, 1), (16, 8, 1), (1, 8, 3)):
        loader = image_loader.make_loader(entries, preprocessing, batch_size=batch_size,
                                          workers=workers, device=torch.device("cpu"))
        assert loader.num_workers == expected
    started = []

    def start_renderer(workers: int, show: bool = False):
        started.append(workers)
        return render_pool.InlineRenderer()

    monkeypatch.setattr(render_pool, "start_renderer", start_renderer)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for world, expected in ((None, 3), ("2", 2)):  # torchrun: each process takes every 2nd
        if world:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert run_cli("--n_images", "3", "--render_workers", "8", "--model_path",
                       str(ROOT / "tests" / "figures" / "missing.pt"),
                       "--save_dir", str(tmp_path)) == 2  # stops at the model, after the start
        assert started.pop() == expected

