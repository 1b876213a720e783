"""ROAD: RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022).

Deletion curves replace pixels with a baseline (zeros, a blur), and the shape of what was
removed leaks into the image: the model may react to the hole's outline, not to the missing
content. ROAD fills every removed pixel by *noisy linear imputation* from its neighbours, so
that the removed set is hard to see, and then measures how the class probability changes:

* MoRF (most relevant first) at percentile p removes the p % of pixels the map ranks highest;
  a faithful map makes the probability fall (a negative change; lower is better).
* LeRF (least relevant first) at p removes the p % ranked lowest; a faithful map keeps the
  probability (a change near zero; higher is better).
* The combined score is (LeRF - MoRF) / 2, each averaged over the percentiles (higher is
  better), as pytorch-grad-cam's ``ROADCombined``.

Definition, exactly (``road``):

* Percentiles: 10, 20, ..., 90 by default (pytorch-grad-cam's ``ROADCombined``). p is the
  percentage of pixels *removed*. pytorch-grad-cam's ``ROADMostRelevantFirst(q)`` and
  ``ROADLeastRelevantFirst(q)`` take q = 100 - p, the percentage kept; over the symmetric
  default set the averages are the same.
* Which pixels: the map orders the H*W pixels, highest first, exact ties broken at random
  (from ``generator``), as the paper's code breaks them with a tiny random jitter, so that a
  flat region is removed as a scattered subset rather than as rows in index order. At p the
  first (MoRF) or last (LeRF) ``N - ceil((100 - p) (N - 1) / 100)`` pixels of that order are
  removed, all channels: for MoRF the pixels at or above the map's (100 - p)-th percentile
  (numpy's linear interpolation), for LeRF those at or below its p-th: exactly the sets
  pytorch-grad-cam removes when no two map values are equal (with ties it removes every
  pixel tied at the threshold, so more than p %). The paper's code removes floor(p N / 100)
  pixels: the same or one fewer.
* Imputation: every removed pixel's value is the weighted mean of its 8 neighbours inside the
  image, weights 1/6 for the 4 edge neighbours and 1/12 for the 4 diagonal ones, renormalized
  over the neighbours that exist at the border. The removed pixels' values are the solution of
  that sparse linear system (per channel, kept pixels fixed), plus independent Gaussian noise
  of standard deviation ``noise`` (0.01 by default, the paper's and pytorch-grad-cam's
  ``NoisyLinearImputer``), in the units of the model input it is given: the *normalized*
  input, as pytorch-grad-cam applies it. Kept pixels are left exactly as they were.
* Score: the class probability (``head``'s: softmax, or a sigmoid head's own sigmoid) on the
  imputed image minus that on the image, pytorch-grad-cam's ``PerturbationConfidenceMetric``
  with ``ClassifierOutputSoftmaxTarget``; averaged over the percentiles for MoRF and LeRF.

The sparse solve runs on the CPU with SciPy's SuperLU (float64): torch has no sparse direct
solver on the CPU, a dense solve of up to 0.9 H W unknowns is out of the question, and an
iterative solve needs hundreds of iterations on large holes (SciPy's conjugate gradients took
700 for a 90 % hole at 224 x 224, 30 times the direct solve). SciPy is imported only when ROAD
runs: the rest of the tool does not need it. The system is symmetric positive
definite, so it is factorized without pivoting in symmetric mode with a minimum-degree
ordering. One factorization per image, map, percentile and direction (18 for the default
percentiles): at 224 x 224 from about 0.02 s with 10 % removed to 0.4 s with 90 % (one
core), 0.12 s on average, so about 2 s per map, besides its 18 forward passes. The imputed
images of the next batch are built in a background thread while the model runs on the current
one (SuperLU holds the GIL, so more threads would not help).

Noise and tie-breaks are reproducible: they come from ``generator`` (or torch's global
generator), drawn once at the start: a random key per pixel of every map, then one seed per
imputed image, so each image's noise does not depend on ``batch_size`` or on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from .gradcam import eval_mode
from .heads import SOFTMAX, Head

__all__ = ["Road", "road", "noisy_linear_impute", "removed_count", "ROAD_PERCENTILES",
           "ROAD_NOISE", "NEIGHBOUR_WEIGHTS"]

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # percent of pixels removed
ROAD_NOISE = 0.01  # std of the imputation noise, in model-input units
# ((row offset, column offset), weight): a removed pixel is the weighted mean of these
NEIGHBOUR_WEIGHTS = (((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12),
                     ((0, -1), 1 / 6), ((0, 1), 1 / 6),
                     ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12))

_MORF, _LERF = 0, 1


@dataclass(frozen=True)
class Road:
    """ROAD scores; (B, K) float32 fields hold one value per map, averaged over percentiles.

    Changes are probability on the imputed image minus probability on the image.
    """

    morf: torch.Tensor                # lower (a larger fall) is better
    lerf: torch.Tensor                # higher (closer to 0) is better
    combined: torch.Tensor            # (lerf - morf) / 2; higher is better
    morf_by_percentile: torch.Tensor  # (P, B, K), in the order of ``percentiles``
    lerf_by_percentile: torch.Tensor  # (P, B, K)
    percentiles: tuple[float, ...]


def road(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor,
         percentiles: Sequence[float] = ROAD_PERCENTILES, noise: float = ROAD_NOISE,
         batch_size: int = 64, head: Head = SOFTMAX,
         generator: torch.Generator | None = None) -> Road:
    """ROAD's MoRF, LeRF and combined scores for each of B x K maps (see the module doc).

    Args:
        model: the classifier, returning (N, C) raw class scores; it is left as it was found.
        images: (B, 3, H, W) preprocessed model inputs, on the model's device.
        maps: (B, K, H, W) saliency maps in [0, 1] at input resolution.
        classes: (B, K) integer tensor: the class each map explains.
        percentiles: percentages of pixels removed, each in (0, 100).
        noise: the imputation noise's standard deviation, in model-input units (>= 0).
        batch_size: how many imputed images go through the model per forward pass.
        head: how the model's output reads as probabilities.
        generator: the source of the tie-breaks and the noise (torch's global one if None).
    """
    check_road_inputs(images, maps, classes, percentiles, noise, batch_size)
    with eval_mode(model), torch.inference_mode():
        on_image, on_imputed = road_probabilities(model, images, maps, classes, percentiles,
                                                  noise, batch_size, head, generator)
    return road_scores(on_image.clone(), on_imputed.clone(), percentiles)


def check_road_inputs(images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor,
                      percentiles: Sequence[float], noise: float, batch_size: int) -> None:
    """Raise ``ValueError`` for shapes, ranges or options ROAD cannot use."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if classes.dim() != 2 or classes.shape[0] != images.shape[0] or classes.shape[1] < 1:
        raise ValueError(f"classes must have shape (B, K) with B = {images.shape[0]} images "
                         f"and K >= 1, got {tuple(classes.shape)}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be an integer tensor, got {classes.dtype}")
    expected = (images.shape[0], classes.shape[1], *images.shape[-2:])
    if tuple(maps.shape) != expected:
        raise ValueError(f"maps must have shape (B, K, H, W) = {expected}, "
                         f"got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()) or maps.min() < 0 or maps.max() > 1:
        raise ValueError("maps must be finite and lie in [0, 1]")
    check_percentiles(percentiles)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite standard deviation >= 0, got {noise}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def check_percentiles(percentiles: Sequence[float]) -> None:
    if len(percentiles) == 0 or not all(0 < p < 100 for p in percentiles):
        raise ValueError(f"ROAD percentiles must be a non-empty list of numbers in (0, 100), "
                         f"got {list(percentiles)}")


def removed_count(n_pixels: int, percentile: float) -> int:
    """How many of ``n_pixels`` ROAD removes at ``percentile``: N - ceil((100 - p)(N - 1)/100).

    Exact rational arithmetic, so that e.g. p = 60 with N - 1 = 50175 is not rounded up.
    """
    kept = math.ceil((100 - Fraction(percentile)) * (n_pixels - 1) / 100)
    return n_pixels - kept


def noisy_linear_impute(images: torch.Tensor, removed: torch.Tensor,
                        noise: float = ROAD_NOISE,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill the ``removed`` pixels of each image by noisy linear imputation (module doc).

    Args:
        images: (N, C, H, W) or (C, H, W) float images, any device.
        removed: (N, H, W) or (H, W) bool: True where a pixel (all its channels) is removed.
            At least one pixel of each image must be kept.
        noise: the standard deviation of the Gaussian noise added to each imputed value.
        generator: a CPU generator for the noise (torch's global one if None), drawn image by
            image: C x (removed pixels) standard normals, channel by channel in pixel order.

    Returns a new tensor like ``images``: kept pixels exactly as they were, removed pixels the
    solution of the neighbour-mean system plus noise.
    """
    single = images.dim() == 3
    batch = images[None] if single else images
    masks = removed[None] if single else removed
    if batch.dim() != 4 or tuple(masks.shape) != (batch.shape[0], *batch.shape[-2:]):
        raise ValueError(f"removed must have shape (N, H, W) matching images {tuple(images.shape)}"
                         f", got {tuple(removed.shape)}")
    out = torch.stack([_impute_one(image, mask.bool(), noise, generator)
                       for image, mask in zip(batch, masks)])
    return out[0] if single else out


def _impute_one(image: torch.Tensor, removed: torch.Tensor, noise: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One (C, H, W) image with its (H, W) bool mask of removed pixels: see ``noisy_linear_impute``.

    The system, for each removed pixel i with in-image neighbours j of weight w_ij:
    (sum_j w_ij) x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j. It is symmetric, and
    positive definite when a pixel is kept (every connected group of removed pixels then
    touches a kept one), so SuperLU factorizes it without pivoting.
    """
    channels, height, width = image.shape
    flat_removed = removed.reshape(-1).cpu()
    unknown = flat_removed.nonzero().squeeze(1)
    n_unknown = unknown.numel()
    result = image.detach().clone(memory_format=torch.contiguous_format)
    if n_unknown == 0:
        return result
    if n_unknown == flat_removed.numel():
        raise ValueError("every pixel is removed: there is nothing to impute from")
    values = image.detach().reshape(channels, -1).to("cpu", torch.float64)
    variable = torch.full((height * width,), -1, dtype=torch.long)
    variable[unknown] = torch.arange(n_unknown)
    row, col = unknown // width, unknown % width
    diagonal = torch.zeros(n_unknown, dtype=torch.float64)
    rhs = torch.zeros(n_unknown, channels, dtype=torch.float64)
    rows, cols, coupling = [], [], []
    for (d_row, d_col), weight in NEIGHBOUR_WEIGHTS:
        r, c = row + d_row, col + d_col
        equation = ((r >= 0) & (r < height) & (c >= 0) & (c < width)).nonzero().squeeze(1)
        neighbour = r[equation] * width + c[equation]
        diagonal[equation] += weight
        neighbour_variable = variable[neighbour]
        is_unknown = neighbour_variable >= 0
        rows.append(equation[is_unknown])
        cols.append(neighbour_variable[is_unknown])
        coupling.append(torch.full((int(is_unknown.sum()),), -weight, dtype=torch.float64))
        rhs.index_add_(0, equation[~is_unknown], weight * values[:, neighbour[~is_unknown]].T)
    everything = torch.arange(n_unknown)
    solution = _solve(torch.cat([diagonal, *coupling]).numpy(),
                      torch.cat([everything, *rows]).numpy(),
                      torch.cat([everything, *cols]).numpy(), rhs.numpy())
    imputed = torch.from_numpy(solution).T  # float64 until the last cast
    if noise > 0:
        draws = torch.randn(channels, n_unknown, generator=generator)  # float32 draws
        imputed = imputed + noise * draws.double()
    result.view(channels, -1)[:, unknown.to(result.device)] = imputed.to(result)
    return result


def _solve(values: np.ndarray, rows: np.ndarray, cols: np.ndarray,
           rhs: np.ndarray) -> np.ndarray:
    """Solve the (n, n) sparse system given by its entries for the (n, C) right-hand side."""
    try:
        import scipy.sparse
        import scipy.sparse.linalg
    except ImportError as error:  # only ROAD needs SciPy; the rest of the tool does not
        raise ImportError("ROAD's imputation needs SciPy: pip install scipy") from error
    size = rhs.shape[0]
    matrix = scipy.sparse.csc_matrix((values, (rows, cols)), shape=(size, size))
    factors = scipy.sparse.linalg.splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                       options={"SymmetricMode": True})
    return np.asarray(factors.solve(rhs))


def road_probabilities(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                       classes: torch.Tensor, percentiles: Sequence[float], noise: float,
                       batch_size: int, head: Head, generator: torch.Generator | None,
                       on_image: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) probabilities on the images and (P, 2, B, K) on the imputed images (MoRF, LeRF).

    To be called with the model in eval mode and gradients off (``road`` and ``faithfulness``
    do that). ``on_image``, when the caller has it already, saves the B image passes.
    """
    images = images.detach()
    classes = classes.detach().to(images.device).long()
    n_images, n_maps = classes.shape
    builder = _ImputedImages(images, maps.detach().flatten(0, 1), percentiles, noise,
                             generator)
    if on_image is None:
        on_image = _batched_probabilities(model, n_images, lambda rows: images[rows], classes,
                                          batch_size, head)
    row_classes = classes.flatten()[builder.map_of_row.to(images.device)][:, None]
    imputed = _batched_probabilities(model, len(builder), builder, row_classes, batch_size,
                                     head, prefetch=True)
    return on_image, imputed.view(len(builder.counts), 2, n_images, n_maps)


def road_scores(on_image: torch.Tensor, on_imputed: torch.Tensor,
                percentiles: Sequence[float]) -> Road:
    """``Road`` from (B, K) image and (P, 2, B, K) imputed-image probabilities."""
    change = (on_imputed - on_image).float()
    morf, lerf = change[:, _MORF].mean(dim=0), change[:, _LERF].mean(dim=0)
    return Road(morf=morf, lerf=lerf, combined=(lerf - morf) / 2,
                morf_by_percentile=change[:, _MORF], lerf_by_percentile=change[:, _LERF],
                percentiles=tuple(percentiles))


def _batched_probabilities(model: nn.Module, n_rows: int,
                           build: Callable[[slice], torch.Tensor], row_classes: torch.Tensor,
                           batch_size: int, head: Head, prefetch: bool = False
                           ) -> torch.Tensor:
    """(rows, n) probabilities of each row's n classes ``row_classes`` (rows, n), computed
    ``batch_size`` rows at a time. With ``prefetch``, the next batch is built in a background
    thread while the model runs on this one (the sparse solves hold one CPU core)."""
    slices = [slice(s, min(s + batch_size, n_rows)) for s in range(0, n_rows, batch_size)]
    out = []

    def built(rows: slice) -> torch.Tensor:
        with torch.inference_mode():
            return build(rows)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(built, slices[0]) if prefetch and slices else None
        for i, rows in enumerate(slices):
            if pending is not None:
                batch = pending.result()
                pending = pool.submit(built, slices[i + 1]) if i + 1 < len(slices) else None
            else:
                batch = built(rows)
            scores = head.scores(model(batch))
            if i == 0 and (row_classes.min() < 0 or row_classes.max() >= scores.shape[1]):
                raise ValueError(f"classes must lie in 0..{scores.shape[1] - 1}")
            out.append(head.probabilities(scores).gather(1, row_classes[rows]))
    return torch.cat(out)


class _ImputedImages:
    """Builds ROAD's imputed images for any rows, only when they are needed.

    Rows run percentile by percentile, MoRF then LeRF, then map by map (b * K + k).
    """

    def __init__(self, images: torch.Tensor, maps: torch.Tensor, percentiles: Sequence[float],
                 noise: float, generator: torch.Generator | None) -> None:
        n_maps, height, width = maps.shape
        n_pixels = height * width
        self.images, self.noise = images, noise
        self.maps_per_image = n_maps // images.shape[0]
        self.n_maps = n_maps
        self.counts = [removed_count(n_pixels, p) for p in percentiles]
        device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand(n_maps, n_pixels, generator=generator, device=device).to(maps.device)
        self.ranks = _ranks(maps.flatten(1), keys)
        n_rows = len(self.counts) * 2 * n_maps
        self.seeds = torch.randint(0, 2 ** 62, (n_rows,), generator=generator,
                                   device=device).tolist()
        self.map_of_row = torch.arange(n_maps).repeat(len(self.counts) * 2)

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self, rows: slice) -> torch.Tensor:
        out = []
        n_pixels = self.ranks.shape[1]
        for row in range(*rows.indices(len(self))):
            count = self.counts[row // (2 * self.n_maps)]
            direction, index = divmod(row % (2 * self.n_maps), self.n_maps)
            ranks = self.ranks[index]
            removed = ranks < count if direction == _MORF else ranks >= n_pixels - count
            image = self.images[index // self.maps_per_image]
            noise_source = torch.Generator().manual_seed(self.seeds[row])
            out.append(_impute_one(image, removed.view(image.shape[-2:]), self.noise,
                                   noise_source))
        return torch.stack(out)


def _ranks(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(M, N) int32 rank of each pixel, 0 for the highest value; ties ordered by ``keys``."""
    shuffle = torch.argsort(keys, dim=1)
    order = shuffle.gather(1, torch.argsort(-values.gather(1, shuffle), dim=1, stable=True))
    ranks = torch.empty(values.shape, dtype=torch.int32, device=values.device)
    ranks.scatter_(1, order, torch.arange(values.shape[1], dtype=torch.int32,
                                          device=values.device).expand_as(order))
    return ranks
