"""Value tests for ROAD (road.py) and the baseline maps (metrics.baseline_maps).

The imputation is checked where its answer is known by hand (a row of pixels, a corner, a
linear ramp, a constant image), for its noise (exactly the documented draws), and against
pytorch-grad-cam's ``NoisyLinearImputer``. The pixels removed at each percentile are
pytorch-grad-cam's own masks; the scores are checked on a hand-built model by hand, and
against pytorch-grad-cam's ROAD on the sample photos with Grad-CAM maps. Also: batching and
the generator, ``faithfulness`` unchanged by ROAD, the model left as found.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_cli.metrics import (
    BASELINE_MAPS,
    Faithfulness,
    baseline_maps,
    faithfulness,
    random_maps,
)
from gradcam_cli.road import (
    NEIGHBOUR_WEIGHTS,
    ROAD_NOISE,
    ROAD_PERCENTILES,
    Road,
    _ranks,
    noisy_linear_impute,
    removed_count,
    road,
)

DATA = Path(__file__).resolve().parent.parent / "data"
OLD_FIELDS = ("deletion_auc", "insertion_auc", "average_drop", "increase")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class SmallNet(nn.Module):
    """A seeded conv net with BatchNorm and Dropout (as in test_metrics)."""

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
            self.fc.weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


def ascending_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Each map replaced by its pixels' ranks k / (N - 1), lowest value 0, ties by index.

    The same order as the map, with no two values equal: pytorch-grad-cam's value thresholds
    and our ranks then pick the same pixels.
    """
    flat = maps.flatten(-2)
    n_pixels = flat.shape[-1]
    order = torch.argsort(flat, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n_pixels).expand_as(order))
    return (ranks.double() / (n_pixels - 1)).float().view_as(maps)


def photos(crop: int, count: int = 5) -> torch.Tensor:
    from gradcam_cli.images import list_images, load_rgb
    from gradcam_cli.preprocessing import IMAGENET_PREPROCESSING, prepare_image
    preprocessing = IMAGENET_PREPROCESSING.with_crop(crop)
    return torch.from_numpy(np.stack([prepare_image(load_rgb(e.path), preprocessing)[1]
                                      for e in list_images(DATA)[:count]]))


# --------------------------------------------------------------------------------------------
# 1. The imputation, where the answer is known
# --------------------------------------------------------------------------------------------


def test_neighbour_weights_are_the_papers() -> None:
    weights = dict(NEIGHBOUR_WEIGHTS)
    assert len(weights) == 8 and math.isclose(sum(weights.values()), 1.0)
    for (d_row, d_col), weight in weights.items():
        assert weight == (1 / 12 if d_row and d_col else 1 / 6)


def test_imputation_of_a_row_by_hand() -> None:
    """One row: only left and right neighbours (1/6 each). [1, x, y, 4]: x = (1 + y) / 2 and
    y = (x + 4) / 2, so x = 2, y = 3; a pixel at the end copies its one neighbour."""
    image = torch.tensor([[[1.0, -5.0, 7.0, 4.0]], [[0.0, 9.0, 9.0, -3.0]]])  # (2, 1, 4)
    removed = torch.tensor([[False, True, True, False]])
    torch.testing.assert_close(noisy_linear_impute(image, removed, noise=0.0),
                               torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.0, -1.0, -2.0, -3.0]]]))
    end = torch.tensor([[False, False, False, True]])
    torch.testing.assert_close(noisy_linear_impute(image, end, noise=0.0)[:, 0, 3],
                               torch.tensor([7.0, 9.0]))


def test_imputation_at_a_corner_renormalizes_the_weights() -> None:
    """The top-left pixel of 2 x 2 has neighbours right (1/6), below (1/6), diagonal (1/12):
    (v01 / 6 + v10 / 6 + v11 / 12) / (5 / 12) = (2 v01 + 2 v10 + v11) / 5."""
    image = torch.tensor([[[100.0, 2.0], [3.0, 5.0]]])
    removed = torch.tensor([[True, False], [False, False]])
    out = noisy_linear_impute(image, removed, noise=0.0)
    assert float(out[0, 0, 0]) == pytest.approx((2 * 2 + 2 * 3 + 5) / 5, abs=1e-6)
    assert out[0].flatten()[1:].tolist() == [2.0, 3.0, 5.0]


def test_linear_ramp_is_filled_exactly_and_constant_stays_constant() -> None:
    """A symmetric weighted mean of a linear function is its centre value, so a ramp with any
    removed pixels away from the border comes back exactly (noise 0): one pixel in the middle,
    a 5 x 4 block, a scattered half of the interior. A constant image stays constant for any
    removed set, border included (all but one pixel removed, too)."""
    height, width = 12, 15
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    ramp = torch.stack([0.5 * rows - 0.25 * cols + 1, -0.1 * rows + 0.3 * cols,
                        2 * rows + 0 * cols])
    middle = torch.zeros(height, width, dtype=torch.bool)
    middle[6, 7] = True
    block = torch.zeros(height, width, dtype=torch.bool)
    block[3:8, 5:9] = True
    scattered = torch.zeros(height, width, dtype=torch.bool)
    scattered[1:-1, 1:-1] = torch.rand(height - 2, width - 2) < 0.5
    for removed in (middle, block, scattered):
        out = noisy_linear_impute(ramp, removed, noise=0.0)
        torch.testing.assert_close(out, ramp, atol=1e-5, rtol=0)
    constant = torch.full((3, height, width), -0.75)
    everywhere_but_one = torch.ones(height, width, dtype=torch.bool)
    everywhere_but_one[0, 0] = False
    for removed in (torch.rand(height, width) < 0.7, everywhere_but_one):
        torch.testing.assert_close(noisy_linear_impute(constant, removed, noise=0.0), constant,
                                   atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="every pixel"):
        noisy_linear_impute(constant, torch.ones(height, width, dtype=torch.bool))
    assert torch.equal(noisy_linear_impute(ramp, torch.zeros(height, width, dtype=torch.bool)),
                       ramp)


def test_noise_is_the_documented_draws_on_removed_pixels_only() -> None:
    """Noisy minus noiseless is ``noise * randn(C, n)`` from the generator, channel by channel
    in pixel order, at the removed pixels; kept pixels are exactly the image's."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 20, 24)
    removed = torch.rand(2, 20, 24) < 0.5
    clean = noisy_linear_impute(images, removed, noise=0.0)
    noisy = noisy_linear_impute(images, removed, noise=0.3,
                                generator=torch.Generator().manual_seed(5))
    again = noisy_linear_impute(images, removed, noise=0.3,
                                generator=torch.Generator().manual_seed(5))
    other = noisy_linear_impute(images, removed, noise=0.3,
                                generator=torch.Generator().manual_seed(6))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    draws = torch.Generator().manual_seed(5)
    for b in range(2):
        kept = ~removed[b]
        assert torch.equal(noisy[b][:, kept], images[b][:, kept])
        expected = 0.3 * torch.randn(3, int(removed[b].sum()), generator=draws)
        torch.testing.assert_close(noisy[b][:, removed[b]] - clean[b][:, removed[b]], expected,
                                   atol=1e-5, rtol=0)
    difference = (noisy - clean).transpose(0, 1)[:, removed]  # (C, all removed pixels)
    assert float(difference.std()) == pytest.approx(0.3, rel=0.05)


def test_imputation_matches_pytorch_grad_cam() -> None:
    """pytorch-grad-cam's NoisyLinearImputer with noise 0, on a photo and four masks: a random
    scattered 10 % and 90 %, a band along the border and a large central blob."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    image = photos(96, count=1)[0]
    rows = torch.arange(96)[:, None]
    cols = torch.arange(96)[None, :]
    masks = [torch.rand(96, 96) < 0.1, torch.rand(96, 96) < 0.9,
             (rows < 5) | (cols > 88) | (rows > 90),
             (rows - 40) ** 2 + (cols - 50) ** 2 < 30 ** 2]
    for removed in masks:
        ours = noisy_linear_impute(image, removed, noise=0.0)
        theirs = NoisyLinearImputer(noise=0.0)(image, (~removed).float())
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
        assert torch.equal(ours[:, ~removed], image[:, ~removed])


# --------------------------------------------------------------------------------------------
# 2. Which pixels go: pytorch-grad-cam's masks; ties at random
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(224, 224), (96, 96), (7, 13), (1, 4)])
def test_removed_pixels_are_pytorch_grad_cams(shape: tuple[int, int]) -> None:
    """For maps with distinct values, MoRF and LeRF at p remove exactly the pixels
    pytorch-grad-cam's RemoveMostRelevantFirst / RemoveLeastRelevantFirst at q = 100 - p do."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )

    def keep_mask(image, mask):  # an "imputer" that returns pytorch-grad-cam's mask
        return mask

    values = ascending_ranks(random_maps(shape, torch.Generator().manual_seed(2), cells=3))
    n_pixels = values.numel()
    ranks = _ranks(values.view(1, -1), torch.rand(1, n_pixels))[0]
    assert sorted(ranks.tolist()) == list(range(n_pixels))
    for p in (*ROAD_PERCENTILES, 25, 33.3, 75, 99):
        count = removed_count(n_pixels, p)
        morf = (ranks < count).view(shape)
        lerf = (ranks >= n_pixels - count).view(shape)
        image = torch.zeros(3, *shape)
        theirs_morf = RemoveMostRelevantFirst(100 - p, keep_mask)(image, values.double()) == 0
        theirs_lerf = RemoveLeastRelevantFirst(100 - p, keep_mask)(image, values.double()) == 0
        assert torch.equal(morf, theirs_morf), p
        assert torch.equal(lerf, theirs_lerf), p
        assert abs(count - p * n_pixels / 100) <= 1  # the paper's floor(p N / 100), +- 1


def test_removed_count_by_hand() -> None:
    """N - ceil((100 - p)(N - 1) / 100), with exact arithmetic where (N - 1) q / 100 is whole."""
    assert [removed_count(4, p) for p in (25, 50, 75)] == [1, 2, 3]
    assert removed_count(50176, 60) == 50176 - 20070  # 0.4 * 50175 = 20070 exactly
    assert removed_count(50176, 10) == 50176 - 45158  # ceil(45157.5)
    assert removed_count(10, 0.001) == 1 and removed_count(10, 99.999) == 9


def test_ties_are_broken_by_the_random_keys() -> None:
    """Ranks order by value, highest first, then by key, lowest first."""
    values = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.9]])
    keys = torch.tensor([[0.7, 0.2, 0.1, 0.4, 0.0, 0.3]])
    order = sorted(range(6), key=lambda i: (-float(values[0, i]), float(keys[0, i])))
    expected = torch.empty(6, dtype=torch.int32)
    expected[order] = torch.arange(6, dtype=torch.int32)
    assert _ranks(values, keys)[0].tolist() == expected.tolist() == [4, 0, 2, 3, 5, 1]


# --------------------------------------------------------------------------------------------
# 3. The scores: by hand, and against pytorch-grad-cam
# --------------------------------------------------------------------------------------------


class RowModel(nn.Module):
    """Images of 1 x 4 pixels: logit 0 = weights . (channel 0), logit 1 = 0."""

    weights = (0.5, 1.0, 0.25, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = x[:, 0, 0, :] @ torch.tensor(self.weights, dtype=x.dtype)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def test_road_scores_by_hand() -> None:
    """Channel 0 = [1, 3, 2, 0]; the map orders pixels 1, 2, 0, 3; p = 25, 50, 75 remove 1, 2
    and 3 pixels. Row imputation (see test_imputation_of_a_row_by_hand):

    MoRF removes {1} -> [1, 1.5, 2, 0]; {1, 2} -> [1, 2/3, 1/3, 0]; {1, 2, 0} -> [0, 0, 0, 0].
    LeRF removes {3} -> [1, 3, 2, 2]; {0, 3} -> [3, 3, 2, 2]; {2, 0, 3} -> [3, 3, 3, 3].
    """
    model = RowModel()
    image = torch.randn(1, 3, 1, 4)
    image[0, 0, 0] = torch.tensor([1.0, 3.0, 2.0, 0.0])
    saliency = torch.tensor([0.3, 0.9, 0.6, 0.0]).view(1, 4)
    maps = saliency.expand(1, 2, 1, 4)
    result = road(model, image, maps, torch.tensor([[0, 1]]), percentiles=(25, 50, 75),
                  noise=0.0)
    assert isinstance(result, Road) and result.percentiles == (25, 50, 75)

    def p0(row: list[float]) -> float:
        return sigmoid(sum(w * v for w, v in zip(RowModel.weights, row)))

    on_image = p0([1, 3, 2, 0])
    morf = [p0(r) - on_image for r in ([1, 1.5, 2, 0], [1, 2 / 3, 1 / 3, 0], [0, 0, 0, 0])]
    lerf = [p0(r) - on_image for r in ([1, 3, 2, 2], [3, 3, 2, 2], [3, 3, 3, 3])]
    for k, sign in ((0, 1), (1, -1)):  # p1 = 1 - p0, so class 1's changes are minus class 0's
        assert result.morf_by_percentile[:, 0, k].tolist() == pytest.approx(
            [sign * v for v in morf], abs=1e-6)
        assert result.lerf_by_percentile[:, 0, k].tolist() == pytest.approx(
            [sign * v for v in lerf], abs=1e-6)
        assert float(result.morf[0, k]) == pytest.approx(sign * sum(morf) / 3, abs=1e-6)
        assert float(result.lerf[0, k]) == pytest.approx(sign * sum(lerf) / 3, abs=1e-6)
        assert float(result.combined[0, k]) == pytest.approx(
            sign * (sum(lerf) - sum(morf)) / 6, abs=1e-6)
    # class 0: removing the most relevant pixels lowers it, the least relevant raise it here
    assert float(result.morf[0, 0]) < 0 < float(result.combined[0, 0])
    assert all(getattr(result, f).dtype == torch.float32 for f in ("morf", "lerf", "combined"))


def pgc_road(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
             classes: torch.Tensor, percentiles, noise: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's MoRF and LeRF changes, (P, B, K), its percentile q = 100 - p.

    Built from its own classes (``ROADMostRelevantFirst(q)`` is exactly
    ``PerturbationConfidenceMetric(RemoveMostRelevantFirst(q, NoisyLinearImputer()))``) so that
    its noise can be set to 0; the probability is ``ClassifierOutputSoftmaxTarget``'s.
    """
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    morf = np.zeros((len(percentiles), *classes.shape), dtype=np.float32)
    lerf = np.zeros_like(morf)
    for k in range(classes.shape[1]):
        cams = maps[:, k].double().numpy()
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, k]]
        for i, p in enumerate(percentiles):
            for removal, out in ((RemoveMostRelevantFirst, morf), (RemoveLeastRelevantFirst, lerf)):
                metric = PerturbationConfidenceMetric(
                    removal(100 - p, NoisyLinearImputer(noise=noise)))
                out[i, :, k] = metric(images, cams, targets, model)
    return morf, lerf


def grad_cam_setup(crop: int, count: int):
    """A torchvision ResNet-18 with random (seeded) weights and 5 classes, the photos, and
    Grad-CAM maps of layer4 for the top class and the lowest one."""
    import torchvision

    from gradcam_cli.gradcam import explain
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    images = photos(crop, count)
    scores, maps = explain(model, images, [model.layer4],
                           lambda s: torch.stack([s.argmax(1), s.argmin(1)], dim=1))
    classes = torch.stack([scores.argmax(1), scores.argmin(1)], dim=1)
    return model, images, maps[0], classes


@pytest.mark.slow
def test_road_matches_pytorch_grad_cam_without_noise() -> None:
    """Two photos at 48 px, the Grad-CAM map of the lowest class (made distinct-valued, same
    order), p = 10 and 90, noise 0: every change agrees to 1e-6 (measured: under 2e-7). The
    slow test below does the top class at 224 px with every percentile."""
    model, images, maps, classes = grad_cam_setup(48, 2)
    maps, classes = ascending_ranks(maps[:, 1:]), classes[:, 1:]
    percentiles = (10, 90)
    ours = road(model, images, maps, classes, percentiles=percentiles, noise=0.0,
                batch_size=5)
    morf, lerf = pgc_road(model, images, maps, classes, percentiles, noise=0.0)
    np.testing.assert_allclose(ours.morf_by_percentile.numpy(), morf, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.lerf_by_percentile.numpy(), lerf, atol=1e-6, rtol=0)
    assert np.abs(morf).max() > 1e-3 and np.abs(lerf).max() > 1e-3  # the changes are real


@pytest.mark.slow
def test_road_combined_matches_pytorch_grad_cam_on_photos() -> None:
    """The five photos at 224 px, the top class's Grad-CAM map, the default percentiles.

    Noise 0: every MoRF and LeRF change agrees with pytorch-grad-cam to 1e-6. With the
    default noise (0.01) both sides draw their own noise, so ``ROADCombined`` itself is
    compared with a tolerance: 1e-3 (measured: differences up to 6e-5, while the noise moves
    either side's scores by up to 1.5e-4 from the noise-free ones).
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    model, images, maps, classes = grad_cam_setup(224, 5)
    maps, classes = ascending_ranks(maps[:, :1]), classes[:, :1]
    clean = road(model, images, maps, classes, noise=0.0)
    morf, lerf = pgc_road(model, images, maps, classes, ROAD_PERCENTILES, noise=0.0)
    worst = max(np.abs(clean.morf_by_percentile.numpy() - morf).max(),
                np.abs(clean.lerf_by_percentile.numpy() - lerf).max())
    print(f"\nnoise 0: largest |ours - pytorch-grad-cam| over 5 x 9 x 2 changes: {worst:.2e} "
          f"(largest change {max(np.abs(morf).max(), np.abs(lerf).max()):.3f})")
    np.testing.assert_allclose(clean.morf_by_percentile.numpy(), morf, atol=1e-6, rtol=0)
    np.testing.assert_allclose(clean.lerf_by_percentile.numpy(), lerf, atol=1e-6, rtol=0)
    np.testing.assert_allclose(clean.combined[:, 0].numpy(),
                               (lerf.mean(0) - morf.mean(0))[:, 0] / 2, atol=1e-6, rtol=0)
    noisy = road(model, images, maps, classes, generator=torch.Generator().manual_seed(0))
    theirs = ROADCombined()(images, maps[:, 0].double().numpy(),
                            [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, 0]],
                            model)
    print(f"ROAD combined, ours (noise {ROAD_NOISE}): {noisy.combined[:, 0].tolist()}\n"
          f"pytorch-grad-cam ROADCombined: {theirs.tolist()}\n"
          f"ours without noise: {clean.combined[:, 0].tolist()}")
    np.testing.assert_allclose(noisy.combined[:, 0].numpy(), theirs, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------
# 4. Batching, the generator, faithfulness, the model left as found
# --------------------------------------------------------------------------------------------


def small_problem():
    torch.manual_seed(4)
    model = SmallNet().eval()
    images = torch.randn(3, 3, 12, 12)
    maps = random_maps((3, 2, 12, 12), torch.Generator().manual_seed(5), cells=4)
    maps[1, 0] = (maps[1, 0] * 3).floor() / 3  # ties, broken at random
    classes = torch.tensor([[0, 3], [1, 1], [4, 2]])
    return model, images, maps, classes


def test_batch_size_and_generator() -> None:
    """batch_size 1, 7 and 1000 give the same scores for one seed; another seed differs."""
    model, images, maps, classes = small_problem()
    results = [road(model, images, maps, classes, percentiles=(20, 60), noise=0.2,
                    batch_size=size, generator=torch.Generator().manual_seed(9))
               for size in (1, 7, 1000)]
    for other in results[1:]:
        for field in ("morf_by_percentile", "lerf_by_percentile", "combined"):
            torch.testing.assert_close(getattr(other, field), getattr(results[0], field),
                                       atol=1e-6, rtol=0)
    reseeded = road(model, images, maps, classes, percentiles=(20, 60), noise=0.2,
                    generator=torch.Generator().manual_seed(10))
    assert (reseeded.combined - results[0].combined).abs().max() > 1e-4
    torch.manual_seed(3)
    first = road(model, images, maps, classes, percentiles=(20, 60), noise=0.2)
    torch.manual_seed(3)  # no generator: torch's global one
    torch.testing.assert_close(road(model, images, maps, classes, percentiles=(20, 60),
                                    noise=0.2).combined, first.combined, atol=0, rtol=0)
    assert results[0].morf.shape == (3, 2) and results[0].morf_by_percentile.shape == (2, 3, 2)


def test_faithfulness_with_road() -> None:
    """road=True: the four old measures are bit-identical to road=False; the ROAD fields are
    ``road``'s for the same generator seed; without road they are None."""
    model, images, maps, classes = small_problem()
    plain = faithfulness(model, images, maps, classes, steps=5, batch_size=4)
    with_road = faithfulness(model, images, maps, classes, steps=5, batch_size=4, road=True,
                             road_percentiles=(30, 70), road_noise=0.05,
                             generator=torch.Generator().manual_seed(1))
    assert isinstance(with_road, Faithfulness)
    assert plain.road is None and plain.road_morf is None and plain.road_lerf is None
    for field in OLD_FIELDS:
        assert torch.equal(getattr(with_road, field), getattr(plain, field)), field
    alone = road(model, images, maps, classes, percentiles=(30, 70), noise=0.05, batch_size=4,
                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(with_road.road_morf, alone.morf, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_road.road_lerf, alone.lerf, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_road.road, alone.combined, atol=1e-6, rtol=0)
    assert not with_road.road.is_inference() and with_road.road.dtype == torch.float32
    with pytest.raises(ValueError, match="percentiles"):
        faithfulness(model, images, maps, classes, road=True, road_percentiles=(0, 50))
    with pytest.raises(ValueError, match="road_noise"):
        faithfulness(model, images, maps, classes, road=True, road_noise=-1.0)


def test_model_left_as_found() -> None:
    """Mixed training flags and requires_grad come back unchanged; no .grad; eval-mode values;
    the scores are ordinary tensors."""
    model, images, maps, classes = small_problem()
    model.train()
    model.features[1].eval()
    model.fc.requires_grad_(False)
    flags = {name: m.training for name, m in model.named_modules()}
    needs_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = road(model, images, maps, classes, percentiles=(50,),
                 generator=torch.Generator().manual_seed(0))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: p.requires_grad for name, p in model.named_parameters()} == needs_grad
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    evaluated = road(model.eval(), images, maps, classes, percentiles=(50,),
                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first.combined, evaluated.combined, atol=1e-6, rtol=0)
    assert not first.combined.is_inference() and not first.morf_by_percentile.is_inference()


def test_inputs_checked() -> None:
    model, images, maps, classes = small_problem()
    with pytest.raises(ValueError, match="percentiles"):
        road(model, images, maps, classes, percentiles=(50, 100))
    with pytest.raises(ValueError, match="percentiles"):
        road(model, images, maps, classes, percentiles=())
    with pytest.raises(ValueError, match="noise"):
        road(model, images, maps, classes, noise=float("nan"))
    with pytest.raises(ValueError, match="maps must have shape"):
        road(model, images, maps[:, :1], classes)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        road(model, images, maps * 2, classes)
    with pytest.raises(ValueError, match="0..4"):
        road(model, images, maps, classes + 5, percentiles=(50,))
    with pytest.raises(ValueError, match="removed must have shape"):
        noisy_linear_impute(images, torch.zeros(3, 12, 11, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# 5. Baseline maps
# --------------------------------------------------------------------------------------------


def test_baseline_maps() -> None:
    """"random" is random_maps; "gaussian" is the normalized centred Gaussian, sigma = min/4."""
    assert BASELINE_MAPS == ("random", "gaussian")
    torch.testing.assert_close(baseline_maps("random", (2, 3, 20, 30),
                                             torch.Generator().manual_seed(4)),
                               random_maps((2, 3, 20, 30), torch.Generator().manual_seed(4)),
                               atol=0, rtol=0)
    gaussian = baseline_maps("gaussian", (2, 3, 21, 31))
    assert gaussian.shape == (2, 3, 21, 31) and gaussian.dtype == torch.float32
    assert torch.equal(gaussian[0, 0], gaussian[1, 2])
    sigma = 21 / 4
    raw = [[math.exp(-((r - 10) ** 2 + (c - 15) ** 2) / (2 * sigma ** 2)) for c in range(31)]
           for r in range(21)]
    low = raw[0][0]
    expected = torch.tensor([[(v - low) / (1 - low) for v in row] for row in raw])
    torch.testing.assert_close(gaussian[0, 0], expected, atol=1e-6, rtol=0)
    assert float(gaussian[0, 0, 10, 15]) == 1.0 and float(gaussian[0, 0, 0, 0]) == 0.0
    even = baseline_maps("gaussian", (8, 8))
    assert torch.equal(even, even.flip(0)) and torch.equal(even, even.flip(1))
    assert float(even.max()) == 1.0 and float(even.min()) == 0.0
    with pytest.raises(ValueError, match="kind"):
        baseline_maps("uniform", (4, 4))
