"""The explanation options end to end: methods, classes, layers, scale, metrics, guided."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_cli import cli
from gradcam_cli.gradcam import upsample_and_normalize

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CAT = DATA / "tabby" / "chelsea.png"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--quiet", "--workers", "0", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_summary(save_dir: Path) -> list[dict[str, str]]:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam++", "xgradcam", "layercam", "hirescam"])
def test_every_gradient_method_runs_from_the_command_line(method: str, tmp_path: Path,
                                                          capsys) -> None:
    """Each method writes a figure whose heading names it, and raw maps of its own."""
    code, _, err = run(capsys, "--images_path", CAT, "--method", method, "--save_dir",
                       tmp_path, "--save_raw")
    assert code == 0, err
    assert (tmp_path / "image0.jpg").exists()
    reference = tmp_path / "reference"
    assert run(capsys, "--images_path", CAT, "--save_dir", reference, "--save_raw")[0] == 0
    ours = np.load(tmp_path / "raw" / "image0.npz")["layer1"]
    gradcam = np.load(reference / "raw" / "image0.npz")["layer1"]
    assert not np.allclose(ours, gradcam)


@pytest.mark.slow
def test_classes_by_name_and_index(tmp_path: Path, capsys) -> None:
    """--classes tabby 967: every image explains those two classes, with their probabilities."""
    code, _, err = run(capsys, "--n_images", "all", "--classes", "tabby", "967",
                       "--save_dir", tmp_path)
    assert code == 0, err
    rows = read_summary(tmp_path)
    assert [(r["class1"], r["class2"]) for r in rows] == [("tabby", "espresso")] * 5
    espresso = [r for r in rows if r["path"] == "espresso/coffee.png"][0]
    assert float(espresso["class2_prob"]) > 0.9 > float(espresso["class1_prob"])
    assert "top1" not in rows[0] and "top-1" not in capsys.readouterr().out


@pytest.mark.slow
def test_unknown_class_name_suggests_close_labels(capsys) -> None:
    code, _, err = run(capsys, "--classes", "tabbby")
    assert code == 2 and "'tabby'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--classes", "1000")
    assert code == 2 and "0..999" in err


def test_true_class_panel_follows_the_folder(tmp_path: Path, capsys) -> None:
    """--true_class adds the folder's class; data/'s folders are all ImageNet labels."""
    code, _, err = run(capsys, "--n_images", "all", "--true_class", "--save_dir", tmp_path)
    assert code == 0, err
    rows = read_summary(tmp_path)
    assert [r["true"] for r in rows] == [r["folder_label"] for r in rows]
    grace = [r for r in rows if r["folder_label"] == "military uniform"][0]
    assert grace["true_prob"] == grace["top3_prob"]  # the uniform is its third guess


@pytest.mark.slow
def test_true_class_of_an_unlabelled_folder_falls_back_to_top1(tmp_path: Path,
                                                               capsys) -> None:
    code, _, err = run(capsys, "--images_path", CAT, "--true_class", "--save_dir", tmp_path)
    assert code == 0, err
    row = read_summary(tmp_path)[0]
    assert row["true"] == row["top1"] and row["folder_label"] == ""


@pytest.mark.slow
def test_layer_by_name_targets_any_4d_module(tmp_path: Path, capsys) -> None:
    """--layer _swish _bn1: non-conv modules by name (_swish is a ReLU6 reused all through the
    network: its last call counts); file names and npz keys carry the layer tag."""
    code, _, err = run(capsys, "--images_path", CAT, "--layer", "_swish", "_bn1",
                       "--save_dir", tmp_path, "--save_raw")
    assert code == 0, err
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"layer-_swish.jpg", "layer-_bn1.jpg"}
    raw = np.load(tmp_path / "raw" / "image0.npz")
    assert raw["layer-_swish"].shape == (4, 7, 7) and raw["layer-_bn1"].shape == (4, 7, 7)


@pytest.mark.slow
def test_layer_typo_suggests_names(capsys) -> None:
    code, _, err = run(capsys, "--layer", "_conv_haed")
    assert code == 2 and "_conv_head" in err and "Traceback" not in err


def test_shared_scale_keeps_weak_maps_weak() -> None:
    """shared: one min-max per image and layer, so the ratio of two maps' peaks survives."""
    strong = torch.zeros(1, 1, 2, 2)
    strong[0, 0, 0, 0] = 4.0
    weak = strong / 4
    raw = [torch.cat([strong, weak], dim=1)]
    per_map = upsample_and_normalize(raw, (2, 2))
    shared = upsample_and_normalize(raw, (2, 2), shared=True)
    assert per_map[0, 0, 1].max() == 1.0
    torch.testing.assert_close(shared[0, 0, 1].max(), torch.tensor(0.25))
    torch.testing.assert_close(shared[0, 0, 0], per_map[0, 0, 0])


@pytest.mark.slow
def test_shared_scale_titles_carry_peaks(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "--images_path", CAT, "--scale", "shared", "--save_dir",
                       tmp_path, "--save_raw")
    assert code == 0, err
    row = read_summary(tmp_path)[0]
    raw = np.load(tmp_path / "raw" / "image0.npz")["layer1"]
    peaks = [float(row[f"{rank}_peak_layer1"]) for rank in ("top1", "top2", "top3", "lowest")]
    np.testing.assert_allclose(peaks, raw.max(axis=(1, 2)), rtol=1e-5)


def test_counterfactual_score_cam_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "--method", "scorecam", "--counterfactual")
    assert code == 2 and "scorecam" in err


@pytest.mark.slow
def test_counterfactual_maps_are_the_negated_gradient_maps(tmp_path: Path, capsys) -> None:
    """--counterfactual writes different raw maps: those of the negated gradients."""
    plain, counter = tmp_path / "plain", tmp_path / "counter"
    assert run(capsys, "--images_path", CAT, "--save_dir", plain, "--save_raw")[0] == 0
    assert run(capsys, "--images_path", CAT, "--save_dir", counter, "--save_raw",
               "--counterfactual")[0] == 0
    a = np.load(plain / "raw" / "image0.npz")["layer1"]
    b = np.load(counter / "raw" / "image0.npz")["layer1"]
    assert (a * b == 0).mean() > 0.5  # where one is positive the other is mostly clipped


@pytest.mark.slow
def test_metrics_columns_and_means(tmp_path: Path, capsys) -> None:
    """--metrics fills seven numbers per map (deletion, insertion, drop, increase, ROAD's
    MoRF, LeRF and their combination), the same for a random and a centred Gaussian map on
    the top-1 class, and prints the top-1 means per figure beside the baselines' means."""
    code, out, err = run(capsys, "--n_images", "2", "--metrics", "--save_dir", tmp_path)
    assert code == 0, err
    rows = read_summary(tmp_path)
    deletions = [float(r["top1_deletion_layer1"]) for r in rows]
    insertions = [float(r["top1_insertion_layer1"]) for r in rows]
    assert all(0 <= v <= 1 for v in deletions + insertions)
    assert all(r["top1_increase_layer1"] in ("0", "1") for r in rows)
    assert f"deletion AUC {np.mean(deletions):.4f}" in out
    for tag in ("layer1", "random", "gaussian"):
        for row in rows:
            morf, lerf = float(row[f"top1_road_morf_{tag}"]), float(row[f"top1_road_lerf_{tag}"])
            assert float(row[f"top1_road_{tag}"]) == pytest.approx((lerf - morf) / 2, abs=2e-6)
    random_deletion = np.mean([float(r["top1_deletion_random"]) for r in rows])
    (line,) = [text for text in out.splitlines() if text.strip().startswith("random map")]
    assert f"deletion AUC {random_deletion:.4f}" in line
    assert any(text.strip().startswith("centred Gaussian") for text in out.splitlines())
    import json
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    info = json.loads(page.split('id="report-data">')[1].split("</script>")[0])["info"]
    assert [row[0] for row in info["means_rows"]] == [
        "layer1", "baseline: random map", "baseline: gaussian map"]
    assert info["means_rows"][1][1] == f"{random_deletion:.4g}"


@pytest.mark.slow
def test_guided_adds_a_second_row(tmp_path: Path, capsys) -> None:
    """--guided: the figure grows by one panel row of Guided Grad-CAM maps."""
    plain, guided = tmp_path / "plain", tmp_path / "guided"
    assert run(capsys, "--images_path", CAT, "--save_dir", plain)[0] == 0
    code, _, err = run(capsys, "--images_path", CAT, "--save_dir", guided, "--guided")
    assert code == 0, err
    small = Image.open(plain / "image0.jpg")
    tall = Image.open(guided / "image0.jpg")
    assert tall.width == small.width and tall.height > small.height + 200
    pixels = np.asarray(tall.convert("RGB"), dtype=np.float32)
    bottom = pixels[small.height + 10:, small.width // 5:]
    assert bottom.std() > 5  # the guided maps are not blank


@pytest.mark.slow
def test_score_cam_runs_batched_with_progress_lines(tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    """Score-CAM at a 16-channel conv (backcount 47): 16 masked passes in batches of 64,
    reported as they go, a warning that a conv's signed output does not suit it, and a map."""
    from gradcam_cli import batch_run
    monkeypatch.setattr(batch_run.Progress, "PLAIN_EVERY_S", 0.0)
    code = cli.main(["--images_path", str(CAT), "--method", "scorecam", "--conv2d_backcount",
                      "47", "--save_dir", str(tmp_path), "--save_raw", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    passes = [line for line in err.splitlines() if "masked passes" in line]
    assert passes and passes[-1].startswith("progress: 16/16 masked passes")
    assert "warning: Score-CAM" in err
    score = np.load(tmp_path / "raw" / "image0.npz")["layer47"]
    assert score.shape == (4, 112, 112) and np.isfinite(score).all()


def test_a_two_class_model_gets_top2_and_no_lowest(tmp_path: Path, capsys) -> None:
    """With fewer than 3 classes the panels are top-1 and top-2 (the lowest would be top-2
    again: no class is shown twice), and every row fits the header."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    model_file = tmp_path / "two.pt"
    torch.save(model, model_file)
    code, _, err = run(capsys, "--model_path", model_file, "--images_path", CAT,
                       "--save_dir", tmp_path / "out")
    assert code == 0, err
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    header = rows[0]
    assert header[3:8] == ["top1", "top1_prob", "top2", "top2_prob", "figures"]
    assert all(len(row) == len(header) for row in rows)
    assert rows[1][3] != rows[1][5]


def test_label_names_win_over_indices() -> None:
    """A folder named '1' means the label '1', even when that label is class 0."""
    from gradcam_cli.labels import LabelIndex
    index = LabelIndex(["1", "2", "cat, kitty"])
    assert index.find("1") == 0 and index.find("2") == 1
    assert index.find("cat,kitty") == 2 and index.find("Kitty") == 2
    assert index.find("0") is None and index.find("0", allow_index=True) == 0


@pytest.mark.parametrize("args, words", [
    (["--classes", "\u00b2"], "not a class index"),
    (["--layer", "_conv_head", "--conv2d_backcount", "2"], "not both"),
])
def test_more_usage_errors(args: list[str], words: str, capsys) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_save_dir_where_raw_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "raw").write_text("not a folder")
    code, _, err = run(capsys, "--images_path", CAT, "--save_dir", tmp_path, "--save_raw")
    assert code == 2 and "--save_dir" in err and "Traceback" not in err


def test_method_flag_lists_exactly_the_registry() -> None:
    """main.py names the methods itself (no torch import before --help); they must match."""
    from gradcam_cli.cam_methods import METHODS
    assert tuple(METHODS) == cli.METHOD_NAMES
    assert cli.GRADIENT_FREE == tuple(name for name, method in METHODS.items()
                                      if not method.uses_gradients)


@pytest.mark.slow
def test_several_methods_write_a_figure_each_equal_to_their_own_runs(tmp_path: Path,
                                                                      capsys) -> None:
    """--method gradcam gradcam++ layercam: one figure per method, byte for byte the figure
    of that method's own run; summary.csv and the raw maps carry the method in their tags;
    the report lists each figure's method."""
    import json

    import numpy as np
    methods = ["gradcam", "gradcam++", "layercam"]
    code, _, err = run(capsys, "--images_path", CAT, "--method", *methods, "--save_raw",
                       "--save_dir", tmp_path / "all")
    assert code == 0, err
    with open(tmp_path / "all" / "summary.csv", newline="", encoding="utf-8") as file:
        (together,) = list(csv.DictReader(file))
    assert together["figures"] == ";".join(f"layer1_{m}.jpg" for m in methods)
    raw = np.load(tmp_path / "all" / "raw" / "image0.npz")
    for method in methods:
        code, _, err = run(capsys, "--images_path", CAT, "--method", method, "--save_raw",
                           "--save_dir", tmp_path / method)
        assert code == 0, err
        assert (tmp_path / method / "image0.jpg").read_bytes() == \
            (tmp_path / "all" / f"layer1_{method}.jpg").read_bytes()
        with open(tmp_path / method / "summary.csv", newline="", encoding="utf-8") as file:
            (alone,) = list(csv.DictReader(file))
        assert together[f"top1_peak_layer1_{method}"] == alone["top1_peak_layer1"]
        alone_raw = np.load(tmp_path / method / "raw" / "image0.npz")
        np.testing.assert_array_equal(raw[f"layer1_{method}"], alone_raw["layer1"])
    page = (tmp_path / "all" / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert data["info"]["methods"] == methods
    assert data["info"]["method"] == ", ".join(methods)


@pytest.mark.slow
def test_sanity_check_writes_its_csv_line_and_report_table(tmp_path: Path, capsys) -> None:
    """--sanity_check on the built-in model (real ImageNet weights): Grad-CAM's maps depend on
    the weights; the csv holds a row per method and step, the same numbers as the line, and
    the report carries both."""
    import json
    code, out, err = run(capsys, "--images_path", DATA, "--n_images", "all", "--method",
                         "gradcam", "layercam", "--sanity_check", "--save_dir", tmp_path)
    assert code == 0, err
    (line,) = [text for text in out.splitlines() if text.startswith("sanity check")]
    assert "gradcam depends on the weights" in line and "5 image(s)" in line
    with open(tmp_path / "sanity_check.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == ["gradcam"] * 6 + ["layercam"] * 6
    assert [int(row["step"]) for row in rows[:6]] == [1, 2, 3, 4, 5, 6]
    final = float(rows[5]["spearman"])
    assert final < 0.5 and f"{final:.2f} after every layer" in line
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="report-data">')[1].split("</script>")[0])
    assert data["info"]["sanity"] == line and len(data["info"]["sanity_rows"]) == 12


@pytest.mark.slow
def test_eigencam_ablationcam_and_smoothing_from_the_command_line(tmp_path: Path,
                                                                  capsys) -> None:
    """Eigen-CAM's map is the same for every panel (class-independent, as its heading says);
    --smooth aug gives the engine's own smoothed maps; neither new method has a
    counterfactual form."""
    import numpy as np

    from gradcam_cli.gradcam import explain
    from gradcam_cli.images import load_rgb
    from gradcam_cli.models import load_model
    from gradcam_cli.preprocessing import prepare_image
    code, _, err = run(capsys, "--images_path", CAT, "--method", "eigencam", "gradcam",
                       "--smooth", "aug", "--save_raw", "--layer", "_swish",
                       "--save_dir", tmp_path)
    assert code == 0, err
    raw = np.load(tmp_path / "raw" / "image0.npz")
    eigen = raw["layer-_swish_eigencam"]
    assert all(np.array_equal(eigen[0], eigen[k]) for k in range(1, len(eigen)))
    loaded = load_model(None)
    _, x = prepare_image(load_rgb(CAT), loaded.preprocessing)
    model = loaded.model.eval()
    _, maps = explain(model, torch.from_numpy(x)[None], [model._swish],
                      torch.from_numpy(raw["classes"])[None], method="gradcam", raw=True,
                      smooth="aug")
    np.testing.assert_allclose(raw["layer-_swish_gradcam"], maps[0][0].numpy(), rtol=1e-4,
                               atol=1e-6)
    code, _, err = run(capsys, "--images_path", CAT, "--method", "ablationcam",
                       "--counterfactual", "--save_dir", tmp_path / "no")
    assert code == 2 and "ablationcam has none" in err


def test_several_methods_resume_with_skip_existing(tmp_path: Path, capsys) -> None:
    """An image whose figure for one method is missing is redone, the other is kept: every
    (layer, method) figure counts among an image's outputs."""
    argv = ["--images_path", DATA, "--n_images", "2", "--method", "gradcam", "hirescam",
            "--render_workers", "0", "--save_dir", tmp_path]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    kept = (tmp_path / "image0_layer1_hirescam.jpg").stat().st_mtime_ns
    redone = tmp_path / "image1_layer1_gradcam.jpg"
    before = np.asarray(Image.open(redone), dtype=np.float32)
    redone.unlink()
    code, out, err = run(capsys, *argv, "--skip_existing")
    assert code == 0, err
    assert "processed 1 image(s), skipped 0, 1 already done" in out
    # alone in its batch now: the same figure up to float rounding (a level or two of JPEG)
    assert np.abs(np.asarray(Image.open(redone), dtype=np.float32) - before).mean() < 0.5
    assert (tmp_path / "image0_layer1_hirescam.jpg").stat().st_mtime_ns == kept
    assert len(read_summary(tmp_path)) == 2
