"""Transformer layers: token and channels-last outputs, the default layer, timm models.

Every map is compared with a reference written here by hand: the layer's output is captured by
a hook, its gradient taken with ``torch.autograd.grad``, and the usual reshape applied (ViT:
``x[:, 1:].reshape(B, 14, 14, D).permute(0, 3, 1, 2)``; Swin and ConvNeXt inner layers:
``x.permute(0, 3, 1, 2)``), then Grad-CAM's formula. Models have random weights from a fixed
seed; one image each, to stay fast on two cores.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from gradcam_cli import cli, targets
from gradcam_cli.gradcam import explain, layers_in_run_order, top_and_lowest
from gradcam_cli.layer_layouts import Layout, transformer_default

RTOL = 1e-5


# ----------------------------------------------------------------------------- helpers

def module_named(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def reference_grad_cam(model: nn.Module, image: torch.Tensor, layer: nn.Module,
                       classes: torch.Tensor,
                       to_grid: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(B, K, h, w) Grad-CAM at ``layer``, by hand: capture, differentiate, reshape, weigh."""
    captured = []

    def keep(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = layer.register_forward_hook(keep)
    try:
        scores = model.eval()(image)
    finally:
        handle.remove()
    activation = captured[-1]
    maps = []
    for k in range(classes.shape[1]):
        picked = scores.gather(1, classes[:, k:k + 1]).sum()
        gradient, = torch.autograd.grad(picked, activation, retain_graph=True)
        a, g = to_grid(activation.detach()), to_grid(gradient)
        weights = g.mean(dim=(2, 3))
        maps.append(torch.relu((weights[:, :, None, None] * a).sum(dim=1)))
    return torch.stack(maps, dim=1)


def engine_maps(model: nn.Module, image: torch.Tensor, layer: nn.Module,
                method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, raw maps) from the tool's engine for top-3 + lowest."""
    scores, raw = explain(model, image, [layer], top_and_lowest, method=method, raw=True)
    return top_and_lowest(scores), raw[0]


def assert_close_maps(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0, "the reference map is all zero: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(scale))


def snapshot(model: nn.Module) -> dict:
    return {"training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_untouched(model: nn.Module, before: dict) -> None:
    assert [m.training for m in model.modules()] == before["training"]
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before["state"][key]), key


def random_head(model: nn.Module) -> nn.Module:
    """torchvision starts ViT's head at zero, so every score and map would be 0."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.05)
    return model


def tiny_vit() -> nn.Module:
    """A small torchvision ViT (2 blocks, width 16) at 224 px: 7 x 7 patches + class token."""
    torch.manual_seed(0)
    return random_head(torchvision.models.VisionTransformer(
        image_size=224, patch_size=32, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=6)).eval()


@pytest.fixture(scope="module")
def vit_b_16() -> nn.Module:
    torch.manual_seed(0)
    return random_head(torchvision.models.vit_b_16(weights=None)).eval()


@pytest.fixture(scope="module")
def swin_t() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_t(weights=None).eval()


@pytest.fixture
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 224, 224)


def layer_named(layers: list, name: str):
    return next(layer for layer in layers if layer.name == name)


# ----------------------------------------------------------------------------- ViT

@pytest.mark.slow
def test_vit_default_layer_is_the_last_blocks_first_norm(vit_b_16: nn.Module,
                                                         image: torch.Tensor) -> None:
    layers, _ = layers_in_run_order(vit_b_16, image)
    default = transformer_default(layers)
    assert default.name == "encoder.layers.encoder_layer_11.ln_1"
    assert default.layout == Layout("tokens", (14, 14), 768, 1)
    assert layer_named(layers, "conv_proj").layout.kind == "channels-first"
    (target,) = targets.pick_targets(layers, [1], None, backcount_given=False)
    assert target.name == default.name and target.module is default.module
    assert target.describe() == ("encoder.layers.encoder_layer_11.ln_1 (default layer for "
                                 "this transformer)")


@pytest.mark.parametrize("name", ["encoder.layers.encoder_layer_11.ln_1",
                                  "encoder.layers.encoder_layer_5"])
@pytest.mark.slow
def test_vit_maps_equal_the_hand_reshape(vit_b_16: nn.Module, image: torch.Tensor,
                                         name: str) -> None:
    """tokens (1, 197, 768) -> drop the class token, (1, 768, 14, 14): the engine's maps equal
    the hand computation, and the default layer's map is not all zero."""
    layer = module_named(vit_b_16, name)
    before = snapshot(vit_b_16)
    classes, maps = engine_maps(vit_b_16, image, layer)
    assert_untouched(vit_b_16, before)
    expected = reference_grad_cam(
        vit_b_16, image, layer, classes,
        lambda x: x[:, 1:].reshape(x.shape[0], 14, 14, x.shape[-1]).permute(0, 3, 1, 2))
    assert maps.shape == (1, 4, 14, 14)
    assert_close_maps(maps, expected)
    assert maps[:, 0].amax() > 0


def test_vit_final_norm_has_no_patch_gradient(vit_b_16: nn.Module, image: torch.Tensor) -> None:
    """Why the default is not the last layer: after the last block only the class token
    reaches the head, so the patch tokens' map there is exactly zero."""
    _, maps = engine_maps(vit_b_16, image, vit_b_16.encoder.ln)
    assert torch.count_nonzero(maps) == 0


# ----------------------------------------------------------------------------- Swin

def test_swin_default_and_layouts(swin_t: nn.Module, image: torch.Tensor) -> None:
    layers, _ = layers_in_run_order(swin_t, image)
    default = transformer_default(layers)
    assert default.name == "norm"
    assert default.layout == Layout("channels-last", (7, 7), 768)
    assert layer_named(layers, "features.5").layout == Layout("channels-last", (14, 14), 384)
    assert layer_named(layers, "permute").layout.kind == "channels-first"
    assert layer_named(layers, "features.0.0").layout.kind == "channels-first"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["norm", "features.5"])
def test_swin_maps_equal_the_hand_permute(swin_t: nn.Module, image: torch.Tensor,
                                          name: str) -> None:
    layer = module_named(swin_t, name)
    before = snapshot(swin_t)
    classes, maps = engine_maps(swin_t, image, layer)
    assert_untouched(swin_t, before)
    expected = reference_grad_cam(swin_t, image, layer, classes,
                                  lambda x: x.permute(0, 3, 1, 2))
    assert_close_maps(maps, expected)


def test_swin_norm_and_permute_give_the_same_map(swin_t: nn.Module, image: torch.Tensor) -> None:
    """The channels-last norm and the channels-first permute after it hold the same numbers:
    their maps must agree."""
    _, at_norm = engine_maps(swin_t, image, swin_t.norm)
    _, at_permute = engine_maps(swin_t, image, swin_t.permute)
    assert_close_maps(at_norm, at_permute)


# ----------------------------------------------------------------------------- ConvNeXt

@pytest.mark.slow
def test_convnext_inner_layer_is_channels_last() -> None:
    """Inside a ConvNeXt block, after its Permute, the LayerNorm and Linear outputs are
    (B, h, w, C); the block's own output is (B, C, h, w) again."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, num_classes=5).eval()
    image = torch.randn(1, 3, 64, 64)
    layers, _ = layers_in_run_order(model, image)
    assert layer_named(layers, "features.7.2.block.3").layout == Layout("channels-last", (2, 2),
                                                                        3072)
    assert layer_named(layers, "features.7.2.block.6").layout.kind == "channels-first"
    assert layer_named(layers, "features.7.2").layout.kind == "channels-first"
    for name, to_grid in [("features.5.8.block.2", lambda x: x.permute(0, 3, 1, 2)),
                          ("features.5.8", lambda x: x)]:
        layer = module_named(model, name)
        classes, maps = engine_maps(model, image, layer)
        assert_close_maps(maps, reference_grad_cam(model, image, layer, classes, to_grid))


# ----------------------------------------------------------------------------- refusals

class _Permuted(nn.Module):
    """A conv, then a module fed by a bare ``permute``: nothing says which axis is which."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.mix = nn.Identity()
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(self.conv(x).permute(0, 2, 3, 1) * 1.0)
        return self.head(y.mean(dim=(1, 2)))


def test_ambiguous_layout_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(B, 8, 8, 8): channels-first and channels-last give the same 8 x 8 grid. The engine
    and the command line refuse it; the line names a layer that can be explained."""
    torch.manual_seed(0)
    model = _Permuted(8).eval()
    image = torch.randn(1, 3, 32, 32)
    layers, _ = layers_in_run_order(model, image)
    assert layer_named(layers, "mix").layout is None
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot tell"):
        explain(model, image, [model.mix], top_and_lowest)
    assert_untouched(model, before)

    path = tmp_path / "permuted.pt"
    torch.save(model, path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    code = cli.main(["--model_path", str(path), "--trust_model", "--layer", "mix",
                      "--images_path", str(folder),
                      "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--crop", "32",
                      "--resize", "32"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot tell" in err and "conv" in err


def test_distinct_sizes_are_read_as_channels_last() -> None:
    """(B, 8, 8, 16) after the same bare permute: only the channels-last reading gives the
    8 x 8 grid of the conv before it, so it is explained, and exactly."""
    torch.manual_seed(0)
    model = _Permuted(16).eval()
    image = torch.randn(1, 3, 32, 32)
    layers, _ = layers_in_run_order(model, image)
    assert layer_named(layers, "mix").layout == Layout("channels-last", (8, 8), 16)
    classes, maps = engine_maps(model, image, model.mix)
    assert_close_maps(maps, reference_grad_cam(model, image, model.mix, classes,
                                               lambda x: x.permute(0, 3, 1, 2)))


@pytest.mark.slow
def test_attention_weights_are_not_a_grid() -> None:
    """timm's ViT runs Identity modules on (B, heads, T, head_dim) queries: no grid fits."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    layers, _ = layers_in_run_order(model, torch.zeros(1, 3, 224, 224))
    assert layer_named(layers, "blocks.0.attn.q_norm").layout is None
    assert transformer_default(layers).name == "blocks.11.norm1"


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def vit_file(tmp_path: Path) -> Path:
    path = tmp_path / "vit.pt"
    torch.save(tiny_vit(), path)
    return path


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_vit_default_layer_without_trust(vit_file: Path, one_image: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A whole torchvision ViT loads without --trust_model (its partial(LayerNorm) is allowed)
    and is explained at the last block's first norm, which --list_layers marks."""
    code, out, err = run_cli(capsys, "--model_path", vit_file, "--list_layers")
    assert code == 0, err
    marked = [line for line in out.splitlines() if line.endswith("<- default")]
    assert len(marked) == 1 and "encoder.layers.encoder_layer_1.ln_1" in marked[0]
    assert "explained as 7x7 (tokens, 1 special)" in marked[0]

    code, out, err = run_cli(capsys, "--model_path", vit_file, "--images_path", one_image,
                             "--save_dir", tmp_path / "out", "--device", "cpu", "--save_raw")
    assert code == 0, err
    assert err == ""
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        header = next(csv.reader(file))
    assert "top1_peak_layer-encoder.layers.encoder_layer_1.ln_1" in header
    raw = np.load(tmp_path / "out" / "raw" / "image0.npz")
    assert raw["layer-encoder.layers.encoder_layer_1.ln_1"].shape == (4, 7, 7)


def test_cli_backcount_on_patch_embedding_is_honoured_with_a_warning(
        vit_file: Path, one_image: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--model_path", vit_file, "--conv2d_backcount", "1",
                             "--images_path", one_image, "--save_dir", tmp_path / "out",
                             "--device", "cpu")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "conv_proj" in warnings[0] and "patch embedding" in warnings[0]
    assert "encoder.layers.encoder_layer_1.ln_1" in warnings[0]
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        assert "top1_peak_layer1" in next(csv.reader(file))


def test_cnn_default_is_unchanged(tmp_path: Path) -> None:
    """A CNN's last conv is no patch embedding: the default stays backcount 1."""
    model = torchvision.models.resnet18(weights=None).eval()
    layers, _ = layers_in_run_order(model, torch.zeros(1, 3, 64, 64))
    assert transformer_default(layers) is None
    (target,) = targets.pick_targets(layers, [1], None, backcount_given=False)
    assert target.name == "layer4.1.conv2" and target.backcount == 1
    assert all(layer.layout.kind == "channels-first" for layer in layers)


# ----------------------------------------------------------------------------- timm

TIMM_MODELS = [("resnet10t", "layer1"), ("convnext_atto", "layer1"),
               ("vit_tiny_patch16_224", "layer-blocks.11.norm1")]


@pytest.mark.slow
@pytest.mark.parametrize("name,tag", TIMM_MODELS)
def test_timm_whole_models_run_with_trust(name: str, tag: str, one_image: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """timm.create_model(pretrained=False) saved whole: refused without --trust_model (timm
    classes run code when unpickled), explained with it, at the expected default layer."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = random_head(timm.create_model(name, pretrained=False, num_classes=5)).eval()
    path = tmp_path / f"{name}.pt"
    torch.save(model, path)
    common = ["--images_path", one_image, "--save_dir", tmp_path / "out", "--device", "cpu"]
    code, _, err = run_cli(capsys, "--model_path", path, *common)
    assert code == 2 and "--trust_model" in err and "timm" in err
    code, out, err = run_cli(capsys, "--model_path", path, "--trust_model", *common)
    assert code == 0, err
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as file:
        header = next(csv.reader(file))
    assert f"top1_peak_{tag}" in header


@pytest.mark.slow
def test_timm_vit_map_equals_the_hand_reshape(image: torch.Tensor) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = random_head(timm.create_model("vit_tiny_patch16_224", pretrained=False)).eval()
    layer = model.blocks[-1].norm1
    classes, maps = engine_maps(model, image, layer)
    expected = reference_grad_cam(
        model, image, layer, classes,
        lambda x: x[:, 1:].reshape(x.shape[0], 14, 14, x.shape[-1]).permute(0, 3, 1, 2))
    assert_close_maps(maps, expected)


def test_later_batches_reuse_the_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout pass runs once per model, input shape and targets; the next batch of the
    same run reuses it and gets the same maps as a fresh pass."""
    from gradcam_cli import gradcam, layer_layouts
    model = tiny_vit()
    layer = model.encoder.layers[-1].ln_1
    images = torch.randn(2, 3, 224, 224)
    passes = []

    class Counting(layer_layouts.LayoutTracer):
        def __init__(self, *args) -> None:
            passes.append(1)
            super().__init__(*args)

    monkeypatch.setattr(gradcam, "LayoutTracer", Counting)
    first = explain(model, images, [layer], top_and_lowest, raw=True)[1][0]
    second = explain(model, images, [layer], top_and_lowest, raw=True)[1][0]
    assert len(passes) == 1
    assert torch.equal(first, second)
    explain(model, images[:1], [layer], top_and_lowest)  # another shape: a new pass
    assert len(passes) == 2
    assert first.amax() > 0
