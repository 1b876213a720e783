"""Which axes of a layer's output are its channels and which its image grid.

Grad-CAM needs activations laid out as (B, C, h, w). CNN layers give that directly. Transformer
layers do not:

* **tokens** (B, T, D), T = k + h*w: ViT-style sequences with k <= 4 leading special tokens
  (class, distillation, register) and h*w patch tokens in row-major order. They are explained
  on the h x w grid: the special tokens are dropped and the rest reshaped.
* **channels-last** (B, h, w, C): Swin stages, the inside of ConvNeXt blocks after a Permute.

The layout of a layer is decided from evidence gathered in a forward pass, never from the shape
alone, because (B, 56, 56, 96) and (B, 96, 56, 56) look alike to a reshape:

1. the model input is channels-first;
2. module types that fix the layout: convolutions, 2-D batch norms and pools give
   channels-first; ``nn.Linear`` and ``nn.LayerNorm`` act on the last axis, so a 4-D output of
   theirs is channels-last (a LayerNorm subclass counts by the axis its ``normalized_shape``
   matches); a torchvision ``Permute`` maps its input's layout through its dims;
3. a module that returns a tensor already seen, or one of the same shape as an input of known
   layout (an activation, a dropout, a residual block), keeps that layout;
4. with no such evidence (an output made by plain tensor code), a reading is taken only when its
   grid is one already seen in the pass and the other reading's grid is not.

Every reading must also give a grid that fits the image: one seen before, or the image size
divided by a whole stride. Evidence that disagrees, or a grid that fits neither way, leaves the
layer unexplained (``None``): the tool refuses it rather than draw a map of the wrong axes.
Re-laying out is pure re-indexing, so the CAM of the re-laid-out activation and gradient is
exactly the CAM at that layer.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Layout", "LayoutTracer", "channels_first_by_type", "MAX_SPECIAL_TOKENS",
           "is_patch_embedding", "transformer_default", "explainable_near"]

MAX_SPECIAL_TOKENS = 4
CHANNELS_FIRST, CHANNELS_LAST, TOKENS = "channels-first", "channels-last", "tokens"

# Modules whose 4-D output is (B, C, H, W) by definition of the operation.
_CHANNELS_FIRST_TYPES: tuple[type, ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.SyncBatchNorm)
# Modules that act on the last axis: a 4-D output of theirs is (B, H, W, C).
_LAST_AXIS_TYPES: tuple[type, ...] = (nn.Linear,)


def _is_permute(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's ``Permute``. Looked up among the loaded modules, not
    imported: a model holding one has loaded it, and importing torchvision costs seconds of
    start-up that a model without it (the built-in one) should not pay."""
    misc = sys.modules.get("torchvision.ops.misc")
    return misc is not None and isinstance(module, getattr(misc, "Permute", ()))


@dataclass(frozen=True)
class Layout:
    """How a layer's output maps to (B, C, h, w): its kind, grid, channels, special tokens."""

    kind: str
    grid: tuple[int, int]
    channels: int
    special: int = 0

    def to_grid(self, tensor: torch.Tensor) -> torch.Tensor:
        """The (B, C, h, w) view of an output (or of its gradient) of this layout."""
        if self.kind == CHANNELS_FIRST:
            return tensor
        if self.kind == CHANNELS_LAST:
            return tensor.permute(0, 3, 1, 2)
        height, width = self.grid
        patches = tensor[:, self.special:]
        return patches.reshape(tensor.shape[0], height, width, tensor.shape[-1]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        """'14x14 (tokens, 1 special)', '7x7 (channels-last)' or '56x56'."""
        grid = f"{self.grid[0]}x{self.grid[1]}"
        if self.kind == TOKENS:
            return f"{grid} (tokens, {self.special} special)"
        if self.kind == CHANNELS_LAST:
            return f"{grid} (channels-last)"
        return grid


def channels_first_by_type(module: nn.Module) -> bool:
    """True for modules whose 4-D output is channels-first by definition (Conv2d, ...)."""
    return isinstance(module, _CHANNELS_FIRST_TYPES)


def _reading(kind: str, shape: tuple[int, ...]) -> Layout:
    if kind == CHANNELS_FIRST:
        return Layout(kind, (shape[2], shape[3]), shape[1])
    return Layout(kind, (shape[1], shape[2]), shape[3])


class LayoutTracer:
    """Forward hook for every module of a model: the layout of each module's output.

    ``layout_of(module)`` is the layout at the module's last call (None: not explainable).
    Tensors are remembered through weak references only, so nothing is kept alive.
    """

    def __init__(self, images: torch.Tensor) -> None:
        self.batch = images.shape[0]
        self.image = (images.shape[-2], images.shape[-1])
        self.known_grids: set[tuple[int, int]] = {self.image}
        self._tensors: dict[int, tuple[weakref.ref, Layout]] = {}
        self._by_module: dict[int, Layout | None] = {}
        self._remember(images, Layout(CHANNELS_FIRST, self.image, images.shape[1]))

    def __call__(self, index: int, module: nn.Module, inputs, output) -> None:
        self.observe(module, inputs, output)

    def layout_of(self, module: nn.Module) -> Layout | None:
        return self._by_module.get(id(module))

    def observe(self, module: nn.Module, inputs, output) -> Layout | None:
        """Decide, remember and return the layout of one call's output."""
        layout = None
        if isinstance(output, torch.Tensor) and output.dim() in (3, 4) \
                and output.shape[0] == self.batch:
            known_inputs = [(t, self._label(t)) for t in inputs if isinstance(t, torch.Tensor)]
            known_inputs = [(t, label) for t, label in known_inputs if label is not None]
            if output.dim() == 4:
                layout = self._four_d(module, known_inputs, output)
            else:
                layout = self._tokens(known_inputs, output)
        if layout is not None:
            self.known_grids.add(layout.grid)
            self._remember(output, layout)
        self._by_module[id(module)] = layout
        return layout

    # ------------------------------------------------------------------ evidence

    def _four_d(self, module: nn.Module, known_inputs, output: torch.Tensor
                ) -> Layout | None:
        shape = tuple(output.shape)
        if channels_first_by_type(module):  # defined by the operation: no grid check
            return _reading(CHANNELS_FIRST, shape)
        evidence: set[str] = set()
        same = self._label(output)
        if same is not None and same.kind != TOKENS:
            evidence.add(same.kind)
        if _is_permute(module):
            evidence |= self._permuted(module, known_inputs)
        else:
            evidence |= self._last_axis(module, shape)
            evidence |= {label.kind for t, label in known_inputs
                         if tuple(t.shape) == shape and label.kind != TOKENS}
        if len(evidence) > 1 or not evidence <= {CHANNELS_FIRST, CHANNELS_LAST}:
            return None  # conflicting evidence, or a permute to some other order
        if evidence:
            layout = _reading(evidence.pop(), shape)
            return layout if self._fits(layout.grid) else None
        readings = [_reading(kind, shape) for kind in (CHANNELS_FIRST, CHANNELS_LAST)]
        fitting = [layout for layout in readings if layout.grid in self.known_grids]
        return fitting[0] if len(fitting) == 1 else None

    @staticmethod
    def _last_axis(module: nn.Module, shape: tuple[int, ...]) -> set[str]:
        """Linear and LayerNorm work on the last axis; a LayerNorm subclass that normalizes
        the channel axis instead (torchvision's and timm's LayerNorm2d) is channels-first."""
        if isinstance(module, _LAST_AXIS_TYPES):
            return {CHANNELS_LAST}
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            size = module.normalized_shape[0]
            if type(module) is nn.LayerNorm:
                return {CHANNELS_LAST}
            if size == shape[3] and size != shape[1]:
                return {CHANNELS_LAST}
            if size == shape[1] and size != shape[3]:
                return {CHANNELS_FIRST}
        return set()

    @staticmethod
    def _permuted(module: nn.Module, known_inputs) -> set[str]:
        dims = list(getattr(module, "dims", ()))
        axes = {CHANNELS_FIRST: "bchw", CHANNELS_LAST: "bhwc"}
        found = set()
        for _, label in known_inputs:
            if label.kind in axes and sorted(dims) == [0, 1, 2, 3]:
                moved = "".join(axes[label.kind][d] for d in dims)
                found |= {kind for kind, order in axes.items() if order == moved} or {"other"}
        return found or {"unknown"}

    def _tokens(self, known_inputs, output: torch.Tensor) -> Layout | None:
        shape = tuple(output.shape)
        same = self._label(output)
        if same is not None:
            return same if same.kind == TOKENS else None
        for t, label in known_inputs:
            if tuple(t.shape) == shape and label.kind == TOKENS:
                return label
            if label.kind == CHANNELS_FIRST and t.dim() == 4 \
                    and shape == (t.shape[0], t.shape[1], t.shape[2] * t.shape[3]):
                return None  # (B, C, h*w): channels first, not tokens
        count, width = shape[1], shape[2]
        found = []
        for special in range(0, MAX_SPECIAL_TOKENS + 1):
            grid = self._grid_of(count - special)
            if grid is not None:
                found.append(Layout(TOKENS, grid, width, special))
        return found[0] if len(found) == 1 else None

    def _grid_of(self, n_patches: int) -> tuple[int, int] | None:
        """The grid of ``n_patches`` tokens: one seen before, or the image's shape at a whole
        stride; at least 2 x 2."""
        if n_patches < 4:
            return None
        seen = [g for g in self.known_grids if g[0] * g[1] == n_patches and min(g) >= 2]
        if len(seen) == 1:
            return seen[0]
        height, width = self.image
        side = math.sqrt(n_patches * height / width)
        for rows in {math.floor(side), math.ceil(side)}:
            if rows >= 2 and n_patches % rows == 0 and self._fits((rows, n_patches // rows)):
                return rows, n_patches // rows
        return None

    def _fits(self, grid: tuple[int, int]) -> bool:
        """A grid seen in this pass, or the image size divided by one whole stride."""
        if grid in self.known_grids:
            return True
        rows, cols = grid
        height, width = self.image
        if not (1 <= rows <= height and 1 <= cols <= width):
            return False
        for stride in {max(1, math.floor(height / rows)), math.ceil(height / rows)}:
            if rows in (height // stride, -(-height // stride)) \
                    and cols in (width // stride, -(-width // stride)):
                return True
        return False

    # ------------------------------------------------------------------ tensors seen

    def _remember(self, tensor: torch.Tensor, layout: Layout) -> None:
        self._tensors[id(tensor)] = (weakref.ref(tensor), layout)

    def _label(self, tensor: torch.Tensor) -> Layout | None:
        entry = self._tensors.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]


# ----------------------------------------------------------------------------- default layer
# These work on the layers of ``gradcam.layers_in_run_order`` (name, module, is_conv, layout).

def is_patch_embedding(layers: list, conv) -> bool:
    """A Conv2d that cuts the image into patches (kernel = stride) and feeds transformer
    blocks: layers with token or channels-last outputs run after it."""
    module = conv.module
    if tuple(module.kernel_size) != tuple(module.stride):
        return False
    after = _layers_after(layers, conv)
    return any(layer.layout is not None and layer.layout.kind in (TOKENS, CHANNELS_LAST)
               for layer in after)


def _layers_after(layers: list, layer) -> list:
    """The layers that run after ``layer``."""
    position = next(i for i, other in enumerate(layers) if other is layer)
    return layers[position + 1:]


def transformer_default(layers: list):
    """The layer a transformer is explained at by default, or None for other models.

    Only when the last Conv2d is a patch embedding. ViT-style models (tokens with a class
    token): the first LayerNorm of the last block. At the last block's output only the class
    token reaches the head, so the patch tokens' gradients there are all zero; the last
    block's first norm feeds its attention, where the class token reads every patch token.
    Models whose head pools the whole grid (Swin): the last normalized grid before the head.
    """
    convs = [layer for layer in layers if layer.is_conv]
    if not convs or not is_patch_embedding(layers, convs[-1]):
        return None
    after = _layers_after(layers, convs[-1])
    with_class_token = [layer for layer in after if layer.layout is not None
                        and layer.layout.kind == TOKENS and layer.layout.special > 0]
    if with_class_token:
        norms: dict[str, list] = {}
        for layer in with_class_token:
            if isinstance(layer.module, nn.LayerNorm):
                norms.setdefault(layer.name.rpartition(".")[0], []).append(layer)
        blocks = [group for group in norms.values() if len(group) >= 2]  # norm1 + norm2
        return blocks[-1][0] if blocks else None
    grids = [layer for layer in after if layer.layout is not None
             and layer.layout.grid[0] * layer.layout.grid[1] > 1]
    normed = [layer for layer in grids if isinstance(layer.module, nn.LayerNorm)]
    return (normed or grids or [None])[-1]


def explainable_near(layers: list, layer, count: int = 3) -> list[str]:
    """Names of up to ``count`` explainable layers nearest to ``layer`` in run order."""
    position = layers.index(layer)
    ranked = sorted((abs(i - position), i) for i, other in enumerate(layers)
                    if other.layout is not None)
    return [layers[i].name for _, i in sorted(ranked[:count], key=lambda pair: pair[1])]
