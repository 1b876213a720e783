"""Eigen-CAM, Ablation-CAM and the two smoothings (``smooth="aug"``, ``smooth="eigen"``).

Values, not shapes: hand-computed maps (the hand network of test_methods, rank-1 activations
whose principal component is known), an SVD taken independently here, the documented
augmentation average recomposed from plain runs, and pytorch-grad-cam's classes of the same
name on torchvision ResNets with random weights (eval mode, seeded) and real photos from data/.
pytorch-grad-cam returns maps min-max normalized at the input size; ours (``raw=False``) are
the same, so maps are compared at input resolution by Pearson r. Those comparisons take 5 to
25 s each on two busy CPU cores (imports, a ResNet's passes on both sides): marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradcam_cli import cam_methods
from gradcam_cli.cam_methods import METHODS, CamMethod
from gradcam_cli.gradcam import (
    AUGMENTATIONS,
    explain,
    explain_methods,
    normalize_maps,
    top_and_lowest,
    upsample_and_normalize,
)
from tests.test_engine import (
    TINY_LAYERS,
    assert_clean,
    mixed_state_model,
    modules_by_name,
    snapshot,
)
from tests.test_methods import ACTIVATION, CLASS_WEIGHTS, GapLinear, hand_network

DATA = Path(__file__).resolve().parent.parent / "data"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_method_with_a_cited_docstring() -> None:
    """The registry is explicit, in the command line's order, one formula per entry, and each
    formula names its paper's year."""
    from gradcam_cli import cli
    assert tuple(METHODS) == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                              "scorecam", "eigencam", "ablationcam") == cli.METHOD_NAMES
    for method in METHODS.values():
        assert method.formula.__doc__ and any(year in method.formula.__doc__
                                              for year in ("2017", "2018", "2020", "2021"))
    assert METHODS["eigencam"].from_activations is cam_methods.eigen_cam
    assert METHODS["ablationcam"].from_ablation is cam_methods.ablation_cam
    with pytest.raises(ValueError, match="exactly one"):
        CamMethod("two", from_gradients=cam_methods.grad_cam,
                  from_activations=cam_methods.eigen_cam)


@pytest.mark.parametrize("method", ["eigencam", "ablationcam"])
def test_gradient_free_methods_refuse_counterfactual(method: str) -> None:
    model = hand_network()
    with pytest.raises(ValueError, match="counterfactual"):
        explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]), method=method,
                counterfactual=True)


def test_unknown_smoothing_is_refused() -> None:
    model = hand_network()
    with pytest.raises(ValueError, match="aug"):
        explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]), smooth="blur")


# --------------------------------------------------------------------------------------------
# Eigen-CAM by hand
# --------------------------------------------------------------------------------------------

# A rank-1 activation (C = 3, 2 x 2): A_k = m_k + v_k z with z centred (it sums to 0), so the
# centred (h*w, C) matrix is z v^T, whose only principal direction is v / |v| and whose
# projection is z |v| up to sign; |v| = 3.
SPATIAL = torch.tensor([[1.0, -2.0], [3.0, -2.0]])
OFFSETS = torch.tensor([5.0, 1.0, 0.0])
DIRECTION = torch.tensor([2.0, -1.0, 2.0])


def rank_one(direction: torch.Tensor) -> torch.Tensor:
    return OFFSETS[:, None, None] + direction[:, None, None] * SPATIAL


class Constant(nn.Module):
    """Returns a fixed activation for every image (the target layer) and sums it into
    ``n_classes`` scores."""

    def __init__(self, activation: torch.Tensor, n_classes: int = 3) -> None:
        super().__init__()
        self.target = nn.Identity()
        self.register_buffer("activation", activation)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.activation.expand(x.shape[0], -1, -1, -1) + 0 * x.sum())
        return a.sum(dim=(1, 2, 3))[:, None].repeat(1, self.n_classes) * torch.arange(
            1.0, self.n_classes + 1)


def eigen_raw(activation: torch.Tensor, classes=((0, 2, 1),)) -> torch.Tensor:
    model = Constant(activation)
    _, maps = explain(model, torch.zeros(len(classes), 1, 2, 2), [model.target],
                      torch.tensor(classes), method="eigencam", raw=True)
    return maps[0]


def test_eigen_cam_of_a_rank_one_activation() -> None:
    """v = (2, -1, 2) sums to 3 > 0: v is kept and the map is ReLU(3 z) = [[3, 0], [9, 0]],
    the same for each of the three classes. With -v (A' = m - v z, sum -3) the sign rule
    flips the direction back to v and projects A' to -3 z: ReLU(-3 z) = [[0, 6], [0, 6]]. So
    the map always correlates positively with sum_k A_k (3 z, then -3 z)."""
    maps = eigen_raw(rank_one(DIRECTION))
    for k in range(3):
        torch.testing.assert_close(maps[0, k], torch.tensor([[3.0, 0.0], [9.0, 0.0]]),
                                   atol=1e-5, rtol=0)
    flipped = eigen_raw(rank_one(-DIRECTION))
    torch.testing.assert_close(flipped[0, 0], torch.tensor([[0.0, 6.0], [0.0, 6.0]]),
                               atol=1e-5, rtol=0)


def independent_projection(terms: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (h, w): the first principal component by torch.linalg.svd, signed to
    correlate positively with the channel sum; no ReLU."""
    x = terms.double().flatten(1).t()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x)
    projection = x @ vh[0]
    if float(projection @ x.sum(dim=1)) < 0:
        projection = -projection
    return projection.view(terms.shape[1:]).float()


def test_eigen_cam_matches_an_independent_svd() -> None:
    """A full-rank random (2 images, 5 channels, 3 x 4) activation: each image's map is
    ReLU of the SVD projection computed here, identical for both classes."""
    activation = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(11))
    model = nn.Sequential(nn.Conv2d(5, 5, 1, bias=False), nn.Flatten(), nn.Linear(60, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(5).view(5, 5, 1, 1))
    _, maps = explain(model, activation, [model[0]], torch.tensor([[0, 3], [2, 1]]),
                      method="eigencam", raw=True)
    for b in range(2):
        expected = torch.relu(independent_projection(activation[b]))
        assert expected.max() > 0 and (expected == 0).any()  # the ReLU does something
        for k in range(2):
            torch.testing.assert_close(maps[0][b, k], expected, atol=1e-5, rtol=1e-5)


def test_eigen_cam_makes_no_forward_pass_of_its_own() -> None:
    """Grad-CAM and Eigen-CAM together run the model once, as Grad-CAM alone does."""
    model = GapLinear().eval()
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        explain_methods(model, torch.randn(2, 3, 6, 6), [model.target],
                        torch.tensor([[0], [1]]), ["gradcam", "eigencam"])
    finally:
        handle.remove()
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# Ablation-CAM by hand
# --------------------------------------------------------------------------------------------


def test_ablation_cam_matches_the_hand_computation() -> None:
    """The hand network's score is y_c = sum_k <W_ck, A_k>; zeroing channel k removes that
    term. Class 0: <W_00, A_0> = 1 + 2 + 0 + 6 = 9, <W_01, A_1> = 1 - 3 + 1 + 0 = -1, y_0 = 8:
    w = (9/8, -1/8), map ReLU(9/8 A_0 - 1/8 A_1) = [[7/8, 15/8], [0, 26/8]].
    Class 1: <W_10, A_0> = -1 + 3 = 2, <W_11, A_1> = -4, y_1 = -2: w = (2, -4) / -2 =
    (-1, 2), map ReLU(-A_0 + 2 A_1) = [[3, 4], [2, 0]]: the negative score flips the weights
    (channel 0 supports class 1, yet weighs -1), as pytorch-grad-cam's formula does."""
    model = hand_network()
    _, maps = explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0, 1]]),
                      method="ablationcam", raw=True)
    torch.testing.assert_close(maps[0][0, 0], torch.tensor([[7 / 8, 15 / 8], [0.0, 26 / 8]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(maps[0][0, 1], torch.tensor([[3.0, 4.0], [2.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_ablation_cam_batches_and_reports_progress() -> None:
    """Batch size does not change Ablation-CAM; progress reaches B * C passes; the weights
    are (y_c - y_c^k) / y_c of passes made here by hand, channel by channel."""
    torch.manual_seed(6)
    model = GapLinear().eval()
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1], [2, 3]])
    seen = []
    _, one = explain(model, images, [model.target], classes, method="ablationcam", raw=True,
                     batch_size=1, progress=lambda done, total: seen.append((done, total)))
    _, many = explain(model, images, [model.target], classes, method="ablationcam", raw=True,
                      batch_size=7)
    torch.testing.assert_close(one[0], many[0], atol=1e-6, rtol=1e-5)
    assert seen[-1] == (2 * 5, 2 * 5) and len(seen) == 10
    with torch.no_grad():
        activation = model.target(model.features(images))
        scores = model(images)
        for b in range(2):
            weights = []
            for k in range(5):
                ablated = activation[b:b + 1].clone()
                ablated[:, k] = 0
                drop = scores[b] - model.fc(ablated.mean(dim=(2, 3)))[0]
                weights.append(drop / scores[b])
            weights = torch.stack(weights, dim=1)[classes[b]]  # (K, C)
            expected = torch.relu(torch.einsum("kc,chw->khw", weights, activation[b]))
            torch.testing.assert_close(one[0][b], expected, atol=1e-5, rtol=1e-4)


class ChannelsLastTarget(nn.Module):
    """conv -> Permute to (B, h, w, C) -> Linear (the target: channels-last) -> back -> ReLU
    -> GAP -> fc; ``as_conv`` swaps the Permute-Linear-Permute for the equal 1x1 conv."""

    def __init__(self, as_conv: bool) -> None:
        super().__init__()
        from torchvision.ops.misc import Permute
        torch.manual_seed(21)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        linear = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)
        if as_conv:
            self.target = nn.Conv2d(4, 5, 1)
            with torch.no_grad():
                self.target.weight.copy_(linear.weight.view(5, 4, 1, 1))
                self.target.bias.copy_(linear.bias)
            self.body = nn.Sequential(self.target)
        else:
            self.target = linear
            self.body = nn.Sequential(Permute([0, 2, 3, 1]), linear, Permute([0, 3, 1, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(self.stem(x))).mean(dim=(2, 3)))


def test_ablation_zeroes_the_channel_axis_of_a_channels_last_layer() -> None:
    """The same network with its target channels-last (Linear between Permutes) or
    channels-first (a 1x1 conv): the same Ablation-CAM maps, so the ablation hook zeroed the
    last axis of the (B, h, w, C) output."""
    images = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    classes = torch.tensor([[0, 1], [2, 0]])
    maps = []
    for as_conv in (False, True):
        model = ChannelsLastTarget(as_conv).eval()
        maps.append(explain(model, images, [model.target], classes, method="ablationcam",
                            raw=True, batch_size=4)[1][0])
    assert maps[1].amax() > 0
    torch.testing.assert_close(maps[0], maps[1], atol=1e-5, rtol=1e-5)


class TokenTarget(nn.Module):
    """Patch embedding (2 x 2) -> tokens with a class token -> Linear (the target, tokens
    (B, 1 + 9, 4)) -> fc of (class token + mean of the patch tokens)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(22)
        self.embed = nn.Conv2d(3, 4, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.target = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        out = self.target(tokens)
        return self.fc(out[:, 0] + out[:, 1:].mean(dim=1))


def test_ablation_zeroes_the_patch_tokens_of_a_token_layer() -> None:
    """For a (B, 1 + h*w, D) layer, channel k is feature k of the patch tokens: the class
    token is no part of A_k and is left alone (weights recomputed here by zeroing
    out[:, 1:, k] with a hook of the test's own)."""
    model = TokenTarget().eval()
    images = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    classes = torch.tensor([[0, 2]])
    _, maps = explain(model, images, [model.target], classes, method="ablationcam", raw=True)
    with torch.no_grad():
        activation = model.target(torch.cat([model.cls, model.embed(images).flatten(2)
                                             .transpose(1, 2)], dim=1))
        grid = activation[0, 1:].t().reshape(4, 3, 3)
        scores = model(images)[0]
        weights = []
        for k in range(4):
            def zero(module, inputs, output, k=k):
                output = output.clone()
                output[:, 1:, k] = 0
                return output
            handle = model.target.register_forward_hook(zero)
            try:
                weights.append((scores - model(images)[0]) / scores)
            finally:
                handle.remove()
        weights = torch.stack(weights, dim=1)[classes[0]]
    expected = torch.relu(torch.einsum("kc,chw->khw", weights, grid))
    assert expected.amax() > 0
    torch.testing.assert_close(maps[0][0], expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Eigen smoothing by hand
# --------------------------------------------------------------------------------------------


def test_eigen_smoothing_projects_each_methods_weighted_activations() -> None:
    """On the hand network (class 0): Grad-CAM's alpha_k A_k with alpha = (0.75, 0.125),
    HiResCAM's G * A, LayerCAM's ReLU(G) * A, Ablation-CAM's w_k A_k with w = (9/8, -1/8):
    each smoothed map is ReLU of the principal component of those terms, computed here by
    an independent SVD. Eigen-CAM is unchanged by it."""
    gradient = CLASS_WEIGHTS[0]
    terms = {
        "gradcam": torch.tensor([0.75, 0.125])[:, None, None] * ACTIVATION,
        "hirescam": gradient * ACTIVATION,
        "layercam": torch.relu(gradient) * ACTIVATION,
        "ablationcam": torch.tensor([9 / 8, -1 / 8])[:, None, None] * ACTIVATION,
        "eigencam": ACTIVATION,
    }
    model = hand_network()
    for method, weighted in terms.items():
        _, maps = explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]),
                          method=method, raw=True, smooth="eigen")
        expected = torch.relu(independent_projection(weighted))
        torch.testing.assert_close(maps[0][0, 0], expected, atol=1e-5, rtol=1e-5,
                                   msg=method)
    _, plain = explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]),
                       method="eigencam", raw=True)
    torch.testing.assert_close(maps[0], plain[0], atol=0, rtol=0)


def test_eigen_smoothing_of_score_cam_uses_its_weights() -> None:
    """Score-CAM's smoothed map is the principal component of alpha_k A_k, alpha its class
    probabilities (test_methods: sigmoid(14/3), sigmoid(2.5))."""
    alpha = torch.sigmoid(torch.tensor([14 / 3, 2.5]))
    model = hand_network()
    _, maps = explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]),
                      method="scorecam", raw=True, smooth="eigen")
    expected = torch.relu(independent_projection(alpha[:, None, None] * ACTIVATION))
    torch.testing.assert_close(maps[0][0, 0], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Augmentation smoothing, recomposed from plain runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_aug_smoothing_averages_normalized_unflipped_maps() -> None:
    """smooth="aug" is, per map: the mean over the six augmentations (flip or not, x 0.9, 1,
    1.1) of the un-flipped raw map min-max normalized at layer resolution, times the mean of
    their peaks; classes (a function here) are picked once, on the original images, and the
    scores returned are theirs. Normalized maps are those raw ones upsampled and normalized."""
    torch.manual_seed(7)
    model = GapLinear().eval()
    images = torch.randn(2, 3, 6, 6)
    picked = []

    def choose(scores: torch.Tensor) -> torch.Tensor:
        picked.append(scores.clone())
        return top_and_lowest(scores, top=2)

    methods = ["gradcam", "layercam", "scorecam", "ablationcam"]
    scores, smoothed = explain_methods(model, images, [model.target], choose, methods,
                                       raw=True, smooth="aug")
    _, normalized = explain_methods(model, images, [model.target], choose, methods,
                                    smooth="aug")
    with torch.no_grad():
        torch.testing.assert_close(scores, model(images), atol=0, rtol=0)
    assert len(picked) == 2 and torch.equal(picked[0], scores)
    classes = top_and_lowest(scores, top=2)
    assert len(AUGMENTATIONS) == 6
    for method in methods:
        shapes, peaks = [], []
        for flip, factor in AUGMENTATIONS:
            augmented = images * factor
            augmented = augmented.flip(-1) if flip else augmented
            raw = explain(model, augmented, [model.target], classes, method=method,
                          raw=True)[1][0]
            raw = raw.flip(-1) if flip else raw
            shapes.append(normalize_maps(raw))
            peaks.append(raw.amax(dim=(-2, -1), keepdim=True))
        expected = torch.stack(shapes).mean(0) * torch.stack(peaks).mean(0)
        assert expected.amax() > 0
        torch.testing.assert_close(smoothed[method][0], expected, atol=1e-6, rtol=1e-5,
                                   msg=method)
        torch.testing.assert_close(normalized[method],
                                   upsample_and_normalize(smoothed[method], (6, 6)),
                                   atol=1e-6, rtol=0, msg=method)


def test_aug_smoothing_reports_progress_over_all_runs() -> None:
    """Ablation-CAM's passes, six times over: progress climbs to 6 * B * C and ends there."""
    torch.manual_seed(8)
    model = GapLinear().eval()
    seen = []
    explain(model, torch.randn(2, 3, 6, 6), [model.target], torch.tensor([[0], [1]]),
            method="ablationcam", smooth="aug", batch_size=4,
            progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (60, 60) and all(total == 60 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


# --------------------------------------------------------------------------------------------
# Many methods at once, and the model left as found
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("smooth", [None, "eigen", "aug"])
def test_many_methods_with_eigen_and_ablation_equal_each_methods_own_run(smooth) -> None:
    """explain_methods with Eigen-CAM and Ablation-CAM among the others: each method's maps
    (raw and normalized) are exactly those of its own call, smoothed or not."""
    model = mixed_state_model()
    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    layers = modules_by_name(model, ["blocks.1.1.conv2", "head"])
    classes = torch.tensor([[1, 2], [3, 0]])
    methods = ["gradcam", "eigencam", "hirescam", "ablationcam", "scorecam"]
    for raw in (True, False):
        scores, together = explain_methods(model, images, layers, classes, methods, raw=raw,
                                           batch_size=16, smooth=smooth)
        assert list(together) == methods
        for method in methods:
            alone_scores, alone = explain(model, images, layers, classes, method=method,
                                          raw=raw, batch_size=16, smooth=smooth)
            torch.testing.assert_close(scores, alone_scores, rtol=0, atol=0)
            for got, want in zip(together[method], alone):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=method)


@pytest.mark.slow
@pytest.mark.parametrize("smooth", [None, "eigen", "aug", "aug+eigen"])
def test_model_left_as_found(smooth) -> None:
    """After Ablation-CAM (its hook on the target) and Eigen-CAM, smoothed or not: no hooks,
    the same mix of training flags and requires_grad, same parameters, no .grad."""
    model = mixed_state_model()
    layers = modules_by_name(model, TINY_LAYERS)
    before = snapshot(model)
    explain_methods(model, torch.randn(2, 3, 12, 12), layers, top_and_lowest,
                    ["ablationcam", "eigencam", "gradcam"], batch_size=8, smooth=smooth)
    assert_clean(model, before)


class FailsOnSmallBatches(nn.Module):
    """A conv then GAP + fc that raises for a batch of one: the ablation passes (batch_size
    1) fail, the first pass (two images) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if x.shape[0] == 1:
            raise RuntimeError("boom in an ablation pass")
        return self.fc(out.mean(dim=(2, 3)))


def test_model_left_as_found_when_an_ablation_pass_raises() -> None:
    model = FailsOnSmallBatches().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="ablation pass"):
        explain(model, torch.randn(2, 3, 8, 8), [model.conv], torch.tensor([[0], [1]]),
                method="ablationcam", batch_size=1)
    assert_clean(model, before)


# --------------------------------------------------------------------------------------------
# Against pytorch-grad-cam
# --------------------------------------------------------------------------------------------


def photos(crop: int, count: int) -> torch.Tensor:
    """The first ``count`` photos of data/, ImageNet-preprocessed at ``crop`` x ``crop``."""
    from gradcam_cli.images import load_rgb
    from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, prepare_image
    paths = sorted(p for p in DATA.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    preprocessing = IMAGENET_PREPROCESSING.with_crop(crop)
    return torch.stack([torch.from_numpy(prepare_image(load_rgb(p), preprocessing)[1])
                        for p in paths[:count]])


def random_resnet(name: str, seed: int) -> nn.Module:
    import torchvision.models
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=20).eval()


def pearson(a, b) -> float:
    pair = torch.stack([torch.as_tensor(a).flatten().double(),
                        torch.as_tensor(b).flatten().double()])
    return float(torch.corrcoef(pair)[0, 1])


def theirs(cam_class, model, layer, images, class_column, **options):
    """pytorch-grad-cam's maps (B, H, W) for one class per image."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with cam_class(model=model, target_layers=[layer]) as cam:
        return torch.from_numpy(cam(images, [ClassifierOutputTarget(int(c))
                                             for c in class_column], **options))


def nontrivial(maps: torch.Tensor) -> None:
    assert all(float(m.amax() - m.amin()) > 0.5 for m in maps.flatten(0, -3))


@pytest.mark.slow
def test_eigen_cam_matches_pytorch_grad_cam() -> None:
    """ResNet-50 (random weights, seed 1) at layer4, 3 photos at 128 px: |r| >= 0.99 per map
    against EigenCAM (the SVD sign is arbitrary there; measured: r = 1.0000000 for all three
    to 7 digits, the signs agree). Their map is the same for any class, as ours is."""
    from pytorch_grad_cam import EigenCAM
    model = random_resnet("resnet50", 1)
    images = photos(128, 3)
    classes = torch.tensor([[0, 5]] * 3)
    _, ours = explain(model, images, [model.layer4], classes, method="eigencam")
    nontrivial(ours)
    reference = theirs(EigenCAM, model, model.layer4, images, classes[:, 0])
    for b in range(3):
        assert abs(pearson(ours[0, b, 0], reference[b])) >= 0.99
        torch.testing.assert_close(ours[0, b, 0], ours[0, b, 1], atol=0, rtol=0)


@pytest.mark.slow
def test_ablation_cam_matches_pytorch_grad_cam() -> None:
    """ResNet-18 (random weights, seed 2) at layer1 (64 channels, after a ReLU, so
    pytorch-grad-cam's AblationLayer zeroes as ours does), 2 photos at 96 px, each image's
    top two classes (positive logits): r >= 0.99 per map against AblationCAM (measured:
    r = 1.0000000 for all four, to 7 digits). 2 x 64 ablated passes each side."""
    from pytorch_grad_cam import AblationCAM
    model = random_resnet("resnet18", 2)
    images = photos(96, 2)
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices
        assert (model(images).gather(1, classes) > 0).all()
    _, ours = explain(model, images, [model.layer1], classes, method="ablationcam",
                      batch_size=64)
    nontrivial(ours)
    for k in range(2):
        reference = theirs(AblationCAM, model, model.layer1, images, classes[:, k])
        for b in range(2):
            assert pearson(ours[0, b, k], reference[b]) >= 0.99


@pytest.mark.slow
def test_aug_smoothing_matches_pytorch_grad_cam() -> None:
    """Grad-CAM with aug_smooth=True, ResNet-18 (seed 3) at layer3, 2 photos at 128 px, each
    image's top class: r >= 0.99 per map (measured: r = 0.9999997 and 0.9999998; not 1 to
    float precision because pytorch-grad-cam renormalizes each augmentation's map after
    resizing it with OpenCV). Six forward and backward passes each side."""
    from pytorch_grad_cam import GradCAM
    model = random_resnet("resnet18", 3)
    images = photos(128, 2)
    scores, ours = explain(model, images, [model.layer3],
                           lambda s: s.argmax(dim=1, keepdim=True), smooth="aug")
    nontrivial(ours)
    reference = theirs(GradCAM, model, model.layer3, images, scores.argmax(dim=1),
                       aug_smooth=True)
    for b in range(2):
        assert pearson(ours[0, b, 0], reference[b]) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_eigen_smoothing_matches_pytorch_grad_cam(method: str, monkeypatch) -> None:
    """eigen_smooth=True, ResNet-18 (seed 4) at layer3, 3 photos at 128 px, each image's top
    two classes: |r| >= 0.99 per map, up to the SVD's sign, which pytorch-grad-cam leaves
    arbitrary: where its sign differs from our rule, its map is ReLU(-p) and must match ours
    made with the opposite sign (first_principal_component negated). Measured: r = 1.0000000
    for every map, to 7 digits (Grad-CAM: the signs agree on 6 of 6; HiResCAM: on 2 of 6)."""
    from pytorch_grad_cam import GradCAM, HiResCAM
    cam_class = {"gradcam": GradCAM, "hirescam": HiResCAM}[method]
    model = random_resnet("resnet18", 4)
    images = photos(128, 3)
    with torch.no_grad():
        classes = model(images).topk(2, dim=1).indices
    _, ours = explain(model, images, [model.layer3], classes, method=method, smooth="eigen")
    nontrivial(ours)
    opposite = None
    for k in range(2):
        reference = theirs(cam_class, model, model.layer3, images, classes[:, k],
                           eigen_smooth=True)
        for b in range(3):
            if pearson(ours[0, b, k], reference[b]) >= 0.99:
                continue
            if opposite is None:  # our maps with the other sign, made once when needed
                monkeypatch.setattr(cam_methods, "first_principal_component",
                                    lambda t, f=cam_methods.first_principal_component: -f(t))
                _, opposite = explain(model, images, [model.layer3], classes, method=method,
                                      smooth="eigen")
                monkeypatch.undo()
            assert pearson(opposite[0, b, k], reference[b]) >= 0.99


class _SharedActivation(nn.Module):
    """One ReLU module called twice (EfficientNet's ``_swish`` is such a module): the
    explained activation is its last call's output, with 6 channels; the first has 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def head(self, activation: torch.Tensor) -> torch.Tensor:
        return self.fc(activation.mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))))


def test_ablationcam_of_a_module_run_twice_ablates_its_last_call() -> None:
    """Each channel of the explained (last-call) activation zeroed by hand, the rest of the
    network run on it: the same weights, so the same map."""
    torch.manual_seed(0)
    model = _SharedActivation().eval()
    images = torch.randn(2, 3, 8, 8)
    classes = torch.tensor([[0, 2], [1, 0]])
    _, maps = explain(model, images, [model.act], classes, method="ablationcam", raw=True)
    with torch.no_grad():
        activation = model.act(model.conv2(model.act(model.conv1(images))))
        scores = model.head(activation)
        expected = torch.empty(2, 2, 8, 8)
        for b in range(2):
            for k in range(2):
                c = classes[b, k]
                weights = []
                for channel in range(6):
                    ablated = activation[b:b + 1].clone()
                    ablated[:, channel] = 0
                    weights.append((scores[b, c] - model.head(ablated)[0, c]) / scores[b, c])
                weighted = torch.stack(weights)[:, None, None] * activation[b]
                expected[b, k] = torch.relu(weighted.sum(dim=0))
    torch.testing.assert_close(maps[0], expected, rtol=1e-4, atol=1e-6)
