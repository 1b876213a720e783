"""What is explained for each image, and how one batch becomes figures, raw maps and rows.

``ClassPlan`` decides which classes each image's panels explain (top-3 + lowest by default, or
the classes the user named, plus the folder's own class on request). ``Explainer`` runs the
engine on a batch and hands back, per image, the job that writes its figures (one per layer)
and raw maps, and its summary row; a renderer (render_pool.py) does the writing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import faults, outputs
from .cam_methods import METHODS
from .faults import RunFault
from .figures import format_probability, guided_to_rgb
from .gradcam import explain_methods, top_and_lowest, upsample_and_normalize
from .handover import FigureJob, ImageJob
from .heads import HEADS
from .images import ImageEntry
from .labels import first_name
from .settings import ExplainOptions
from .targets import Target, View, views_of


class ClassPlan:
    """Which classes the panels of every image explain, and how their titles read.

    By default: the ``max_panels`` top classes, then the lowest-scoring one (left out when
    the top ones are every class, so no class is shown twice). A multi-label model shows only
    the top classes at or above its threshold (at least the most probable one, saying when
    none reaches it). A binary model shows its class and what argues against it."""

    def __init__(self, options: ExplainOptions) -> None:
        self.fixed = list(options.classes) if options.classes else None
        self.true_class = options.true_class
        self.counterfactual = options.counterfactual
        self.binary = options.head == "binary" and self.fixed is None
        self.multi_label = options.head == "sigmoid"
        self.threshold = options.threshold
        self.top = min(options.max_panels, options.n_classes)
        if self.fixed:
            base = [f"class{i + 1}" for i in range(len(self.fixed))]
        elif self.binary:
            base = ["positive", "against"]
        else:
            base = [f"top{r + 1}" for r in range(self.top)]
            base += ["lowest"] if options.n_classes > self.top else []
        self.ranks = base + (["true"] if self.true_class else [])

    @property
    def is_top(self) -> bool:
        return self.fixed is None and not self.binary

    @property
    def accuracy_top(self) -> int | None:
        """The k of the run's top-k accuracy: 1 for a binary model, None with --classes."""
        if self.binary:
            return 1
        return self.top if self.is_top else None

    def choose(self, scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(B, K) classes; an unknown true class (-1) falls back to the top-1 class."""
        batch = scores.shape[0]
        if self.fixed:
            chosen = torch.tensor(self.fixed, device=scores.device).expand(batch, -1)
        elif self.binary:  # heads.BINARY: class 1 is y, class 0 is -y (what argues against)
            chosen = torch.tensor([1, 0], device=scores.device).expand(batch, -1)
        elif "lowest" in self.ranks:
            chosen = top_and_lowest(scores, self.top)
        else:  # the top classes are all of them
            chosen = scores.topk(self.top, dim=1).indices
        if self.true_class:
            truth = truth.to(scores.device)
            fallback = scores.argmax(dim=1)
            chosen = torch.cat([chosen, torch.where(truth >= 0, truth, fallback)[:, None]], 1)
        return chosen

    def shown(self, probabilities: list[float]) -> list[bool]:
        """Which panels an image shows: a multi-label model's top classes below the threshold
        are left out, except the most probable one."""
        return [not (self.multi_label and self.is_top and rank.startswith("top")
                     and rank != "top1" and p < self.threshold)
                for rank, p in zip(self.ranks, probabilities)]

    def titles(self, labels: list[str], classes: list[int], probabilities: list[float],
               truth_known: bool, peaks: list[float] | None = None) -> list[str]:
        """'1. tabby 16.1%', 'lowest: ...', 'true: ...'; 'against' marks counterfactuals."""
        titles = []
        for rank, c, p in zip(self.ranks, classes, probabilities):
            name = first_name(labels[c])
            if rank == "against":  # a binary model: the map of -y, with P(not the class)
                titles.append(f"against {first_name(labels[1])} (not: {format_probability(p)})")
                continue
            if rank == "lowest":
                prefix = "lowest:"
            elif rank == "true":
                prefix = "true:" if truth_known else "true ? (folder not a label), top-1:"
            elif rank.startswith("top"):
                prefix = f"{rank[3:]}."
            else:
                prefix = ""
            against = "against " if self.counterfactual else ""
            title = f"{prefix} {against}{name} {format_probability(p)}"
            if rank == "top1" and self.multi_label and p < self.threshold:
                title += f" (none \u2265 {format_probability(self.threshold)})"
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


@dataclass
class BatchOutcome:
    """What became of one batch: each image's files to write with its summary row, and the
    images the model failed on, with the reason."""

    jobs: list[tuple[ImageJob, list[str]]] = field(default_factory=list)
    failed: list[tuple[ImageEntry, str]] = field(default_factory=list)


@dataclass
class _Computed:
    """The engine's results for a chunk of images, on the CPU, ready to be drawn."""

    truth: np.ndarray                  # (B,) folder class, -1 when the folder is not a label
    classes: np.ndarray                # (B, K)
    probabilities: np.ndarray          # (B, K)
    maps: np.ndarray                   # (L, B, K, H, W) uint8 colour indices
    peaks: np.ndarray                  # (L, B, K) raw peaks
    raw: list[np.ndarray] | None    # L x (B, K, h, w) raw maps, with --save_raw
    guided: np.ndarray | None       # (L, B, K, H, W, 3) uint8, with --guided
    metrics: np.ndarray | None      # (L, B, K, M), with --metrics (outputs.METRICS)
    baselines: np.ndarray | None = None  # (2, B, M): the baseline maps, first panel


class Explainer:
    """Turns one batch of images into the jobs that write their files, and their rows.

    Out of GPU memory, the batch is halved and tried again, down to one image; the smaller
    size then holds for the rest of the run, Score-CAM's and the metrics' passes included, so
    the outputs are those of that --batch_size from the start. A model that raises on a batch
    is tried image by image, and only the images it fails on are skipped."""

    def __init__(self, model: nn.Module, targets: list[Target], labels: list[str],
                 options: ExplainOptions, settings, panel: int, class_of_folder,
                 score_progress=None) -> None:
        self.model = model
        self.targets = targets
        self.views = views_of(targets, options.methods)
        self.labels = labels
        self.options = options
        self.plan = ClassPlan(options)
        self.head = HEADS[options.head]
        self.settings = settings
        self.class_of_folder = class_of_folder
        self.score_progress = score_progress
        self.layout = (len(self.plan.ranks), panel, options.guided)
        self.batch_size = settings.batch_size
        self.score_batch_size = options.score_batch_size
        self._told_batch_size = self.batch_size
        if "scorecam" in options.methods and any(isinstance(t.module, nn.Conv2d)
                                                 for t in targets):
            print("warning: Score-CAM weights channels by class probabilities, all positive, "
                  "so on a conv's signed output its maps are often zero; a layer after the "
                  "activation suits it better (e.g. --layer with a ReLU's name from "
                  "--list_layers)", file=sys.stderr)

    def explain(self, entries: list[ImageEntry], shown: list[np.ndarray],
                inputs: torch.Tensor) -> BatchOutcome:
        """Run the engine on the batch, in chunks of the current batch size."""
        outcome = BatchOutcome()
        start = 0
        while start < len(entries):
            stop = start + self.batch_size
            computed, problem = self._attempt(entries[start:stop], inputs[start:stop])
            if problem == _OUT_OF_MEMORY:
                self._halve_batch(entries[start:stop])
                continue
            self._tell_batch_size()
            if problem is None:
                outcome.jobs += self._jobs(entries[start:stop], shown[start:stop], computed)
            else:
                self._one_by_one(entries[start:stop], shown[start:stop], inputs[start:stop],
                                 problem, outcome)
            start = stop
        return outcome

    def _one_by_one(self, entries: list[ImageEntry], shown: list[np.ndarray],
                    inputs: torch.Tensor, problem: str, outcome: BatchOutcome) -> None:
        """The model raised on these images together: find which of them it fails on."""
        if len(entries) == 1:
            outcome.failed.append((entries[0], problem))
            return
        for b, entry in enumerate(entries):
            computed, problem = self._attempt([entry], inputs[b:b + 1])
            if problem == _OUT_OF_MEMORY:
                raise RunFault(f"out of GPU memory with a single image ({entry.path})")
            if problem is None:
                outcome.jobs += self._jobs([entry], shown[b:b + 1], computed)
            else:
                outcome.failed.append((entry, problem))

    def _attempt(self, entries: list[ImageEntry],
                 inputs: torch.Tensor) -> tuple[_Computed | None, str | None]:
        """(results, None), or (None, why) when the model raised or memory ran out. Nothing
        of a failed attempt is kept (no tensor, no traceback), so its memory is freed."""
        try:
            return self._compute(entries, inputs), None
        except Exception as error:
            if faults.is_helper_death(error):
                raise
            if is_out_of_memory(error):
                return None, _OUT_OF_MEMORY
            return None, f"{type(error).__name__}: {error}"

    def _halve_batch(self, entries: list[ImageEntry]) -> None:
        if len(entries) == 1:
            raise RunFault(f"out of GPU memory with a single image ({entries[0].path})")
        self.batch_size = max(1, min(self.batch_size, len(entries)) // 2)
        self.score_batch_size = min(self.score_batch_size, self.batch_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _tell_batch_size(self) -> None:
        """One line when a smaller batch has worked after running out of memory."""
        if self.batch_size < self._told_batch_size:
            print(f"warning: out of GPU memory with batches of {self._told_batch_size}; "
                  f"going on with batches of {self.batch_size} (the same outputs as "
                  f"--batch_size {self.batch_size})", file=sys.stderr)
            self._told_batch_size = self.batch_size

    def _compute(self, entries: list[ImageEntry], inputs: torch.Tensor) -> _Computed:
        options = self.options
        truth = torch.tensor([self.class_of_folder(e.folder_label) for e in entries])
        scores, by_method = explain_methods(
            self.model, inputs, [t.module for t in self.targets],
            lambda s: self.plan.choose(s, truth), options.methods,
            counterfactual=options.counterfactual, raw=True,
            batch_size=self.score_batch_size, progress=self.score_progress, head=self.head,
            smooth=options.smooth)
        layer_of = {id(t): i for i, t in enumerate(self.targets)}
        raw_maps = [by_method[v.method][layer_of[id(v.target)]] for v in self.views]
        classes = self.plan.choose(scores, truth)
        maps = upsample_and_normalize(raw_maps, inputs.shape[-2:], shared=options.shared_scale)
        probabilities = self.head.probabilities(scores).gather(1, classes)
        guided = self._guided(inputs, classes, maps) if options.guided else None
        if options.metrics:  # faithfulness is measured on each map's own [0, 1] scale
            per_map = (upsample_and_normalize(raw_maps, inputs.shape[-2:])
                       if options.shared_scale else maps)
            metrics = self._metrics(inputs, classes, per_map, entries)
            baselines = self._baseline_metrics(inputs, classes[:, :1], entries)
        else:
            metrics = baselines = None
        peaks = torch.stack([m.amax(dim=(2, 3)) for m in raw_maps]).cpu().numpy()
        return _Computed(
            truth=truth.numpy(), classes=classes.cpu().numpy(),
            probabilities=probabilities.cpu().numpy(), maps=quantise(maps).cpu().numpy(),
            peaks=peaks, raw=[m.cpu().numpy() for m in raw_maps]
            if self.settings.save_raw else None, guided=guided, metrics=metrics,
            baselines=baselines)

    def _guided(self, inputs: torch.Tensor, classes: torch.Tensor,
                maps: torch.Tensor) -> np.ndarray:
        """(L, B, K, H, W, 3) uint8: Guided Grad-CAM per layer, image and class."""
        from .guided import guided_backprop, guided_grad_cam
        gradients = guided_backprop(self.model, inputs, classes, head=self.head)
        return np.stack([guided_to_rgb(guided_grad_cam(gradients, layer_maps).cpu().numpy())
                         for layer_maps in maps])

    def _metrics(self, inputs: torch.Tensor, classes: torch.Tensor, maps: torch.Tensor,
                 entries: list[ImageEntry]) -> np.ndarray:
        """(V, B, K, M): each figure's maps' faithfulness (``outputs.METRICS``)."""
        return torch.stack([self._faithfulness(inputs, classes, view_maps, entries)
                            for view_maps in maps]).float().cpu().numpy()

    def _baseline_metrics(self, inputs: torch.Tensor, classes: torch.Tensor,
                          entries: list[ImageEntry]) -> np.ndarray:
        """(2, B, M): the same measures for a random and a centred Gaussian map (each image's
        random map seeded by its index, so it is the same in any batch or process)."""
        from .metrics import baseline_maps
        size = (1, 1) + tuple(inputs.shape[-2:])
        per_kind = []
        for kind in outputs.BASELINE_TAGS:
            maps = torch.cat([baseline_maps(kind, size, _seeded(entry.index))
                              for entry in entries]).to(inputs.device)
            per_kind.append(self._faithfulness(inputs, classes, maps, entries)[:, 0])
        return torch.stack(per_kind).float().cpu().numpy()

    def _faithfulness(self, inputs: torch.Tensor, classes: torch.Tensor, maps: torch.Tensor,
                      entries: list[ImageEntry]) -> torch.Tensor:
        """(B, K, M) faithfulness of (B, K) maps. Deletion and the rest go batched across
        images; ROAD image by image, its imputation noise seeded by the image's index, so a
        map's numbers do not depend on the batch it came in."""
        from .metrics import faithfulness
        from .road import road
        scores = faithfulness(self.model, inputs, maps, classes,
                              batch_size=self.score_batch_size, head=self.head)
        roads = [road(self.model, inputs[b:b + 1], maps[b:b + 1], classes[b:b + 1],
                      batch_size=self.score_batch_size, head=self.head,
                      generator=_seeded(entry.index)) for b, entry in enumerate(entries)]
        return torch.stack([scores.deletion_auc, scores.insertion_auc, scores.average_drop,
                            scores.increase,
                            torch.cat([r.morf for r in roads]).to(scores.deletion_auc),
                            torch.cat([r.lerf for r in roads]).to(scores.deletion_auc),
                            torch.cat([r.combined for r in roads]).to(scores.deletion_auc)],
                           dim=-1)

    def heading(self, view: View) -> str:
        kind = "Counterfactual " if self.options.counterfactual else ""
        smooth = f", {self.options.smooth} smoothing" if self.options.smooth else ""
        same = " (one map for every class)" if view.method in CLASS_INDEPENDENT else ""
        return f"{kind}{METHODS[view.method].name}{smooth}{same} at {view.target.describe()}"

    def _jobs(self, entries: list[ImageEntry], shown: list[np.ndarray],
              computed: _Computed) -> list[tuple[ImageJob, list[str]]]:
        return [self._job(entry, shown[b], computed, b) for b, entry in enumerate(entries)]

    def _job(self, entry: ImageEntry, shown: np.ndarray, computed: _Computed,
             b: int) -> tuple[ImageJob, list[str]]:
        """One image's files to write, and its summary row (logged once they are written)."""
        settings = self.settings
        tags = [v.tag for v in self.views]
        paths = outputs_of(entry, settings.save_dir, tags, settings.n_selected,
                           settings.save_raw)
        classes, probabilities = computed.classes[b], computed.probabilities[b]
        peaks = computed.peaks[:, b]
        shown_panels = self.plan.shown(probabilities.tolist())
        keep = [k for k, panel in enumerate(shown_panels) if panel]
        every = len(keep) == len(shown_panels)  # the usual case: views, not copies
        layout = (len(keep),) + self.layout[1:]
        figures = []
        for layer, view in enumerate(self.views):
            titles = self.plan.titles(self.labels, classes.tolist(), probabilities.tolist(),
                                      bool(computed.truth[b] >= 0), peaks[layer].tolist()
                                      if self.options.shared_scale else None)
            figures.append(FigureJob(
                paths[layer], _panels(computed.maps[layer, b], keep, every),
                [titles[k] for k in keep], self.heading(view),
                None if computed.guided is None
                else _panels(computed.guided[layer, b], keep, every)))
        job = ImageJob(entry.index, entry.relative, shown, layout, figures)
        if computed.raw is not None:
            job.raw_path = paths[-1]
            job.raw_maps = dict(zip(tags, (m[b] for m in computed.raw)))
            job.classes, job.probabilities = classes, probabilities
        row = outputs.summary_row(
            entry.index, entry.relative, entry.folder_label,
            [self.labels[c] if panel else "" for c, panel in zip(classes, shown_panels)],
            [p if panel else None for p, panel in zip(probabilities.tolist(), shown_panels)],
            [p.name for p in paths[:len(tags)]],
            outputs.extra_values(peaks, None if computed.metrics is None
                                 else computed.metrics[:, b],
                                 None if computed.baselines is None
                                 else computed.baselines[:, b]))
        return job, row


_OUT_OF_MEMORY = "out of memory"
CLASS_INDEPENDENT = ("eigencam",)  # methods whose map is the same for every class


def _panels(per_class: np.ndarray, keep: list[int], every: bool) -> np.ndarray:
    """The shown panels' rows of a (K, ...) array: the array itself when all are shown."""
    return per_class if every else per_class[keep]


METRICS_SEED = 20221  # ROAD's noise and the random baseline map: seeded per image index


def _seeded(index: int) -> torch.Generator:
    return torch.Generator().manual_seed(METRICS_SEED + index)


def quantise(maps: torch.Tensor) -> torch.Tensor:
    """[0, 1] maps as uint8 colour indices, on their own device (a quarter of the bytes to
    copy): exactly figures.overlay's np.clip(map * 255 + 0.5, 0, 255).astype(np.uint8)."""
    return maps.float().mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another backend's 'out of memory' RuntimeError (MPS)."""
    cuda_error = getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_error is not None and isinstance(error, cuda_error):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
