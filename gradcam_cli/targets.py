"""The layers a run explains: chosen by --layer name or --conv2d_backcount, or a
transformer's default layer, and the listing --list_layers prints."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass

from torch import nn

from .errors import UsageError
from .layer_layouts import explainable_near, is_patch_embedding, transformer_default


@dataclass(frozen=True)
class Target:
    """A layer to explain: its tag (in file names and npz keys), name, module and backcount;
    ``transformer_default`` when it was chosen as a transformer's default layer."""

    tag: str
    name: str
    module: nn.Module
    backcount: int | None = None
    transformer_default: bool = False

    def describe(self) -> str:
        if self.transformer_default:
            return f"{self.name} (default layer for this transformer)"
        where = f"conv2d_backcount {self.backcount}" if self.backcount else "--layer"
        return f"{self.name} ({where})"


@dataclass(frozen=True)
class View:
    """One figure of each image: a target layer explained by one method. Its tag names its
    files, npz keys and summary.csv columns: the layer's own tag in a one-method run (as
    before methods could be combined), ``{layer tag}_{method}`` with several methods."""

    target: Target
    method: str
    tag: str

    def caption(self, n_methods: int) -> str:
        """The module's name, and the method's when a run has several."""
        return self.target.name if n_methods == 1 else f"{self.target.name}, {self.method}"


def views_of(targets: list[Target], methods: tuple[str, ...]) -> list[View]:
    """Every (layer, method) figure, layer by layer, each layer's methods in the order given."""
    return [View(t, m, t.tag if len(methods) == 1 else f"{t.tag}_{m}")
            for t in targets for m in methods]


def pick_targets(layers: list, backcounts: list[int], names: list[str] | None,
                 backcount_given: bool = True) -> list:
    """The target layers: by --layer name, else by backcount (1 = the last Conv2d to run).

    Without --conv2d_backcount, a transformer whose last Conv2d is its patch embedding is
    explained at ``transformer_default`` instead."""
    if names:
        by_name = {layer.name: layer for layer in layers}
        targets = []
        for name in names:
            if name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(f"--layer {name}: no module of that name with a 4-D or token "
                                 f"output{hint} (--list_layers prints them)")
            if by_name[name].layout is None:
                raise UsageError(f"--layer {name}: cannot tell which axes of its output "
                                 f"{by_name[name].output_shape} are channels and which the "
                                 f"image grid, so it is not explained; layers that can be: "
                                 f"{', '.join(explainable_near(layers, by_name[name]))} "
                                 f"(--list_layers shows each layer's grid)")
            targets.append(Target(f"layer-{name}", name, by_name[name].module))
        return targets
    convs = [layer for layer in layers if layer.is_conv]
    if not convs:
        raise UsageError("the model has no Conv2d layer that runs in its forward pass; "
                         "Grad-CAM needs one (or name a layer with a 4-D output with --layer)")
    if not backcount_given:
        default = transformer_default(layers)
        if default is not None:
            return [_default_target(default)]
    bad = [b for b in backcounts if not 1 <= b <= len(convs)]
    if bad:
        raise UsageError(f"--conv2d_backcount {bad[0]} is out of range: this model has "
                         f"{len(convs)} Conv2d layers, so use 1..{len(convs)} "
                         f"(--list_layers prints them)")
    for b in backcounts:
        conv = convs[len(convs) - b]
        if backcount_given and is_patch_embedding(layers, conv):
            default = transformer_default(layers)
            better = f"; the default for this model is {default.name}" if default else ""
            print(f"warning: --conv2d_backcount {b} is {conv.name}, the patch embedding that "
                  f"feeds the transformer blocks: its map shows edges, not evidence{better}",
                  file=sys.stderr)
    return [Target(f"layer{b}", convs[len(convs) - b].name, convs[len(convs) - b].module, b)
            for b in backcounts]


def _default_target(layer):
    """A Target for the transformer default layer, described as such in figure headings."""
    return Target(f"layer-{layer.name}", layer.name, layer.module, transformer_default=True)


def print_layers(layers: list, default=None) -> None:
    """Every module with a 4-D or token output in run order; Conv2d layers carry their
    backcount. Layers not laid out as (B, C, H, W) say which grid they are explained on."""
    n_convs = sum(layer.is_conv for layer in layers)
    width = max(len(layer.name) for layer in layers)
    print(f"{'backcount':>9}  {'layer':<{width}}  {'type':<24}  output shape")
    seen = 0
    for layer in layers:
        seen += layer.is_conv
        backcount = str(n_convs - seen + 1) if layer.is_conv else "-"
        kind = type(layer.module).__name__
        line = f"{backcount:>9}  {layer.name:<{width}}  {kind:<24}  {tuple(layer.output_shape)}"
        if layer.layout is None:
            line += "  not explained: channel and grid axes cannot be told apart"
        elif layer.layout.kind != "channels-first":
            line += f"  explained as {layer.layout.describe()}"
        if default is not None and layer.name == default.name:
            line += "  <- default"
        print(line)
