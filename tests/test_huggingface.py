"""Hugging Face image classifiers: save_pretrained folders and hf:ORG/NAME, loaded offline.

Every family is built tiny from its config with random weights (re-initialised with He-normal
convolutions and unit-gain norms, so that activations do not vanish and the maps are not all
zero), saved with the image processor its hub checkpoints use, and loaded through
``models.load_model``. What is compared, and how closely (tolerances measured on these models
with the installed transformers 5):

* **Model input**, on data/tabby/chelsea.png (451 x 300) and data/military uniform/
  grace_hopper.jpg (512 x 600). The processor transformers 5's ``AutoImageProcessor``
  returns by default is the torchvision backend (the "fast" processor); ``backend="pil"``
  (formerly ``use_fast=False``) gives the PIL backend (the "slow" one). This tool resizes with
  PIL, so its input equals the **slow** processor's to float rounding (``INPUT_ATOL``; measured
  0 for most families, 2.4e-7 for EfficientNet's two normalizations). The **fast** processor's
  antialiased torchvision resize rounds some pixels to the neighbouring 8-bit level: its input
  differs from ours (and from the slow one's) by at most one level in under 1% of the values
  (measured: one level in at most 0.6%). With NEAREST (EfficientNet's hub setting)
  torchvision's nearest-exact picks a neighbouring source pixel for 10.5% of grace_hopper's
  values (up to 209 levels off), so the fast comparison is left out there: the slow processor
  is matched exactly.
* **Probabilities and Grad-CAM maps** at the default layer, computed on our input and on the
  processor's, for chelsea.png: on the slow processor's input they agree to 1e-6 (maps 1e-5:
  EfficientNet's float rounding moves them by 1.5e-6); on the fast processor's, probabilities
  within ``FAST_PROBABILITY_ATOL`` and maps (min-max normalized, upsampled) within
  ``FAST_MAP_ATOL`` (measured maxima 8.5e-4 and 6.7e-3).
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from gradcam_cli import cli  # noqa: E402
from gradcam_cli.gradcam import explain, layers_in_run_order, top_and_lowest  # noqa: E402
from gradcam_cli.images import load_rgb  # noqa: E402
from gradcam_cli.layer_layouts import Layout, is_patch_embedding, transformer_default  # noqa: E402
from gradcam_cli.models import ModelError, load_model  # noqa: E402
from gradcam_cli.models.huggingface import (  # noqa: E402
    SizeError,
    labels_of,
    processor_preprocessing,
)
from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, Preprocessing, prepare_image  # noqa: E402
from gradcam_cli.targets import pick_targets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PHOTOS = [DATA / "tabby" / "chelsea.png", DATA / "military uniform" / "grace_hopper.jpg"]
INPUT_ATOL = 1e-6
FAST_LEVELS = 1.0 + 1e-3  # the fast processor's input: at most one 8-bit level off ...
FAST_FRACTION = 0.01  # ... in at most 1% of the values
FAST_PROBABILITY_ATOL = 2e-3
FAST_MAP_ATOL = 0.02
SLOW_PROBABILITY_ATOL = 1e-6
SLOW_MAP_ATOL = 1e-5  # EfficientNet's inputs differ by float rounding (2.4e-7): maps by 1.5e-6
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
EFFICIENTNET_STD = (0.47853944, 0.4732864, 0.47434163)  # google/efficientnet-b0's image_std
NAMES = ["cat", "dog", "bird", "fish", "frog"]
TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=224, patch_size=16, num_labels=5)


# ----------------------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """A tiny model of one family, the image processor its hub checkpoints use (class name
    and settings), the Preprocessing that processor must read as, and the default layer."""

    model: Callable[[], nn.Module]
    processor: str
    settings: dict = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    default_layer: str = ""


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT))


FAMILIES = {
    # google/vit-base-patch16-224: squash to 224, bilinear, mean = std = 0.5
    "vit": Family(_vit, "ViTImageProcessor", {},
                  Preprocessing(224, 224, HALF, HALF, "bilinear", True, "floor"),
                  "vit.layers.1.layernorm_before"),
    # facebook/deit-base-distilled-patch16-224: squash to 256, crop 224, bicubic, ImageNet
    "deit": Family(lambda: transformers.DeiTForImageClassificationWithTeacher(
                       transformers.DeiTConfig(**TINY_VIT)),
                   "DeiTImageProcessor", {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD},
                   Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", True, "floor"),
                   "deit.layers.1.layernorm_before"),
    # microsoft/beit-base-patch16-224: squash to 224, bilinear, 0.5
    "beit": Family(lambda: transformers.BeitForImageClassification(
                       transformers.BeitConfig(**TINY_VIT, use_mean_pooling=True)),
                   "BeitImageProcessor", {"resample": 2},
                   Preprocessing(224, 224, HALF, HALF, "bilinear", True, "floor"),
                   "beit.layers.1.layernorm_before"),
    # microsoft/swin-tiny-patch4-window7-224: a ViTImageProcessor, bicubic, ImageNet
    "swin": Family(lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
                       image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                       num_heads=[1, 1, 1, 1], window_size=7, num_labels=5)),
                   "ViTImageProcessor", {"resample": 3, "image_mean": IMAGENET_MEAN,
                                         "image_std": IMAGENET_STD},
                   Preprocessing(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", True,
                                 "floor"),
                   "swin.layernorm"),
    # facebook/convnext-tiny-224: shortest_edge 224 with crop_pct 0.875: 256, crop 224
    "convnext": Family(lambda: transformers.ConvNextForImageClassification(
                           transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32],
                                                       depths=[1, 1, 1, 1], num_labels=5)),
                       "ConvNextImageProcessor",
                       {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
                        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD},
                       Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", False,
                                     "floor"),
                       "convnext.encoder.stages.3.layers.0.dwconv"),
    # microsoft/resnet-50: the same ConvNextImageProcessor settings
    "resnet": Family(lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
                         embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 2],
                         layer_type="basic", num_labels=5)),
                     "ConvNextImageProcessor",
                     {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
                      "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD},
                     Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", False,
                                   "floor"),
                     "resnet.encoder.stages.3.layers.1.layer.1.convolution"),
    # google/efficientnet-b0: squash to 224 with NEAREST; include_top divides by image_std a
    # second time, so the std on [0, 1] pixels is image_std squared (ImageNet's, nearly)
    "efficientnet": Family(lambda: transformers.EfficientNetForImageClassification(
                               transformers.EfficientNetConfig(
                                   image_size=224, width_coefficient=0.1, depth_coefficient=0.1,
                                   hidden_dim=128, num_labels=5)),
                           "EfficientNetImageProcessor",
                           {"size": {"height": 224, "width": 224}, "resample": 0,
                            "image_mean": IMAGENET_MEAN, "image_std": EFFICIENTNET_STD,
                            "include_top": True},
                           Preprocessing(224, 224, IMAGENET_MEAN,
                                         tuple(s * s for s in EFFICIENTNET_STD), "nearest", True,
                                         "floor"),
                           "efficientnet.encoder.top_conv"),
    # apple/mobilevit-small: shortest edge 288, crop 256, bilinear, no normalization, BGR
    "mobilevit": Family(lambda: transformers.MobileViTForImageClassification(
                            transformers.MobileViTConfig(
                                image_size=256, hidden_sizes=[16, 24, 32],
                                neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=5)),
                        "MobileViTImageProcessor",
                        {"size": {"shortest_edge": 288}, "crop_size": {"height": 256,
                                                                       "width": 256},
                         "resample": 2},
                        Preprocessing(288, 256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear",
                                      False, "floor", bgr=True),
                        "mobilevit.conv_1x1_exp.convolution"),
}


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that keep activations alive through a tiny random network: with transformers'
    own initialisation EfficientNet's and MobileViT's activations shrink layer by layer until
    their logits are exactly zero. Convolutions get He-normal weights, norms unit gain, linear
    layers 1/sqrt(fan_in), the classifier scaled so the logits spread over about one unit."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) \
                    and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, module.in_features ** -0.5)
        size = getattr(model.config, "image_size", 224)
        logits = model.eval()(torch.rand(2, 3, size, size)).logits
        spread = float(logits.std())
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)
                 and m.out_features == model.config.num_labels]
        for head in heads:
            head.weight.mul_(1.0 / max(spread, 1e-30))
    return model.eval()


def processor_of(family: Family, backend: str = "torchvision"):
    name = family.processor + ("Pil" if backend == "pil" else "")
    return getattr(transformers, name)(**family.settings)


def save_family(name: str, folder: Path, **config) -> Path:
    family = FAMILIES[name]
    model = lively(family.model())
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    processor_of(family).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``saved(name)``: the folder of that family's tiny model, saved once per module."""
    folders: dict[str, Path] = {}

    def folder_of(name: str) -> Path:
        if name not in folders:
            folders[name] = save_family(name, tmp_path_factory.mktemp(name))
        return folders[name]
    return folder_of


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails the test: loading must stay offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def our_input(image, preprocessing: Preprocessing) -> torch.Tensor:
    return torch.from_numpy(prepare_image(image, preprocessing)[1])[None]


def probabilities_and_maps(model: nn.Module, images: torch.Tensor, layer: nn.Module,
                           classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        probabilities = torch.softmax(model(images).logits, dim=1)
    _, maps = explain(model, images, [layer], classes)
    return probabilities, maps[0]


def levels(difference: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """A difference in model input, in 8-bit pixel levels."""
    return difference.abs() * torch.tensor(preprocessing.std)[:, None, None] * 255.0


# ----------------------------------------------------------------------------- every family

@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_input_probabilities_and_maps(name: str, saved, no_network) -> None:
    family = FAMILIES[name]
    loaded = load_model(str(saved(name)))
    model = loaded.model
    assert not model.training
    assert loaded.labels is None and loaded.multi_label is False  # LABEL_0 ... are no names
    got = loaded.preprocessing
    assert (got.resize, got.crop, got.interpolation, got.squash, got.crop_offset, got.bgr) == (
        family.preprocessing.resize, family.preprocessing.crop,
        family.preprocessing.interpolation, family.preprocessing.squash, "floor",
        family.preprocessing.bgr)
    np.testing.assert_allclose(got.mean, family.preprocessing.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.std, family.preprocessing.std, rtol=1e-6)

    fast = transformers.AutoImageProcessor.from_pretrained(saved(name), local_files_only=True)
    slow = transformers.AutoImageProcessor.from_pretrained(saved(name), local_files_only=True,
                                                           backend="pil")
    assert (fast.backend, slow.backend) == ("torchvision", "pil")
    for photo in PHOTOS:
        image = load_rgb(photo)
        ours = our_input(image, got)
        from_slow = slow(images=image, return_tensors="pt")["pixel_values"]
        from_fast = fast(images=image, return_tensors="pt")["pixel_values"]
        assert ours.shape == from_slow.shape == from_fast.shape == (1, 3, got.crop, got.crop)
        torch.testing.assert_close(ours, from_slow, rtol=0, atol=INPUT_ATOL)
        if got.interpolation != "nearest":
            off = levels(from_fast[0] - ours[0], got)
            assert float(off.max()) <= FAST_LEVELS
            assert float((off > 0.5).float().mean()) <= FAST_FRACTION

    # probabilities and maps at the default layer, on chelsea.png
    image = load_rgb(PHOTOS[0])
    ours = our_input(image, got)
    layers, _ = layers_in_run_order(model, ours)
    (target,) = pick_targets(layers, [1], None, backcount_given=False)
    assert target.name == family.default_layer
    with torch.no_grad():
        classes = top_and_lowest(model(ours).logits)
    probabilities, maps = probabilities_and_maps(model, ours, target.module, classes)
    assert maps[:, 0].amax() > 0, "the top class's map is all zero: it would prove nothing"
    references = [(slow, SLOW_PROBABILITY_ATOL, SLOW_MAP_ATOL)]
    if got.interpolation != "nearest":
        references.append((fast, FAST_PROBABILITY_ATOL, FAST_MAP_ATOL))
    for processor, probability_atol, map_atol in references:
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        their_probabilities, their_maps = probabilities_and_maps(model, pixels, target.module,
                                                                 classes)
        torch.testing.assert_close(probabilities, their_probabilities, rtol=0,
                                   atol=probability_atol)
        torch.testing.assert_close(maps, their_maps, rtol=0, atol=map_atol)


# ----------------------------------------------------------------------------- ViT layers

def reference_grad_cam(model: nn.Module, image: torch.Tensor, layer: nn.Module,
                       classes: torch.Tensor) -> torch.Tensor:
    """(B, K, 14, 14) Grad-CAM at a ViT token layer by hand: capture the tokens, take their
    gradient with torch.autograd.grad, drop the class token, reshape to (B, D, 14, 14)."""
    captured = []

    def keep(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = layer.register_forward_hook(keep)
    try:
        scores = model.eval()(image).logits
    finally:
        handle.remove()
    tokens = captured[-1]

    def grid(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].reshape(x.shape[0], 14, 14, x.shape[-1]).permute(0, 3, 1, 2)

    maps = []
    for k in range(classes.shape[1]):
        picked = scores.gather(1, classes[:, k:k + 1]).sum()
        gradient, = torch.autograd.grad(picked, tokens, retain_graph=True)
        weights = grid(gradient).mean(dim=(2, 3))
        maps.append(torch.relu((weights[:, :, None, None] * grid(tokens.detach())).sum(dim=1)))
    return torch.stack(maps, dim=1)


def test_vit_default_layer_is_on_the_token_grid(saved) -> None:
    """The last block's layernorm_before, on the 14 x 14 patch grid behind the class token:
    not the patch embedding, and not the final layernorm, whose patch tokens get no gradient
    (only the class token reaches the head), so its maps are exactly zero."""
    loaded = load_model(str(saved("vit")))
    model, image = loaded.model, our_input(load_rgb(PHOTOS[0]), loaded.preprocessing)
    layers, _ = layers_in_run_order(model, image)
    default = transformer_default(layers)
    assert default.name == "vit.layers.1.layernorm_before"
    assert default.layout == Layout("tokens", (14, 14), 64, 1)
    embedding = next(layer for layer in layers if layer.is_conv)
    assert embedding.name == "vit.embeddings.patch_embeddings.projection"
    assert is_patch_embedding(layers, embedding) and default is not embedding
    _, maps = explain(model, image, [default.module], top_and_lowest, raw=True)
    assert maps[0].shape == (1, 4, 14, 14) and maps[0][:, 0].amax() > 0
    _, final = explain(model, image, [model.vit.layernorm], top_and_lowest, raw=True)
    assert torch.count_nonzero(final[0]) == 0


def run_cli(capsys: pytest.CaptureFixture[str], *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (save_pretrained's progress bar) is not the run's
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def common(tmp_path: Path, *extra) -> list:
    return ["--images_path", PHOTOS[0], "--save_dir", tmp_path / "out", "--device", "cpu",
            "--workers", "0", "--render_workers", "0", "--quiet", *extra]


def test_vit_named_layer_equals_the_hand_reshape(saved, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--layer with the model's own module name: the raw maps the run saves equal Grad-CAM
    computed by hand on that layer's tokens (reshaped without the class token)."""
    name = "vit.layers.0.layernorm_after"
    code, _, err = run_cli(capsys, "--model_path", saved("vit"), "--layer", name, "--save_raw",
                           *common(tmp_path))
    assert code == 0, err
    raw = np.load(tmp_path / "out" / "raw" / "image0.npz")
    maps, classes = torch.from_numpy(raw[f"layer-{name}"]), torch.from_numpy(raw["classes"])
    loaded = load_model(str(saved("vit")))
    image = our_input(load_rgb(PHOTOS[0]), loaded.preprocessing)
    layer = dict(loaded.model.named_modules())[name]
    expected = reference_grad_cam(loaded.model, image, layer, classes[None])[0]
    assert maps.shape == (4, 14, 14)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- command line

def summary_row(tmp_path: Path) -> dict:
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 1
    return rows[0]


def logits_on_our_input(folder: Path) -> torch.Tensor:
    loaded = load_model(str(folder))
    with torch.no_grad():
        return loaded.model(our_input(load_rgb(PHOTOS[0]), loaded.preprocessing)).logits[0]


def test_cli_default_run_with_id2label(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       no_network) -> None:
    """--model_path DIR and no layer flag: the figure and summary.csv, top-1 named from
    id2label, its probability the softmax of the model's logits on our input."""
    folder = save_family("vit", tmp_path / "vit", id2label=dict(enumerate(NAMES)),
                         label2id={n: i for i, n in enumerate(NAMES)})
    code, _, err = run_cli(capsys, "--model_path", folder, *common(tmp_path))
    assert code == 0, err
    assert err == ""
    assert (tmp_path / "out" / "image0.jpg").is_file()
    row = summary_row(tmp_path)
    probabilities = torch.softmax(logits_on_our_input(folder), dim=0)
    best = int(probabilities.argmax())
    assert row["top1"] == NAMES[best]
    assert float(row["top1_prob"]) == pytest.approx(float(probabilities[best]), rel=1e-5)
    assert "top1_peak_layer-vit.layers.1.layernorm_before" in row


def test_cli_multi_label_config_gives_sigmoid(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_family("vit", tmp_path / "vit", problem_type="multi_label_classification")
    code, _, err = run_cli(capsys, "--model_path", folder, *common(tmp_path))
    assert code == 0, err
    row = summary_row(tmp_path)
    logits = logits_on_our_input(folder)
    for column, index in [("top1", int(logits.argmax())), ("lowest", int(logits.argmin()))]:
        assert row[column] == f"class {index}"  # LABEL_i: the tool's own default names
        assert float(row[f"{column}_prob"]) == pytest.approx(
            float(torch.sigmoid(logits[index])), rel=1e-5)
    assert float(torch.sigmoid(logits).sum()) != pytest.approx(1.0, abs=0.05)


def test_cli_labels_path_overrides_id2label(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_family("vit", tmp_path / "vit", id2label=dict(enumerate(NAMES)),
                         label2id={n: i for i, n in enumerate(NAMES)})
    labels = tmp_path / "labels.txt"
    own = ["alpha", "beta", "gamma", "delta", "epsilon"]
    labels.write_text(repr(dict(enumerate(own))), encoding="utf-8")  # {0: 'alpha', ...}
    code, _, err = run_cli(capsys, "--model_path", folder, "--labels_path", labels,
                           *common(tmp_path))
    assert code == 0, err
    assert summary_row(tmp_path)["top1"] == own[int(logits_on_our_input(folder).argmax())]


def test_cli_list_layers_prints_the_models_module_names(saved,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    code, out, err = run_cli(capsys, "--model_path", saved("vit"), "--list_layers")
    assert code == 0, err
    assert "vit.embeddings.patch_embeddings.projection" in out
    marked = [line for line in out.splitlines() if line.endswith("<- default")]
    assert len(marked) == 1 and "vit.layers.1.layernorm_before" in marked[0]
    assert "explained as 14x14 (tokens, 1 special)" in marked[0]


def test_labels_of_reads_id2label_in_index_order() -> None:
    config = transformers.ViTConfig(id2label={1: "dog", 0: "cat", 2: "bird"})
    assert labels_of(config) == ["cat", "dog", "bird"]
    assert labels_of(transformers.ViTConfig(num_labels=3)) is None  # LABEL_0, LABEL_1, ...


# ----------------------------------------------------------------------------- errors

def assert_one_error(code: int, err: str, *words: str) -> str:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("main.py: error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def copy_folder(source: Path, target: Path, without: str = "") -> Path:
    shutil.copytree(source, target)
    if without:
        (target / without).unlink()
    return target


def test_folder_without_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "weights").mkdir()
    code, _, err = run_cli(capsys, "--model_path", tmp_path / "weights", "--list_layers")
    assert_one_error(code, err, "is a folder but not a Hugging Face model folder",
                     "no config.json", "give the model file inside it")


def test_remote_code_needs_trust_model(saved, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_folder(saved("vit"), tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig",
                          "AutoModelForImageClassification": "modeling_x.XForImageClassification"}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "--model_path", folder, "--list_layers")
    assert_one_error(code, err, "runs its own code from the folder", "--trust_model")


def test_missing_weights_file_is_named(saved, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_folder(saved("vit"), tmp_path / "bare", without="model.safetensors")
    code, _, err = run_cli(capsys, "--model_path", folder, "--list_layers")
    assert_one_error(code, err, "model.safetensors")


def test_not_an_image_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "--model_path", folder, "--list_layers")
    assert_one_error(code, err, "bert model is not an image classifier")


def test_weights_without_a_head_are_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A backbone saved without its classifier would get a random head: refused."""
    folder = tmp_path / "backbone"
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(folder)
    code, _, err = run_cli(capsys, "--model_path", folder, "--list_layers")
    assert_one_error(code, err, "the weights lack", "classifier.weight")


def test_no_preprocessor_config_warns_and_uses_imagenet(saved, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    folder = copy_folder(saved("mobilevit"), tmp_path / "noproc",
                         without="preprocessor_config.json")
    capsys.readouterr()  # saving the folder (first use) draws save_pretrained's progress bar
    loaded = load_model(str(folder))
    assert loaded.preprocessing == IMAGENET_PREPROCESSING.with_crop(256)  # config.image_size
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ")
    assert "preprocessor_config.json" in warning[0] and "--resize" in warning[0]


def test_hub_id_not_in_the_cache_says_how_to_download(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      no_network) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_cli(capsys, "--model_path", "hf:nobody/nothing", "--list_layers")
    assert_one_error(code, err, "hf:nobody/nothing", "not in the local Hugging Face cache",
                     str(tmp_path / "hub"), "hf download nobody/nothing",
                     "huggingface-cli download nobody/nothing", "then run again")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(capsys, "--model_path", "hf:nobody/nothing", "--list_layers")
    assert_one_error(code, err, str(tmp_path / "home" / "hub"))


def test_hub_id_loads_from_a_hand_built_cache(saved, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              no_network) -> None:
    """models--org--name/snapshots/<hash>/ and refs/main, as huggingface_hub lays them out:
    hf:org/name loads from there without any network call."""
    repo = tmp_path / "hub" / "models--org--name"
    commit = "0123456789abcdef0123456789abcdef01234567"
    copy_folder(saved("vit"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("hf:org/name")
    direct = load_model(str(saved("vit")))
    assert loaded.preprocessing == direct.preprocessing
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(),
                                 direct.model.state_dict().items()):
        assert torch.equal(a, b), name
    code, out, err = run_cli(capsys, "--model_path", "hf:org/name", "--list_layers")
    assert code == 0, err
    assert "vit.layers.1.layernorm_before" in out


def test_transformers_missing_says_pip_install(saved, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = run_cli(capsys, "--model_path", saved("vit"), "--list_layers")
    assert_one_error(code, err, "pip install transformers")
    with pytest.raises(ModelError, match="pip install transformers"):
        load_model(str(saved("vit")))


# ----------------------------------------------------------------------------- processors

def assert_same_input(preprocessing: Preprocessing, processor) -> None:
    for photo in PHOTOS:
        image = load_rgb(photo)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(our_input(image, preprocessing), theirs, rtol=0,
                                   atol=INPUT_ATOL)


@pytest.mark.parametrize("processor, kwargs, expected", [
    # ConvNeXt at 384 and above: squashed to n x n, no crop
    ("ConvNextImageProcessor", {"size": {"shortest_edge": 384}},
     Preprocessing(384, 384, HALF, HALF, "bicubic", True, "floor")),
    # CLIP: shortest edge, then a centre crop
    ("CLIPImageProcessor", {},
     Preprocessing(224, 224, (0.48145466, 0.4578275, 0.40821073),
                   (0.26862954, 0.26130258, 0.27577711), "bicubic", False, "floor")),
    # PoolFormer reads crop_pct its own way (the shorter side to int(n / crop_pct), then its
    # crop_size): the test images choose that reading over ConvNeXt's
    ("PoolFormerImageProcessor", {"crop_size": {"height": 200, "width": 200}},
     Preprocessing(248, 200, IMAGENET_MEAN, IMAGENET_STD, "bicubic", False, "floor")),
    # EfficientNet with rescale_offset: pixels to [-1, 1] before normalizing
    ("EfficientNetImageProcessor", {"size": {"height": 240, "width": 240}, "resample": 3,
                                    "rescale_offset": True, "rescale_factor": 1 / 127.5,
                                    "include_top": False, "do_normalize": False},
     Preprocessing(240, 240, HALF, HALF, "bicubic", True, "floor")),
])
def test_processor_readings(processor: str, kwargs: dict, expected: Preprocessing) -> None:
    fast = getattr(transformers, processor)(**kwargs)
    slow = getattr(transformers, processor + "Pil")(**kwargs)
    got = processor_preprocessing(fast, "test", twin=slow)
    assert (got.resize, got.crop, got.interpolation, got.squash, got.bgr) == (
        expected.resize, expected.crop, expected.interpolation, expected.squash, expected.bgr)
    np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.std, expected.std, rtol=1e-6)
    assert_same_input(got, slow)


@pytest.mark.parametrize("processor, kwargs, words", [
    ("ViTImageProcessor", {"size": {"height": 224, "width": 256}},
     ["size 224x256", "not square", "--resize and --crop"]),
    ("ViTImageProcessor", {"do_resize": False}, ["do_resize is false"]),
    ("ViTImageProcessor", {"do_center_crop": True, "crop_size": {"height": 200, "width": 180}},
     ["crop_size 200x180"]),
    ("ViTImageProcessor", {"do_pad": True}, ["do_pad"]),
    ("CLIPImageProcessor", {"do_center_crop": False}, ["size shortest_edge 224",
                                                       "without do_center_crop"]),
    ("MobileViTImageProcessor", {}, ["crop_size 256 is larger than the resized image (224)"]),
    ("ViTImageProcessor", {"size": {"shortest_edge": 224, "longest_edge": 300}},
     ["longest_edge 300", "shortest_edge 224", "cannot be reproduced"]),
])
def test_processor_refusals_name_the_attribute(processor: str, kwargs: dict,
                                               words: list[str]) -> None:
    with pytest.raises(ModelError) as caught:
        processor_preprocessing(getattr(transformers, processor)(**kwargs), "where")
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_size_it_cannot_reproduce_keeps_the_rest_for_resize_and_crop(
        saved, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-square fixed size: one error line that names the size and --resize/--crop; the
    error carries the model and the rest of the reading (filter, mean, std) for a caller
    that has both flags."""
    folder = copy_folder(saved("swin"), tmp_path / "wide")
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["size"] = {"height": 224, "width": 320}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    code, _, err = run_cli(capsys, "--model_path", folder, "--list_layers")
    assert_one_error(code, err, "size 224x320", "--resize and --crop")
    with pytest.raises(SizeError) as caught:
        load_model(str(folder))
    partial = caught.value.loaded.preprocessing
    assert (partial.interpolation, partial.mean, partial.std, partial.crop_offset) == (
        "bicubic", IMAGENET_MEAN, IMAGENET_STD, "floor")
    assert isinstance(caught.value.loaded.model, transformers.SwinForImageClassification)
    code, out, err = run_cli(capsys, "--model_path", folder, "--resize", "224", "--crop", "224",
                             "--list_layers")
    assert code == 0 and "swin.layernorm" in out, err


def test_legacy_torchvision_nearest_is_refused() -> None:
    """torchvision's legacy "nearest" samples other points than PIL's nearest."""
    from torchvision.transforms.v2 import InterpolationMode
    processor = transformers.ViTImageProcessor(resample=InterpolationMode.NEAREST)
    with pytest.raises(ModelError, match="resample"):
        processor_preprocessing(processor, "where")


def test_a_processor_that_does_more_than_its_settings_say_is_refused() -> None:
    """The settings are checked against the processor's own output: a processor class whose
    code shifts every value (nothing in its settings says so) is refused, not approximated."""
    class Shifted(transformers.ViTImageProcessorPil):
        def _preprocess(self, *args, **kwargs):
            feature = super()._preprocess(*args, **kwargs)
            feature["pixel_values"] = np.asarray(feature["pixel_values"]) + 0.25
            return feature

    with pytest.raises(ModelError, match="does not do what its settings"):
        processor_preprocessing(Shifted(), "where")


# ----------------------------------------------------------------------------- start-up

@pytest.mark.slow
def test_builtin_model_start_up_imports_neither_transformers_nor_timm(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "main.py"),
                           "--images_path", str(PHOTOS[0]), "--device", "cpu", "--quiet",
                           "--save_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "torch" in imported  # the output is read correctly
    assert not {name for name in imported if name.split(".")[0] in ("transformers", "timm")}
