"""timm training checkpoints, ``--arch timm:NAME``, timm's data config as preprocessing, and
.safetensors state_dicts (issue 18, items 3 and 4).

Checks values: the loaded model's outputs equal those of the model whose weights were saved
(or of its EMA copy with --ema), the preprocessing equals timm's own evaluation transform pixel
for pixel, and every user mistake ends as exit 2 with one ``main.py: error:`` line. The timm
checkpoints are written by timm's own ``CheckpointSaver`` with an optimizer, an EMA model, an
AMP scaler and train.py's argparse.Namespace, as train.py writes them.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gradcam_cli import cli, models
from gradcam_cli.images import load_rgb
from gradcam_cli.models import builtin, timm_models, torchvision_models
from gradcam_cli.preprocessing import Preprocessing, crop_image, normalize, prepare_image
from tests.cli_helpers import assert_user_error, run_main

ROOT = Path(__file__).resolve().parent.parent
CHELSEA = ROOT / "data" / "tabby" / "chelsea.png"  # 451 x 300, landscape
HOPPER = ROOT / "data" / "military uniform" / "grace_hopper.jpg"  # 512 x 600, portrait
ROCKET = ROOT / "data" / "missile" / "rocket.jpg"  # 640 x 427
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def safetensors_torch():
    return pytest.importorskip("safetensors.torch")


# ----------------------------------------------------------------------------- helpers





def cli_args(tmp_path: Path, image: Path = CHELSEA) -> list[str | Path]:
    return ["--images_path", image, "--save_dir", tmp_path / "out", "--device", "cpu",
            "--workers", "0", "--render_workers", "0", "--quiet"]


def train_args(model_name: str, num_classes: int) -> argparse.Namespace:
    """The Namespace timm's train.py parses and saves as 'args' (a representative part of its
    options, with the values train.py itself sets: device, rank, world_size, prefetcher)."""
    return argparse.Namespace(
        data_dir="/datasets/pets", dataset="", train_split="train", val_split="validation",
        class_map="", model=model_name, pretrained=False, initial_checkpoint="", resume="",
        num_classes=num_classes, gp=None, img_size=None, in_chans=None, input_size=None,
        crop_pct=None, mean=None, std=None, interpolation="", batch_size=128,
        validation_batch_size=None, channels_last=False, model_kwargs={}, opt="adamw",
        opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=0.05, clip_grad=None,
        clip_mode="norm", layer_decay=None, sched="cosine", lr=None, lr_base=5e-4,
        lr_base_size=512, lr_base_scale="", warmup_lr=1e-5, min_lr=0.0, epochs=2,
        decay_milestones=[90, 180], warmup_epochs=0, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3],
        hflip=0.5, vflip=0.0, color_jitter=0.4, aa="rand-m9-mstd0.5", reprob=0.25,
        remode="pixel", mixup=0.8, cutmix=1.0, cutmix_minmax=None, smoothing=0.1,
        train_interpolation="random", drop=0.0, drop_path=0.1, bn_momentum=None, bn_eps=None,
        model_ema=True, model_ema_decay=0.9998, seed=42, log_interval=50, workers=8,
        amp=True, amp_dtype="float16", pin_mem=False, output="", experiment="",
        eval_metric="top1", prefetcher=True, device="cuda:0", distributed=False, world_size=1,
        rank=0, local_rank=0, grad_accum_steps=1)


class Checkpoint:
    """A timm training checkpoint on disk and the models whose weights it holds."""

    def __init__(self, path: Path, model: nn.Module, ema: nn.Module | None):
        self.path, self.model, self.ema = path, model, ema


def write_timm_checkpoint(timm, folder: Path, name: str, num_classes: int,
                          with_ema: bool = True) -> Checkpoint:
    """What timm's train.py writes (model_best.pth.tar), written by timm's CheckpointSaver
    after an AdamW step, with a ModelEmaV3 copy (decay 0.5, so it differs from the model),
    an AMP scaler and train.py's args."""
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    with torch.no_grad():  # a head that picks a class clearly, so top-1 is not a near-tie
        model.get_classifier().weight.mul_(50)
    ema = ModelEmaV3(model, decay=0.5) if with_ema else None
    optimizer = create_optimizer_v2(model, "adamw", lr=0.01, weight_decay=0.05)
    model.train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()  # the optimizer now holds state (step, exp_avg, exp_avg_sq)
    if ema is not None:
        ema.update(model)
    model.eval()
    saver = CheckpointSaver(model, optimizer, args=train_args(name, num_classes),
                            model_ema=ema, amp_scaler=NativeScaler(device="cpu"),
                            checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=1, metric=81.25)
    path = folder / "model_best.pth.tar"
    assert path.is_file()
    return Checkpoint(path, model, ema.module.eval() if ema is not None else None)


@pytest.fixture(scope="module")
def resnet_checkpoint(timm, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return write_timm_checkpoint(timm, tmp_path_factory.mktemp("resnet18"), "resnet18", 7)


@pytest.fixture(scope="module")
def vit_checkpoint(timm, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return write_timm_checkpoint(timm, tmp_path_factory.mktemp("vit"), "vit_tiny_patch16_224", 5)


@pytest.fixture(scope="module")
def no_ema_checkpoint(timm, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return write_timm_checkpoint(timm, tmp_path_factory.mktemp("no_ema"), "resnet18", 7,
                                 with_ema=False)


def outputs(model: nn.Module, preprocessing: Preprocessing, photo: Path = CHELSEA
            ) -> torch.Tensor:
    """The model's outputs for the photo, preprocessed as the tool does it."""
    _, model_input = prepare_image(load_rgb(photo), preprocessing)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(model_input)[None])


def expected_from_config(config) -> Preprocessing:
    """timm's transforms_imagenet_eval, written out: scale = floor(size / crop_pct)."""
    size = config["input_size"][-1]
    return Preprocessing(resize=math.floor(size / config["crop_pct"]), crop=size,
                         mean=tuple(config["mean"]), std=tuple(config["std"]),
                         interpolation=config["interpolation"],
                         squash=config["crop_mode"] == "squash")


def random_resnet18(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1234)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


# ----------------------------------------------------------------------------- checkpoints

def test_a_timm_checkpoint_names_only_argparse_namespace(resnet_checkpoint: Checkpoint) -> None:
    """What the weights-only scan finds in train.py's checkpoint: its args' Namespace, nothing
    else (optimizer, EMA, scaler and saver state are plain). That is the one type allowed."""
    path = str(resnet_checkpoint.path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["argparse.Namespace"]
    keys = set(torch.load(path, weights_only=False))
    assert {"arch", "state_dict", "state_dict_ema", "args", "optimizer", "epoch", "version",
            "metric", "amp_scaler"} <= keys


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_timm_checkpoint_loads_with_no_flags(which: str, request: pytest.FixtureRequest,
                                             timm) -> None:
    """The checkpoint's own arch, head sized from its weights, strict: outputs equal the
    saved model's; with --ema they equal the EMA model's (which differ from them)."""
    checkpoint: Checkpoint = request.getfixturevalue(f"{which}_checkpoint")
    loaded = models.load_model(str(checkpoint.path))
    assert type(loaded.model) is type(checkpoint.model)
    config = timm.data.resolve_data_config({}, model=checkpoint.model)
    assert loaded.preprocessing == expected_from_config(config)
    expected = outputs(checkpoint.model, loaded.preprocessing)
    got = outputs(loaded.model, loaded.preprocessing)
    assert got.shape == expected.shape == (1, checkpoint.model.num_classes)
    assert torch.equal(got, expected)

    with_ema = models.load_model(str(checkpoint.path), ema=True)
    ema_expected = outputs(checkpoint.ema, with_ema.preprocessing)
    assert torch.equal(outputs(with_ema.model, with_ema.preprocessing), ema_expected)
    assert not torch.allclose(ema_expected, expected, atol=1e-3)


def test_timm_checkpoint_preprocessing_values(resnet_checkpoint: Checkpoint,
                                              vit_checkpoint: Checkpoint) -> None:
    """resnet18 (a1_in1k): 224 crop of a 235 resize (224 / 0.95), bicubic, ImageNet's mean;
    vit_tiny (augreg): 224 of 248 (224 / 0.9), bicubic, mean and std 0.5."""
    assert models.load_model(str(resnet_checkpoint.path)).preprocessing == Preprocessing(
        235, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert models.load_model(str(vit_checkpoint.path)).preprocessing == Preprocessing(
        248, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


@pytest.mark.slow
def test_dataparallel_and_legacy_timm_checkpoints(resnet_checkpoint: Checkpoint,
                                                  tmp_path: Path) -> None:
    """'module.'-prefixed weights, saved in torch.save's legacy (non-zip) format: same model."""
    content = torch.load(str(resnet_checkpoint.path), weights_only=False)
    content["state_dict"] = {f"module.{k}": v for k, v in content["state_dict"].items()}
    path = tmp_path / "legacy.pth.tar"
    torch.save(content, path, _use_new_zipfile_serialization=False)
    loaded = models.load_model(str(path))
    assert torch.equal(outputs(loaded.model, loaded.preprocessing),
                       outputs(resnet_checkpoint.model, loaded.preprocessing))


@pytest.mark.slow
def test_arch_overrides_the_checkpoints_own(resnet_checkpoint: Checkpoint) -> None:
    """--arch resnet18 on timm's resnet18 checkpoint: torchvision's ResNet (same keys) with
    torchvision's preprocessing, the same outputs."""
    loaded = models.load_model(str(resnet_checkpoint.path), arch="resnet18")
    assert type(loaded.model) is torchvision.models.ResNet
    assert loaded.preprocessing == torchvision_models.torchvision_preprocessing("resnet18")
    expected = outputs(resnet_checkpoint.model, loaded.preprocessing)
    assert torch.allclose(outputs(loaded.model, loaded.preprocessing), expected, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_end_to_end(resnet_checkpoint: Checkpoint, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """No flags: the figure and summary.csv are written, top-1 is the model's own argmax."""
    code, _, err = run_main(capsys, "--model_path", resnet_checkpoint.path, *cli_args(tmp_path))
    assert code == 0, err
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 1
    loaded = models.load_model(str(resnet_checkpoint.path))
    scores = outputs(resnet_checkpoint.model, loaded.preprocessing)[0]
    assert rows[0]["top1"] == f"class {int(scores.argmax())}"
    assert float(rows[0]["top1_prob"]) == pytest.approx(
        float(scores.softmax(0).max()), abs=1e-5)
    figure = tmp_path / "out" / rows[0]["figures"]
    assert figure.is_file() and figure.stat().st_size > 10_000


# ----------------------------------------------------------------------------- preprocessing

CONFIGS = {  # model (default tag) or pretrained tag -> what its data config exercises
    "resnet18": "center, crop_pct 0.95, bicubic",
    "vit_tiny_patch16_224": "center, crop_pct 0.9, mean/std 0.5",
    "resnet50.tv_in1k": "center, crop_pct 0.875, bilinear",
    "dm_nfnet_f0.dm_in1k": "squash, crop_pct 0.9, 192 px",
    "convnext_tiny.fb_in22k_ft_in1k_384": "squash, crop_pct 1.0, 384 px",
}


@pytest.mark.parametrize("photo", [CHELSEA, HOPPER, ROCKET], ids=lambda p: p.name)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_preprocessing_equals_timms_eval_transform(name: str, photo: Path, timm) -> None:
    """crop_image + normalize equal timm.data.create_transform(**config) on real photos
    (landscape and portrait): the crop pixel for pixel, the input exactly (tolerance 0)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name).to_dict()
    config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    ours = timm_models.preprocessing_from_data_config(config, name)
    assert ours == expected_from_config(config)
    transform = timm.data.create_transform(**config)
    image = load_rgb(photo)
    shown = crop_image(image, ours)
    geometry = torchvision.transforms.Compose(transform.transforms[:-2])  # Resize, CenterCrop
    assert np.array_equal(shown, np.asarray(geometry(image)))
    got = normalize(torch.from_numpy(shown[None].copy()), ours, torch.device("cpu"))[0]
    expected = transform(image)
    assert got.shape == expected.shape == (3, ours.crop, ours.crop)
    assert float((got - expected).abs().max()) == 0.0


def test_whole_timm_models_get_timms_data_config(timm, tmp_path: Path) -> None:
    """A whole timm model (torch.save, --trust_model) gets the data config timm resolves for
    it, also a squash one (pretrained_cfg overlay)."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=3,
                              pretrained_cfg_overlay={"crop_mode": "squash", "crop_pct": 1.0})
    path = tmp_path / "whole.pt"
    torch.save(model.eval(), path)
    loaded = models.load_model(str(path), trust_model=True)
    assert loaded.preprocessing == Preprocessing(224, 224, IMAGENET_MEAN, IMAGENET_STD,
                                                 "bicubic", squash=True)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert models.whole_model_preprocessing(vit) == expected_from_config(
        timm.data.resolve_data_config({}, model=vit))


def test_border_and_large_crop_pct_are_approximated_with_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    """'border' becomes 'center', crop_pct > 1 a resize to the crop: each says so."""
    config = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
              "std": IMAGENET_STD, "crop_pct": 1.15, "crop_mode": "border"}
    found = timm_models.preprocessing_from_data_config(config, "--arch timm:x")
    assert found == Preprocessing(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    err = capsys.readouterr().err
    assert "'border'" in err and "crop_pct 1.15" in err


# ----------------------------------------------------------------------------- --arch timm:

@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_arch_timm_with_a_plain_state_dict(suffix: str, resnet_checkpoint: Checkpoint,
                                           tmp_path: Path, timm) -> None:
    """--arch timm:resnet18 with the bare state_dict (torch.save or safetensors)."""
    state = resnet_checkpoint.model.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        pytest.importorskip("safetensors.torch").save_file(state, str(path))
    loaded = models.load_model(str(path), arch="timm:resnet18")
    assert type(loaded.model) is type(resnet_checkpoint.model)
    assert loaded.preprocessing == Preprocessing(235, 224, IMAGENET_MEAN, IMAGENET_STD,
                                                 "bicubic")
    assert torch.equal(outputs(loaded.model, loaded.preprocessing),
                       outputs(resnet_checkpoint.model, loaded.preprocessing))


def test_arch_timm_with_a_pretrained_tag_takes_that_tags_config(
        resnet_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """timm:resnet18.tv_in1k: the same weights, torchvision's recipe (bilinear, 0.875)."""
    path = tmp_path / "weights.pt"
    torch.save(resnet_checkpoint.model.state_dict(), path)
    loaded = models.load_model(str(path), arch="timm:resnet18.tv_in1k")
    assert loaded.preprocessing == Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD,
                                                 "bilinear")


# ----------------------------------------------------------------------------- safetensors

def test_safetensors_with_a_torchvision_arch(safetensors_torch, tmp_path: Path) -> None:
    """--arch resnet18 with a .safetensors (10 classes): torchvision's model, its outputs."""
    saved = random_resnet18(num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    safetensors_torch.save_file(saved.state_dict(), str(path))
    loaded = models.load_model(str(path), arch="resnet18")
    assert type(loaded.model) is torchvision.models.ResNet
    assert loaded.preprocessing == torchvision_models.torchvision_preprocessing("resnet18")
    got = outputs(loaded.model, loaded.preprocessing)
    assert got.shape == (1, 10)
    assert torch.equal(got, outputs(saved, loaded.preprocessing))


@pytest.mark.slow
def test_safetensors_with_the_builtin_arch(safetensors_torch, tmp_path: Path) -> None:
    """--arch efficientnet-lite0 with a .safetensors of 7 classes."""
    torch.manual_seed(99)
    saved = builtin.builtin_architecture(num_classes=7).eval()
    path = tmp_path / "lite0.safetensors"
    safetensors_torch.save_file(saved.state_dict(), str(path))
    loaded = models.load_model(str(path), arch="efficientnet-lite0")
    assert loaded.preprocessing == models.BUILTIN_PREPROCESSING
    got = outputs(loaded.model, loaded.preprocessing)
    assert got.shape == (1, 7)
    assert torch.equal(got, outputs(saved, loaded.preprocessing))


@pytest.mark.slow
def test_safetensors_end_to_end(safetensors_torch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    saved = random_resnet18(num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    safetensors_torch.save_file(saved.state_dict(), str(path))
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "resnet18",
                            *cli_args(tmp_path))
    assert code == 0, err
    assert (tmp_path / "out" / "summary.csv").is_file()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mismatched_keys_are_summed_up(suffix: str, safetensors_torch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """resnet18 weights with --arch resnet34: the keys resnet34 has and the file lacks."""
    path = tmp_path / f"resnet18{suffix}"
    state = random_resnet18().state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors_torch.save_file(state, str(path))
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "resnet34",
                            *cli_args(tmp_path))
    assert_user_error(code, err, str(path), "does not match --arch resnet34",
                      "96 keys missing from the file", "layer1.2.conv1.weight")


def test_shape_mismatch_is_named(timm, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """vit_tiny weights as vit_small: same keys, other widths; the first one is named."""
    path = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)
    code, _, err = run_main(capsys, "--model_path", path, "--arch",
                            "timm:vit_small_patch16_224", *cli_args(tmp_path))
    assert_user_error(code, err, "does not match --arch timm:vit_small_patch16_224",
                      "of another shape", "in the file", "in the architecture")


def test_unknown_timm_name_suggests_close_ones(timm, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.pt"
    torch.save(random_resnet18().state_dict(), path)
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "timm:resnet181",
                            *cli_args(tmp_path))
    assert_user_error(code, err, "--arch timm:resnet181", "'resnet181'", "did you mean",
                      "timm:resnet18")


def test_safetensors_without_arch(safetensors_torch, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(random_resnet18().state_dict(), str(path))
    code, _, err = run_main(capsys, "--model_path", path, *cli_args(tmp_path))
    assert_user_error(code, err, str(path), "--arch NAME", "timm:NAME", "efficientnet-lite0")


def test_ema_with_safetensors(safetensors_torch, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(random_resnet18().state_dict(), str(path))
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "resnet18", "--ema",
                            *cli_args(tmp_path))
    assert_user_error(code, err, "--ema is only for timm training checkpoints")


def test_corrupt_safetensors(safetensors_torch, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.safetensors"
    safetensors_torch.save_file(random_resnet18().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:5000])  # cut short, as by a failed copy
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "resnet18",
                            *cli_args(tmp_path))
    assert_user_error(code, err, str(path), "not a readable .safetensors file")


def test_safetensors_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    code, _, err = run_main(capsys, "--model_path", path, "--arch", "resnet18",
                            *cli_args(tmp_path))
    assert_user_error(code, err, "pip install safetensors")


@pytest.mark.slow
def test_ema_without_ema_weights(no_ema_checkpoint: Checkpoint, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "--model_path", no_ema_checkpoint.path, "--ema",
                            *cli_args(tmp_path))
    assert_user_error(code, err, "--ema", "no EMA weights", "state_dict_ema", "without --ema")
    loaded = models.load_model(str(no_ema_checkpoint.path))  # without --ema: its weights
    assert torch.equal(outputs(loaded.model, loaded.preprocessing),
                       outputs(no_ema_checkpoint.model, loaded.preprocessing))


@pytest.mark.parametrize("how", ["checkpoint", "arch"])
def test_timm_not_installed(how: str, resnet_checkpoint: Checkpoint, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """Without timm, the checkpoint still unpickles (it holds no timm class) and the message
    names the architecture and the install command."""
    if how == "checkpoint":
        argv = ["--model_path", resnet_checkpoint.path]
    else:
        path = tmp_path / "weights.pt"
        torch.save(resnet_checkpoint.model.state_dict(), path)
        argv = ["--model_path", path, "--arch", "timm:resnet18"]
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = run_main(capsys, *argv, *cli_args(tmp_path))
    needle = "the timm architecture resnet18" if how == "checkpoint" else "--arch timm:resnet18"
    assert_user_error(code, err, needle, "pip install timm")


class _RunsACommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["args", "top"])
def test_checkpoint_with_unsafe_content_is_still_refused(
        where: str, resnet_checkpoint: Checkpoint, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A timm checkpoint that also holds os.system (in its args Namespace or beside them):
    refused without --trust_model, before anything of it runs."""
    marker = tmp_path / "ran"
    content = torch.load(str(resnet_checkpoint.path), weights_only=False)
    payload = _RunsACommand(f"touch '{marker}'")
    if where == "args":
        content["args"].on_load = payload
    else:
        content["hook"] = payload
    path = tmp_path / "evil.pth.tar"
    torch.save(content, path)
    assert not marker.exists()
    code, _, err = run_main(capsys, "--model_path", path, *cli_args(tmp_path))
    assert_user_error(code, err, "system", "--trust_model")
    assert not marker.exists()


@pytest.mark.slow
def test_timm_and_safetensors_are_imported_only_when_needed(tmp_path: Path) -> None:
    """Loading the built-in model or a torchvision state_dict imports neither package."""
    path = tmp_path / "weights.pt"
    torch.save(random_resnet18().state_dict(), path)
    script = (
        "import sys\n"
        "from gradcam_cli import cli, models\n"
        "models.load_model(None)\n"
        f"models.load_model({str(path)!r}, arch='resnet18')\n"
        "print(sorted(m for m in ('timm', 'safetensors') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("form", ["built-in", "torchvision name", "whole model"])
def test_ema_with_a_model_that_has_no_ema_weights_is_one_line(form: str, tmp_path: Path,
                                                             capsys) -> None:
    """--ema names EMA weights, which only a training checkpoint holds: every other form is
    refused rather than silently explained with its ordinary weights."""
    if form == "whole model":
        path = tmp_path / "whole.pt"
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()), path)
        model = [str(path)]
    else:
        model = [] if form == "built-in" else ["resnet18"]
    code = cli.main([*(["--model_path", *model] if model else []), "--ema", "--images_path",
                     str(CHELSEA), "--save_dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--ema is only for timm training checkpoints" in err, err
    assert len(err.strip().splitlines()) == 1
