"""Model outputs of every common form, and probabilities that match the head: a softmax for
one class per image, a sigmoid per class for multi-label models, sigmoid(y) for a binary one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from gradcam_cli import cli
from gradcam_cli.gradcam import explain
from gradcam_cli.guided import guided_backprop
from gradcam_cli.heads import BINARY, SIGMOID, SOFTMAX, OutputError, class_scores
from gradcam_cli.images import load_rgb
from gradcam_cli.metrics import faithfulness
from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, prepare_image

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "data" / "tabby" / "chelsea.png"


class TinyNet(nn.Module):
    """A small CNN whose output form is chosen: a tensor, a tuple with an auxiliary output,
    a dict, or an object with .logits (as Hugging Face returns)."""

    def __init__(self, n_outputs: int = 5, form: str = "tensor") -> None:
        super().__init__()
        self.form = form
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, n_outputs)

    def forward(self, x):
        logits = self.fc(self.features(x).mean(dim=(2, 3)))
        if self.form == "tuple":
            return logits, logits.detach() * 0.5  # a GoogLeNet-style auxiliary output
        if self.form == "list":
            return [logits]
        if self.form == "dict":
            return {"logits": logits, "hidden": x}
        if self.form == "object":
            return _Output(logits)
        return logits


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.loss = None


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "object"])
def test_every_output_form_gives_the_maps_of_the_plain_tensor(form: str) -> None:
    """The same weights returning their scores in another form: the same scores, maps
    (Grad-CAM and Score-CAM), guided gradients and faithfulness numbers."""
    plain = TinyNet(form="tensor").eval()
    other = TinyNet(form=form).eval()
    other.load_state_dict(plain.state_dict())
    x = images()
    classes = torch.tensor([[0, 3], [4, 1]])
    for method in ("gradcam", "scorecam"):
        want = explain(plain, x, [plain.features[2]], classes, method=method)
        got = explain(other, x, [other.features[2]], classes, method=method)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(guided_backprop(other, x, classes),
                               guided_backprop(plain, x, classes))
    maps = explain(plain, x, [plain.features[2]], classes)[1][0]
    for field in ("deletion_auc", "insertion_auc", "average_drop"):
        torch.testing.assert_close(getattr(faithfulness(other, x, maps, classes), field),
                                   getattr(faithfulness(plain, x, maps, classes), field))


def test_an_output_without_scores_names_what_the_model_returned() -> None:
    with pytest.raises(OutputError, match=r"it returned a tuple of 2 \(a tensor of shape "
                                          r"\(2, 3, 4, 4\), a str\)"):
        class_scores((torch.zeros(2, 3, 4, 4), "x"))
    with pytest.raises(OutputError, match="a dict with keys hidden"):
        class_scores({"hidden": torch.zeros(2, 5)})
    torch.testing.assert_close(class_scores({"logits": torch.ones(2, 5)}), torch.ones(2, 5))


def test_a_binary_heads_against_map_is_the_counterfactual_of_its_class() -> None:
    """One output y explained as [-y, y]: class 1's map is the map of y, class 0's the
    counterfactual map (the gradient of -y), and the probabilities sigmoid(-y), sigmoid(y)."""
    model = TinyNet(n_outputs=1).eval()
    x = images(3)
    layer = [model.features[2]]
    scores, maps = explain(model, x, layer, torch.tensor([[1, 0]] * 3), head=BINARY)
    _, for_y = explain(model, x, layer, torch.zeros(3, 1, dtype=torch.long))
    _, against_y = explain(model, x, layer, torch.zeros(3, 1, dtype=torch.long),
                           counterfactual=True)
    torch.testing.assert_close(maps[0, :, 0], for_y[0, :, 0])
    torch.testing.assert_close(maps[0, :, 1], against_y[0, :, 0])
    y = model(x)[:, 0].detach()
    torch.testing.assert_close(scores, torch.stack([-y, y], dim=1))
    probabilities = BINARY.probabilities(scores)
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(y))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_a_sigmoid_heads_probabilities_are_per_class() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.0]])
    torch.testing.assert_close(SIGMOID.probabilities(scores), torch.sigmoid(scores))
    torch.testing.assert_close(SOFTMAX.probabilities(scores), torch.softmax(scores, dim=1))


def read_rows(save_dir: Path) -> list[dict[str, str]]:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def cat_input() -> torch.Tensor:
    _, x = prepare_image(load_rgb(CAT), IMAGENET_PREPROCESSING)
    return torch.from_numpy(x)[None]


def run(tmp_path: Path, model: nn.Module, *flags: str) -> tuple[int, Path]:
    path = tmp_path / "model.pt"
    torch.save(model, path)
    out = tmp_path / "out"
    code = cli.main(["--model_path", str(path), "--images_path", str(CAT), "--save_dir",
                     str(out), "--workers", "0", "--render_workers", "0", "--quiet", *flags])
    return code, out


def test_a_binary_model_shows_its_class_and_what_argues_against_it(tmp_path: Path,
                                                                  capsys) -> None:
    """One output: probability sigmoid(y), never a softmax's 1.0; panels 'positive' and
    'against', each class once."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 1)).eval()
    labels = tmp_path / "labels.txt"
    labels.write_text("{0: 'pneumonia'}", encoding="utf-8")
    code, out = run(tmp_path, model, "--labels_path", str(labels))
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(out)
    p = float(torch.sigmoid(model(cat_input()).detach())[0, 0])
    assert (row["positive"], row["against"]) == ("pneumonia", "not pneumonia")
    assert float(row["positive_prob"]) == pytest.approx(p, rel=1e-5)
    assert float(row["against_prob"]) == pytest.approx(1 - p, rel=1e-5)
    assert "lowest" not in row and "top2" not in row


def test_counterfactual_is_refused_for_a_binary_model(tmp_path: Path, capsys) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 1))
    code, _ = run(tmp_path, model, "--counterfactual")
    err = capsys.readouterr().err
    assert code == 2 and "already shows the map against its class" in err, err


def multi_label(scores: list[float]) -> nn.Module:
    """14 labels, like a chest X-ray classifier, whose scores are set by hand (the image moves
    them by less than 0.01)."""
    linear = nn.Linear(4, len(scores))
    with torch.no_grad():
        linear.weight.mul_(0.001)
        linear.bias.copy_(torch.tensor(scores))
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         linear).eval()


def test_multi_label_panels_are_the_classes_above_the_threshold(tmp_path: Path,
                                                                capsys) -> None:
    scores = [-4.0] * 14
    scores[2], scores[5], scores[9], scores[11], scores[7] = 3.0, 1.0, 0.5, -0.05, -6.0
    # classes 2, 5 and 9 present, 11 just below the threshold, 7 the lowest
    model = multi_label(scores)
    code, out = run(tmp_path, model, "--multi_label", "--max_panels", "4")
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(out)
    probabilities = torch.sigmoid(model(cat_input()).detach())[0]
    assert [row[f"top{k}"] for k in range(1, 5)] == ["class 2", "class 5", "class 9", ""]
    assert row["top4_prob"] == "" and row["lowest"] == "class 7"
    for k, c in ((1, 2), (2, 5), (3, 9)):
        assert float(row[f"top{k}_prob"]) == pytest.approx(float(probabilities[c]), rel=1e-5)
    assert float(row["lowest_prob"]) == pytest.approx(float(probabilities[7]), rel=1e-5)


def test_a_multi_label_image_with_no_class_present_shows_its_most_probable(
        tmp_path: Path, capsys) -> None:
    scores = [-4.0] * 14
    scores[6] = -1.0
    code, out = run(tmp_path, multi_label(scores), "--multi_label")
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(out)
    assert row["top1"] == "class 6" and row["top2"] == row["top3"] == ""
    assert float(row["top1_prob"]) == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0))),
                                                    rel=1e-3)


def test_binary_and_multi_label_accuracy_follow_the_threshold(tmp_path: Path, capsys) -> None:
    """Binary: right when the class predicted at the threshold is the folder's; multi-label:
    the most probable class, and the folder's class among those shown; the report's right
    and wrong marks agree with the printed numbers."""
    from gradcam_cli import report
    folder = tmp_path / "images"
    for name in ("pneumonia", "normal"):
        (folder / name).mkdir(parents=True)
        (folder / name / "x.png").write_bytes(CAT.read_bytes())
    labels = tmp_path / "labels.txt"
    labels.write_text("{0: 'normal', 1: 'pneumonia'}", encoding="utf-8")
    binary = multi_label([1.5])  # p = sigmoid(1.5) = 0.82 on both photos: pneumonia
    path = tmp_path / "binary.pt"
    torch.save(binary, path)
    argv = ["--images_path", str(folder), "--n_images", "all", "--workers", "0",
            "--render_workers", "0", "--quiet"]
    assert cli.main(["--model_path", str(path), "--labels_path", str(labels),
                     "--save_dir", str(tmp_path / "b"), *argv]) == 0
    assert "images whose folder names are labels: 50.0% (the class when its probability " \
           "is at least 0.5, else normal)" in capsys.readouterr().out
    assert cli.main(["--model_path", str(path), "--labels_path", str(labels), "--threshold",
                     "0.9", "--save_dir", str(tmp_path / "b9"), *argv]) == 0
    assert ": 50.0% (the class when its probability is at least 0.9" in capsys.readouterr().out
    with open(tmp_path / "b" / "summary.csv", newline="", encoding="utf-8") as file:
        header, *rows = list(csv.reader(file))
    info = report.ReportInfo(model="m", layers=[("layer1", "x")], method="gradcam",
                             n_images=2, labels=["normal", "pneumonia"], head="binary")
    data = report.page_data(header, rows, info)
    by_folder = dict(zip((row[2] for row in sorted(rows, key=lambda r: int(r[0]))),
                         data["right"]))
    assert by_folder == {"normal": 0, "pneumonia": 1}

    scores = [-4.0] * 3
    scores[1], scores[2] = 2.0, 0.2  # 'pneumonia' most probable, 'other' present too
    labels3 = tmp_path / "labels3.txt"
    labels3.write_text("{0: 'normal', 1: 'pneumonia', 2: 'other'}", encoding="utf-8")
    torch.save(multi_label(scores), path)
    assert cli.main(["--model_path", str(path), "--labels_path", str(labels3),
                     "--multi_label", "--max_panels", "2", "--save_dir", str(tmp_path / "m"),
                     *argv]) == 0
    out = capsys.readouterr().out
    assert "most probable class 50.0%, folder class at or above 0.5 (or the most " \
           "probable) 50.0%" in out, out
