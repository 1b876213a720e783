"""Value tests for guided backpropagation and Guided Grad-CAM (guided.py).

Every test checks numbers: a tiny network worked out by hand, Captum's GuidedBackprop and
GuidedGradCam on torchvision models, an independent hook-based reference (the native
activation, then the incoming gradient clipped at zero with a tensor hook) on networks written
with functional ReLU calls and on the built-in EfficientNet-Lite0, and the state of the model and
of torch itself after a call, also after an exception inside the forward pass.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcam_cli.gradcam import grad_cam
from gradcam_cli.guided import guided_backprop, guided_grad_cam

DATA = Path(__file__).resolve().parent.parent / "data"

# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


class _HookGuided(nn.Module):
    """The guided rule written independently: native activation, then clip the gradient at 0.

    The tensor hook sees d y / d (activation input) = native mask * incoming gradient; clipping
    it at zero leaves the incoming gradient where the input is in range and it is positive.
    The hook reads ``switch["guided"]`` at backward time, so one forward pass serves both the
    guided and the plain gradient.
    """

    def __init__(self, activation: nn.Module, switch: dict) -> None:
        super().__init__()
        self.activation = activation
        self.switch = switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if x.requires_grad:
            x.register_hook(lambda grad: grad.clamp(min=0) if self.switch["guided"] else grad)
        return self.activation(x)


def reference_gradients(model: nn.Module, images: torch.Tensor, classes: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided, plain) input gradients, each (B, K, C, H, W), the textbook way.

    A deep copy whose nn.ReLU / nn.ReLU6 modules are wrapped in ``_HookGuided``; one forward
    pass, then one backward pass per (image, class) for each of the two rules."""
    net = copy.deepcopy(model).eval()
    switch = {"guided": True}
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(module, name, _HookGuided(type(child)(), switch))
    net.requires_grad_(False)
    images = images.detach().clone().requires_grad_(True)
    scores = net(images)
    out = {rule: torch.zeros(*classes.shape, *images.shape[1:]) for rule in (True, False)}
    for b in range(classes.shape[0]):
        for k in range(classes.shape[1]):
            for rule in (True, False):
                switch["guided"] = rule
                (grad,) = torch.autograd.grad(scores[b, classes[b, k]], images,
                                              retain_graph=True)
                out[rule][b, k] = grad[b]
    return out[True], out[False]


def _assert_relu_is_ordinary() -> None:
    """No guided mode is left active: torch.relu, F.relu and nn.ReLU6 have their usual gradient."""
    x = torch.tensor([-1.0, 2.0, 3.0, 7.0], requires_grad=True)
    incoming = torch.tensor([1.0, -1.0, 1.0, 1.0])
    for activation, expected in [(torch.relu, [0.0, -1.0, 1.0, 1.0]),
                                 (F.relu, [0.0, -1.0, 1.0, 1.0]),
                                 (lambda t: t.relu(), [0.0, -1.0, 1.0, 1.0]),
                                 (nn.ReLU6(), [0.0, -1.0, 1.0, 0.0])]:
        y = activation(x)
        assert "Guided" not in y.grad_fn.name()
        (grad,) = torch.autograd.grad(y, x, incoming)
        assert grad.tolist() == expected


# --------------------------------------------------------------------------------------------
# 1. A tiny network by hand
# --------------------------------------------------------------------------------------------


def _tiny_network(activation: nn.Module) -> nn.Module:
    """1x1 conv (weights 2, -1, 0.5; bias -1) -> activation -> flatten -> linear 4 -> 2."""
    conv = nn.Conv2d(3, 1, kernel_size=1)
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1))
        conv.bias.fill_(-1.0)
        linear.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5],
                                          [-2.0, 1.0, 3.0, 1.0]]))
    return nn.Sequential(conv, activation, nn.Flatten(), linear)


def _tiny_image(corner: float) -> torch.Tensor:
    """Channel 0 is [[1, -1], [2, corner]], channels 1 and 2 are 0: pre-activation 2 x0 - 1."""
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = torch.tensor([[1.0, -1.0], [2.0, corner]])
    return image


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6()],
                         ids=["relu", "relu_inplace", "relu6"])
def test_tiny_network_by_hand(activation: nn.Module) -> None:
    # Pre-activation h = 2 x0 - 1 = [[1, -3], [3, 5]] (all below 6, so ReLU6 acts as ReLU).
    # Class 0: incoming gradient dy0/dr = [[1, 2], [-1, 0.5]].
    #   (0, 1): h = -3 < 0, gradient +2  -> 0 (input negative)
    #   (1, 0): h = 3 > 0,  gradient -1  -> 0 (incoming gradient negative; vanilla keeps -1)
    #   guided dy0/dh = [[1, 0], [0, 0.5]]
    # Class 1: dy1/dr = [[-2, 1], [3, 1]] -> guided dy1/dh = [[0, 0], [3, 1]]
    # Input gradient = conv weight of the channel (2, -1, 0.5) times dy/dh.
    weights = torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1)
    dh0 = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    dh1 = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    expected0 = torch.tensor([[[2.0, 0.0], [0.0, 1.0]],
                              [[-1.0, 0.0], [0.0, -0.5]],
                              [[0.5, 0.0], [0.0, 0.25]]])
    expected1 = torch.tensor([[[0.0, 0.0], [6.0, 2.0]],
                              [[0.0, 0.0], [-3.0, -1.0]],
                              [[0.0, 0.0], [1.5, 0.5]]])
    assert torch.equal(expected0, weights * dh0) and torch.equal(expected1, weights * dh1)

    model = _tiny_network(activation)
    images = _tiny_image(3.0).repeat(2, 1, 1, 1)
    classes = torch.tensor([[0, 1], [1, 0]])  # the second image asks in the other order
    result = guided_backprop(model, images, classes)
    assert result.shape == (2, 2, 3, 2, 2)
    expected = torch.stack([torch.stack([expected0, expected1]),
                            torch.stack([expected1, expected0])])
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)
    # The plain gradient differs exactly where the guided rule bites: (1, 0) for class 0 is -1.
    reference, plain = reference_gradients(model, images, classes)
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=0)
    assert plain[0, 0, 0, 1, 0].item() == pytest.approx(-2.0)
    assert result[0, 0, 0, 1, 0].item() == 0.0


def test_relu6_blocks_the_gradient_above_six() -> None:
    # With corner x0 = 4: h = 7 at (1, 1). ReLU passes class 0's +0.5 there, ReLU6 blocks it.
    images = _tiny_image(4.0)
    classes = torch.tensor([[0]])
    relu = guided_backprop(_tiny_network(nn.ReLU()), images, classes)
    relu6 = guided_backprop(_tiny_network(nn.ReLU6()), images, classes)
    torch.testing.assert_close(relu[0, 0, :, 1, 1], torch.tensor([1.0, -0.5, 0.25]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(relu6[0, 0, :, 1, 1], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(relu6[0, 0, :, 0, 0], torch.tensor([2.0, -1.0, 0.5]),
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. Against Captum
# --------------------------------------------------------------------------------------------


def _resnet18() -> tuple[nn.Module, nn.Module]:
    from torchvision.models import resnet18
    model = resnet18(weights=None)
    return model, model.layer4[-1].conv2


def _vgg11() -> tuple[nn.Module, nn.Module]:
    from torchvision.models import vgg11
    model = vgg11(weights=None)
    return model, model.features[18]  # the last conv


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("build", [_resnet18, _vgg11], ids=["resnet18", "vgg11"])
def test_matches_captum(build) -> None:
    from captum import attr as captum_attr  # requirements-dev.txt
    model, layer = build()  # random seeded weights, train mode, ReLU(inplace=True)
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([[1, 5, 7], [2, 9, 0]])

    guided = guided_backprop(model, images, classes)
    _, raw = grad_cam(model, images, [layer], classes, raw=True)
    cam = F.interpolate(raw[0], size=images.shape[-2:], mode="nearest")
    ours_ggc = guided_grad_cam(guided, cam)

    # Captum runs on the same model (ours is done with it), in eval mode and with out-of-place
    # ReLUs: its layer hook on the last conv would otherwise see VGG's in-place ReLU overwrite
    # the activation. Each (image, class) pair is one row of a batch of B * K.
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    rows = images.repeat_interleave(classes.shape[1], dim=0)
    targets = classes.flatten().tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "setting backward hooks", "required_grads set"
        captum_guided = captum_attr.GuidedBackprop(model).attribute(rows, target=targets)
        captum_ggc = captum_attr.GuidedGradCam(model, layer).attribute(
            rows, target=targets, interpolate_mode="nearest")
    captum_guided = captum_guided.detach().view_as(guided)
    captum_ggc = captum_ggc.detach().view_as(guided)

    assert guided.shape == (2, 3, 3, 64, 64)
    assert captum_guided.abs().max() > 0 and captum_ggc.abs().max() > 0
    assert _relative_error(guided, captum_guided) <= 1e-5
    assert _relative_error(ours_ggc, captum_ggc) <= 1e-5


# --------------------------------------------------------------------------------------------
# 3. The model and torch are left as found
# --------------------------------------------------------------------------------------------


class _Stateful(nn.Module):
    """In-place ReLU on its input, BatchNorm, Dropout, an in-place nn.ReLU; can raise."""

    def __init__(self, raise_after_relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 5)
        self.raise_after_relu = raise_after_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.relu_(x)
        x = self.relu(self.bn(self.conv(x)))
        if self.raise_after_relu:
            raise RuntimeError("boom")
        return self.fc(self.drop(x).mean(dim=(2, 3)))


def _snapshot(model: nn.Module) -> dict:
    """Everything about the model that guided_backprop must not change."""
    plain = (bool, int, float, str, tuple, type(None))
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "attributes": [{k: v for k, v in vars(m).items() if isinstance(v, plain)}
                       for m in model.modules()],
        "attribute_names": [sorted(vars(m)) for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   dict(m._backward_pre_hooks)) for m in model.modules()],
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks),
                         len(nn.modules.module._global_backward_hooks)),
        "parameters": [(id(p), p.requires_grad, p.grad) for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(before: dict, after: dict) -> None:
    state_before, state_after = before.pop("state"), after.pop("state")
    assert before == after
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        assert torch.equal(state_before[key], state_after[key]), key


def _stateful_model(raise_after_relu: bool = False) -> nn.Module:
    model = _Stateful(raise_after_relu)
    model.train()
    model.bn.eval()  # mixed flags: each must come back as it was
    model.conv.weight.requires_grad_(False)  # partly frozen
    model.fc.register_forward_hook(lambda module, inputs, output: None)  # the user's own hook
    return model


def test_model_left_as_found() -> None:
    model = _stateful_model()
    images = torch.randn(2, 3, 8, 8)
    images_before = images.clone()
    before = _snapshot(model)
    first = guided_backprop(model, images, torch.tensor([[0, 3], [4, 1]]))
    _assert_same(before, _snapshot(model))
    assert torch.equal(images, images_before) and not images.requires_grad and images.grad is None
    # Eval mode during the pass: Dropout off and BatchNorm statistics untouched, so it repeats.
    second = guided_backprop(model, images, torch.tensor([[0, 3], [4, 1]]))
    assert torch.equal(first, second) and first.abs().max() > 0
    _assert_relu_is_ordinary()


def test_model_left_as_found_after_an_exception() -> None:
    model = _stateful_model(raise_after_relu=True)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        guided_backprop(model, torch.randn(2, 3, 8, 8), torch.tensor([[0], [1]]))
    _assert_same(before, _snapshot(model))
    _assert_relu_is_ordinary()


def test_works_under_no_grad_and_inference_mode() -> None:
    model = _stateful_model()
    images = torch.randn(2, 3, 8, 8)
    classes = torch.tensor([[2], [0]])
    expected = guided_backprop(model, images, classes)
    with torch.no_grad():
        torch.testing.assert_close(guided_backprop(model, images, classes), expected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_images = images.clone()
        result = guided_backprop(model, inference_images, classes)
    torch.testing.assert_close(result, expected)


# --------------------------------------------------------------------------------------------
# 4. Functional ReLU calls are guided
# --------------------------------------------------------------------------------------------


class _FunctionalNet(nn.Module):
    """Six convs, each followed by a different way of writing ReLU / ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1)
                                   for i in range(7))
        self.fc = nn.Linear(6, 10)
        self.relu6 = nn.ReLU6(inplace=True)
        self.max_before_relu6 = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        x = F.relu(c[0](x), inplace=True)
        x = torch.relu(c[1](x))
        x = c[2](x).relu()
        x = c[3](x)
        torch.relu_(x)  # return value ignored: the result must be written back into x
        x = c[4](x)
        x.relu_()
        x = c[5](x)
        self.max_before_relu6 = x.max().item()
        x = self.relu6(x)  # nn.ReLU6(inplace=True): F.hardtanh(x, 0, 6, inplace=True)
        x = F.relu6(c[6](x))
        return self.fc(x.mean(dim=(2, 3)))


class _ModuleNet(nn.Module):
    """The same network written with nn.ReLU / nn.ReLU6 modules (same parameter names)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1)
                                   for i in range(7))
        self.fc = nn.Linear(6, 10)
        self.acts = nn.ModuleList([nn.ReLU() for _ in range(5)] + [nn.ReLU6(), nn.ReLU6()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.slow
def test_functional_relus_are_guided() -> None:
    functional = _FunctionalNet()
    with torch.no_grad():
        for conv in functional.convs:
            conv.weight.mul_(4.0)  # large enough that some ReLU6 inputs pass 6
    modular = _ModuleNet()
    modular.load_state_dict(functional.state_dict())
    images = torch.randn(2, 3, 12, 12)
    classes = torch.tensor([[0, 7, 3], [9, 2, 5]])

    torch.testing.assert_close(functional(images.clone()), modular(images))  # same network
    assert functional.max_before_relu6 > 6.0
    guided_functional = guided_backprop(functional, images, classes)
    guided_modular = guided_backprop(modular, images, classes)
    reference, plain = reference_gradients(modular, images, classes)
    assert reference.abs().max() > 0
    torch.testing.assert_close(guided_functional, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(guided_modular, reference, atol=1e-6, rtol=1e-5)
    assert _relative_error(guided_functional, plain) > 1e-3


def _relu_ignoring_result(x: torch.Tensor) -> torch.Tensor:
    torch.relu_(x)  # the result must be written back into x
    return x


_RELU_VARIANTS = {
    "F.relu": F.relu,
    "F.relu_inplace": lambda x: F.relu(x, inplace=True),
    "F.relu_": F.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "torch.relu_ result ignored": _relu_ignoring_result,
    "Tensor.relu": lambda x: x.relu(),
    "Tensor.relu_": lambda x: x.relu_(),
    "aten.relu": lambda x: torch.ops.aten.relu(x),
    "aten.relu_.default": lambda x: torch.ops.aten.relu_.default(x),
    "nn.ReLU_inplace": nn.ReLU(inplace=True),
}
_RELU6_VARIANTS = {
    "F.relu6": F.relu6,
    "F.relu6_inplace": lambda x: F.relu6(x, inplace=True),
    "F.hardtanh(0,6)": lambda x: F.hardtanh(x, 0.0, 6.0),
    "F.hardtanh_(0,6)": lambda x: F.hardtanh_(x, 0.0, 6.0),
    "nn.ReLU6_inplace": nn.ReLU6(inplace=True),
    "nn.Hardtanh(0,6)": nn.Hardtanh(0.0, 6.0),
    "aten.hardtanh(0,6)": lambda x: torch.ops.aten.hardtanh(x, 0.0, 6.0),
}


class _Lambda(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


@pytest.mark.parametrize("name", list(_RELU_VARIANTS) + list(_RELU6_VARIANTS))
def test_each_relu_variant_is_guided(name: str) -> None:
    function = _RELU_VARIANTS.get(name) or _RELU6_VARIANTS[name]
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(6.0)  # pre-activations beyond 6 too
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model = nn.Sequential(conv, _Lambda(function), head)
    twin = nn.Sequential(conv, nn.ReLU() if name in _RELU_VARIANTS else nn.ReLU6(), head)
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 4], [3, 1]])
    assert (conv(images) > 6).any()
    reference, plain = reference_gradients(twin, images, classes)
    result = guided_backprop(model, images, classes)
    torch.testing.assert_close(result, reference, atol=1e-6, rtol=1e-5)
    assert _relative_error(result, plain) > 1e-3


def test_inplace_relu_on_a_leaf_returns_a_new_tensor() -> None:
    # Writing back into a parameter is refused, so the rectified copy is used and the
    # parameter stays as it was (a plain forward with gradients would raise here).
    class OnParameter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([-1.0, 2.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None] * torch.relu_(self.weight)

    model = OnParameter()
    images = torch.randn(1, 3, 2, 2)
    result = guided_backprop(model, images, torch.tensor([[0, 1]]))
    assert model.weight.tolist() == [-1.0, 2.0] and model.weight.grad is None
    torch.testing.assert_close(result[0, 0], torch.zeros(3, 2, 2), atol=1e-7, rtol=0)
    torch.testing.assert_close(result[0, 1], torch.full((3, 2, 2), 2.0 / 12), atol=1e-7, rtol=0)


@pytest.mark.parametrize("activation", [nn.SiLU(), nn.Hardtanh(-1.0, 1.0)],
                         ids=["silu", "hardtanh(-1,1)"])
def test_warns_when_no_relu_is_caught(activation: nn.Module) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), activation, nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    images = torch.randn(2, 3, 6, 6) * 3
    classes = torch.tensor([[0, 2], [1, 0]])
    with pytest.warns(UserWarning, match="no ReLU was caught"):
        result = guided_backprop(model, images, classes)
    torch.testing.assert_close(result, reference_gradients(model, images, classes)[1])


def test_bad_arguments() -> None:
    model = _tiny_network(nn.ReLU())
    images = _tiny_image(3.0)
    with pytest.raises(ValueError, match="shape"):
        guided_backprop(model, images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        guided_backprop(model, images, torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="0..1"):
        guided_backprop(model, images, torch.tensor([[2]]))
    with pytest.raises(ValueError, match="B, K"):
        guided_grad_cam(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_guided_grad_cam_values() -> None:
    guided = torch.tensor([1.0, -2.0, 3.0]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)
    cam = torch.tensor([[[[0.0, 0.5], [1.0, 2.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [1.0, 2.0]],
                              [[0.0, -1.0], [-2.0, -4.0]],
                              [[0.0, 1.5], [3.0, 6.0]]]])[None]
    torch.testing.assert_close(guided_grad_cam(guided, cam), expected, atol=1e-6, rtol=0)
    # A map at another resolution is upsampled bilinearly first (as grad_cam does).
    small = torch.rand(2, 3, 4, 4)
    big_guided = torch.randn(2, 3, 3, 16, 16)
    up = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(guided_grad_cam(big_guided, small),
                               big_guided * up[:, :, None])


# --------------------------------------------------------------------------------------------
# 5. The built-in model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_model_on_a_photo() -> None:
    from gradcam_cli.images import list_images, load_rgb
    from gradcam_cli.models import load_model
    from gradcam_cli.preprocessing import prepare_image
    loaded_model = load_model(None)
    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    entry = next(e for e in list_images(DATA) if e.folder_label == "tabby")
    _, pixels = prepare_image(load_rgb(entry.path), preprocessing)
    images = torch.from_numpy(pixels)[None]
    classes = torch.tensor([[281, 285]])  # tabby, Egyptian cat
    before = _snapshot(model)

    guided = guided_backprop(model, images, classes)
    _assert_same(before, _snapshot(model))
    assert guided.shape == (1, 2, 3, 224, 224)
    assert torch.isfinite(guided).all() and guided.abs().max() > 0
    # Against the hook-based reference: every nn.ReLU6 (each reused within its block) guided.
    reference, plain = reference_gradients(model, images, classes)
    assert _relative_error(guided, reference) <= 1e-5
    assert _relative_error(guided, plain) > 1e-2
