"""--sanity_check at the end of a run: the model-parameter randomisation test (sanity.py) on the
run's first images, its csv beside summary.csv, its closing line and what the report shows."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import outputs
from .explainer import ClassPlan
from .heads import HEADS
from .images import load_rgb
from .labels import LabelIndex
from .preprocessing import Preprocessing, crop_image, normalize
from .sanity import ROW_HEADER, SanityReport, sanity_check
from .settings import RunPlan
from .targets import Target

SANITY_CSV = "sanity_check.csv"
MAX_IMAGES = 16  # the test's images: the run's first ones that decode
MAX_STEPS = 6


@dataclass(frozen=True)
class SanitySummary:
    """What the end of a run says about the check: one line, and the rows of its csv."""

    line: str
    header: list[str]
    rows: list[list[str]]


def run_sanity_check(model: nn.Module, preprocessing: Preprocessing, targets: list[Target],
                     plan: RunPlan, device: torch.device) -> SanitySummary | None:
    """The check on the run's first ``MAX_IMAGES`` readable images, for every method and
    layer of the run and each image's first panel's class (its top-1 class by default);
    writes sanity_check.csv. None when no image decodes."""
    images, truths = _first_images(plan, preprocessing, device)
    if images is None:
        return None
    classes_of = ClassPlan(plan.options)
    head = HEADS[plan.options.head]
    report = sanity_check(model, images, [t.module for t in targets],
                          lambda scores: classes_of.choose(scores, truths)[:, :1],
                          plan.options.methods, head=head,
                          batch_size=plan.settings.batch_size, max_steps=MAX_STEPS)
    rows = [[str(value) if not isinstance(value, float) else f"{value:.4f}" for value in row]
            for row in report.to_rows()]
    header = list(ROW_HEADER)
    _write_csv(plan.settings.save_dir / SANITY_CSV, header, rows)
    return SanitySummary(describe(report, len(images)), header, rows)


def describe(report: SanityReport, n_images: int) -> str:
    """One line: whether each method's maps depend on the weights, with the numbers."""
    parts = []
    for verdict in report.verdicts():
        where = f" at {verdict.layer_name}" if len(report.layer_names) > 1 else ""
        if verdict.depends_on_weights is None:
            state = "cannot tell (its maps were constant)"
        else:
            state = "depends on the weights" if verdict.depends_on_weights else \
                "does NOT depend on the weights: it shows the image, not the model"
        parts.append(f"{verdict.method}{where} {state} (rank correlation with the original "
                     f"maps {verdict.first_step_spearman:.2f} after re-initialising the "
                     f"classifier, {verdict.final_spearman:.2f} after every layer; SSIM "
                     f"{verdict.final_ssim:.2f})")
    return (f"sanity check (weights re-initialised from the output down, {len(report.steps)} "
            f"steps, {n_images} image(s)): " + "; ".join(parts))


def _first_images(plan: RunPlan, preprocessing: Preprocessing, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The first readable images of the run as model input, and their folder classes."""
    index = LabelIndex(plan.labels)
    crops, truths = [], []
    for entry in plan.entries:
        try:
            crops.append(crop_image(load_rgb(entry.path), preprocessing))
        except Exception:  # an unreadable file was skipped (and named) by the run already
            continue
        found = index.find(entry.folder_label)
        truths.append(-1 if found is None else found)
        if len(crops) == MAX_IMAGES:
            break
    if not crops:
        return None, torch.empty(0)
    shown = torch.from_numpy(np.stack(crops))
    return normalize(shown, preprocessing, device), torch.tensor(truths)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with outputs.atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(rows)
