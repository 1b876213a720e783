"""The batch run: images decoded in a DataLoader, explained in batches, written as they come.

Memory stays flat however many images there are: only a few batches are in flight, and every
figure, raw-map file and summary row goes to disk as soon as it is made. Under ``torchrun`` each
process takes every N-th image (by index), and the first process merges the summary
(summary.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import faults, outputs, report
from .explainer import Explainer, outputs_of
from .handover import DecodedBatch
from .image_loader import SHARED_MEMORY, batches_from, make_loader
from .images import ImageEntry
from .labels import LabelIndex
from .preprocessing import Preprocessing, normalize
from .progress import Progress, score_progress
from .render_pool import InlineRenderer
from .settings import RunPlan, RunSettings
from .summary import RunResult, run_report, summary_header, wanted_rows
from .targets import Target


class BatchRun:
    """One process's run over its share of the images: decode, explain, hand each image to
    the renderer, and log its summary row once its files are written.

    A fault, SIGTERM or Ctrl-C does not escape ``run``: the run stops within seconds, what
    finished is kept (files and rows), and ``result.stop`` says why."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, targets: list[Target],
                 plan: RunPlan, device: torch.device, renderer=None) -> None:
        self.plan = plan
        self.settings = plan.settings
        self.preprocessing = preprocessing
        self.device = device
        self.renderer = renderer if renderer is not None else InlineRenderer(plan.settings.show)
        self.result = RunResult()
        self.mine = self._still_to_do()
        self._labels = LabelIndex(plan.labels)
        quiet = self.settings.quiet or not plan.dist.leader
        self.explainer = Explainer(model, targets, plan.labels, plan.options, self.settings,
                                   preprocessing.crop, self._class_of_folder,
                                   score_progress(quiet))
        self.progress = Progress(len(self.mine), quiet)
        self.pending: dict[int, _Pending] = {}  # image index -> its row, logged once written
        self.summary_log: outputs.SummaryLog | None = None
        self.live_report: report.RunReport | None = None

    def run(self) -> RunResult:
        """Explain this process's share; returns what happened to it."""
        _check_display(self.settings, self.renderer)
        self.renderer.hold_batches_of(self.settings.batch_size)
        # From the first write in save_dir to the render processes' end, a stop (a fault,
        # SIGTERM, Ctrl-C) is caught here, so it always ends with what is done written and
        # the resume line.
        try:
            self.live_report = self._start_writing()
            self.summary_log = outputs.SummaryLog(self.settings.save_dir, self.plan.dist.rank)
            loader = make_loader(self.mine, self.preprocessing, self.settings.batch_size,
                                 self.settings.workers, self.device)
            with batches_from(loader) as batches:
                for batch in batches:
                    self._explain_batch(batch)
            self.renderer.flush()
            self._log(self.renderer.take_finished())
            self.renderer.close()
        except BaseException as stop:  # noqa: B036 (Ctrl-C and SIGTERM stop cleanly too)
            self.result.stop = _as_stop(stop)
            if self.result.stop is None:
                raise
        finally:
            self._close()
        self.result.rows = self.summary_log.rows if self.summary_log is not None else []
        return self.result

    def _close(self) -> None:
        """End the renderer, log what a stop left finished, close the bar and the row log;
        a stop signal now waits until everything is closed."""
        try:
            with faults.deferred():
                self.renderer.close(abort=True)  # nothing left after a close that went through
                if self.result.stop is not None and self.summary_log is not None:
                    with contextlib.suppress(faults.RunFault):
                        self._log([i for i, job in list(self.pending.items()) if job.written()])
                self.progress.close()
                if self.summary_log is not None:
                    self.summary_log.close()
        except (KeyboardInterrupt, faults.Terminated) as late:  # it came as the run ended
            self.result.stop = self.result.stop or late

    def _explain_batch(self, batch: DecodedBatch) -> None:
        for position, error in batch.failed:
            self._skip(self.mine[position], f"not a readable image ({error})")
        self.progress.update(len(batch.failed))
        if batch.shown is None:
            return
        inputs = normalize(batch.shown, self.preprocessing, self.device)
        outcome = self.explainer.explain([self.mine[p] for p in batch.positions],
                                         list(batch.shown.numpy()), inputs)
        for entry, reason in outcome.failed:
            self._skip(entry, f"the model failed on it ({reason})")
        self.progress.update(len(outcome.failed))
        for job, row in outcome.jobs:
            self.pending[job.index] = _Pending(row, job.paths(),
                                               time.time_ns() - CLOCK_SLACK_NS)
            self.renderer.submit(job)
            self._log(self.renderer.take_finished())
        _return_free_memory()

    def _log(self, finished: list[int]) -> None:
        """Log the rows of images whose files are all written; refresh the live report."""
        for index in finished:
            with faults.deferred():
                _log_row(self.summary_log, self.pending.pop(index).row)
                self.result.processed += 1
            self.progress.update(1)
        if self.live_report is not None:
            self.live_report.refresh(self._rows_so_far, self.result.skipped)

    def _rows_so_far(self) -> list[list[str]]:
        """Every process's rows logged so far (and a resumed run's earlier ones)."""
        rows = outputs.previous_rows(self.settings.save_dir, with_summary=self.result.resumed)
        return list(wanted_rows(self.plan, rows, width=len(summary_header(self.plan))).values())

    def _class_of_folder(self, folder: str | None) -> int:
        found = self._labels.find(folder)
        return -1 if found is None else found

    def _skip(self, entry: ImageEntry, reason: str) -> None:
        print(f"warning: skipping {entry.path}: {reason}", file=sys.stderr)
        self.result.unreadable += 1
        self.result.skipped.append((entry.relative, reason))

    def _still_to_do(self) -> list[ImageEntry]:
        """This process's share less, with --skip_existing, the images an earlier run of the
        same settings finished (``result`` notes the resume and how many were done). It only
        reads save_dir: a stop here leaves the earlier run's files as they were."""
        settings, mine = self.settings, self.plan.share
        if not settings.skip_existing:
            return mine
        self.result.resumed = outputs.same_run(settings.save_dir, settings.signature)
        if self.result.resumed:
            done_rows = outputs.previous_rows(settings.save_dir)
            todo = [e for e in mine if not _already_done(e, settings, done_rows)]
            self.result.already_done = len(mine) - len(todo)
            return todo
        if self.plan.dist.leader and (settings.save_dir / outputs.SUMMARY).exists():
            print(f"warning: --skip_existing: the outputs in {settings.save_dir} were made "
                  f"with other options (model, layers, method, classes, ...); doing every "
                  f"image again", file=sys.stderr)
        return mine

    def _start_writing(self) -> report.RunReport | None:
        """Make save_dir this run's: an earlier run's row logs go (unless resumed), its
        signature is recorded and summary.csv's room held; returns the live report (first
        process only)."""
        settings, dist = self.settings, self.plan.dist
        if dist.leader and not self.result.resumed:
            outputs.remove_logs(settings.save_dir)  # rows of an earlier run are not this run's
        dist.barrier()  # every process has read the old signature and rows before they go
        if not dist.leader:
            return None
        outputs.record_run(settings.save_dir, settings.signature)
        outputs.reserve_space(settings.save_dir, len(self.plan.entries),
                              len(summary_header(self.plan)))
        return run_report(self.plan)


def _return_free_memory() -> None:
    """glibc: give the heap's free pages back to the system once per batch. Without it the
    model process's memory creeps up with the number of images (1.28x from 64 to 640 images,
    measured); with it the run stays flat (1.06x). Forcing big buffers to mmap instead kept
    it flat too, but made every large torch tensor on the CPU fault its pages in afresh: the
    pipeline ran at 41 images/s against 87 with this (bench.py parts e and f)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    return ctypes.CDLL(None)


CLOCK_SLACK_NS = 1_000_000_000  # file times come from a coarser clock than time.time_ns()


@dataclass
class _Pending:
    """An image handed to the renderer: its row, its files, and when it was handed over."""

    row: list[str]
    paths: list[Path]
    since_ns: int

    def written(self) -> bool:
        """Whether all its files were written by this run (files appear whole, by rename):
        how a stopped run tells what finished, whatever messages the stop cut short."""
        try:
            return all(path.stat().st_mtime_ns >= self.since_ns for path in self.paths)
        except OSError:
            return False


def _as_stop(stop: BaseException) -> BaseException | None:
    """What a run stops for: a fault, a signal, a dead decode process; None for a bug."""
    if isinstance(stop, (KeyboardInterrupt, faults.Terminated, faults.RunFault)):
        return stop
    reason = faults.decode_fault(stop)
    if reason is not None and faults.is_shared_memory_full(stop):
        return faults.RunFault(
            f"a decode process could not put a batch in shared memory, {SHARED_MEMORY} "
            f"({reason}); {faults.SHARED_MEMORY_ADVICE}, or use fewer --workers or a smaller "
            f"--batch_size")
    if reason is not None:
        return faults.RunFault(f"a decode process failed ({reason})")
    if faults.is_helper_death(stop):
        received = faults.signal_received()
        if received is not None:  # the group got the signal, and so did we
            return faults.stop_for(received)
        return faults.RunFault(f"a decode process died: {str(stop).splitlines()[0]}")
    if isinstance(stop, OSError):
        return faults.RunFault(f"cannot write in {getattr(stop, 'filename', None) or 'save_dir'}"
                               f": {stop.strerror or stop}")
    return None


def _log_row(log: outputs.SummaryLog, row: list[str]) -> None:
    try:
        log.write(row)
    except OSError as error:
        raise faults.RunFault(f"cannot write the summary log in {log.path.parent}: "
                              f"{error.strerror or error}") from None


def _check_display(settings: RunSettings, renderer) -> None:
    """--show shows figures from this process; without a display, say so once and go on."""
    if not getattr(renderer, "show", False):
        return
    from .figures import display_available
    if not display_available():
        print("warning: --show: no display available; figures are saved but not shown",
              file=sys.stderr)
        renderer.show = False


def _already_done(entry: ImageEntry, settings: RunSettings,
                  done_rows: dict[int, list[str]]) -> bool:
    row = done_rows.get(entry.index)
    return (row is not None and len(row) > 1 and row[1] == entry.relative
            and all(path.exists() for path in outputs_of(entry, settings.save_dir, settings.tags,
                                                         settings.n_selected,
                                                         settings.save_raw)))
