"""Faithfulness metrics for saliency maps: deletion/insertion AUC, average drop, increase, ROAD.

Torch (ROAD's sparse solves use SciPy, in road.py). A saliency map is faithful when the pixels
it ranks highest are the ones the model's score depends on. Three families of checks measure
that with the model itself:

* Deletion and insertion (Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
  Black-box Models", BMVC 2018). Deletion removes the most salient pixels first and watches the
  class probability fall (a low area under the curve is good); insertion starts from a blank
  (blurred) image, reveals the most salient pixels first and watches it rise (a high area is
  good).
* Average drop and increase in confidence (Chattopadhyay et al., "Grad-CAM++", WACV 2018). The
  model sees the image multiplied by the map; a faithful map keeps most of the probability
  (a low drop) and sometimes raises it.
* ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
  ICML 2022), with ``road=True``: the most (MoRF) or least (LeRF) relevant pixels are removed
  at several percentiles and filled by noisy linear imputation from their neighbours, so the
  hole's outline does not leak into the image (road.py defines it exactly).

Baseline maps (``baseline_maps``) say what a score is worth: compute every measure for them on
the same images and report each method beside them.

* ``"random"``: ``random_maps``, smooth uniform noise on a 7 x 7 grid: the chance level, as
  coarse as a last-conv-layer map, so smoothness alone earns nothing.
* ``"gaussian"``: a centred isotropic Gaussian, sigma = a quarter of the shorter side,
  min-max normalized to [0, 1] (1 at the centre): the "the object is in the middle" prior.
  Photos are framed around their subject and the crop is centred, so this map already scores
  well with no knowledge of the model.

A map should beat both. One that does not beat the random map is no better than chance; one
that beats the random map but not the Gaussian tells you no more than "look at the centre".

Every perturbed image goes through the model in batches of ``batch_size``, across images, maps
and steps, and is built only when its batch is due, so memory does not grow with the number
of steps. The model is left as it was found: its training flags are restored, gradients are
never recorded, ``requires_grad`` is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .gradcam import eval_mode, normalize_maps
from .heads import SOFTMAX, Head
from .road import ROAD_NOISE, ROAD_PERCENTILES, check_percentiles, road_probabilities, road_scores

__all__ = ["Faithfulness", "faithfulness", "random_maps", "baseline_maps", "BASELINES",
           "BASELINE_MAPS"]

BASELINES = ("blur", "zero")
BLUR_SIGMA_FRACTION = 1 / 20  # the blur baseline's Gaussian sigma, as a fraction of min(H, W)
BASELINE_MAPS = ("random", "gaussian")
GAUSSIAN_MAP_SIGMA_FRACTION = 1 / 4  # the centred Gaussian map's sigma, times min(H, W)

# Kinds of perturbed image, one per row of the job table.
_REMOVE = 0   # the baseline where rank < n, the image elsewhere (deletion; also the image, n=0)
_REVEAL = 1   # the image where rank < n, the baseline elsewhere (insertion)
_EXPLAIN = 2  # the image times the map (the Grad-CAM++ "explanation map")


@dataclass(frozen=True)
class Faithfulness:
    """Per-map faithfulness scores; every field is (B, K) float32, one value per map.

    ``increase`` is 1.0 where the explanation map raised the class probability, else 0.0; its
    mean times 100 is Grad-CAM++'s "increase in confidence" in percent.

    The ROAD fields are None unless ``faithfulness`` was asked for them (``road=True``); they
    are probability changes averaged over the percentiles (road.py).
    """

    deletion_auc: torch.Tensor   # in [0, 1]; lower is better
    insertion_auc: torch.Tensor  # in [0, 1]; higher is better
    average_drop: torch.Tensor   # percent, in [0, 100]; lower is better
    increase: torch.Tensor       # 0.0 or 1.0; higher (on average) is better
    road_morf: torch.Tensor | None = None  # in [-1, 1]; lower is better
    road_lerf: torch.Tensor | None = None  # in [-1, 1]; higher is better
    road: torch.Tensor | None = None       # (road_lerf - road_morf) / 2; higher is better


def faithfulness(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                 classes: torch.Tensor, steps: int = 16, batch_size: int = 64,
                 baseline: str = "blur", head: Head = SOFTMAX, road: bool = False,
                 road_percentiles: Sequence[float] = ROAD_PERCENTILES,
                 road_noise: float = ROAD_NOISE,
                 generator: torch.Generator | None = None) -> Faithfulness:
    """Deletion AUC, insertion AUC, average drop, increase (and ROAD) for each of B x K maps.

    Args:
        model: the classifier, returning (N, C) raw class scores; it is left as it was found.
        images: (B, 3, H, W) preprocessed model inputs, on the model's device.
        maps: (B, K, H, W) saliency maps in [0, 1] at input resolution (e.g. ``grad_cam``'s
            maps for one layer).
        classes: (B, K) integer tensor: the class each map explains.
        steps: the number of equal chunks the H*W pixels are deleted or inserted in.
        batch_size: how many perturbed images go through the model per forward pass.
        baseline: what a removed pixel becomes, for both curves: ``"blur"``, the image blurred
            with a Gaussian of sigma = min(H, W) / 20 (separable, reflect padding, as RISE uses
            for insertion), or ``"zero"``, zeros: the dataset mean for normalized inputs.
        road: also ROAD's MoRF, LeRF and combined scores (``road.road``): 2 x P more forward
            passes per map and as many sparse solves on the CPU, so off by default.
        road_percentiles, road_noise: ROAD's percentages of pixels removed and imputation
            noise std (model-input units).
        generator: the source of ROAD's tie-breaks and noise (torch's global one if None).

    The class probability is ``head``'s: the softmax of the model's raw scores (a sigmoid
    head's own sigmoid), taken for the map's class.

    Deletion and insertion: the pixels are ordered by the map, highest first, ties broken by
    pixel index (a stable sort on -map, row-major). After s of the ``steps`` chunks, the first
    ``floor(s * H * W / steps)`` pixels in that order (all channels) are removed (deletion:
    replaced by the baseline, starting from the image) or revealed (insertion: taken from the
    image, starting from the baseline). The steps + 1 probabilities, from s = 0 to s = steps,
    form each curve, and the AUC is the trapezoidal area under it with the x axis scaled to
    [0, 1], so it lies in [0, 1]. Both curves start or end at the probability on the image and on
    the baseline, which are computed once per image.

    Average drop and increase: Y is the probability on the image, O the probability on the
    explanation map E = image * map, where "image" is the *normalized* model input (so a zero
    map gives zeros, the dataset mean, not black). average_drop = max(0, Y - O) / Y * 100
    (0 where Y <= O, so Y = 0 never divides) and increase = 1.0 where O > Y, else 0.0.

    ROAD runs after the other measures, in batches of its own, so they are the same numbers
    with and without it; it reuses their probabilities on the images.
    """
    height, width = _check_inputs(images, maps, classes, steps, batch_size, baseline)
    if road:
        check_percentiles(road_percentiles)
        if not (math.isfinite(road_noise) and road_noise >= 0):
            raise ValueError(f"road_noise must be a finite standard deviation >= 0, "
                             f"got {road_noise}")
    n_images, n_maps = classes.shape
    n_pixels = height * width
    device = images.device
    with eval_mode(model), torch.inference_mode():
        images = images.detach()
        maps = maps.detach().to(device=device, dtype=images.dtype)
        classes = classes.detach().to(device).long()
        baselines = (_gaussian_blur(images, BLUR_SIGMA_FRACTION * min(height, width))
                     if baseline == "blur" else torch.zeros_like(images))
        jobs = _job_table(n_images, n_maps, n_pixels, steps, device)
        builder = _PerturbedImages(images, baselines, maps, jobs)
        probs = _probabilities(model, builder, classes, jobs["image"], batch_size, head)
        if road:
            on_image = probs[:n_images]  # each image's K classes (the first job block)
            _, on_imputed = road_probabilities(model, images, maps, classes, road_percentiles,
                                               road_noise, batch_size, head, generator,
                                               on_image=on_image)
    scores = _scores(probs.clone(), n_images, n_maps, steps)  # clone: not an inference tensor
    if not road:
        return scores
    measured = road_scores(on_image.clone(), on_imputed.clone(), road_percentiles)
    return replace(scores, road_morf=measured.morf, road_lerf=measured.lerf,
                   road=measured.combined)


def random_maps(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                cells: int = 7) -> torch.Tensor:
    """Smooth random saliency maps of ``shape`` (..., H, W), float32 in [0, 1].

    Uniform noise on a ``cells`` x ``cells`` grid, upsampled bilinearly to H x W and min-max
    normalized per map: the "random map" baseline, as coarse as Grad-CAM's maps (a 7 x 7 last
    conv layer for a 224 x 224 input), so a metric cannot favour Grad-CAM just for being smooth.
    The noise comes from ``generator`` (on its device), so a seeded generator repeats the maps.
    """
    if cells < 2:
        raise ValueError(f"cells must be >= 2 (one cell is a constant map), got {cells}")
    *leading, height, width = tuple(shape)
    device = generator.device if generator is not None else None
    noise = torch.rand(math.prod(leading), 1, cells, cells, generator=generator, device=device)
    smooth = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    return normalize_maps(smooth.view(*leading, height, width))


def baseline_maps(kind: str, shape: tuple[int, ...] | torch.Size,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline saliency maps of ``shape`` (..., H, W), float32 in [0, 1] (see the module doc).

    ``"random"``: ``random_maps(shape, generator)``. ``"gaussian"``: the same map for every
    leading index, exp(-d^2 / (2 sigma^2)) with d the distance from the image centre
    ((H - 1) / 2, (W - 1) / 2) in pixels and sigma = min(H, W) / 4, min-max normalized to
    [0, 1]; it does not use ``generator`` (it is made on the generator's device if given).
    """
    if kind == "random":
        return random_maps(shape, generator)
    if kind != "gaussian":
        raise ValueError(f"kind must be one of {', '.join(BASELINE_MAPS)}, got {kind!r}")
    *leading, height, width = tuple(shape)
    device = generator.device if generator is not None else None
    sigma = GAUSSIAN_MAP_SIGMA_FRACTION * min(height, width)
    rows = torch.arange(height, dtype=torch.float64, device=device) - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float64, device=device) - (width - 1) / 2
    squared = rows[:, None] ** 2 + cols[None, :] ** 2
    gaussian = normalize_maps(torch.exp(-squared / (2 * sigma ** 2))).float()
    return gaussian.expand(*leading, height, width).contiguous()


def _check_inputs(images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, steps: int,
                  batch_size: int, baseline: str) -> tuple[int, int]:
    """Raise ``ValueError`` for shapes, ranges or options the metrics cannot use; return H, W."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    n_images, _, height, width = images.shape
    if classes.dim() != 2 or classes.shape[0] != n_images or classes.shape[1] < 1:
        raise ValueError(f"classes must have shape (B, K) with B = {n_images} images and K >= 1, "
                         f"got {tuple(classes.shape)}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be an integer tensor, got {classes.dtype}")
    expected = (n_images, classes.shape[1], height, width)
    if tuple(maps.shape) != expected:
        raise ValueError(f"maps must have shape (B, K, H, W) = {expected}, "
                         f"got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()) or maps.min() < 0 or maps.max() > 1:
        raise ValueError("maps must be finite and lie in [0, 1]")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    return height, width


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (B, C, H, W) with a normalized Gaussian: one 1-D conv per axis, reflect padding.

    The kernel radius is ceil(3 sigma), capped at H - 1 and W - 1 (reflect padding cannot be
    wider than the image); a constant image is left unchanged.
    """
    channels, height, width = images.shape[1:]
    radius = max(0, min(math.ceil(3 * sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / max(sigma, 1e-12)) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    rows = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), rows, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), cols, groups=channels)


def _job_table(n_images: int, n_maps: int, n_pixels: int, steps: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One row per forward-pass input, in this order (the slices ``_scores`` reads):

    B images, B baselines, B*K explanation maps, (steps - 1) x B*K inner deletion points,
    (steps - 1) x B*K inner insertion points. Columns: ``image`` (b), ``map`` (b * K + k; any
    map of image b for the first two blocks), ``kind`` and ``count`` (how many pixels, in map
    order, are removed or revealed).
    """
    long = dict(dtype=torch.long, device=device)
    every_image = torch.arange(n_images, **long)
    every_map = torch.arange(n_images * n_maps, **long)
    inner = torch.arange(1, steps, **long) * n_pixels // steps  # floor(s * N / steps)
    n_inner = inner.numel()

    def block(maps: torch.Tensor, kind: int, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": maps // n_maps, "map": maps,
                "kind": torch.full_like(maps, kind), "count": counts}

    blocks = [
        block(every_image * n_maps, _REMOVE, torch.zeros(n_images, **long)),
        block(every_image * n_maps, _REMOVE, torch.full((n_images,), n_pixels, **long)),
        block(every_map, _EXPLAIN, torch.zeros(every_map.numel(), **long)),
        block(every_map.repeat(n_inner), _REMOVE, inner.repeat_interleave(every_map.numel())),
        block(every_map.repeat(n_inner), _REVEAL, inner.repeat_interleave(every_map.numel())),
    ]
    return {key: torch.cat([b[key] for b in blocks]) for key in blocks[0]}


class _PerturbedImages:
    """Builds the model inputs for any rows of the job table, only when they are needed."""

    def __init__(self, images: torch.Tensor, baselines: torch.Tensor, maps: torch.Tensor,
                 jobs: dict[str, torch.Tensor]) -> None:
        self.images = images
        self.baselines = baselines
        self.maps = maps.flatten(0, 1)  # (B*K, H, W)
        self.jobs = jobs
        flat = self.maps.flatten(1)
        order = torch.argsort(-flat, dim=1, stable=True)  # highest first, ties by pixel index
        self.ranks = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
        self.ranks.scatter_(1, order, torch.arange(flat.shape[1], dtype=torch.int32,
                                                   device=flat.device).expand_as(order))

    def __len__(self) -> int:
        return self.jobs["image"].numel()

    def __call__(self, rows: slice) -> torch.Tensor:
        image_index, map_index = self.jobs["image"][rows], self.jobs["map"][rows]
        kind, count = self.jobs["kind"][rows], self.jobs["count"][rows]
        image, base = self.images[image_index], self.baselines[image_index]
        shape = (-1, 1, *image.shape[-2:])
        chosen = (self.ranks[map_index] < count[:, None]).view(shape)
        take_base = chosen != (kind == _REVEAL).view(-1, 1, 1, 1)
        perturbed = torch.where(take_base, base, image)
        explained = image * self.maps[map_index].view(shape)
        return torch.where((kind == _EXPLAIN).view(-1, 1, 1, 1), explained, perturbed)


def _probabilities(model: nn.Module, builder: _PerturbedImages, classes: torch.Tensor,
                   image_of_row: torch.Tensor, batch_size: int, head: Head) -> torch.Tensor:
    """(rows, K) probabilities of each row's image's K classes, ``batch_size`` at a time."""
    out = []
    for start in range(0, len(builder), batch_size):
        rows = slice(start, min(start + batch_size, len(builder)))
        scores = head.scores(model(builder(rows)))
        if start == 0 and (classes.min() < 0 or classes.max() >= scores.shape[1]):
            raise ValueError(f"classes must lie in 0..{scores.shape[1] - 1}")
        probs = head.probabilities(scores)
        out.append(probs.gather(1, classes[image_of_row[rows]]))
    return torch.cat(out)


def _scores(probs: torch.Tensor, n_images: int, n_maps: int, steps: int) -> Faithfulness:
    """Curves, AUCs, drop and increase from the job table's probabilities (see ``_job_table``)."""
    b, k, inner = n_images, n_maps, steps - 1
    on_image, on_base = probs[:b], probs[b:2 * b]                           # (B, K)
    start = 2 * b

    def own_class(block: torch.Tensor) -> torch.Tensor:
        """(..., B*K, K) probabilities of all K classes -> (..., B, K) of each map's class."""
        return block.view(*block.shape[:-2], b, k, k).diagonal(dim1=-2, dim2=-1)

    on_explanation = own_class(probs[start:start + b * k])
    start += b * k
    deleting = own_class(probs[start:start + inner * b * k].view(inner, b * k, k))
    start += inner * b * k
    inserting = own_class(probs[start:start + inner * b * k].view(inner, b * k, k))
    deletion = torch.cat([on_image[None], deleting, on_base[None]])        # (steps + 1, B, K)
    insertion = torch.cat([on_base[None], inserting, on_image[None]])
    dropped = on_image > on_explanation
    drop = torch.where(dropped, (on_image - on_explanation)
                       / torch.where(dropped, on_image, torch.ones_like(on_image)) * 100, 0.0)
    return Faithfulness(
        deletion_auc=torch.trapezoid(deletion, dx=1 / steps, dim=0),
        insertion_auc=torch.trapezoid(insertion, dx=1 / steps, dim=0),
        average_drop=drop,
        increase=(on_explanation > on_image).float(),
    )
