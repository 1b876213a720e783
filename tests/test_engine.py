"""Value tests for the Grad-CAM engine (gradcam.py).

Every test checks numbers, not only shapes: against an independent naive Grad-CAM written
here, against the CAM identity, against hand-computed maps, and against the engine itself
under changes that must not matter (batching, freezing, in-place activations, class choice).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, vgg11

from gradcam_cli.gradcam import (
    ConvLayer,
    conv_layers_in_run_order,
    eval_mode,
    grad_cam,
    normalize_maps,
    top_and_lowest,
)

# --------------------------------------------------------------------------------------------
# An independent, naive Grad-CAM (the reference)
# --------------------------------------------------------------------------------------------


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Plain per-map min-max over the last two dims; a constant map becomes zero."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1.0),
                       torch.zeros_like(maps))


def naive_grad_cam(model: nn.Module, images: torch.Tensor, layer_names: Sequence[str],
                   classes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Textbook Grad-CAM on a deep copy of ``model``: one backward pass per (image, class).

    Every ``inplace`` flag on the copy is switched off (nn.ReLU and the test blocks here), so
    the stored activation is the target module's own output. The gradient of each target
    output is caught with ``Tensor.register_hook`` during ``scores[b, c].backward()``.
    Returns the scores and, per layer, the raw maps (B, K, h, w) in float64 (computed from the
    float32 activations/gradients)."""
    net = copy.deepcopy(model).eval()
    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    net.requires_grad_(False)  # gradients flow from the (grad-requiring) images instead:
    images = images.detach().clone().requires_grad_(True)  # no 100M-entry param grads
    modules = dict(net.named_modules())
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            call = calls[name]
            acts[name] = output

            def save_grad(grad: torch.Tensor) -> None:
                if call == calls[name]:  # keep the gradient of the last call only
                    grads[name] = grad
            output.register_hook(save_grad)
        return hook

    for name in layer_names:
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    try:
        scores = net(images)
        batch, n_classes = classes.shape
        raw = [torch.zeros(batch, n_classes, *acts[n].shape[-2:], dtype=torch.float64)
               for n in layer_names]
        for b in range(batch):
            for k in range(n_classes):
                images.grad = None
                grads.clear()
                scores[b, classes[b, k]].backward(retain_graph=True)
                for index, name in enumerate(layer_names):
                    activation = acts[name][b].detach().double()
                    if name not in grads:  # the score does not depend on this layer
                        continue
                    alpha = grads[name][b].double().mean(dim=(1, 2))
                    raw[index][b, k] = torch.relu((alpha[:, None, None] * activation).sum(0))
    finally:
        for handle in handles:
            handle.remove()
    return scores.detach(), raw


def naive_normalized(raw: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """Upsample (bilinear, align_corners=False) and min-max normalize: (L, B, K, H, W)."""
    return torch.stack([_minmax(F.interpolate(m, size=tuple(size), mode="bilinear",
                                              align_corners=False)) for m in raw])


def assert_raw_close(got: list[torch.Tensor], expected: list[torch.Tensor],
                     rel: float = 1e-5) -> None:
    """Raw maps agree to ``rel`` of the layer's largest map value (and to 1e-5 absolute)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert g.shape == e.shape
        assert torch.isfinite(g).all()
        scale = max(float(e.abs().max()), 1e-12)
        err = float((g.double() - e).abs().max())
        assert err <= 1e-5, f"max abs diff {err}"
        assert err <= rel * scale, f"max abs diff {err} vs map scale {scale}"


def assert_normalized_close(got: torch.Tensor, raw_expected: list[torch.Tensor],
                            size: Sequence[int], tol: float = 1e-5,
                            min_rel_span: float = 1e-2) -> int:
    """Normalized maps agree to ``tol`` wherever the raw map's range is not degenerate.

    A map is compared when its raw span is at least ``min_rel_span`` of the layer's largest
    raw value (float32 rounding is ~1e-7 of that, so the normalized error stays ~1e-5 below
    it). All maps must lie in [0, 1] and be finite. Returns how many maps were compared.
    """
    expected = naive_normalized(raw_expected, size)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert got.min() >= 0 and got.max() <= 1
    compared = 0
    for layer, raw in enumerate(raw_expected):
        scale = float(raw.abs().max())
        span = raw.amax(dim=(-2, -1)) - raw.amin(dim=(-2, -1))
        for b in range(raw.shape[0]):
            for k in range(raw.shape[1]):
                if scale == 0 or span[b, k] < min_rel_span * scale:
                    continue
                err = float((got[layer, b, k].double() - expected[layer, b, k]).abs().max())
                assert err <= tol, f"layer {layer}, image {b}, class {k}: max abs diff {err}"
                compared += 1
    return compared


# --------------------------------------------------------------------------------------------
# Tiny seeded models
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """conv-ReLU-conv with a residual add; ``inplace`` makes the ReLU and the add in-place."""

    def __init__(self, channels: int, inplace: bool = True, batch_norm: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # ReLU right after the target conv1
        out = self.conv2(out)
        if self.inplace:
            out += x  # in-place add on conv2's own output
        else:
            out = out + x
        return self.relu(out)


class TinyNet(nn.Module):
    """Stem, a ModuleList of nested blocks (one inside a Sequential), a head conv, GAP, FC."""

    def __init__(self, n_classes: int = 6, inplace: bool = True, batch_norm: bool = False
                 ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                  nn.BatchNorm2d(8) if batch_norm else nn.Identity(),
                                  nn.ReLU(inplace=inplace))
        self.blocks = nn.ModuleList([
            ResBlock(8, inplace, batch_norm),
            nn.Sequential(nn.MaxPool2d(2), ResBlock(8, inplace, batch_norm)),
        ])
        self.head = nn.Conv2d(8, 12, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(12, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.relu(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


TINY_LAYERS = ["stem.0", "blocks.0.conv1", "blocks.1.1.conv2", "head"]


def randomise_batch_norm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def modules_by_name(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    table = dict(model.named_modules())
    return [table[n] for n in names]


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(1)
    return TinyNet()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(3)
    return resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(4)
    return vgg11(weights=None).eval()


# --------------------------------------------------------------------------------------------
# 1. Agreement with the naive reference
# --------------------------------------------------------------------------------------------


def test_tiny_cnn_matches_naive_reference(tiny: TinyNet, tiny_images: torch.Tensor) -> None:
    """Raw and normalized maps equal a textbook Grad-CAM on a tiny residual CNN with in-place
    ReLUs/adds right after the target convs, at four layers and four classes."""
    classes = torch.tensor([[0, 3, 5, 1], [2, 2, 4, 0]])
    layers = modules_by_name(tiny, TINY_LAYERS)
    ref_scores, ref_raw = naive_grad_cam(tiny, tiny_images, TINY_LAYERS, classes)

    scores, raw = grad_cam(tiny, tiny_images, layers, classes, raw=True)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-5)
    assert [tuple(m.shape) for m in raw] == [(2, 4, 12, 12), (2, 4, 12, 12), (2, 4, 6, 6),
                                             (2, 4, 6, 6)]
    assert all(float(m.max()) > 0 for m in ref_raw)  # the comparison is not 0 == 0
    assert_raw_close(raw, ref_raw)

    _, maps = grad_cam(tiny, tiny_images, layers, classes)
    assert maps.shape == (4, 2, 4, 12, 12)
    assert assert_normalized_close(maps, ref_raw, (12, 12)) >= 24


@pytest.mark.parametrize("name, layer_names, size", [
    ("resnet18", ["layer2.0.conv1", "layer3.1.conv2", "layer4.1.conv2"], 64),
    ("vgg11", ["features.3", "features.13", "features.18"], 64),
])
@pytest.mark.slow
def test_torchvision_models_match_naive_reference(request: pytest.FixtureRequest, name: str,
                                                  layer_names: list[str], size: int) -> None:
    """resnet18 and vgg11 (random weights, in-place ReLUs, residual adds, dropout) give the
    naive Grad-CAM's raw and normalized maps at three layers incl. the last conv, K=3."""
    model = request.getfixturevalue("resnet" if name == "resnet18" else "vgg")
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    classes = torch.tensor([[7, 100, 999], [0, 512, 7]])
    ref_scores, ref_raw = naive_grad_cam(model, images, layer_names, classes)

    layers = modules_by_name(model, layer_names)
    scores, raw = grad_cam(model, images, layers, classes, raw=True)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)
    assert all(float(m.max()) > 0 for m in ref_raw)
    assert_raw_close(raw, ref_raw)

    _, maps = grad_cam(model, images, layers, classes)
    assert maps.shape == (3, 2, 3, size, size)
    assert assert_normalized_close(maps, ref_raw, (size, size)) >= 6


# --------------------------------------------------------------------------------------------
# 2. CAM identity
# --------------------------------------------------------------------------------------------


class CamNet(nn.Module):
    """conv - ReLU - conv (target) - global average pooling - Linear."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.last = nn.Conv2d(6, 7, 3, padding=1)
        self.fc = nn.Linear(7, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.last(self.features(x)).mean(dim=(2, 3)))


def test_cam_identity() -> None:
    """With conv -> GAP -> Linear, Grad-CAM at the conv is CAM = ReLU(sum_k w_ck A_k) / (h w):
    raw maps equal the scaled CAM and normalized maps equal the normalized CAM."""
    torch.manual_seed(6)
    model = CamNet().eval()
    images = torch.randn(3, 3, 10, 10)
    classes = torch.tensor([[0, 1, 4], [3, 3, 2], [4, 0, 1]])

    _, raw = grad_cam(model, images, [model.last], classes, raw=True)
    _, maps = grad_cam(model, images, [model.last], classes)

    with torch.no_grad():
        activation = model.last(model.features(images))  # (B, 7, h, w)
    h, w = activation.shape[-2:]
    weights = model.fc.weight.detach()[classes]  # (B, K, 7)
    cam = torch.relu(torch.einsum("bkc,bchw->bkhw", weights, activation))
    assert float(cam.max()) > 0
    torch.testing.assert_close(raw[0] * (h * w), cam, atol=1e-5, rtol=1e-5)
    assert float((raw[0] - cam / (h * w)).abs().max()) <= 1e-6
    expected = _minmax(F.interpolate(cam, size=(10, 10), mode="bilinear", align_corners=False))
    assert float((maps[0] - expected).abs().max()) <= 1e-5


# --------------------------------------------------------------------------------------------
# 3. Hand-computed values
# --------------------------------------------------------------------------------------------


class HandNet(nn.Module):
    """conv 3->2 (2x2 kernel, only channel 0 used) - ReLU(inplace) - GAP - Linear 2->2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 2)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
            self.conv.weight[1, 0] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
            self.conv.bias.copy_(torch.tensor([0.5, -1.5]))
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_hand_computed_maps() -> None:
    """Exact Grad-CAM values worked out by hand, including the ReLU mask in the gradient and
    the pre-ReLU activation (the in-place ReLU after the conv must not leak into A).

    X = [[1,2,0],[0,1,3],[2,0,1]] (channel 0; channels 1, 2 have zero weights).
    A0 = X[i,j] - X[i+1,j+1] + 0.5 = [[.5,-.5],[.5,.5]]
    A1 = X[i,j+1] + X[i+1,j] - 1.5 = [[.5,-.5],[1.5,1.5]]
    GAP of ReLU: (0.375, 0.875); y = W g = (-1.375, 2.0).
    dy_c/dA_k = W[c,k]/4 * [A_k > 0], 3 of 4 positive  ->  alpha_k = 3 W[c,k] / 16.
    class 0: (3 A0 - 6 A1)/16 = [[-.09375, .09375], [-.46875, -.46875]] -> ReLU
    class 1: (9 A0 + 3 A1)/16 = [[.375, -.375], [.5625, .5625]]       -> ReLU
    (Using ReLU(A) instead of A would make class 0's map all zero.)
    """
    model = HandNet()
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0]])
    images = torch.stack([x, torch.full((3, 3), 7.0), -x])[None]  # (1, 3, 3, 3)
    classes = torch.tensor([[0, 1]])

    scores, raw = grad_cam(model, images, [model.conv], classes, raw=True)
    torch.testing.assert_close(scores, torch.tensor([[-1.375, 2.0]]), atol=1e-6, rtol=0)
    expected_raw = torch.tensor([[[[0.0, 0.09375], [0.0, 0.0]],
                                  [[0.375, 0.0], [0.5625, 0.5625]]]])
    torch.testing.assert_close(raw[0], expected_raw, atol=1e-6, rtol=0)

    # Upsampling 2x2 -> 3x3 (align_corners=False) gives rows/cols [v0, (v0+v1)/2, v1]:
    # class 0: [[0, .046875, .09375], [0, .0234375, .046875], [0, 0, 0]]      / .09375
    # class 1: [[.375, .1875, 0], [.46875, .375, .28125], [.5625]*3]           / .5625
    _, maps = grad_cam(model, images, [model.conv], classes)
    expected = torch.tensor([[[0.0, 0.5, 1.0], [0.0, 0.25, 0.5], [0.0, 0.0, 0.0]],
                             [[2 / 3, 1 / 3, 0.0], [5 / 6, 2 / 3, 0.5], [1.0, 1.0, 1.0]]])
    torch.testing.assert_close(maps[0, 0], expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# 4. Batch == one image at a time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
def test_batch_equals_single_images(batch_norm: bool) -> None:
    """B=3 in one call gives each image's maps as three B=1 calls do, also with BatchNorm
    (the model is left in train mode: the engine must run it in eval mode)."""
    torch.manual_seed(7)
    model = TinyNet(batch_norm=batch_norm)
    randomise_batch_norm(model)
    model.train()
    images = torch.randn(3, 3, 12, 12)
    classes = torch.tensor([[0, 1, 2], [5, 4, 3], [1, 1, 0]])
    layers = modules_by_name(model, TINY_LAYERS)

    scores, raw = grad_cam(model, images, layers, classes, raw=True)
    _, maps = grad_cam(model, images, layers, classes)
    for b in range(3):
        s1, raw1 = grad_cam(model, images[b:b + 1], layers, classes[b:b + 1], raw=True)
        _, maps1 = grad_cam(model, images[b:b + 1], layers, classes[b:b + 1])
        torch.testing.assert_close(s1[0], scores[b], atol=1e-6, rtol=1e-5)
        for layer in range(len(layers)):
            torch.testing.assert_close(raw1[layer][0], raw[layer][b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(maps1[:, 0], maps[:, b], atol=1e-5, rtol=0)
    assert model.training  # and the flag is restored


# --------------------------------------------------------------------------------------------
# 5. Model hygiene
# --------------------------------------------------------------------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def snapshot(model: nn.Module) -> dict:
    """Everything the engine promises to leave alone."""
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_clean(model: nn.Module, before: dict) -> None:
    """No hooks left, flags/requires_grad/values unchanged, no .grad filled."""
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr, None)
            assert not hooks, f"{name or '(model)'}.{attr} = {hooks}"
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grad_enabled"] == before["grad_enabled"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for name, param in model.named_parameters():
        assert param.grad is None, f"{name}.grad was filled"


class Exploding(nn.Module):
    """Raises in forward after the target conv has run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.relu(self.conv(x))
        raise RuntimeError("boom after the target layer")


def mixed_state_model() -> TinyNet:
    """A TinyNet with BatchNorm in train mode, some submodules in eval, some params frozen."""
    torch.manual_seed(8)
    model = TinyNet(batch_norm=True)
    randomise_batch_norm(model)
    model.train()
    model.stem.eval()
    model.blocks[1][1].bn1.eval()
    model.fc.eval()
    for param in model.stem.parameters():
        param.requires_grad_(False)
    model.blocks[0].conv2.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("outer_grad", [True, False])
def test_model_left_as_found(outer_grad: bool) -> None:
    """After a normal call: no hooks, same training flags (a mix), same requires_grad (a
    mix), same parameters and BN running stats, no .grad, same global grad mode."""
    model = mixed_state_model()
    images = torch.randn(2, 3, 12, 12)
    with torch.set_grad_enabled(outer_grad):
        before = snapshot(model)
        assert len(set(before["training"].values())) == 2
        assert len(set(before["requires_grad"].values())) == 2
        layers = modules_by_name(model, TINY_LAYERS)
        _, maps = grad_cam(model, images, layers, top_and_lowest)
        assert torch.isfinite(maps).all()
        assert_clean(model, before)
        conv_layers_in_run_order(model, images)
        assert_clean(model, before)


@pytest.mark.parametrize("case", ["forward_raises", "classes_wrong_shape", "classes_float",
                                  "class_out_of_range", "class_negative",
                                  "callable_wrong_shape"])
def test_model_left_as_found_after_errors(case: str) -> None:
    """The same guarantees hold when the engine raises (in the model's forward, or on bad
    classes checked before or after the forward pass)."""
    images = torch.randn(2, 3, 12, 12)
    if case == "forward_raises":
        model: nn.Module = Exploding()
        model.train()
        layers = [model.conv]
        classes: object = torch.zeros(2, 1, dtype=torch.long)
        error: type[Exception] = RuntimeError
    else:
        model = mixed_state_model()
        layers = modules_by_name(model, TINY_LAYERS)
        error = ValueError
        classes = {
            "classes_wrong_shape": torch.zeros(3, 2, dtype=torch.long),
            "classes_float": torch.zeros(2, 2),
            "class_out_of_range": torch.tensor([[0, 6], [1, 2]]),
            "class_negative": torch.tensor([[0, -1], [1, 2]]),
            "callable_wrong_shape": lambda scores: scores.argmax(dim=1),
        }[case]
    before = snapshot(model)
    with pytest.raises(error):
        grad_cam(model, images, layers, classes)
    assert_clean(model, before)


def test_works_inside_inference_mode(tiny: TinyNet, tiny_images: torch.Tensor) -> None:
    """Called inside torch.inference_mode() with inference-tensor images (as a CLI may do),
    grad_cam gives the same maps and leaves inference mode on."""
    classes = torch.tensor([[0, 1, 2], [3, 4, 5]])
    layers = modules_by_name(tiny, TINY_LAYERS)
    _, expected = grad_cam(tiny, tiny_images, layers, classes)
    with torch.inference_mode():
        images = tiny_images.clone()
        _, maps = grad_cam(tiny, images, layers, classes)
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(maps, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# 6. Frozen model, in-place ReLU
# --------------------------------------------------------------------------------------------


def test_frozen_model_gives_same_maps(tiny: TinyNet, tiny_images: torch.Tensor) -> None:
    """A model with every requires_grad=False gives the same maps as its trainable copy."""
    classes = torch.tensor([[0, 1, 2], [3, 4, 5]])
    frozen = copy.deepcopy(tiny).requires_grad_(False)
    s1, raw1 = grad_cam(tiny, tiny_images, modules_by_name(tiny, TINY_LAYERS), classes, raw=True)
    s2, raw2 = grad_cam(frozen, tiny_images, modules_by_name(frozen, TINY_LAYERS), classes,
                        raw=True)
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)
    assert all(float(m.max()) > 0 for m in raw1)
    for a, b in zip(raw1, raw2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())


@pytest.mark.slow
def test_inplace_relu_after_target_gives_same_maps(tiny_images: torch.Tensor) -> None:
    """In-place ReLU / in-place residual add right after the target convs (the in-place trap)
    give exactly the maps of the same weights with every in-place op switched off."""
    torch.manual_seed(9)
    inplace = TinyNet(inplace=True)
    plain = TinyNet(inplace=False)
    plain.load_state_dict(inplace.state_dict())
    classes = torch.tensor([[0, 1, 2], [3, 4, 5]])
    _, raw1 = grad_cam(inplace, tiny_images, modules_by_name(inplace, TINY_LAYERS), classes,
                       raw=True)
    _, raw2 = grad_cam(plain, tiny_images, modules_by_name(plain, TINY_LAYERS), classes,
                       raw=True)
    _, maps1 = grad_cam(inplace, tiny_images, modules_by_name(inplace, TINY_LAYERS), classes)
    _, maps2 = grad_cam(plain, tiny_images, modules_by_name(plain, TINY_LAYERS), classes)
    for a, b in zip(raw1, raw2):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(maps1, maps2, atol=1e-6, rtol=0)
    # And the hand-set network: the pre-ReLU activation makes class 0 non-zero.
    hand = HandNet()
    hand_plain = HandNet()
    hand_plain.relu.inplace = False
    images = torch.randn(4, 3, 3, 3)
    classes = torch.tensor([[0, 1]] * 4)
    _, r1 = grad_cam(hand, images, [hand.conv], classes, raw=True)
    _, r2 = grad_cam(hand_plain, images, [hand_plain.conv], classes, raw=True)
    torch.testing.assert_close(r1[0], r2[0], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# 7. classes as a callable; top_and_lowest
# --------------------------------------------------------------------------------------------


def test_top_and_lowest_values() -> None:
    """The 3 best classes in descending score order, then the argmin; top capped at C."""
    scores = torch.tensor([[0.1, 5.0, -2.0, 3.0, 4.0, -1.0],
                           [9.0, -7.0, 8.0, 7.5, 0.0, 1.0]])
    assert top_and_lowest(scores).tolist() == [[1, 4, 3, 2], [0, 2, 3, 1]]
    assert top_and_lowest(scores, top=1).tolist() == [[1, 2], [0, 1]]
    assert top_and_lowest(scores[:, :2], top=3).tolist() == [[1, 0, 0], [0, 1, 1]]


@pytest.mark.slow
def test_callable_classes_equal_precomputed(tiny: TinyNet, tiny_images: torch.Tensor) -> None:
    """classes=top_and_lowest gives the maps of classes=top_and_lowest(scores) computed from
    a separate plain eval-mode forward, and the same scores."""
    tiny.train()
    with eval_mode(tiny), torch.no_grad():
        plain_scores = tiny(tiny_images)
    chosen = top_and_lowest(plain_scores)
    assert chosen.shape == (2, 4)
    layers = modules_by_name(tiny, TINY_LAYERS)
    s1, maps1 = grad_cam(tiny, tiny_images, layers, top_and_lowest)
    s2, maps2 = grad_cam(tiny, tiny_images, layers, chosen)
    torch.testing.assert_close(s1, plain_scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)
    torch.testing.assert_close(maps1, maps2, atol=0, rtol=0)
    seen: list[torch.Tensor] = []
    grad_cam(tiny, tiny_images, layers, lambda s: seen.append(s) or top_and_lowest(s))
    torch.testing.assert_close(seen[0], plain_scores, atol=1e-6, rtol=1e-5)
    assert tiny.training


# --------------------------------------------------------------------------------------------
# 8. normalize_maps
# --------------------------------------------------------------------------------------------


def test_normalize_all_zero_map_stays_zero() -> None:
    """An all-zero map is all zero after normalizing (no NaN), next to a normal map."""
    maps = torch.zeros(2, 3, 4, 5)
    maps[1, 2] = torch.arange(20.0).view(4, 5)
    out = normalize_maps(maps)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros(3, 4, 5))
    assert torch.equal(out[1, :2], torch.zeros(2, 4, 5))
    torch.testing.assert_close(out[1, 2], torch.arange(20.0).view(4, 5) / 19, atol=1e-7, rtol=0)


def test_normalize_general_map_is_affine_to_unit_range() -> None:
    """Each map gets min 0, max 1 and is a * map + b with a > 0 (checked against the
    per-map min-max formula), independently for every map of a batch."""
    maps = torch.randn(3, 2, 7, 6, dtype=torch.float64) * torch.tensor([0.01, 1.0, 50.0],
                                                                       dtype=torch.float64
                                                                       ).view(3, 1, 1, 1) + 3
    out = normalize_maps(maps)
    flat = out.flatten(-2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(flat.amax(-1), torch.ones(3, 2, dtype=torch.float64))
    src = maps.flatten(-2)
    slope = 1 / (src.amax(-1, keepdim=True) - src.amin(-1, keepdim=True))
    torch.testing.assert_close(flat, (src - src.amin(-1, keepdim=True)) * slope,
                               atol=1e-12, rtol=0)


def test_normalize_is_scale_invariant_for_small_maps() -> None:
    """Min-max normalizing ignores the map's scale: a Grad-CAM map whose values are small
    (1e-8, still exactly representable in float32) is normalized like the same map x 1e8."""
    base = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    expected = torch.tensor([[0.0, 1.0], [0.2, 0.0]])
    torch.testing.assert_close(normalize_maps(base), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(normalize_maps(base * 1e-8), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# 9. conv_layers_in_run_order
# --------------------------------------------------------------------------------------------


class MyConv(nn.Conv2d):
    """A Conv2d subclass."""


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class RunOrderNet(nn.Module):
    """Registration order: a, b, blocks(0, 1), shared, unused, fc.
    Run order: b, a, shared (first call), blocks.1, blocks.0, shared (last call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = MyConv(3, 3, 1)
        self.blocks = nn.ModuleList([Inner(), Inner()])
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(self.b(x))
        x = self.shared(x)
        x = self.blocks[0](self.blocks[1](x))
        x = self.shared(F.max_pool2d(x, 2))
        return self.fc(x.mean(dim=(2, 3)))


def test_conv_layers_in_run_order() -> None:
    """Nested convs are found with their qualified names, in run (not registration) order; the
    subclass is found; the shared conv appears once, at its last call, with that call's
    output shape; the unused conv is absent; the scores are the eval-mode scores."""
    torch.manual_seed(10)
    model = RunOrderNet()
    model.train()
    example = torch.randn(2, 3, 8, 8)
    found, scores = conv_layers_in_run_order(model, example)
    assert all(isinstance(layer, ConvLayer) for layer in found)
    assert [layer.name for layer in found] == ["b", "a", "blocks.1.seq.0", "blocks.0.seq.0",
                                               "shared"]
    table = dict(model.named_modules())
    assert all(layer.module is table[layer.name] for layer in found)
    assert isinstance(found[0].module, MyConv)
    assert [layer.output_shape for layer in found] == [(2, 3, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8),
                                                       (2, 4, 8, 8), (2, 4, 4, 4)]
    with eval_mode(model), torch.no_grad():
        expected = model(example)
    torch.testing.assert_close(scores, expected, atol=0, rtol=0)
    assert model.training


def test_conv_layers_in_run_order_torchvision(resnet: nn.Module) -> None:
    """On resnet18 the last conv to run is layer4.1.conv2, and downsample convs (registered
    after conv2 of their block but run before the residual add) are placed in run order."""
    found, _ = conv_layers_in_run_order(resnet, torch.randn(1, 3, 64, 64))
    names = [layer.name for layer in found]
    assert len(names) == 20
    assert names[0] == "conv1" and names[-1] == "layer4.1.conv2"
    assert found[-1].output_shape == (1, 512, 2, 2)
    # torchvision's BasicBlock computes conv1, conv2, then downsample(x).
    i = names.index("layer2.0.conv2")
    assert names[i + 1] == "layer2.0.downsample.0"


def test_conv_layers_in_run_order_then_grad_cam_on_lazy_model() -> None:
    """Listing the convs of a not-yet-initialised model (LazyConv2d/LazyLinear, whose first
    forward creates the weights) must leave ordinary parameters behind, so that grad_cam on
    the listed layers works and matches the naive reference."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(inplace=True), nn.LazyConv2d(5, 3),
                          nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.LazyLinear(3))
    images = torch.randn(2, 3, 9, 9)
    found, _ = conv_layers_in_run_order(model, images)
    assert [layer.name for layer in found] == ["0", "2"]
    assert not any(p.is_inference() for p in model.parameters())
    classes = torch.tensor([[0, 2], [1, 0]])
    _, raw = grad_cam(model, images, [layer.module for layer in found], classes, raw=True)
    _, ref_raw = naive_grad_cam(model, images, ["0", "2"], classes)
    assert_raw_close(raw, ref_raw)


# --------------------------------------------------------------------------------------------
# 10. Layers that do not affect the score
# --------------------------------------------------------------------------------------------


class DeadBranchNet(nn.Module):
    """A live trunk and a dead conv whose output is computed and thrown away, either before
    the trunk or after the class scores are computed."""

    def __init__(self, dead_after_head: bool = False) -> None:
        super().__init__()
        self.dead_after_head = dead_after_head
        self.live = nn.Conv2d(3, 5, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.dead = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dead_after_head:
            self.dead(x)
        scores = self.fc(self.relu(self.live(x)).mean(dim=(2, 3)))
        if self.dead_after_head:
            self.dead(x)
        return scores


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dead_after_head", [False, True], ids=["dead_first", "dead_last"])
@pytest.mark.parametrize("with_live", [True, False], ids=["with_live", "dead_only"])
def test_dead_branch_gives_zero_map(frozen: bool, dead_after_head: bool, with_live: bool
                                    ) -> None:
    """A target layer whose output does not reach the scores gets all-zero maps (raw and
    normalized, no NaN), whether or not other target layers are live, the model is frozen, or
    the dead layer runs after the scores; the live layer's maps stay correct."""
    torch.manual_seed(11)
    model = DeadBranchNet(dead_after_head).requires_grad_(not frozen)
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1], [2, 0]])
    names = ["dead", "live"] if with_live else ["dead"]
    layers = modules_by_name(model, names)
    before = snapshot(model)

    _, raw = grad_cam(model, images, layers, classes, raw=True)
    _, maps = grad_cam(model, images, layers, classes)
    assert torch.equal(raw[0], torch.zeros(2, 2, 6, 6))
    assert torch.equal(maps[0], torch.zeros(2, 2, 6, 6))
    assert not torch.isnan(maps).any()
    if with_live:
        _, ref_raw = naive_grad_cam(model, images, ["live"], classes)
        assert float(ref_raw[0].max()) > 0
        assert_raw_close(raw[1:], ref_raw)
    assert_clean(model, before)
