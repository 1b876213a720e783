"""The batch run: images decoded in a DataLoader, explained in batches, written as they come.

Memory stays flat however many images there are: only a few batches are in flight, and every
figure, raw-map file and summary row goes to disk as soon as it is made. Under ``torchrun`` each
process takes every N-th image (by index), and the first process merges the summary.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import outputs
import report
from explainer import ClassPlan, ExplainOptions, Explainer, Target, outputs_of
from utils import ImageEntry, LabelIndex, Preprocessing, load_rgb, prepare_image


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


@dataclass
class RunResult:
    """Counts of one process (or, after ``finish``, of all) and its summary rows."""

    processed: int = 0
    unreadable: int = 0
    already_done: int = 0
    rows: list[list[str]] = field(default_factory=list)
    resumed: bool = False


# ----------------------------------------------------------------------------- distribution

class Distributed:
    """The process group torchrun sets up (a single process when there is none)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.active = self.world > 1

    def start(self, device: torch.device) -> None:
        if not self.active:
            return
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cpu":  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world))

    def gather(self, value):
        """Every process's ``value``, in rank order (on every process)."""
        if not self.active:
            return [value]
        import torch.distributed as dist
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def stop(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()

    @property
    def leader(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------- images in

class ImageDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed images; a file that fails to decode comes back as its error."""

    def __init__(self, entries: list[ImageEntry], preprocessing: Preprocessing) -> None:
        self.entries = entries
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int):
        try:
            shown, model_input = prepare_image(load_rgb(self.entries[position].path),
                                               self.preprocessing)
        except Exception as error:  # any undecodable file is skipped, never fatal
            return position, None, None, f"{type(error).__name__}: {error}"
        return position, shown, torch.from_numpy(model_input), None


def collate(items: list) -> dict:
    good = [item for item in items if item[3] is None]
    return {"positions": [item[0] for item in good],
            "shown": [item[1] for item in good],
            "inputs": torch.stack([item[2] for item in good]) if good else None,
            "failed": [(item[0], item[3]) for item in items if item[3] is not None]}


def make_loader(entries: list[ImageEntry], preprocessing: Preprocessing, batch_size: int,
                workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageDataset(entries, preprocessing), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None)


# ----------------------------------------------------------------------------- progress

class Progress:
    """tqdm on a terminal; a plain line every 30 s otherwise; nothing with --quiet."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, total: int, quiet: bool, unit: str = "images") -> None:
        self.total = total
        self.done = 0
        self.unit = unit
        self.started = self.last = time.monotonic()
        self.bar = None
        self.quiet = quiet or total == 0
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            leave=unit == "images")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.quiet or now - self.last < self.PLAIN_EVERY_S:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"progress: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
              f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def score_progress(quiet: bool):
    """A ``progress(done, total)`` callback for Score-CAM's masked passes: one bar per layer
    and batch, gone when it is full."""
    current: list[Progress] = []

    def report(done: int, total: int) -> None:
        if not current:
            current.append(Progress(total, quiet, unit="Score-CAM passes"))
        current[0].update(done - current[0].done)
        if done >= total:
            current.pop().close()
    return report


# ----------------------------------------------------------------------------- the run

def run_batches(model: nn.Module, preprocessing: Preprocessing, entries: list[ImageEntry],
                targets: list[Target], labels: list[str], options: ExplainOptions,
                settings: RunSettings, device: torch.device, dist: Distributed) -> RunResult:
    """Explain this process's share of ``entries``; returns what happened to them."""
    result = RunResult()
    mine = entries[dist.rank::dist.world]
    if settings.skip_existing:
        result.resumed = outputs.same_run(settings.save_dir, settings.signature)
        if result.resumed:
            done_rows = outputs.previous_rows(settings.save_dir)
            todo = [e for e in mine if not _already_done(e, settings, done_rows)]
            result.already_done = len(mine) - len(todo)
            mine = todo
        elif dist.leader and (settings.save_dir / outputs.SUMMARY).exists():
            print(f"warning: --skip_existing: the outputs in {settings.save_dir} were made with "
                  f"other options (model, layers, method, classes, ...); doing every image "
                  f"again", file=sys.stderr)
    dist.gather(None)  # every process has read the old signature before it is replaced
    if dist.leader:
        outputs.record_run(settings.save_dir, settings.signature)
    log = outputs.SummaryLog(settings.save_dir, dist.rank)
    index = LabelIndex(labels)
    def class_of_folder(folder: str | None) -> int:
        found = index.find(folder)
        return -1 if found is None else found

    explainer = Explainer(model, targets, labels, options, settings, preprocessing.crop, log,
                          class_of_folder, score_progress(settings.quiet or not dist.leader))
    progress = Progress(len(mine), settings.quiet or not dist.leader)
    try:
        loader = make_loader(mine, preprocessing, settings.batch_size, settings.workers, device)
        for batch in loader:
            for position, error in batch["failed"]:
                print(f"warning: skipping {mine[position].path}: not a readable image ({error})",
                      file=sys.stderr)
            result.unreadable += len(batch["failed"])
            if batch["inputs"] is not None:
                inputs = batch["inputs"].to(device, non_blocking=True)
                explainer.explain([mine[p] for p in batch["positions"]], batch["shown"], inputs)
                result.processed += len(batch["positions"])
            progress.update(len(batch["positions"]) + len(batch["failed"]))
    finally:
        progress.close()
        log.close()
    result.rows = log.rows
    return result


def _already_done(entry: ImageEntry, settings: RunSettings,
                  done_rows: dict[int, list[str]]) -> bool:
    row = done_rows.get(entry.index)
    return (row is not None and len(row) > 1 and row[1] == entry.relative
            and all(path.exists() for path in outputs_of(entry, settings.save_dir, settings.tags,
                                                         settings.n_selected,
                                                         settings.save_raw)))


def finish(entries: list[ImageEntry], labels: list[str], options: ExplainOptions,
           settings: RunSettings, result: RunResult, dist: Distributed) -> RunResult:
    """Merge every process's rows into summary.csv and report; returns the run's totals."""
    gathered = dist.gather(result)
    total = RunResult(*(sum(getattr(r, name) for r in gathered)
                        for name in ("processed", "unreadable", "already_done")))
    if not dist.leader:
        return total
    carried = outputs.previous_rows(settings.save_dir) if result.resumed else {}
    wanted = {entry.index: entry.relative for entry in entries}
    rows = {i: row for i, row in carried.items() if wanted.get(i) == row[1]}
    for process in gathered:
        rows.update({int(row[0]): row for row in process.rows})
    merged = total.rows = list(rows.values())
    plan = ClassPlan(options)
    header = outputs.summary_header(plan.ranks, settings.tags, options.metrics)
    outputs.write_summary(settings.save_dir, header, merged)
    if options.metrics:
        ranks = ["top1"] if plan.is_top else plan.ranks
        print_metric_means(outputs.metric_means(merged, header, settings.tags, ranks), options,
                           len(merged), ranks)
    scores = outputs.accuracy(merged, labels, plan.top) if plan.is_top else None
    if scores is not None:
        print(f"accuracy over {len(merged)} images whose folder names are labels: "
              f"top-1 {scores[0]:.1%}, top-{plan.top} {scores[1]:.1%}")
    if settings.report:
        skipped = [(e.relative, "not a readable image") for e in entries if e.index not in rows]
        report.write_report(settings.save_dir, header, merged, report.run_info(
            settings.signature, labels, len(entries), skipped, scores))
    done = f", {total.already_done} already done" if total.already_done else ""
    print(f"processed {total.processed} image(s), skipped {total.unreadable}{done}; "
          f"figures in {settings.save_dir}")
    return total


def print_metric_means(means: dict[str, dict[str, float]], options: ExplainOptions,
                       n_images: int, ranks: list[str]) -> None:
    """One line per layer: the method's mean faithfulness over the run's maps of ``ranks``
    (the predicted class's maps by default, as the papers report them)."""
    kind = "counterfactual " if options.counterfactual else ""
    print(f"faithfulness of {kind}{options.method} over {n_images} image(s), maps of "
          f"{', '.join(ranks)} (deletion AUC: lower is better; insertion AUC: higher is "
          f"better):")
    for tag, values in means.items():
        print(f"  {tag}: deletion AUC {values['deletion']:.4f}, insertion AUC "
              f"{values['insertion']:.4f}, average drop {values['drop']:.1f}%, "
              f"increase in confidence {100 * values['increase']:.1f}%")
