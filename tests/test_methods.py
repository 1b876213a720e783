"""Every CAM method against numbers worked out by hand, and the identities the papers state.

The hand network: x (1, 2, 2, 2) -> 1x1 conv with identity weights (the target layer, so A = x)
-> flatten -> linear (2 classes) with hand-set weights W. The gradient of class c's score with
respect to A is then exactly W_c, so every formula can be evaluated on paper:

    A_0 = [[1, 2], [0, 3]]        A_1 = [[2, 3], [1, 1]]
    G_0 = [[1, 1], [-1, 2]]       G_1 = [[0.5, -1], [1, 0]]      (class 0)
    class 1: G_0 = [[-1, 0], [0, 1]], G_1 = [[-2, 0], [0, 0]]
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcam_cli.cam_methods import METHODS
from gradcam_cli.gradcam import explain, grad_cam

ACTIVATION = torch.tensor([[[1.0, 2.0], [0.0, 3.0]], [[2.0, 3.0], [1.0, 1.0]]])
CLASS_WEIGHTS = torch.tensor([
    [[[1.0, 1.0], [-1.0, 2.0]], [[0.5, -1.0], [1.0, 0.0]]],
    [[[-1.0, 0.0], [0.0, 1.0]], [[-2.0, 0.0], [0.0, 0.0]]],
])


def hand_network() -> nn.Sequential:
    conv = nn.Conv2d(2, 2, kernel_size=1, bias=False)
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        linear.weight.copy_(CLASS_WEIGHTS.reshape(2, 8))
    return nn.Sequential(conv, nn.Flatten(), linear)


def raw_map(method: str, class_index: int = 0, counterfactual: bool = False) -> torch.Tensor:
    model = hand_network()
    _, maps = explain(model, ACTIVATION[None], [model[0]], torch.tensor([[class_index]]),
                      method=method, counterfactual=counterfactual, raw=True)
    return maps[0][0, 0]


HAND_MAPS = {
    # alpha = (mean G_0, mean G_1) = (0.75, 0.125); 0.75 A_0 + 0.125 A_1
    "gradcam": [[1.0, 1.875], [0.125, 2.375]],
    # sum_k G_k A_k = [[1 + 1, 2 - 3], [0 + 1, 6 + 0]] -> ReLU
    "hirescam": [[2.0, 0.0], [1.0, 6.0]],
    # sum_k ReLU(G_k) A_k = [[1 + 1, 2 + 0], [0 + 1, 6 + 0]]
    "layercam": [[2.0, 2.0], [1.0, 6.0]],
    # w_0 = (1 + 2 + 0 + 6) / 6 = 1.5, w_1 = (1 - 3 + 1 + 0) / 7 = -1/7; 1.5 A_0 - A_1 / 7
    "xgradcam": [[1.5 - 2 / 7, 3 - 3 / 7], [0.0, 4.5 - 1 / 7]],
    # a = G^2 / (2 G^2 + sum(A_k) G^3): w_0 = 1/8 + 1/8 + 0 + (4/56) * 2 = 0.25 + 1/7,
    # w_1 = (0.25 / 1.375) * 0.5 + 0 + 1/9 + 0
    "gradcam++": [[(0.25 + 1 / 7) + 2 * (0.25 / 1.375 * 0.5 + 1 / 9),
                   2 * (0.25 + 1 / 7) + 3 * (0.25 / 1.375 * 0.5 + 1 / 9)],
                  [(0.25 / 1.375 * 0.5 + 1 / 9),
                   3 * (0.25 + 1 / 7) + (0.25 / 1.375 * 0.5 + 1 / 9)]],
}


@pytest.mark.parametrize("method", sorted(HAND_MAPS))
def test_gradient_methods_match_the_hand_computation(method: str) -> None:
    """Each gradient method gives the value worked out on paper, to 1e-6."""
    torch.testing.assert_close(raw_map(method), torch.tensor(HAND_MAPS[method]),
                               atol=1e-6, rtol=0)


def test_score_cam_matches_the_hand_computation() -> None:
    """Masks H_0 = A_0 / 3, H_1 = (A_1 - 1) / 2; class-0 scores (y_0, y_1) of x * H_k are
    (6, 4/3) and (0, -2.5), so alpha = (sigmoid(14/3), sigmoid(2.5))."""
    alpha_0 = torch.sigmoid(torch.tensor(14 / 3))
    alpha_1 = torch.sigmoid(torch.tensor(2.5))
    expected = alpha_0 * ACTIVATION[0] + alpha_1 * ACTIVATION[1]
    torch.testing.assert_close(raw_map("scorecam"), expected, atol=1e-6, rtol=0)


def test_counterfactual_negates_the_gradients() -> None:
    """Class 1: alpha = (0, -0.5): Grad-CAM is ReLU(-0.5 A_1) = 0; the counterfactual map is
    ReLU(0.5 A_1), the regions that argue against class 1."""
    torch.testing.assert_close(raw_map("gradcam", 1), torch.zeros(2, 2))
    torch.testing.assert_close(raw_map("gradcam", 1, counterfactual=True),
                               0.5 * ACTIVATION[1], atol=1e-6, rtol=0)


def test_counterfactual_score_cam_is_refused() -> None:
    """Score-CAM has no gradient to negate."""
    model = hand_network()
    with pytest.raises(ValueError, match="counterfactual"):
        explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]), method="scorecam",
                counterfactual=True)


def test_unknown_method_is_refused() -> None:
    model = hand_network()
    with pytest.raises(ValueError, match="gradcam"):
        explain(model, ACTIVATION[None], [model[0]], torch.tensor([[0]]), method="nope")


class GapLinear(nn.Module):
    """conv -> ReLU -> conv (target) -> global average pooling -> linear: the CAM setting."""

    def __init__(self, positive_weights: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.target = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        if positive_weights:
            with torch.no_grad():
                self.fc.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.target(self.features(x)).mean(dim=(2, 3)))


def raw_maps_of(model: nn.Module, method: str, images: torch.Tensor,
                classes: torch.Tensor) -> torch.Tensor:
    return explain(model, images, [model.target], classes, method=method, raw=True)[1][0]


def test_gap_linear_identities() -> None:
    """With GAP + linear, dy_c/dA_k = w_ck / (h w) everywhere, so Grad-CAM = CAM / (h w),
    XGrad-CAM = Grad-CAM (its weights are sum_ij A/sum A * G = G), and
    HiResCAM = Grad-CAM (summing G_k A_k over k with constant G_k is the same thing)."""
    torch.manual_seed(3)
    model = GapLinear().eval()
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    activation = model.target(model.features(images)).detach()
    cam = torch.relu(torch.einsum("kc,bchw->bkhw", model.fc.weight[classes[0]].detach(),
                                  activation))
    hw = activation.shape[-1] * activation.shape[-2]
    grad = raw_maps_of(model, "gradcam", images, classes)
    torch.testing.assert_close(grad[0], cam[0] / hw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(raw_maps_of(model, "xgradcam", images, classes), grad,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(raw_maps_of(model, "hirescam", images, classes), grad,
                               atol=1e-6, rtol=1e-5)


def test_gap_linear_layercam_equals_gradcam_for_positive_weights() -> None:
    """LayerCAM keeps only positive gradients; when every class weight is positive it is
    Grad-CAM again."""
    torch.manual_seed(4)
    model = GapLinear(positive_weights=True).eval()
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1], [2, 3]])
    torch.testing.assert_close(raw_maps_of(model, "layercam", images, classes),
                               raw_maps_of(model, "gradcam", images, classes),
                               atol=1e-6, rtol=1e-5)


def test_grad_cam_is_the_gradcam_method() -> None:
    """grad_cam(...) keeps working and is explain(method='gradcam')."""
    torch.manual_seed(5)
    model = GapLinear().eval()
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1], [2, 3]])
    torch.testing.assert_close(grad_cam(model, images, [model.target], classes)[1],
                               explain(model, images, [model.target], classes)[1])


def test_score_cam_batches_and_reports_progress() -> None:
    """Batch size does not change Score-CAM; progress reaches B * C passes."""
    torch.manual_seed(6)
    model = GapLinear().eval()
    images = torch.randn(2, 3, 6, 6)
    classes = torch.tensor([[0, 1], [2, 3]])
    seen = []
    _, one = explain(model, images, [model.target], classes, method="scorecam", raw=True,
                     batch_size=1, progress=lambda done, total: seen.append((done, total)))
    _, many = explain(model, images, [model.target], classes, method="scorecam", raw=True,
                      batch_size=7)
    torch.testing.assert_close(one[0], many[0], atol=1e-6, rtol=1e-5)
    assert seen[-1] == (2 * 5, 2 * 5) and len(seen) == 10


def test_every_method_is_registered_with_a_cited_docstring() -> None:
    """The registry is explicit and each formula names its paper."""
    assert set(METHODS) == {"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                            "scorecam", "eigencam", "ablationcam"}
    for method in METHODS.values():
        function = method.formula
        assert function.__doc__ and any(year in function.__doc__
                                        for year in ("2017", "2018", "2020", "2021"))


@pytest.mark.slow
def test_many_methods_in_one_pass_equal_each_methods_own_run() -> None:
    """explain_methods shares the forward and backward passes between the gradient methods;
    each method's maps (raw and normalized, counterfactual too) equal its own call's."""
    from gradcam_cli.gradcam import explain_methods
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layers = [model[6], model[3]]
    classes = torch.tensor([[1, 2], [3, 4], [5, 0]])
    methods = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam"]
    for counterfactual, raw in ((False, False), (True, False), (False, True)):
        chosen = [m for m in methods if METHODS[m].uses_gradients or not (counterfactual or raw)]
        if chosen:
            scores, together = explain_methods(model, images, layers, classes, chosen,
                                               counterfactual=counterfactual, raw=raw,
                                               batch_size=32)
            assert list(together) == chosen
            for method in chosen:
                alone_scores, alone = explain(model, images, layers, classes, method=method,
                                              counterfactual=counterfactual, raw=raw,
                                              batch_size=32)
                torch.testing.assert_close(scores, alone_scores, rtol=0, atol=0)
                for got, want in zip(together[method], alone):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
