"""Guided backpropagation and Guided Grad-CAM (pure torch).

Guided backpropagation (Springenberg et al. 2015, "Striving for Simplicity: The All
Convolutional Net", arXiv 1412.6806) is the gradient of a class score y_c with respect to the
input image, with the backward rule of every ReLU replaced by

    grad_in = grad_out  where (ReLU input > 0) and (grad_out > 0),  else 0

so only evidence that increases y_c through active units reaches the pixels. Guided Grad-CAM
(Selvaraju et al., arXiv 1610.02391) multiplies it by the Grad-CAM map upsampled to the image:
fine-grained detail from the former, class-discriminative localisation from the latter.

How the ReLUs are found: during the one forward pass a ``torch.overrides.TorchFunctionMode``
intercepts every ReLU-like call and runs it through ``_GuidedReLU``, an autograd Function whose
forward is the normal op and whose backward is the guided rule. The user's model is left
exactly as found: no module is replaced, no attribute changed, no hook registered, every
training flag is restored (``gradcam.eval_mode``), ``requires_grad`` is never touched and no
``.grad`` is filled (gradients come from ``torch.autograd.grad`` with respect to a copy of the
images). The mode is pushed for the forward pass only and popped in a ``finally``, after an
exception too.

Caught (when the input requires grad and grad mode is on, i.e. on the path to the scores):

* ``nn.ReLU`` (also ``inplace=True``), ``F.relu``, ``torch.relu``, ``Tensor.relu``,
  ``torch.relu_``, ``F.relu_``, ``Tensor.relu_``, ``torch.ops.aten.relu`` / ``relu_``;
* ReLU6: ``nn.ReLU6`` (also ``inplace=True``), ``F.relu6``, and ``F.hardtanh`` /
  ``F.hardtanh_`` / ``nn.Hardtanh`` / ``torch.ops.aten.hardtanh`` with ``min_val == 0`` (a ReLU
  capped at ``max_val``; gradient also blocked where the input is >= ``max_val``).

Not caught (their backward stays the ordinary one): anything that does not reach Python as one
of those calls, i.e. custom C++/CUDA ops and fused kernels (e.g. quantized ``ConvReLU2d``),
TorchScript (``torch.jit.script``/``trace``) and ``torch.compile``d code, and rectifiers written
another way (``torch.clamp(x, min=0)``, ``torch.maximum(x, 0)``, ``F.threshold``,
``x * (x > 0)``). Other activations (LeakyReLU, GELU, SiLU/Swish, ...) are not ReLUs and keep
their ordinary gradient. If no ReLU is caught at all, a warning says that the result is the
plain input gradient.

In-place variants: the guided result is written back into the tensor with ``copy_`` so that
code which ignores the return value (``torch.relu_(x); use(x)``) still sees the rectified
values. Where writing back is not allowed (a leaf that requires grad, a view of one, an
inference tensor, overlapping memory, all cases where the native in-place call would raise
too), the new tensor is returned instead and the original is left unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from .gradcam import check_classes, eval_mode
from .heads import SOFTMAX, Head

__all__ = ["guided_backprop", "guided_grad_cam"]


class _GuidedReLU(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU capped at ``upper`` with the guided backward rule."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None) -> torch.Tensor:
        out = torch.relu(x) if upper is None else F.hardtanh(x, 0.0, upper)
        # The output alone decides the mask (0 < out < upper iff 0 < x < upper), as in the
        # native in-place backward; so the input may be overwritten afterwards (in-place calls).
        ctx.save_for_backward(out)
        ctx.upper = upper
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        passed = (out > 0) & (grad > 0)
        if ctx.upper is not None:
            passed &= out < ctx.upper
        return torch.where(passed, grad, 0.0), None


@dataclass(frozen=True)
class _Signature:
    """How a ReLU-like function takes its arguments: names after the input, defaults, in-place."""

    names: tuple[str, ...]
    defaults: tuple[Any, ...]
    inplace: bool | None  # fixed by the function; None: read from its ``inplace`` argument
    capped: bool  # hardtanh-like: the cap is the ``max_val`` argument (with ``min_val == 0``)
    upper: float | None = None  # a fixed cap (6 for relu6)


def _relu_signatures() -> dict[Callable, _Signature]:
    """Every function the mode guides, as it reaches ``__torch_function__``, with its arguments."""
    relu = _Signature(("inplace",), (False,), None, False)
    relu_out, relu_in = _Signature((), (), False, False), _Signature((), (), True, False)
    relu6 = _Signature(("inplace",), (False,), None, False, 6.0)
    relu6_out = _Signature((), (), False, False, 6.0)
    relu6_in = _Signature((), (), True, False, 6.0)
    hardtanh = _Signature(("min_val", "max_val", "inplace"), (-1.0, 1.0, False), None, True)
    hardtanh_out = _Signature(("min_val", "max_val"), (-1.0, 1.0), False, True)
    hardtanh_in = _Signature(("min_val", "max_val"), (-1.0, 1.0), True, True)
    aten = torch.ops.aten
    table: dict[Callable, _Signature] = {
        F.relu: relu, F.relu6: relu6,
        torch.relu: relu_out, torch.Tensor.relu: relu_out, aten.relu: relu_out,
        aten.relu.default: relu_out,
        torch.relu_: relu_in, torch.Tensor.relu_: relu_in, aten.relu_: relu_in,
        aten.relu_.default: relu_in,
        F.hardtanh: hardtanh, aten.hardtanh: hardtanh_out,
        aten.hardtanh.default: hardtanh_out,
        aten.hardtanh_: hardtanh_in, aten.hardtanh_.default: hardtanh_in,
    }
    for name, signature in (("relu6", relu6_out), ("relu6_", relu6_in),
                            ("hardtanh", hardtanh_out), ("hardtanh_", hardtanh_in)):
        function = _private_nn_function(name)
        if function is not None:
            table[function] = signature
    return table


def _private_nn_function(name: str) -> Callable | None:
    """``torch._C._nn.<name>``: what F.relu6 and F.hardtanh call, and so what a
    TorchFunctionMode sees of them (there is no public name for it). The one private torch
    name here; a torch without it loses guiding of those calls only, and
    tests/test_torch_contract.py fails loudly if it is gone."""
    return getattr(getattr(torch._C, "_nn", None), name, None)


_SIGNATURES = _relu_signatures()


@dataclass(frozen=True)
class _ReluCall:
    """One caught call: its input, its cap (None for a plain ReLU) and whether it is in place."""

    input: torch.Tensor
    upper: float | None
    inplace: bool


def _as_relu_call(func: Callable, args: tuple, kwargs: dict) -> _ReluCall | None:
    """The call as (input, cap, in-place) if ``func`` is a ReLU-like call to guide, else None."""
    try:
        signature = _SIGNATURES.get(func)
    except TypeError:  # an unhashable callable: not one of ours
        return None
    if signature is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    if len(args) - 1 > len(signature.names) or set(kwargs) - set(signature.names):
        return None  # an unexpected argument (e.g. out=): leave the call alone
    values = dict(zip(signature.names, signature.defaults))
    values.update(zip(signature.names, args[1:]))
    values.update(kwargs)
    upper = signature.upper
    if signature.capped:
        if values["min_val"] != 0:
            return None  # a hardtanh that is not a capped ReLU
        upper = float(values["max_val"])
    inplace = signature.inplace if signature.inplace is not None else bool(values["inplace"])
    return _ReluCall(args[0], upper, inplace)


def _guided_relu(call: _ReluCall) -> torch.Tensor:
    """Run one caught call through ``_GuidedReLU``; for an in-place call, write back if allowed."""
    out = _GuidedReLU.apply(call.input, call.upper)
    if not call.inplace:
        return out
    try:
        return call.input.copy_(out)
    except RuntimeError:  # refused before writing anything (leaf, inference tensor, overlap)
        return out


class _GuidedReLUMode(TorchFunctionMode):
    """While active, ReLU-like calls on tensors that need a gradient get the guided backward.

    ``caught`` counts the calls guided. Inside ``__torch_function__`` the mode is switched off,
    so the ops it runs itself are not intercepted again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.caught = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _as_relu_call(func, args, kwargs)
        if call is None or not (torch.is_grad_enabled() and call.input.requires_grad):
            return func(*args, **kwargs)
        self.caught += 1
        return _guided_relu(call)


def guided_backprop(model: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                    head: Head = SOFTMAX) -> torch.Tensor:
    """Guided-backpropagation gradients of each image's class scores with respect to the image.

    Args:
        model: the classifier; it is left exactly as it was found (see the module docstring).
        images: (B, C, H, W) float tensor, already preprocessed, on the model's device.
        classes: (B, K) integer tensor: the classes to explain for each image.
        head: how the model's output reads as class scores (see ``heads.Head``).

    Returns:
        (B, K, C, H, W), the input's dtype: d y_c / d image for c = ``classes[b, k]``, y_c the
        raw score before softmax, with every caught ReLU's backward replaced by the guided rule.

    One forward pass (model in eval mode) and K backward passes through the retained graph; one
    backward of ``sum_b y[b, classes[b, k]]`` gives every image's own gradient because images
    do not interact in eval mode.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    check_classes(classes, images.shape[0])
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        pixels = images.detach().clone().requires_grad_(True)
        with _GuidedReLUMode() as mode:
            # The model gets a non-leaf copy, so in-place ops on its input behave as usual.
            scores = head.scores(model(pixels.clone()))
        if classes.max() >= scores.shape[1] or classes.min() < 0:
            raise ValueError(f"classes must lie in 0..{scores.shape[1] - 1}")
        if mode.caught == 0:
            warnings.warn("guided backprop: no ReLU was caught in the forward pass, so the "
                          "result is the plain input gradient", stacklevel=2)
        return torch.stack(_input_gradients(scores, pixels, classes.to(scores.device).long()),
                           dim=1)


def _input_gradients(scores: torch.Tensor, pixels: torch.Tensor, classes: torch.Tensor
                     ) -> list[torch.Tensor]:
    """For each of the K columns of ``classes``: d (sum_b y[b, classes[b, k]]) / d pixels."""
    n_classes = classes.shape[1]
    if not scores.requires_grad:  # the scores do not depend on the image
        return [torch.zeros_like(pixels) for _ in range(n_classes)]
    gradients = []
    for k in range(n_classes):
        selector = torch.zeros_like(scores)
        selector.scatter_(1, classes[:, k:k + 1], 1.0)
        (gradient,) = torch.autograd.grad(scores, pixels, grad_outputs=selector,
                                          retain_graph=k < n_classes - 1, allow_unused=True)
        gradients.append(torch.zeros_like(pixels) if gradient is None else gradient)
    return gradients


def guided_grad_cam(guided: torch.Tensor, cam_maps: torch.Tensor) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop times the Grad-CAM map, pixel by pixel (Selvaraju et al.).

    Args:
        guided: (B, K, C, H, W) from ``guided_backprop``.
        cam_maps: (B, K, H, W) Grad-CAM maps for the same images and classes (e.g. one layer of
            ``grad_cam``'s output). Maps of another size (h, w), such as ``grad_cam(...,
            raw=True)``, are upsampled bilinearly to (H, W) first, as ``grad_cam`` does.

    Returns:
        (B, K, C, H, W) in ``guided``'s dtype: the map is shared by the C channels.
    """
    if guided.dim() != 5 or cam_maps.dim() != 4 or guided.shape[:2] != cam_maps.shape[:2]:
        raise ValueError(f"guided must be (B, K, C, H, W) and cam_maps (B, K, H, W) with the same "
                         f"B and K, got {tuple(guided.shape)} and {tuple(cam_maps.shape)}")
    size = tuple(guided.shape[-2:])
    cam_maps = cam_maps.to(device=guided.device, dtype=guided.dtype)
    if tuple(cam_maps.shape[-2:]) != size:
        cam_maps = F.interpolate(cam_maps, size=size, mode="bilinear", align_corners=False)
    return guided * cam_maps.unsqueeze(2)
