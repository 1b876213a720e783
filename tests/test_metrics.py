"""Value tests for the faithfulness metrics (metrics.py).

Every test checks numbers: curves of a toy model whose probabilities are known by construction,
an independent loop-per-step reference, average drop and increase computed by hand, invariance
to batching, the model left as found, and Grad-CAM beating random maps on the sample photos.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcam_cli.metrics import Faithfulness, _gaussian_blur, faithfulness, random_maps

DATA = Path(__file__).resolve().parent.parent / "data"
FIELDS = ("deletion_auc", "insertion_auc", "average_drop", "increase")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def trapezoid(values: list[float]) -> float:
    """Area under values[0..S] at x = 0, 1/S, ..., 1, by the trapezoid rule (by hand)."""
    steps = len(values) - 1
    return (sum(values) - (values[0] + values[-1]) / 2) / steps


class LeftHalfModel(nn.Module):
    """logit 0 = gain * (mean of channel 0 over the left half), logit 1 = 0.

    So p(class 0) = sigmoid(gain * left mean) and p(class 1) = 1 - p(class 0). The unused
    linear layer and dropout only give the model parameters and a training flag to check.
    """

    def __init__(self, gain: float = 10.0) -> None:
        super().__init__()
        self.gain = gain
        self.unused = nn.Linear(2, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.gain * x[:, 0, :, : x.shape[-1] // 2].mean(dim=(1, 2))
        left = self.dropout(left)
        return torch.stack([left, torch.zeros_like(left)], dim=1)


class SmallNet(nn.Module):
    """A seeded conv net with BatchNorm and Dropout: a general, nonlinear model."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(8, n_classes)
        with torch.no_grad():
            bn = self.features[1]
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            self.fc.weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


def left_right_maps(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A map that ranks the left half first (good) and one that ranks it last (bad)."""
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


# --------------------------------------------------------------------------------------------
# 1. Deletion and insertion, known by construction
# --------------------------------------------------------------------------------------------


def test_deletion_insertion_auc_hand_computed_zero_baseline() -> None:
    """4 x 4 images, 4 steps of 4 pixels; the left half is 8 pixels, so 2 chunks.

    Image 0 has channel 0 = 1 (full logit 10), image 1 has channel 0 = 0.5 (full logit 5).
    The good map removes the left half in chunks 1-2 (left mean 1, 1/2, 0, 0, 0); the bad one
    in chunks 3-4 (1, 1, 1, 1/2, 0). Insertion reveals in the same order from zeros.
    """
    torch.manual_seed(1)
    good, bad = left_right_maps(4, 4)
    images = torch.randn(2, 3, 4, 4)  # channels 1-2 and the right half must not matter
    images[0, 0, :, :2] = 1.0
    images[1, 0, :, :2] = 0.5
    maps = torch.stack([good, bad, good, bad])[None].expand(2, -1, -1, -1)
    classes = torch.tensor([[0, 0, 1, 1]] * 2)
    result = faithfulness(LeftHalfModel(), images, maps, classes, steps=4, baseline="zero")
    assert isinstance(result, Faithfulness)

    for b, full in enumerate([10.0, 5.0]):
        good_left, bad_left = [1, 0.5, 0, 0, 0], [1, 1, 1, 0.5, 0]  # left mean / full, per step
        expected_deletion = {
            "good": trapezoid([sigmoid(full * m) for m in good_left]),
            "bad": trapezoid([sigmoid(full * m) for m in bad_left])}
        expected_insertion = {  # revealing k chunks leaves the left mean of deleting S - k
            "good": trapezoid([sigmoid(full * m) for m in bad_left[::-1]]),
            "bad": trapezoid([sigmoid(full * m) for m in good_left[::-1]])}
        for k, (cls, which) in enumerate([(0, "good"), (0, "bad"), (1, "good"), (1, "bad")]):
            deletion, insertion = expected_deletion[which], expected_insertion[which]
            if cls == 1:  # p1 = 1 - p0 at every step, so the area is 1 - area
                deletion, insertion = 1 - deletion, 1 - insertion
            assert float(result.deletion_auc[b, k]) == pytest.approx(deletion, abs=1e-5)
            assert float(result.insertion_auc[b, k]) == pytest.approx(insertion, abs=1e-5)
        # for class 0 the good map deletes faster and inserts faster than the bad one
        assert result.deletion_auc[b, 0] < result.deletion_auc[b, 1]
        assert result.insertion_auc[b, 0] > result.insertion_auc[b, 1]

    # image 0 by literal numbers: sigmoid(10) = 0.9999546, sigmoid(5) = 0.9933071
    assert float(result.deletion_auc[0, 0]) == pytest.approx(
        (0.9999546 / 2 + 0.9933071 + 0.5 + 0.5 + 0.5 / 2) / 4, abs=1e-6)
    assert float(result.insertion_auc[0, 1]) == pytest.approx(
        (0.5 / 2 + 0.5 + 0.5 + 0.9933071 + 0.9999546 / 2) / 4, abs=1e-6)


def test_blur_baseline_on_constant_image_gives_flat_curves() -> None:
    """A constant image is its own blur, so nothing the curves do changes the probability."""
    value = 0.3
    images = torch.full((1, 3, 20, 20), value)
    good, bad = left_right_maps(20, 20)
    maps = torch.stack([good, bad, random_maps((20, 20), torch.Generator().manual_seed(0))])[None]
    result = faithfulness(LeftHalfModel(), images, maps, torch.tensor([[0, 0, 1]]), steps=5,
                          baseline="blur")
    p0 = sigmoid(10 * value)
    expected = torch.tensor([[p0, p0, 1 - p0]])
    torch.testing.assert_close(result.deletion_auc, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.insertion_auc, expected, atol=1e-5, rtol=0)


def test_blur_is_the_separable_gaussian() -> None:
    """The blur equals one 2-D convolution with the outer-product Gaussian (reflect padding)."""
    torch.manual_seed(2)
    images = torch.randn(2, 3, 40, 30)
    sigma = 30 / 20
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel2d = (torch.outer(g, g) / g.sum() ** 2).float()
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    expected = F.conv2d(padded, kernel2d.expand(3, 1, -1, -1).contiguous(), groups=3)
    got = _gaussian_blur(images, sigma)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - images).abs().max() > 0.5  # it really blurs
    constant = torch.full((1, 3, 40, 30), -1.25)
    torch.testing.assert_close(_gaussian_blur(constant, sigma), constant, atol=1e-6, rtol=0)


def reference_curves(model: nn.Module, image: torch.Tensor, base: torch.Tensor,
                     saliency: torch.Tensor, cls: int, steps: int
                     ) -> tuple[list[float], list[float]]:
    """Deletion and insertion curves, one perturbed image and forward pass per step."""
    n_pixels = saliency.numel()
    values = saliency.flatten().tolist()
    order = sorted(range(n_pixels), key=lambda i: (-values[i], i))
    deletion, insertion = [], []
    with torch.no_grad():
        for s in range(steps + 1):
            chosen = torch.tensor(order[: s * n_pixels // steps], dtype=torch.long)
            deleted, inserted = image.clone().flatten(1), base.clone().flatten(1)
            deleted[:, chosen] = base.flatten(1)[:, chosen]
            inserted[:, chosen] = image.flatten(1)[:, chosen]
            for x, curve in ((deleted, deletion), (inserted, insertion)):
                scores = model(x.view(1, *image.shape))
                curve.append(float(torch.softmax(scores.double(), 1)[0, cls]))
    return deletion, insertion


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_curves_match_step_by_step_reference(baseline: str) -> None:
    """A nonlinear net, 25 pixels in 4 steps (chunks of 6, 6, 6, 7), tied map values."""
    torch.manual_seed(3)
    model = SmallNet().eval()
    images = torch.randn(2, 3, 5, 5)
    maps = torch.rand(2, 3, 5, 5)
    maps[0, 1] = (maps[0, 1] * 3).floor() / 3  # many ties: broken by pixel index
    classes = torch.tensor([[0, 1, 4], [2, 2, 3]])
    result = faithfulness(model, images, maps, classes, steps=4, baseline=baseline)
    bases = (_gaussian_blur(images, 5 / 20) if baseline == "blur"
             else torch.zeros_like(images))
    for b in range(2):
        for k in range(3):
            deletion, insertion = reference_curves(model, images[b], bases[b], maps[b, k],
                                                   int(classes[b, k]), steps=4)
            assert float(result.deletion_auc[b, k]) == pytest.approx(trapezoid(deletion),
                                                                     abs=1e-5)
            assert float(result.insertion_auc[b, k]) == pytest.approx(trapezoid(insertion),
                                                                      abs=1e-5)


# --------------------------------------------------------------------------------------------
# 2. Average drop and increase in confidence, by hand
# --------------------------------------------------------------------------------------------


def test_average_drop_and_increase_hand_computed() -> None:
    """Channel 0 = 1 on the left, so Y0 = sigmoid(10), Y1 = sigmoid(-10).

    E = image * map: a map of 0.5 halves the left mean (O0 = sigmoid(5), a drop; O1 =
    sigmoid(-5), an increase); 1 keeps it (O = Y: no drop, no increase, since O > Y is strict);
    0 zeroes it (O0 = 1/2); 0.25 on the left only gives O0 = sigmoid(2.5).
    """
    images = torch.ones(1, 3, 4, 4)
    images[0, 0, :, 2:] = -7.0  # the right half does not count
    quarter_left = torch.zeros(4, 4)
    quarter_left[:, :2] = 0.25
    maps = torch.stack([torch.full((4, 4), 0.5), torch.full((4, 4), 0.5), torch.ones(4, 4),
                        torch.zeros(4, 4), quarter_left])[None]
    classes = torch.tensor([[0, 1, 0, 0, 0]])
    result = faithfulness(LeftHalfModel(), images, maps, classes, steps=2, baseline="zero")
    y0 = sigmoid(10)
    y1 = sigmoid(-10)
    expected_drop = [(y0 - sigmoid(5)) / y0 * 100, 0.0, 0.0, (y0 - 0.5) / y0 * 100,
                     (y0 - sigmoid(2.5)) / y0 * 100]
    assert result.average_drop[0].tolist() == pytest.approx(expected_drop, abs=1e-4)
    assert sigmoid(-5) > y1
    assert result.increase[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert result.average_drop.dtype == torch.float32 and result.increase.dtype == torch.float32


def test_average_drop_zero_probability_is_not_nan() -> None:
    """Y underflows to 0 for class 0 (logit -1e4): no drop is possible, and nothing is NaN.

    A zero map makes O0 = sigmoid(0) = 1/2 > 0 = Y0 (an increase); for class 1, Y1 = O1 = 1.
    """
    images = torch.full((1, 3, 4, 4), -1000.0)
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.5)])[None]
    result = faithfulness(LeftHalfModel(), images, maps, torch.tensor([[0, 1]]), steps=2,
                          baseline="zero")
    assert result.average_drop.tolist() == [[0.0, 0.0]]
    assert result.increase.tolist() == [[1.0, 0.0]]


# --------------------------------------------------------------------------------------------
# 3. Batching does not change anything
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_batch_size_does_not_change_results(baseline: str) -> None:
    """batch_size 1, 7 (chunks that straddle images, maps and steps) and 1000 agree."""
    torch.manual_seed(4)
    model = SmallNet().eval()
    images = torch.randn(3, 3, 12, 12)
    maps = random_maps((3, 2, 12, 12), torch.Generator().manual_seed(5), cells=4)
    classes = torch.tensor([[0, 3], [1, 1], [4, 2]])
    results = [faithfulness(model, images, maps, classes, steps=5, batch_size=size,
                            baseline=baseline) for size in (1, 7, 1000)]
    for other in results[1:]:
        for field in FIELDS:
            scale = 100.0 if field == "average_drop" else 1.0  # percent: 1e-6 of a probability
            torch.testing.assert_close(getattr(other, field) / scale,
                                       getattr(results[0], field) / scale, atol=1e-6, rtol=0)
    assert results[0].deletion_auc.shape == (3, 2)
    assert all(getattr(results[0], f).dtype == torch.float32 for f in FIELDS)


# --------------------------------------------------------------------------------------------
# 4. The model is left as found
# --------------------------------------------------------------------------------------------


def test_model_left_as_found_and_run_in_eval_mode() -> None:
    """Mixed training flags and requires_grad come back unchanged; no .grad; eval-mode values."""
    torch.manual_seed(6)
    model = SmallNet()
    model.train()
    model.features[1].eval()  # a mix of flags
    model.fc.requires_grad_(False)
    flags = {name: m.training for name, m in model.named_modules()}
    needs_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 8, 8)
    maps = random_maps((2, 2, 8, 8), torch.Generator().manual_seed(7), cells=3)
    classes = torch.tensor([[0, 1], [2, 3]])

    first = faithfulness(model, images, maps, classes, steps=4)
    second = faithfulness(model, images, maps, classes, steps=4)  # dropout off: repeatable

    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == needs_grad
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # BatchNorm running stats not updated
        assert torch.equal(value, state[key]), key
    eval_copy = SmallNet()
    eval_copy.load_state_dict(state)
    expected = faithfulness(eval_copy.eval(), images, maps, classes, steps=4)
    for field in FIELDS:
        torch.testing.assert_close(getattr(first, field), getattr(second, field), atol=0, rtol=0)
        torch.testing.assert_close(getattr(first, field), getattr(expected, field),
                                   atol=1e-6, rtol=0)
        assert not getattr(first, field).is_inference()  # usable outside inference mode


def test_inputs_checked() -> None:
    model = LeftHalfModel()
    images = torch.zeros(1, 3, 4, 4)
    maps = torch.zeros(1, 1, 4, 4)
    classes = torch.tensor([[0]])
    with pytest.raises(ValueError, match="maps must have shape"):
        faithfulness(model, images, maps[:, :, :3], classes)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        faithfulness(model, images, maps + 2, classes)
    with pytest.raises(ValueError, match="classes must have shape"):
        faithfulness(model, images, maps, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        faithfulness(model, images, maps, classes.float())
    with pytest.raises(ValueError, match="0..1"):
        faithfulness(model, images, maps, torch.tensor([[2]]))
    with pytest.raises(ValueError, match="baseline"):
        faithfulness(model, images, maps, classes, baseline="mean")
    with pytest.raises(ValueError, match="steps"):
        faithfulness(model, images, maps, classes, steps=0)


# --------------------------------------------------------------------------------------------
# Random maps
# --------------------------------------------------------------------------------------------


def test_random_maps_are_seeded_smooth_and_in_unit_range() -> None:
    first = random_maps((2, 3, 64, 48), torch.Generator().manual_seed(8))
    again = random_maps((2, 3, 64, 48), torch.Generator().manual_seed(8))
    other = random_maps((2, 3, 64, 48), torch.Generator().manual_seed(9))
    assert first.shape == (2, 3, 64, 48) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.testing.assert_close(first.amin(dim=(-2, -1)), torch.zeros(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(first.amax(dim=(-2, -1)), torch.ones(2, 3), atol=0, rtol=0)
    # bilinear from 7 cells: neighbours differ by at most (range / cell width) of the noise
    steepest = max(float(first.diff(dim=-1).abs().max()), float(first.diff(dim=-2).abs().max()))
    assert steepest < 0.2
    with pytest.raises(ValueError, match="cells"):
        random_maps((5, 5), None, cells=1)  # one cell: no "where", only rounding noise


# --------------------------------------------------------------------------------------------
# 5. Grad-CAM is more faithful than random maps on the sample photos
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grad_cam_deletes_faster_than_random_maps_on_photos() -> None:
    """Built-in model, the 5 photos of data/, top-1 class, last conv, steps=8.

    Each photo gets two maps for its top-1 class in one call (so the image and baseline passes
    are shared): Grad-CAM's and a seeded random map. Averaged over the photos, removing
    Grad-CAM's pixels first must make the probability fall faster.
    """
    from gradcam_cli.gradcam import conv_layers_in_run_order, grad_cam
    from gradcam_cli.images import list_images, load_rgb
    from gradcam_cli.models import load_model
    from gradcam_cli.preprocessing import prepare_image

    loaded_model = load_model(None)

    model, preprocessing = loaded_model.model, loaded_model.preprocessing
    images = torch.from_numpy(np.stack([prepare_image(load_rgb(e.path), preprocessing)[1]
                                        for e in list_images(DATA)]))
    assert images.shape[0] == 5
    convs, _ = conv_layers_in_run_order(model, images[:1])
    scores, cam = grad_cam(model, images, [convs[-1].module],
                           lambda s: s.argmax(dim=1, keepdim=True))
    noise = random_maps((5, 1, *images.shape[-2:]), torch.Generator().manual_seed(0))
    top1 = scores.argmax(dim=1, keepdim=True).expand(-1, 2)
    result = faithfulness(model, images, torch.cat([cam[0], noise], dim=1), top1, steps=8)
    deletion = result.deletion_auc.mean(dim=0)  # (Grad-CAM, random)
    insertion = result.insertion_auc.mean(dim=0)
    drop = result.average_drop.mean(dim=0)
    print(f"\nmean over 5 photos (Grad-CAM vs random): deletion AUC {deletion[0]:.4f} vs "
          f"{deletion[1]:.4f}, insertion AUC {insertion[0]:.4f} vs {insertion[1]:.4f}, "
          f"average drop {drop[0]:.2f}% vs {drop[1]:.2f}%")
    assert deletion[0] < deletion[1]
