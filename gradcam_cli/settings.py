"""The settings a run is made with, shared by the command line, the explainer, the batch run
and the summary: how to explain (``ExplainOptions``), what to write where (``RunSettings``),
and the two with the images, labels and process group (``RunPlan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .images import ImageEntry
    from .torchrun_group import Distributed


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain: the method and its variants, the classes, the scale, the metrics."""

    methods: tuple[str, ...] = ("gradcam",)
    counterfactual: bool = False
    guided: bool = False
    classes: tuple[int, ...] | None = None
    true_class: bool = False
    shared_scale: bool = False
    metrics: bool = False
    score_batch_size: int = 64
    n_classes: int = 1000
    smooth: str | None = None  # None, "aug", "eigen" or "aug+eigen" (explain_methods)
    head: str = "softmax"      # heads.HEADS: softmax, sigmoid (multi-label) or binary
    threshold: float = 0.5     # multi-label: a class is shown at or above this probability
    max_panels: int = 3        # the top classes shown before the lowest


@dataclass(frozen=True)
class RunSettings:
    """What to explain and where to write it."""

    save_dir: Path
    tags: list[str]
    n_selected: int
    batch_size: int
    workers: int
    show: bool = False
    quiet: bool = False
    save_raw: bool = False
    skip_existing: bool = False
    signature: dict = field(default_factory=dict)
    report: bool = True
    resume_command: str = "python main.py --skip_existing"


@dataclass(frozen=True)
class RunPlan:
    """One run as each of its stages sees it: every selected image (of all torchrun
    processes), the labels, how to explain, what to write where, and the process group."""

    entries: list[ImageEntry]
    labels: list[str]
    options: ExplainOptions
    settings: RunSettings
    dist: Distributed

    @property
    def share(self) -> list[ImageEntry]:
        """This process's images: every N-th by index under torchrun, else all of them."""
        return self.entries[self.dist.rank::self.dist.world]
