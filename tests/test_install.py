"""The tool as a package: installed with pip it runs from any folder as ``gradcam``, and a
user's own modules (models.py, utils.py, ...) are never shadowed by the tool's."""

from __future__ import annotations

import csv
import filecmp
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "data" / "tabby" / "chelsea.png"

USER_UTILS = '''
from torch import nn


class Head(nn.Module):
    """A classifier head, kept in the user's utils.py as training repositories do."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))
'''

USER_MODELS = '''
from torch import nn

from utils import Head


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = Head(16, 5)

    def forward(self, x):
        return self.head(self.features(x))
'''

SAVE_USER_MODEL = '''
import sys
import torch
from models import MyNet

torch.manual_seed(0)
model = MyNet().eval()
torch.save(model, "mynet.pt")
from PIL import Image
sys.path.insert(0, sys.argv[1])
from gradcam_cli.images import load_rgb
from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, prepare_image
_, x = prepare_image(load_rgb(sys.argv[2]), IMAGENET_PREPROCESSING)
print(int(model(torch.from_numpy(x)[None]).argmax()))
'''


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> tuple[Path, int]:
    """A user's training folder: models.py whose MyNet uses a Head from utils.py, the model
    saved whole from there (so its classes are models.MyNet and utils.Head), and the class
    the model gives the cat photo."""
    folder = tmp_path_factory.mktemp("user_repo")
    (folder / "utils.py").write_text(USER_UTILS, encoding="utf-8")
    (folder / "models.py").write_text(USER_MODELS, encoding="utf-8")
    (folder / "save.py").write_text(SAVE_USER_MODEL, encoding="utf-8")
    done = subprocess.run([sys.executable, "save.py", str(ROOT), str(CAT)], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return folder, int(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the checkout installed by ``pip install .`` (its
    dependencies from this interpreter's site-packages; pip fetches only setuptools to build)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--no-deps", str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def top1_of(save_dir: Path) -> str:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return next(csv.DictReader(file))["top1"]


@pytest.mark.slow
def test_installed_gradcam_runs_from_any_folder(installed: Path, tmp_path: Path) -> None:
    """``gradcam`` from a folder with no checkout: the built-in model (weights from its
    package, labels and report assets from ours) writes every figure and the report."""
    images = tmp_path / "photos"
    images.mkdir()
    for photo in sorted((ROOT / "data").rglob("*.*"))[:3]:
        if photo.suffix.lower() in (".jpg", ".jpeg", ".png"):
            (images / photo.name).write_bytes(photo.read_bytes())
    n_photos = len(list(images.iterdir()))
    done = subprocess.run([str(installed / "gradcam"), "--n_images", "all", "--images_path",
                           "photos", "--imageNet_labels", "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = sorted(p.name for p in (tmp_path / "results").glob("image*.jpg"))
    assert figures == [f"image{i}.jpg" for i in range(n_photos)]
    assert (tmp_path / "results" / "report.html").stat().st_size > 10_000
    bad = subprocess.run([str(installed / "gradcam"), "--n_images", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("gradcam: error:"), bad.stderr
    where = subprocess.run([str(installed / "python"), "-c",
                            "from gradcam_cli.gradcam import explain, grad_cam; "
                            "import gradcam_cli; print(gradcam_cli.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert "site-packages" in where.stdout and str(ROOT) not in where.stdout


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["main.py", "gradcam"])
def test_a_users_models_and_utils_modules_load_through_both_entries(
        entry: str, user_folder: tuple[Path, int], installed: Path, tmp_path: Path) -> None:
    """The user's models.py and utils.py, from the folder the model was saved in: the class
    loads with --trust_model (the tool's package shadows neither module), and the run
    explains the class the model itself predicts."""
    folder, predicted = user_folder
    command = ([sys.executable, str(ROOT / "main.py")] if entry == "main.py"
               else [str(installed / "gradcam")])
    done = subprocess.run(command + ["--model_path", "mynet.pt", "--trust_model",
                                     "--images_path", str(CAT), "--save_dir", str(tmp_path),
                                     "--quiet"],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "image0.jpg").exists()
    assert top1_of(tmp_path) == f"class {predicted}"


@pytest.mark.slow
def test_a_users_modules_load_from_pythonpath_elsewhere(user_folder: tuple[Path, int],
                                                        tmp_path: Path) -> None:
    """Run from another folder with the user's folder on PYTHONPATH, as the error advises."""
    folder, predicted = user_folder
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model_path",
                           str(folder / "mynet.pt"), "--trust_model", "--images_path", str(CAT),
                           "--save_dir", str(tmp_path / "out"), "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(folder), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert top1_of(tmp_path / "out") == f"class {predicted}"


SCRIPT_SAVING_MAIN_CLASS = '''
import torch
from torch import nn


class ScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


torch.save(ScriptNet(), "script_net.pt")
'''


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True])
def test_a_class_pickled_from_a_script_run_as_main_says_how_to_fix_it(
        trust: bool, tmp_path: Path) -> None:
    """``python train.py`` pickles its class as __main__.ScriptNet, which no other program can
    import: one line that says to define the class in a module, with or without trust."""
    (tmp_path / "train.py").write_text(SCRIPT_SAVING_MAIN_CLASS, encoding="utf-8")
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, timeout=120)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--model_path",
                           "script_net.pt", "--images_path", str(CAT), "--save_dir", "out"]
                          + (["--trust_model"] if trust else []),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("main.py: error: --model_path script_net.pt")
    assert "__main__.ScriptNet" in lines[0] and "move ScriptNet into a module" in lines[0]


def test_only_main_py_at_the_top_level() -> None:
    """Every module lives in gradcam_cli/, so none can shadow a user's module of its name."""
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["main.py"]
    main = (ROOT / "main.py").read_text(encoding="utf-8")
    assert "from gradcam_cli.cli import command_line" in main


def test_the_packaged_labels_are_the_checkouts() -> None:
    """--labels_path imagenet1000_labels.txt from a checkout and --imageNet_labels from an
    installed package read the same file."""
    assert filecmp.cmp(ROOT / "imagenet1000_labels.txt",
                       ROOT / "gradcam_cli" / "imagenet1000_labels.txt", shallow=False)


def test_no_dependency_has_an_upper_bound() -> None:
    """A cap would make pip downgrade a user's newer torch (gigabytes) or fail to resolve; a
    cap is allowed only with a comment above it naming a known break."""
    for path in ROOT.glob("requirements*.txt"):
        previous = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            requirement = line.split("#")[0].strip()
            if re.search(r"(<|~=)", requirement):
                assert "known break" in previous, f"{path.name}: {line}"
            previous = line


def test_pyproject_reads_the_requirements_files() -> None:
    """One source of truth: the package's dependencies and extras are the requirements files."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dependencies = { file = ["requirements.txt"] }' in text
    assert 'gradcam = "gradcam_cli.cli:command_line"' in text
    assert textwrap.dedent('''\
        optional-dependencies.test = { file = ["requirements-test.txt"] }''') in text
