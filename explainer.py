"""What is explained for each image, and how one batch becomes figures, raw maps and rows.

``ClassPlan`` decides which classes each image's panels explain (top-3 + lowest by default, or
the classes the user named, plus the folder's own class on request). ``Explainer`` runs the
engine on a batch, then writes each image's figure per layer, its raw maps and its summary row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

import outputs
from cam_methods import METHODS
from gradcam import explain, top_and_lowest, upsample_and_normalize
from figures import (FigureWriter, display_available, format_probability, guided_to_rgb,
                     show_figure)
from utils import ImageEntry, first_name

TOP = 3


@dataclass(frozen=True)
class Target:
    """A layer to explain: its tag (in file names and npz keys), name, module and backcount."""

    tag: str
    name: str
    module: nn.Module
    backcount: Optional[int] = None

    def describe(self) -> str:
        where = f"conv2d_backcount {self.backcount}" if self.backcount else "--layer"
        return f"{self.name} ({where})"


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain: the method and its variants, the classes, the scale, the metrics."""

    method: str = "gradcam"
    counterfactual: bool = False
    guided: bool = False
    classes: Optional[tuple[int, ...]] = None
    true_class: bool = False
    shared_scale: bool = False
    metrics: bool = False
    score_batch_size: int = 64
    n_classes: int = 1000


class ClassPlan:
    """Which classes the panels of every image explain, and how their titles read."""

    def __init__(self, options: ExplainOptions) -> None:
        self.fixed = list(options.classes) if options.classes else None
        self.true_class = options.true_class
        self.counterfactual = options.counterfactual
        self.top = min(TOP, options.n_classes)
        base = ([f"class{i + 1}" for i in range(len(self.fixed))] if self.fixed
                else [f"top{r + 1}" for r in range(self.top)] + ["lowest"])
        self.ranks = base + (["true"] if self.true_class else [])

    @property
    def is_top(self) -> bool:
        return self.fixed is None

    def choose(self, scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(B, K) classes; an unknown true class (-1) falls back to the top-1 class."""
        if self.fixed:
            chosen = torch.tensor(self.fixed, device=scores.device).expand(scores.shape[0], -1)
        else:
            chosen = top_and_lowest(scores, self.top)
        if self.true_class:
            truth = truth.to(scores.device)
            fallback = scores.argmax(dim=1)
            chosen = torch.cat([chosen, torch.where(truth >= 0, truth, fallback)[:, None]], 1)
        return chosen

    def titles(self, labels: list[str], classes: list[int], probabilities: list[float],
               truth_known: bool, peaks: Optional[list[float]] = None) -> list[str]:
        """'1. tabby 16.1%', 'lowest: ...', 'true: ...'; 'against' marks counterfactuals."""
        titles = []
        for rank, c, p in zip(self.ranks, classes, probabilities):
            if rank == "lowest":
                prefix = "lowest:"
            elif rank == "true":
                prefix = "true:" if truth_known else "true ? (folder not a label), top-1:"
            elif rank.startswith("top"):
                prefix = f"{rank[3:]}."
            else:
                prefix = ""
            against = "against " if self.counterfactual else ""
            title = f"{prefix} {against}{first_name(labels[c])} {format_probability(p)}"
            titles.append(title.strip())
        if peaks is not None:
            titles = [f"{t} (peak {peak:.3g})" for t, peak in zip(titles, peaks)]
        return titles


def figure_name(index: int, tag: str, n_layers: int, n_images: int) -> str:
    """image{i}.jpg for one layer, layer{b}.jpg for several on one image, else both."""
    if n_layers == 1:
        return f"image{index}.jpg"
    if n_images == 1:
        return f"{tag}.jpg"
    return f"image{index}_{tag}.jpg"


def outputs_of(entry: ImageEntry, save_dir: Path, tags: list[str], n_images: int,
               save_raw: bool) -> list[Path]:
    """Every file an image produces: its figures (one per layer), then its raw npz."""
    paths = [save_dir / figure_name(entry.index, tag, len(tags), n_images) for tag in tags]
    if save_raw:
        paths.append(outputs.raw_path(save_dir, entry.index))
    return paths


class Explainer:
    """Turns one batch of images into figures, raw maps and summary rows."""

    def __init__(self, model: nn.Module, targets: list[Target], labels: list[str],
                 options: ExplainOptions, settings, panel: int, log: outputs.SummaryLog,
                 class_of_folder, score_progress=None) -> None:
        self.model = model
        self.targets = targets
        self.labels = labels
        self.options = options
        self.plan = ClassPlan(options)
        self.settings = settings
        self.class_of_folder = class_of_folder
        self.score_progress = score_progress
        self.figures = FigureWriter(n_maps=len(self.plan.ranks), panel=panel,
                                    guided_row=options.guided)
        self.log = log
        if options.method == "scorecam" and any(isinstance(t.module, nn.Conv2d)
                                                for t in targets):
            print("warning: Score-CAM weights channels by class probabilities, all positive, "
                  "so on a conv's signed output its maps are often zero; a layer after the "
                  "activation suits it better (e.g. --layer with a ReLU's name from "
                  "--list_layers)", file=sys.stderr)
        self.show = settings.show
        if self.show and not display_available():
            print("warning: --show: no display available; figures are saved but not shown",
                  file=sys.stderr)
            self.show = False

    def explain(self, entries: list[ImageEntry], shown: list[np.ndarray],
                inputs: torch.Tensor) -> None:
        options = self.options
        truth = torch.tensor([self.class_of_folder(e.folder_label) for e in entries])
        scores, raw_maps = explain(
            self.model, inputs, [t.module for t in self.targets],
            lambda s: self.plan.choose(s, truth), method=options.method,
            counterfactual=options.counterfactual, raw=True,
            batch_size=options.score_batch_size, progress=self.score_progress)
        classes = self.plan.choose(scores, truth)
        maps = upsample_and_normalize(raw_maps, inputs.shape[-2:], shared=options.shared_scale)
        probabilities = torch.softmax(scores.float(), dim=1).gather(1, classes)
        guided = self._guided(inputs, classes, maps) if options.guided else None
        if options.metrics:  # faithfulness is measured on each map's own [0, 1] scale
            per_map = (upsample_and_normalize(raw_maps, inputs.shape[-2:])
                       if options.shared_scale else maps)
            metrics = self._metrics(inputs, classes, per_map)
        else:
            metrics = None
        peaks = torch.stack([m.amax(dim=(2, 3)) for m in raw_maps]).cpu().numpy()
        maps, classes = maps.cpu().numpy(), classes.cpu().numpy()
        probabilities = probabilities.cpu().numpy()
        raw = [m.cpu().numpy() for m in raw_maps] if self.settings.save_raw else None
        for b, entry in enumerate(entries):
            self._write_image(entry, shown[b], maps[:, b], classes[b], probabilities[b],
                              None if raw is None else [m[b] for m in raw],
                              peaks=peaks[:, b], truth_known=bool(truth[b] >= 0),
                              guided=None if guided is None else guided[:, b],
                              metrics=None if metrics is None else metrics[:, b])

    def _guided(self, inputs: torch.Tensor, classes: torch.Tensor,
                maps: torch.Tensor) -> np.ndarray:
        """(L, B, K, H, W, 3) uint8: Guided Grad-CAM per layer, image and class."""
        from guided import guided_backprop, guided_grad_cam
        gradients = guided_backprop(self.model, inputs, classes)
        return np.stack([guided_to_rgb(guided_grad_cam(gradients, layer_maps).cpu().numpy())
                         for layer_maps in maps])

    def _metrics(self, inputs: torch.Tensor, classes: torch.Tensor,
                 maps: torch.Tensor) -> np.ndarray:
        """(L, B, K, 4): deletion AUC, insertion AUC, average drop %, increase (0/1)."""
        from metrics import faithfulness
        per_layer = []
        for layer_maps in maps:
            scores = faithfulness(self.model, inputs, layer_maps, classes,
                                  batch_size=self.options.score_batch_size)
            per_layer.append(torch.stack([scores.deletion_auc, scores.insertion_auc,
                                          scores.average_drop, scores.increase], dim=-1))
        return torch.stack(per_layer).float().cpu().numpy()

    def heading(self, target: Target) -> str:
        kind = "Counterfactual " if self.options.counterfactual else ""
        return f"{kind}{METHODS[self.options.method].name} at {target.describe()}"

    def _write_image(self, entry: ImageEntry, shown: np.ndarray, maps: np.ndarray,
                     classes: np.ndarray, probabilities: np.ndarray,
                     raw_maps: Optional[list[np.ndarray]], peaks: np.ndarray,
                     truth_known: bool, guided: Optional[np.ndarray],
                     metrics: Optional[np.ndarray]) -> None:
        settings = self.settings
        tags = [t.tag for t in self.targets]
        paths = outputs_of(entry, settings.save_dir, tags, settings.n_selected,
                           settings.save_raw)
        for layer, target in enumerate(self.targets):
            titles = self.plan.titles(self.labels, classes.tolist(), probabilities.tolist(),
                                      truth_known, peaks[layer].tolist()
                                      if self.options.shared_scale else None)
            figure = self.figures.compose(shown, maps[layer], titles, entry.relative,
                                          self.heading(target),
                                          guided=None if guided is None else guided[layer])
            outputs.save_jpeg(figure, paths[layer])
            if self.show:
                show_figure(figure, paths[layer].name)
        if raw_maps is not None:
            outputs.save_raw(paths[-1], dict(zip(tags, raw_maps)), classes, probabilities)
        self.log.write(outputs.summary_row(
            entry.index, entry.relative, entry.folder_label,
            [self.labels[c] for c in classes], probabilities.tolist(),
            [p.name for p in paths[:len(tags)]],
            outputs.extra_values(peaks, metrics)))
