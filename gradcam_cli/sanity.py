"""The model-parameter randomisation test of Adebayo et al., "Sanity Checks for Saliency Maps"
(NeurIPS 2018, arXiv 1810.03292): a map that barely changes when the model's weights are
re-initialised shows the image, not the model.

Pure torch: no files, no printing. ``sanity_check`` works on a ``copy.deepcopy`` of the model
(the user's model is only run through ``explain_methods``, which leaves it exactly as found,
and read by ``named_modules``), re-initialises its layers in a cascade from the output down,
recomputes the maps after each step and compares them with the original maps by Spearman rank
correlation and SSIM.

The cascade. The modules that own parameters are put in forward run order: one forward pass of
one image through the copy, with a forward *pre*-hook on every module (removed after), orders
them by when each is first entered. Entry order puts a parent that owns parameters (a ViT's
position embedding, held by the model itself) before its children, where its parameters are
used. A module that owns parameters but never runs (``nn.MultiheadAttention.out_proj``, whose
weight its parent uses directly) comes right after its nearest running ancestor. Read from the
top (the last module to run, normally the classifier), the modules are grouped into at most
``max_steps`` steps:

* step 1 re-initialises the last module alone (the paper's first step, the logits);
* the other modules, top down, are split into ``max_steps - 1`` contiguous groups of equal size
  (the sizes differ by at most one, the larger groups at the top); one module per step when
  there are fewer modules than steps;
* ``max_steps=1`` re-initialises everything in one step.

Steps are cumulative: step k re-initialises groups 1..k, so the last step is the full cascade
(every parameter of the model re-initialised).

Re-initialising a module. Its own ``reset_parameters()`` where it has one (the initialisation
its class gives a fresh module); otherwise each of its own floating-point parameters is drawn
from N(0, s^2), s the parameter's own standard deviation (a parameter with one element or a
constant one is left as it is: it has no spread to copy). Only the module's own parameters
change, and its running statistics (below): anything else a ``reset_parameters`` touches (a
child's parameters, other buffers) is put back. Each module's draws come from the global RNG
seeded with ``seed + its position in the cascade`` (top first), inside
``torch.random.fork_rng``: the user's global RNG state is unchanged, and a module's new
weights do not depend on ``max_steps``. ``seed`` comes from ``generator`` (one draw) or is 0.

Running statistics (BatchNorm's running mean and variance: the buffers of modules with a
``reset_running_stats()``) are reset with their module by default, so every module is either
as trained (weights and statistics) or as freshly constructed, and the full cascade is
exactly a freshly constructed model (what BatchNorm's own ``reset_parameters`` does).
Adebayo et al. re-initialise the weights, and running statistics are not weights; but they
are statistics of the trained weights' outputs, and kept under new weights they wreck the
network: on EfficientNet-Lite0 with its ImageNet weights, the block outputs' spread across
five photos falls to about 1e-7 of their size after the full cascade (the network computes a
constant), so every gradient map would change because the network is dead, a model-blind
method included. With the statistics reset the spread stays about half the size.
``reset_running_stats=False`` keeps them.

The comparison, per map (one image, one class, one layer, one method), between the maps
``explain_methods`` returns (upsampled to the input size and min-max normalized):

* Spearman's rank correlation over the pixels, ties given their average rank (as
  ``scipy.stats.spearmanr``). An original map that is constant has no ranking to keep: its
  value is NaN and it is left out of the means. A map that becomes constant while its
  original was not keeps none of the ranking: 0.
* SSIM (Wang et al. 2004) of the two [0, 1] maps: Gaussian window 11 x 11, sigma 1.5,
  C1 = (0.01)^2, C2 = (0.03)^2 (dynamic range 1), population (co)variances, averaged over the
  positions where the window fits ("valid", as Wang's MATLAB code and scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)``).

Cost: one ``explain_methods`` call on the user's model for the original maps, then one per
step on the copy, each over the images in chunks of ``batch_size``; plus one forward pass of
one image to order the modules, and the deep copy (the model's memory once more). The default
``max_steps=6`` means 7 explain passes in all. The original maps stay on the images' device
(L x B x K x H x W floats per method) to be compared at every step; the comparison itself is
cheap (a sort and five 11-tap filter passes per map).

The verdict (``SanityReport.verdicts``): a method's maps at a layer depend on the weights when
the mean Spearman correlation after the full cascade is below 0.5. Adebayo et al. find that
Gradient and Grad-CAM maps lose their resemblance to the original under cascading
randomisation (their rank correlation falls towards zero), while Guided Backprop and Guided
Grad-CAM keep it through most of the cascade (high correlation, the maps still look alike):
0.5 lies between the two behaviours, far from both. On EfficientNet-Lite0 with its ImageNet
weights (five photos, 112 px, top class) every method of METHODS ends between -0.58 and 0.21
at the last conv layer and at block 10, while a map that is only the image's edges stays at
exactly 1.
The verdict also gives the first step's value and the first step at which the mean falls
below the threshold: a map that only changes once the cascade reaches the layers below its
target layer (Eigen-CAM ignores the classifier) still depends on the weights, but not on those
above its layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .gradcam import _classes_for, eval_mode, explain_methods
from .heads import SOFTMAX, Head

__all__ = ["sanity_check", "SanityReport", "SanityStep", "MapSimilarity", "Verdict",
           "ROW_HEADER", "DEPENDENCE_THRESHOLD", "DEFAULT_MAX_STEPS",
           "parameter_modules_in_run_order", "cascade_groups", "reinitialize", "spearman",
           "ssim", "compare_maps"]

DEFAULT_MAX_STEPS = 6
DEPENDENCE_THRESHOLD = 0.5
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
ROW_HEADER = ("method", "layer", "step", "modules_reinitialised", "down_to", "spearman", "ssim")
_MAPS_PER_CHUNK = 32  # maps compared at once: bounds the float64 temporaries

Progress = Callable[[int, int], None] | None


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MapSimilarity:
    """How one method's maps at one target layer compare with the original maps at a step.

    ``spearman`` and ``ssim`` are the means over the images and classes (maps whose original
    is constant are left out of the Spearman mean; NaN if every one is); ``*_per_map`` hold
    the (B, K) values on the CPU, float64, NaN where the Spearman correlation is undefined."""

    method: str
    layer: int
    layer_name: str
    spearman: float
    ssim: float
    spearman_per_map: torch.Tensor = field(repr=False)
    ssim_per_map: torch.Tensor = field(repr=False)


@dataclass(frozen=True, eq=False)
class SanityStep:
    """One step of the cascade: ``index`` from 1, the modules re-initialised so far (top
    first, cumulative), those this step added, and the maps' similarity to the originals."""

    index: int
    modules: tuple[str, ...]
    new_modules: tuple[str, ...]
    similarities: tuple[MapSimilarity, ...]

    def similarity(self, method: str, layer: int = 0) -> MapSimilarity:
        for entry in self.similarities:
            if entry.method == method and entry.layer == layer:
                return entry
        raise KeyError(f"no maps for method {method!r} at layer {layer}")


@dataclass(frozen=True)
class Verdict:
    """Whether a method's maps at a layer depend on the model's weights.

    ``depends_on_weights``: the mean Spearman correlation after the full cascade is below the
    threshold (None when it is undefined: every original map was constant).
    ``first_below``: the first step whose mean is below the threshold (None: none is)."""

    method: str
    layer: int
    layer_name: str
    depends_on_weights: bool | None
    threshold: float
    first_step_spearman: float
    final_spearman: float
    final_ssim: float
    first_below: int | None


@dataclass(frozen=True, eq=False)
class SanityReport:
    """What ``sanity_check`` found: the cascade's groups (top first), then per step the
    similarity of every method's maps at every target layer to the original maps."""

    methods: tuple[str, ...]
    layer_names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    steps: tuple[SanityStep, ...]
    seed: int
    reset_running_stats: bool

    def similarity(self, step: int, method: str, layer: int = 0) -> MapSimilarity:
        """The similarity at step ``step`` (1-based, as ``SanityStep.index``)."""
        return self.steps[step - 1].similarity(method, layer)

    def verdicts(self, threshold: float = DEPENDENCE_THRESHOLD) -> tuple[Verdict, ...]:
        """One verdict per method and layer, by the rule of the module doc."""
        verdicts = []
        for method in self.methods:
            for layer, layer_name in enumerate(self.layer_names):
                means = [step.similarity(method, layer).spearman for step in self.steps]
                final = self.steps[-1].similarity(method, layer)
                below = [step.index for step, value in zip(self.steps, means)
                         if value < threshold]
                verdicts.append(Verdict(
                    method, layer, layer_name,
                    None if math.isnan(final.spearman) else final.spearman < threshold,
                    threshold, means[0], final.spearman, final.ssim,
                    below[0] if below else None))
        return tuple(verdicts)

    def depends_on_weights(self, method: str, threshold: float = DEPENDENCE_THRESHOLD
                           ) -> bool | None:
        """True when the method's maps depend on the weights at every target layer, False
        when they do not at some layer, None when some layer cannot tell and none fails."""
        if method not in self.methods:
            raise KeyError(f"method {method!r} was not checked; checked: {', '.join(self.methods)}")
        found = [v.depends_on_weights for v in self.verdicts(threshold) if v.method == method]
        if False in found:
            return False
        return None if None in found else True

    def to_rows(self) -> list[tuple]:
        """CSV-ready rows, one per method, layer and step, in the order of ``ROW_HEADER``:
        method, layer index, step, how many modules are re-initialised, the deepest of them
        (the cascade is contiguous from the top, so these two say which), mean Spearman,
        mean SSIM."""
        rows = []
        for method in self.methods:
            for layer in range(len(self.layer_names)):
                for step in self.steps:
                    entry = step.similarity(method, layer)
                    rows.append((method, layer, step.index, len(step.modules), step.modules[-1],
                                 entry.spearman, entry.ssim))
        return rows


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def sanity_check(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
                 classes, methods: Sequence[str], head: Head = SOFTMAX, batch_size: int = 64,
                 max_steps: int = DEFAULT_MAX_STEPS, generator: torch.Generator | None = None,
                 progress: Progress = None, reset_running_stats: bool = True) -> SanityReport:
    """Adebayo et al.'s cascading model-parameter randomisation test (see the module doc).

    Args:
        model: the classifier; left exactly as found (only a deep copy is re-initialised).
        images: (B, 3, H, W) preprocessed images on the model's device; H, W >= 11.
        layers: target modules of ``model`` (found in the copy by their qualified names).
        classes: (B, K) integer tensor, or a function of the original scores (such as
            ``gradcam.top_and_lowest``): it is applied once, to the original model's scores,
            and every step explains the same classes.
        methods: names from ``cam_methods.METHODS``.
        head, batch_size: as for ``explain_methods``; the images go through it ``batch_size``
            at a time.
        max_steps: at most this many cascade steps (each costs one explain pass).
        generator: where the seed comes from (one draw); None: seed 0.
        progress: ``progress(done, total)`` after each explain call (chunks of images, over the
            original pass and every step).
        reset_running_stats: reset BatchNorm-style running statistics with their module
            (the default; see the module doc); False keeps them.

    Returns a ``SanityReport``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"images must be at least {SSIM_WINDOW} pixels on each side for SSIM, "
                         f"got {tuple(images.shape[-2:])}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    methods = tuple(dict.fromkeys(methods))
    layer_names = _layer_names(model, layers)
    seed = 0 if generator is None else int(torch.randint(
        0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    chunks = [slice(start, start + batch_size) for start in range(0, images.shape[0], batch_size)]

    with torch.inference_mode(False):
        randomised = copy.deepcopy(model)
        randomised.requires_grad_(False)  # gradients go to activations only; none kept here
        targets = [randomised.get_submodule(name) for name in layer_names]
        groups = cascade_groups(parameter_modules_in_run_order(randomised, images[:1]),
                                max_steps)
        position = {name: index for index, name in
                    enumerate(name for group in groups for name in group)}
        total = len(chunks) * (len(groups) + 1)

        # The original maps, from the user's model (explain_methods leaves it as found), and
        # the classes every step explains.
        parts: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
        chosen = []
        for done, chunk in enumerate(chunks, 1):
            chunk_classes = classes[chunk] if isinstance(classes, torch.Tensor) else classes
            scores, maps = explain_methods(model, images[chunk], layers, chunk_classes,
                                           methods, batch_size=batch_size, head=head)
            chosen.append(_classes_for(scores, chunk_classes, images[chunk].shape[0]))
            for method in methods:
                parts[method].append(maps[method])
            if progress is not None:
                progress(done, total)
        reference = {method: torch.cat(maps, dim=1) for method, maps in parts.items()}
        del parts

        steps = []
        done_modules: list[str] = []
        for index, group in enumerate(groups, 1):
            for name in group:
                reinitialize(randomised, [name], seed + position[name], reset_running_stats)
            done_modules.extend(group)
            spearmans: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
            ssims: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
            for number, chunk in enumerate(chunks):
                _, maps = explain_methods(randomised, images[chunk], targets, chosen[number],
                                          methods, batch_size=batch_size, head=head)
                for method in methods:
                    rho, structural = compare_maps(reference[method][:, chunk], maps[method])
                    spearmans[method].append(rho)
                    ssims[method].append(structural)
                if progress is not None:
                    progress(len(chunks) * index + number + 1, total)
            similarities = []
            for method in methods:
                rho = torch.cat(spearmans[method], dim=1).double().cpu()
                structural = torch.cat(ssims[method], dim=1).double().cpu()
                for layer, layer_name in enumerate(layer_names):
                    similarities.append(MapSimilarity(
                        method, layer, layer_name, _nanmean(rho[layer]),
                        float(structural[layer].mean()), rho[layer], structural[layer]))
            steps.append(SanityStep(index, tuple(done_modules), tuple(group),
                                    tuple(similarities)))
    return SanityReport(methods, tuple(layer_names), groups, tuple(steps), seed,
                        reset_running_stats)


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def _layer_names(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    """Each target module's qualified name in ``model``; ValueError for one not in it."""
    if len(layers) == 0:
        raise ValueError("layers is empty: give at least one target module")
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    missing = [i for i, module in enumerate(layers) if id(module) not in names]
    if missing:
        raise ValueError(f"target layer(s) {missing} are not submodules of the model")
    return [names[id(module)] for module in layers]


# --------------------------------------------------------------------------------------------
# The cascade
# --------------------------------------------------------------------------------------------


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def parameter_modules_in_run_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The qualified names of the modules that own parameters, in forward run order (first
    entry; see the module doc), from one forward pass of ``example`` in eval mode under
    ``no_grad``. The pre-hooks are removed after; every training flag is restored."""
    named = list(model.named_modules())
    entered: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(module, inputs) -> None:
            entered.setdefault(name, len(entered))
        return record

    try:
        for name, module in named:
            handles.append(module.register_forward_pre_hook(hook(name)))
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    keys = {}
    for position, (name, module) in enumerate(named):
        if not _owns_parameters(module):
            continue
        if name in entered:
            keys[name] = (entered[name], 0, position)
        else:  # never runs: right after its nearest running ancestor
            keys[name] = (entered.get(_nearest_running_ancestor(name, entered), -1), 1, position)
    if not keys:
        raise ValueError("the model has no parameters to re-initialise")
    return sorted(keys, key=keys.__getitem__)


def _nearest_running_ancestor(name: str, entered: dict[str, int]) -> str:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in entered:
            return candidate
    return ""


def cascade_groups(run_order: Sequence[str], max_steps: int = DEFAULT_MAX_STEPS
                   ) -> tuple[tuple[str, ...], ...]:
    """The cascade's steps, top first: the last module of ``run_order`` alone, then the
    rest, top down, in ``max_steps - 1`` contiguous groups of equal size (sizes differ by at
    most one, the larger ones at the top); ``max_steps=1``: everything in one step. Each
    group lists its modules top first."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    top = list(reversed(run_order))
    if not top:
        raise ValueError("no modules to re-initialise")
    if max_steps == 1:
        return (tuple(top),)
    groups = [(top[0],)]
    rest = top[1:]
    n_groups = min(max_steps - 1, len(rest))
    if n_groups:
        size, extra = divmod(len(rest), n_groups)
        start = 0
        for group in range(n_groups):
            end = start + size + (1 if group < extra else 0)
            groups.append(tuple(rest[start:end]))
            start = end
    return tuple(groups)


@contextlib.contextmanager
def _seeded_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """The global RNG of the CPU and of every device holding ``model``'s tensors, seeded with
    ``seed`` for the block and restored after. ``torch.manual_seed`` is not used: it would
    also seed devices the model is not on (lazily, for CUDA not yet started)."""
    devices: dict[str, set[int]] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type not in ("cpu", "meta"):
            devices.setdefault(tensor.device.type, set()).add(
                tensor.device.index if tensor.device.index is not None else 0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cpu_rng_fork())
        for kind, indices in devices.items():
            stack.enter_context(torch.random.fork_rng(devices=sorted(indices),
                                                      device_type=kind))
        torch.default_generator.manual_seed(seed)
        for kind, indices in devices.items():
            module = torch.get_device_module(kind)
            for index in indices:
                generators = getattr(module, "default_generators", None)
                if generators:
                    generators[index].manual_seed(seed)
                else:
                    module.manual_seed(seed)
        yield


@contextlib.contextmanager
def _cpu_rng_fork() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def reinitialize(model: nn.Module, names: Sequence[str], seed: int,
                 reset_running_stats: bool = True) -> None:
    """Re-initialise the own parameters of the named modules of ``model`` in place, by the
    rule of the module doc, with the RNG seeded by ``seed`` (the global RNG state is kept).
    Meant for a copy: it changes ``model``."""
    with _seeded_rng(model, seed), torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            own = list(module.parameters(recurse=False))
            own_ids = {id(p) for p in own}
            statistics = reset_running_stats and callable(
                getattr(module, "reset_running_stats", None))
            own_buffers = {id(b) for b in module.buffers(recurse=False)} if statistics else set()
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                kept = [p for p in module.parameters() if id(p) not in own_ids]
                kept += [b for b in module.buffers() if id(b) not in own_buffers]
                saved = [t.detach().clone() for t in kept]
                reset()
                for tensor, value in zip(kept, saved):
                    tensor.copy_(value)
            else:
                for parameter in own:
                    if not parameter.is_floating_point() or parameter.numel() < 2:
                        continue
                    spread = float(parameter.detach().float().std())
                    if spread > 0:
                        parameter.normal_(0.0, spread)
            if statistics:
                module.reset_running_stats()


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N, P) ranks 1..P along each row, ties given their average rank: the mean
    of the first and last sorted position of each run of equal values, plus one."""
    n, p = values.shape
    dtype = _exact_dtype(values.device)
    ordered, order = values.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    positions = torch.arange(p, device=values.device).expand(n, p)
    first = torch.where(starts, positions, 0).cummax(dim=1).values
    last = torch.where(ends, positions, p).flip(1).cummin(dim=1).values.flip(1)
    ranks_sorted = (first + last).to(dtype) / 2 + 1
    return torch.empty_like(ranks_sorted).scatter_(1, order, ranks_sorted)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps over their last two dims (average
    ranks for ties, as ``scipy.stats.spearmanr``); NaN where either map is constant.
    Returns shape ``a.shape[:-2]``, float64 (float32 on MPS)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    lead = a.shape[:-2]
    flat_a = a.reshape(-1, a.shape[-2] * a.shape[-1])
    flat_b = b.reshape(-1, b.shape[-2] * b.shape[-1])
    values = []
    for start in range(0, flat_a.shape[0], _MAPS_PER_CHUNK):
        ra = _average_ranks(flat_a[start:start + _MAPS_PER_CHUNK])
        rb = _average_ranks(flat_b[start:start + _MAPS_PER_CHUNK])
        ra = ra - ra.mean(dim=1, keepdim=True)
        rb = rb - rb.mean(dim=1, keepdim=True)
        denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
        values.append((ra * rb).sum(dim=1) / denominator)  # 0 / 0 -> NaN for a constant map
    if not values:
        return torch.empty(lead, dtype=_exact_dtype(a.device), device=a.device)
    return torch.cat(values).clamp(-1.0, 1.0).reshape(lead)


def _gaussian_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-x.square() / (2 * SSIM_SIGMA ** 2))
    return window / window.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each pair of [0, 1] maps over their last two dims:
    Gaussian window 11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, mean over the valid positions.
    Returns shape ``a.shape[:-2]``, float64 (float32 on MPS)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    height, width = a.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"maps must be at least {SSIM_WINDOW} pixels on each side for SSIM, "
                         f"got {height} x {width}")
    lead = a.shape[:-2]
    dtype = _exact_dtype(a.device)
    window = _gaussian_window(a.device, dtype)
    across, down = window.view(1, 1, 1, -1), window.view(1, 1, -1, 1)
    flat_a = a.reshape(-1, 1, height, width)
    flat_b = b.reshape(-1, 1, height, width)
    values = []
    for start in range(0, flat_a.shape[0], _MAPS_PER_CHUNK):
        x = flat_a[start:start + _MAPS_PER_CHUNK].to(dtype)
        y = flat_b[start:start + _MAPS_PER_CHUNK].to(dtype)
        n = x.shape[0]
        stacked = torch.cat([x, y, x * x, y * y, x * y])
        mu_x, mu_y, xx, yy, xy = F.conv2d(F.conv2d(stacked, across), down).split(n)
        var_x = xx - mu_x.square()
        var_y = yy - mu_y.square()
        cov = xy - mu_x * mu_y
        index = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
            (mu_x.square() + mu_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2))
        values.append(index.mean(dim=(1, 2, 3)))
    if not values:
        return torch.empty(lead, dtype=dtype, device=a.device)
    return torch.cat(values).reshape(lead)


def compare_maps(reference: torch.Tensor, maps: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Spearman, SSIM) of ``maps`` against ``reference``, per map (shape ``[:-2]``).
    Spearman: NaN where the reference is constant, 0 where only ``maps`` is."""
    rho = spearman(reference, maps)
    flat = reference.flatten(-2)
    constant_reference = flat.amax(dim=-1) == flat.amin(dim=-1)
    rho = torch.where(torch.isnan(rho) & ~constant_reference, torch.zeros_like(rho), rho)
    return rho, ssim(reference, maps)
