"""The Grad-CAM engine: hooks, one forward pass, gradients down to the target layers, maps.

Pure torch. Grad-CAM (Selvaraju et al., arXiv 1610.02391) for class c at a layer with output A:

    alpha_k = mean over (i, j) of d y_c / d A_k[i, j]      (y_c: the raw score, before softmax)
    map     = ReLU(sum_k alpha_k * A_k)

The user's model is left exactly as it was found: hooks are removed in a ``finally``, every
submodule's training flag is restored, ``requires_grad`` is never touched and no ``.grad`` is
filled, because gradients are taken with ``torch.autograd.grad`` down to the hooked layer outputs
only.

Transformer layers are explained too: token outputs (B, T, D) on their patch grid and
channels-last outputs (B, h, w, C) after a permute (``layer_layouts`` decides which is which).
The gradient is taken with respect to the layer's own output and then re-laid out exactly like
the activation; since that is pure re-indexing, the map is the CAM at that layer.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cam_methods import METHODS, class_maps, combine
from .heads import SOFTMAX, Head, class_scores
from .layer_layouts import CHANNELS_FIRST, Layout, LayoutTracer, channels_first_by_type

__all__ = ["grad_cam", "explain", "explain_methods", "SMOOTHING", "AUGMENTATIONS",
           "top_and_lowest", "ConvLayer", "conv_layers_in_run_order", "layers_in_run_order",
           "normalize_maps", "upsample_and_normalize", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own flag."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, was_training in flags:
            module.training = was_training


@contextlib.contextmanager
def _forward_hooks(modules: Sequence[nn.Module], hook) -> Iterator[None]:
    """Register ``hook(index, module, inputs, output)`` on each module; always remove them."""
    handles = []
    try:
        for index, module in enumerate(modules):
            handles.append(module.register_forward_hook(
                lambda mod, inputs, output, index=index: hook(index, mod, inputs, output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ActivationRecorder:
    """Forward hook that makes each target layer's output a tensor we can differentiate to.

    Two things make this correct and cheap:

    * The forward pass starts under ``torch.no_grad()``; the first target layer to run switches
      gradient recording on. Nothing before the earliest target layer is recorded for autograd,
      and frozen models (all ``requires_grad=False``) work, since the activation itself is made
      to require grad.
    * The hook keeps the layer's output ``A`` and hands the rest of the network a copy. An
      in-place operation downstream (torchvision's ``ReLU(inplace=True)``) then changes the copy,
      never ``A``, so the activation we keep and the gradient we take are of the same tensor.

    A layer that runs more than once per forward pass keeps its last call's output.
    """

    def __init__(self, n_layers: int) -> None:
        self.activations: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, index: int, module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {module.__class__.__name__} returned "
                            f"{type(output).__name__}, not a tensor")
        torch.set_grad_enabled(True)
        activation = output if output.requires_grad else output.detach().requires_grad_(True)
        self.activations[index] = activation
        return activation.clone()


def check_classes(classes: torch.Tensor, batch_size: int) -> None:
    """ValueError unless ``classes`` is a (batch_size, K >= 1) integer tensor."""
    if not isinstance(classes, torch.Tensor) or classes.dim() != 2 \
            or classes.shape[0] != batch_size or classes.shape[1] < 1:
        shape = tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes)
        raise ValueError(f"classes must be a tensor of shape (B, K) with B = {batch_size} images "
                         f"and K >= 1, got {shape}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be an integer tensor, got {classes.dtype}")


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map (last two dims) to [0, 1].

    A map that is the same everywhere has no "where": it becomes 1 where it is positive and
    0 where it is zero, so an all-zero map stays zero and nothing is ever NaN.
    """
    flat = maps.flatten(-2)
    low, high = torch.aminmax(flat, dim=-1, keepdim=True)
    span = high - low
    flat_range = span <= torch.finfo(maps.dtype).eps * high.abs()
    if not flat_range.any():  # the usual case: the same values with fewer passes over maps
        return (flat - low).div_(span).view_as(maps)
    scaled = (flat - low) / torch.where(flat_range, torch.ones_like(span), span)
    constant = (flat > 0).to(maps.dtype)
    return torch.where(flat_range, constant, scaled).view_as(maps)


ClassChoice = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def top_and_lowest(scores: torch.Tensor, top: int = 3) -> torch.Tensor:
    """(B, top + 1) class indices: the ``top`` best-scoring classes, best first, then the worst."""
    best = scores.topk(min(top, scores.shape[1]), dim=1).indices
    return torch.cat([best, scores.argmin(dim=1, keepdim=True)], dim=1)


def grad_cam(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
             classes: ClassChoice, raw: bool = False, head: Head = SOFTMAX):
    """Grad-CAM maps for several classes at several layers, from one forward pass.

    Args:
        model: the classifier; it is left exactly as it was found.
        images: (B, 3, H, W) float tensor, already preprocessed, on the model's device.
        layers: the target modules: anything returning a 4-D tensor (usually ``nn.Conv2d``),
            channels-last (B, h, w, C) or tokens (B, T, D) on a patch grid included.
        classes: (B, K) integer tensor: the classes to explain for each image; or a function
            from the (B, C) scores to such a tensor (e.g. ``top_and_lowest``), so the classes
            are picked from the same forward pass that the maps use.
        raw: return each layer's maps at its own resolution, unnormalized.
        head: how the model's output reads as class scores (``heads.Head``): the output may
            be a tensor, an object with ``.logits``, a dict or a tuple; a binary head's one
            output y is explained as the classes [-y, y].

    Returns:
        ``(scores, maps)``: ``scores`` (B, C) are the raw class scores of that forward pass.
        ``maps`` is float32 (L, B, K, H, W), upsampled bilinearly to the input size and
        min-max normalized per map; with ``raw=True`` it is a list of L tensors (B, K, h, w),
        after the ReLU, before upsampling and normalizing.
    """
    return explain(model, images, layers, classes, method="gradcam", raw=raw, head=head)


def explain(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
            classes: ClassChoice, method: str = "gradcam", counterfactual: bool = False,
            raw: bool = False, batch_size: int = 64, progress=None, head: Head = SOFTMAX,
            smooth: str | None = None):
    """Like ``grad_cam``, for any method of ``cam_methods.METHODS``.

    ``counterfactual=True`` negates the gradients (Selvaraju et al., section 5): the map shows
    the regions whose removal would make the network more confident in the class. Methods
    without gradients refuse it. ``batch_size`` and ``progress(done, total)`` serve the extra
    forward passes of Score-CAM and Ablation-CAM. ``smooth``: see ``explain_methods``.
    """
    scores, maps = explain_methods(model, images, layers, classes, [method], counterfactual,
                                   raw, batch_size, progress, head, smooth)
    return scores, maps[method]


SMOOTHING = ("aug", "eigen", "aug+eigen")
"""The ``smooth`` options of ``explain_methods`` (None: no smoothing)."""

AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))
"""Test-time augmentations of ``smooth="aug"``, pytorch-grad-cam's default ttach set: a
horizontal flip or not, times the (preprocessed) input multiplied by 0.9, 1 or 1.1."""


def explain_methods(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
                    classes: ClassChoice, methods: Sequence[str],
                    counterfactual: bool = False, raw: bool = False, batch_size: int = 64,
                    progress=None, head: Head = SOFTMAX, smooth: str | None = None):
    """Several methods' maps from one forward pass and one backward pass.

    The gradient methods differ only in how they weight the same activations and gradients,
    so they share both passes, and Eigen-CAM needs only the forward one; methods that need
    forward passes of their own (Score-CAM, Ablation-CAM) run them after. Returns
    ``(scores, {method: maps})``, each method's maps as ``explain`` returns them: exactly what
    a call for that method alone gives.

    ``smooth`` (any method, gradient-free ones and ``raw=True`` included):

    * ``"eigen"``: each map is ReLU of the first principal component of what its method sums
      over channels (alpha_k A_k; G * A for HiResCAM; ReLU(G) * A for LayerCAM; Score-CAM's
      and Ablation-CAM's w_k A_k), as pytorch-grad-cam's ``eigen_smooth``, instead of ReLU of
      the sum; the sign as ``cam_methods.first_principal_component`` states. Eigen-CAM is its
      own eigen smoothing: unchanged.
    * ``"aug"``: test-time augmentation, as pytorch-grad-cam's ``aug_smooth``: the engine runs
      once per ``AUGMENTATIONS`` entry (6 times the cost), on the original images first, whose
      scores pick the classes (``classes`` may be a function) and are the scores returned; the
      other five runs explain those same classes. Each run's raw maps (layer resolution) are
      un-flipped and min-max normalized per map, then averaged; the average is multiplied by
      the mean of the runs' peak values. Normalizing first is what pytorch-grad-cam does
      (it averages maps scaled to [0, 1]): each augmentation counts the same, where raw
      values would let the brighter inputs (x 1.1) weigh more. The multiplication keeps raw
      maps in their method's units, so peaks and a scale shared between classes still mean
      something. Bilinear upsampling commutes with the flip and the mean, so the normalized
      maps are those of pytorch-grad-cam up to its per-augmentation renormalization at input
      size.
    * ``"aug+eigen"``: both: the augmented runs use eigen smoothing.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {unknown[0] if unknown else None!r}; choose from "
                         f"{', '.join(METHODS)}")
    if smooth is not None and smooth not in SMOOTHING:
        raise ValueError(f"unknown smoothing {smooth!r}; choose from {', '.join(SMOOTHING)} "
                         f"or None")
    chosen = {name: METHODS[name] for name in dict.fromkeys(methods)}
    without = [name for name, m in chosen.items() if not m.uses_gradients]
    if counterfactual and without:
        raise ValueError(f"{without[0]} uses no gradients, so it has no counterfactual form")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if len(layers) == 0:
        raise ValueError("layers is empty: give at least one target module")
    if isinstance(classes, torch.Tensor):
        check_classes(classes, images.shape[0])
    eigen = smooth in ("eigen", "aug+eigen")
    if smooth in ("aug", "aug+eigen"):
        scores, raw_maps = _augmented(model, images, layers, classes, chosen, counterfactual,
                                      batch_size, progress, head, eigen)
    else:
        scores, _, raw_maps = _raw_maps(model, images, layers, classes, chosen,
                                        counterfactual, batch_size, progress, head, eigen)
    if raw:
        return scores, raw_maps
    return scores, {name: upsample_and_normalize(maps, images.shape[-2:])
                    for name, maps in raw_maps.items()}


def _raw_maps(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
              classes: ClassChoice, chosen: dict, counterfactual: bool, batch_size: int,
              progress, head: Head, eigen: bool):
    """One run of the engine: ``(scores, classes, {method: [raw maps per layer]})``."""
    recorder = _ActivationRecorder(len(layers))
    raw_maps: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model), torch.inference_mode(False):
        # The tracer's hooks come after the recorder's, so they see what flows downstream.
        known = _known_layouts(model, images, layers)
        tracer = None if known is not None or all(channels_first_by_type(m) for m in layers) \
            else LayoutTracer(images)
        with _forward_hooks(layers, recorder), _tracing(model, tracer), torch.no_grad():
            scores = head.scores(model(images))
            classes = _classes_for(scores, classes, images.shape[0])
            missing = [i for i, a in enumerate(recorder.activations) if a is None]
            if missing:
                raise ValueError(f"target layer(s) {missing} did not run in the forward pass")
            activations = list(recorder.activations)
            layouts = known or _target_layouts(layers, activations, tracer)
            if tracer is not None:
                _remember_layouts(model, images, layers, layouts)
            grids = [layout.to_grid(a.detach()) for layout, a in zip(layouts, activations)]
            with_gradients = {name: m for name, m in chosen.items() if m.uses_gradients}
            if with_gradients:
                sign = -1.0 if counterfactual else 1.0
                per_class = _gradients_per_class(scores, activations, classes)
                for layer, layout in enumerate(layouts):
                    gradients = [sign * layout.to_grid(grads[layer]) for grads in per_class]
                    for name, m in with_gradients.items():
                        raw_maps.setdefault(name, []).append(torch.stack(
                            [combine(m.from_gradients(grids[layer], g), grids[layer], eigen)
                             for g in gradients], dim=1).float())
            for name, m in chosen.items():
                if m.from_activations is not None:  # one map for all K classes
                    raw_maps[name] = [m.from_activations(grid).float().unsqueeze(1)
                                      .repeat(1, classes.shape[1], 1, 1) for grid in grids]
        scores = scores.detach()
        for name, m in chosen.items():  # after the hooks are gone: plain inference passes
            if not m.runs_own_passes:
                continue
            per_layer = []
            for module, layout, grid in zip(layers, layouts, grids):
                with torch.no_grad():
                    if m.from_scores is not None:
                        weights = m.from_scores(model, images, grid, classes,
                                                batch_size=batch_size, progress=progress,
                                                head=head)
                    else:
                        weights = m.from_ablation(model, images, grid, classes, scores=scores,
                                                  module=module, layout=layout,
                                                  batch_size=batch_size, progress=progress,
                                                  head=head)
                    per_layer.append(class_maps(weights, grid, eigen).float())
            raw_maps[name] = per_layer
    return scores, classes, {name: raw_maps[name] for name in chosen}


def _augmented(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
               classes: ClassChoice, chosen: dict, counterfactual: bool, batch_size: int,
               progress, head: Head, eigen: bool):
    """``smooth="aug"`` (see ``explain_methods``): ``(scores, {method: [raw maps]})``."""
    order = [(False, 1.0)] + [a for a in AUGMENTATIONS if a != (False, 1.0)]
    shapes: dict[str, list[torch.Tensor]] = {}
    peaks: dict[str, list[torch.Tensor]] = {}
    scores = None
    for step, (flip, factor) in enumerate(order):
        if step == 0:
            augmented = images
        else:
            augmented = images * factor
            augmented = augmented.flip(-1) if flip else augmented
        step_progress = None if progress is None else (
            lambda done, total, step=step: progress(step * total + done, len(order) * total))
        step_scores, step_classes, maps = _raw_maps(model, augmented, layers, classes, chosen,
                                                    counterfactual, batch_size, step_progress,
                                                    head, eigen)
        if step == 0:  # the original images: their scores and classes hold for every run
            scores, classes = step_scores, step_classes
        for name, per_layer in maps.items():
            for layer, layer_maps in enumerate(per_layer):
                layer_maps = layer_maps.flip(-1) if flip else layer_maps
                shape = normalize_maps(layer_maps)
                peak = layer_maps.amax(dim=(-2, -1), keepdim=True)
                if step == 0:
                    shapes.setdefault(name, []).append(shape)
                    peaks.setdefault(name, []).append(peak)
                else:
                    shapes[name][layer] += shape
                    peaks[name][layer] += peak
    count = float(len(order))
    return scores, {name: [(shape / count) * (peak / count)
                           for shape, peak in zip(shapes[name], peaks[name])]
                    for name in chosen}


@contextlib.contextmanager
def _tracing(model: nn.Module, tracer: LayoutTracer | None) -> Iterator[None]:
    """Let ``tracer`` watch every submodule's output for the block (nothing if None)."""
    if tracer is None:
        yield
        return
    with _forward_hooks([m for name, m in model.named_modules() if name], tracer):
        yield


# Layouts already found for a model, by input shape and target modules, so that the later
# batches of a run skip the layout pass. Weak references only: nothing is kept alive.
_LAYOUTS_FOUND: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _known_layouts(model: nn.Module, images: torch.Tensor,
                   layers: Sequence[nn.Module]) -> list[Layout] | None:
    entry = _LAYOUTS_FOUND.get(model, {}).get(tuple(images.shape))
    if entry is None or len(entry[0]) != len(layers) \
            or any(ref() is not module for ref, module in zip(entry[0], layers)):
        return None
    return entry[1]


def _remember_layouts(model: nn.Module, images: torch.Tensor, layers: Sequence[nn.Module],
                      layouts: list[Layout]) -> None:
    refs = [weakref.ref(module) for module in layers]
    _LAYOUTS_FOUND.setdefault(model, {})[tuple(images.shape)] = (refs, layouts)


def _target_layouts(layers: Sequence[nn.Module], activations: list[torch.Tensor],
                    tracer: LayoutTracer | None) -> list[Layout]:
    """Each target's layout; ValueError for one whose channel and grid axes cannot be told."""
    layouts = []
    for index, (module, activation) in enumerate(zip(layers, activations)):
        if tracer is None:
            layout = Layout(CHANNELS_FIRST, tuple(activation.shape[-2:]), activation.shape[1])
        else:
            layout = tracer.layout_of(module)
        if layout is None:
            raise ValueError(f"target layer {index} ({type(module).__name__}, output "
                             f"{tuple(activation.shape)}): cannot tell which axes are its "
                             f"channels and which its grid; layers_in_run_order lists the "
                             f"layers that can be explained")
        layouts.append(layout)
    return layouts


def upsample_and_normalize(raw_maps: Sequence[torch.Tensor], size,
                           shared: bool = False) -> torch.Tensor:
    """Raw maps (L of (B, K, h, w)) -> (L, B, K, H, W): bilinear to ``size``, then [0, 1].

    ``shared=False`` stretches each map to [0, 1] on its own; ``shared=True`` uses one scale
    for the K maps of an image at a layer, so a weak map still looks weak beside a strong one.
    """
    per_layer = [F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
                 for m in raw_maps]
    upsampled = per_layer[0].unsqueeze(0) if len(per_layer) == 1 else torch.stack(per_layer)
    if not shared:
        return normalize_maps(upsampled)
    layers, batch, classes, height, width = upsampled.shape
    joint = upsampled.reshape(layers, batch, classes * height, width)
    return normalize_maps(joint).view(layers, batch, classes, height, width)


def _classes_for(scores: torch.Tensor, classes: ClassChoice, batch_size: int) -> torch.Tensor:
    """The (B, K) classes to explain, checked against the scores of the forward pass."""
    if not isinstance(classes, torch.Tensor):
        classes = classes(scores.detach())
        check_classes(classes, batch_size)
    if classes.max() >= scores.shape[1] or classes.min() < 0:
        raise ValueError(f"classes must lie in 0..{scores.shape[1] - 1}")
    return classes.to(scores.device).long()


def _gradients_per_class(scores: torch.Tensor, activations: list[torch.Tensor],
                         classes: torch.Tensor) -> list[list[torch.Tensor]]:
    """For each of the K columns of ``classes``: d y_c / d A for every target layer.

    Images in a batch are independent in eval mode, so one backward pass of
    ``sum_b scores[b, classes[b, k]]`` gives every image's own gradient; the K passes run
    batched (vmap over the grad outputs) where every op of the graph supports it. A batch of
    one image takes the K passes one by one, each from a scalar: torch's check of explicit grad
    outputs, and vmap, cost about a second of imports (sympy, functorch) on first use, which a
    single image never wins back. The gradients are the same either way.
    """
    n_classes = classes.shape[1]
    if not scores.requires_grad:  # no target layer reaches the scores: every gradient is 0
        warnings.warn("no target layer reaches the class scores (a dead branch, or a no_grad "
                      "block inside the model): every map is zero", RuntimeWarning,
                      stacklevel=2)
        return [[torch.zeros_like(a) for a in activations] for _ in range(n_classes)]
    selectors = torch.zeros((n_classes,) + tuple(scores.shape), dtype=scores.dtype,
                            device=scores.device)
    selectors.scatter_(2, classes.t().unsqueeze(2), 1.0)
    if n_classes > 1 and scores.shape[0] > 1:
        try:  # all K backward passes as one batched pass: fewer, bigger kernels
            grads = torch.autograd.grad(scores, activations, grad_outputs=selectors,
                                        retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            return [[torch.zeros_like(a) if g is None else g[k]
                     for a, g in zip(activations, grads)] for k in range(n_classes)]
        except RuntimeError:  # an op without a batching rule: one pass per class
            pass
    per_class = []
    for k in range(n_classes):
        with torch.enable_grad():  # d/dscores of this sum is selectors[k], exactly
            selected = (scores * selectors[k]).sum()
        grads = torch.autograd.grad(selected, activations, retain_graph=k < n_classes - 1,
                                    allow_unused=True)
        per_class.append([torch.zeros_like(a) if g is None else g
                          for a, g in zip(activations, grads)])
    return per_class


@dataclass(frozen=True)
class ConvLayer:
    """A module found in a model: its qualified name, the module, its output shape, whether
    it is a Conv2d (only those get a backcount), and the layout it is explained in (None: its
    channel and grid axes cannot be told apart, so it cannot be explained)."""

    name: str
    module: nn.Module
    output_shape: tuple[int, ...]
    is_conv: bool = True
    layout: Layout | None = None


def layers_in_run_order(model: nn.Module, example: torch.Tensor
                        ) -> tuple[list[ConvLayer], torch.Tensor]:
    """Every submodule with a 4-D output, or a token output (B, T, D) on a patch grid, in the
    order of its last call in a forward pass, each with its layout.

    Returns the layers (the last to run is last) and the model's class scores for
    ``example`` (``heads.class_scores``: ``OutputError`` when its output holds none).
    A module that never runs is left out; one that runs twice is counted once, at its last
    call. Runs under ``no_grad`` (not inference mode), so lazy modules get ordinary weights.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    modules = [module for _, module in named]
    names = [name for name, _ in named]
    order: OrderedDict[int, ConvLayer] = OrderedDict()
    tracer = LayoutTracer(example)

    def record(index: int, module: nn.Module, inputs, output) -> None:
        layout = tracer.observe(module, inputs, output)
        if isinstance(output, torch.Tensor) and (output.dim() == 4 or layout is not None):
            order.pop(index, None)
            order[index] = ConvLayer(names[index], module, tuple(output.shape),
                                     isinstance(module, nn.Conv2d), layout)

    with eval_mode(model), _forward_hooks(modules, record), torch.no_grad():
        output = model(example)
    return list(order.values()), class_scores(output)


def conv_layers_in_run_order(model: nn.Module, example: torch.Tensor
                             ) -> tuple[list[ConvLayer], torch.Tensor]:
    """Every ``nn.Conv2d`` (subclasses too) in the order of its last call in a forward pass.

    Returns the layers (the last to run is last) and the model's scores for ``example``.
    A conv that never runs is left out; one that runs twice is counted once, at its last call.
    """
    layers, scores = layers_in_run_order(model, example)
    return [layer for layer in layers if layer.is_conv], scores
