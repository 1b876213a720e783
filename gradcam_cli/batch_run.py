"""The batch run: images decoded in a DataLoader, explained in batches, written as they come.

Memory stays flat however many images there are: only a few batches are in flight, and every
figure, raw-map file and summary row goes to disk as soon as it is made. Under ``torchrun`` each
process takes every N-th image (by index), and the first process merges the summary.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import faults
from .errors import program
from . import outputs
from . import report
from .explainer import ClassPlan, Explainer, outputs_of
from .handover import DecodedBatch
from .image_loader import SHARED_MEMORY, batches_from, make_loader
from .progress import Progress, score_progress
from .render_pool import InlineRenderer
from .settings import ExplainOptions, RunSettings
from .targets import Target
from .torchrun_group import Distributed
from .images import ImageEntry
from .labels import LabelIndex
from .preprocessing import Preprocessing, normalize


@dataclass
class RunResult:
    """Counts of one process (or, after ``finish``, of all) and its summary rows.

    ``skipped`` names each image that was not processed (its path relative to --images_path)
    and why: not a readable image, or the model failed on it. ``stop`` is what ended the run
    early (a fault, SIGTERM, Ctrl-C), or None."""

    processed: int = 0
    unreadable: int = 0
    already_done: int = 0
    rows: list[list[str]] = field(default_factory=list)
    resumed: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stop: Optional[BaseException] = None


# ----------------------------------------------------------------------------- the run

def run_batches(model: nn.Module, preprocessing: Preprocessing, entries: list[ImageEntry],
                targets: list[Target], labels: list[str], options: ExplainOptions,
                settings: RunSettings, device: torch.device, dist: Distributed,
                renderer=None) -> RunResult:
    """Explain this process's share of ``entries``; returns what happened to them.

    A fault, SIGTERM or Ctrl-C does not escape: the run stops within seconds, what finished
    is kept (files and rows), and ``result.stop`` says why."""
    renderer = renderer if renderer is not None else InlineRenderer(settings.show)
    result = RunResult()
    mine = _still_to_do(entries, settings, dist, result)

    def rows_so_far() -> list[list[str]]:
        """Every process's rows logged so far (and a resumed run's earlier ones)."""
        rows = outputs.previous_rows(settings.save_dir, with_summary=result.resumed)
        width = len(summary_header(options, settings))
        return list(_wanted_rows(entries, rows, width=width).values())
    _check_display(settings, renderer)
    renderer.hold_batches_of(settings.batch_size)
    index = LabelIndex(labels)

    def class_of_folder(folder: str | None) -> int:
        found = index.find(folder)
        return -1 if found is None else found

    explainer = Explainer(model, targets, labels, options, settings, preprocessing.crop,
                          class_of_folder, score_progress(settings.quiet or not dist.leader))
    progress = Progress(len(mine), settings.quiet or not dist.leader)
    pending: dict[int, _Pending] = {}  # image index -> its row, logged once its files exist
    summary_log: Optional[outputs.SummaryLog] = None
    live_report: Optional[report.RunReport] = None

    def log(finished: list[int]) -> None:
        for index_done in finished:
            with faults.deferred():
                _log_row(summary_log, pending.pop(index_done).row)
                result.processed += 1
            progress.update(1)
        if live_report is not None:
            live_report.refresh(rows_so_far, result.skipped)

    def explain_batch(batch: DecodedBatch) -> None:
        for position, error in batch.failed:
            _skip(result, mine[position], f"not a readable image ({error})")
        progress.update(len(batch.failed))
        if batch.shown is None:
            return
        inputs = normalize(batch.shown, preprocessing, device)
        outcome = explainer.explain([mine[p] for p in batch.positions],
                                    list(batch.shown.numpy()), inputs)
        for entry, reason in outcome.failed:
            _skip(result, entry, f"the model failed on it ({reason})")
        progress.update(len(outcome.failed))
        for job, row in outcome.jobs:
            pending[job.index] = _Pending(row, job.paths(), time.time_ns() - CLOCK_SLACK_NS)
            renderer.submit(job)
            log(renderer.take_finished())
        _return_free_memory()

    # From the first write in save_dir to the render processes' end, a stop (a fault, SIGTERM,
    # Ctrl-C) is caught here, so it always ends with what is done written and the resume line.
    try:
        live_report = _start_writing(entries, labels, options, settings, dist, result.resumed)
        summary_log = outputs.SummaryLog(settings.save_dir, dist.rank)
        loader = make_loader(mine, preprocessing, settings.batch_size, settings.workers, device)
        with batches_from(loader) as batches:
            for batch in batches:
                explain_batch(batch)
        renderer.flush()
        log(renderer.take_finished())
        renderer.close()
    except BaseException as stop:  # noqa: B036 (Ctrl-C and SIGTERM stop cleanly too)
        result.stop = _as_stop(stop)
        if result.stop is None:
            raise
    finally:
        try:
            with faults.deferred():  # a stop signal now waits until everything is closed
                renderer.close(abort=True)  # nothing left to do after a close that went through
                if result.stop is not None and summary_log is not None:
                    with contextlib.suppress(faults.RunFault):
                        log([i for i, job in list(pending.items()) if job.written()])
                progress.close()
                if summary_log is not None:
                    summary_log.close()
        except (KeyboardInterrupt, faults.Terminated) as late:  # it came as the run ended
            result.stop = result.stop or late
    result.rows = summary_log.rows if summary_log is not None else []
    return result


def _still_to_do(entries: list[ImageEntry], settings: RunSettings, dist: Distributed,
                 result: RunResult) -> list[ImageEntry]:
    """This process's share of ``entries`` less, with --skip_existing, the images an earlier
    run of the same settings finished (``result`` notes the resume and how many were done).
    It only reads save_dir: a stop here leaves the earlier run's files as they were."""
    mine = entries[dist.rank::dist.world]
    if not settings.skip_existing:
        return mine
    result.resumed = outputs.same_run(settings.save_dir, settings.signature)
    if result.resumed:
        done_rows = outputs.previous_rows(settings.save_dir)
        todo = [e for e in mine if not _already_done(e, settings, done_rows)]
        result.already_done = len(mine) - len(todo)
        return todo
    if dist.leader and (settings.save_dir / outputs.SUMMARY).exists():
        print(f"warning: --skip_existing: the outputs in {settings.save_dir} were made with "
              f"other options (model, layers, method, classes, ...); doing every image "
              f"again", file=sys.stderr)
    return mine


def _start_writing(entries: list[ImageEntry], labels: list[str], options: ExplainOptions,
                   settings: RunSettings, dist: Distributed,
                   resumed: bool) -> Optional[report.RunReport]:
    """Make save_dir this run's: an earlier run's row logs go (unless resumed), its signature
    is recorded and summary.csv's room held; returns the live report (first process only)."""
    if dist.leader and not resumed:
        outputs.remove_logs(settings.save_dir)  # rows of an earlier run are not this run's
    dist.barrier()  # every process has read the old signature and rows before they go
    if not dist.leader:
        return None
    outputs.record_run(settings.save_dir, settings.signature)
    outputs.reserve_space(settings.save_dir, len(entries), len(summary_header(options, settings)))
    return _run_report(entries, labels, options, settings)


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


def _as_stop(stop: BaseException) -> Optional[BaseException]:
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


def _skip(result: RunResult, entry: ImageEntry, reason: str) -> None:
    print(f"warning: skipping {entry.path}: {reason}", file=sys.stderr)
    result.unreadable += 1
    result.skipped.append((entry.relative, reason))


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


def finish(entries: list[ImageEntry], labels: list[str], options: ExplainOptions,
           settings: RunSettings, result: RunResult, dist: Distributed) -> RunResult:
    """Merge every process's rows into summary.csv and report; returns the run's totals.

    A stopped run (``result.stop``) only writes what is done and says how to resume; it
    never waits on the other processes, which may be gone."""
    if result.stop is None:
        try:
            gathered = dist.gather(result)
        except (KeyboardInterrupt, faults.Terminated, faults.RunFault) as stop:
            result.stop = stop
    if result.stop is not None:
        return _finish_stopped(entries, labels, options, settings, result, dist)
    faults.run_complete()  # every image is done: a stop signal from here on is dropped
    total = RunResult(processed=sum(r.processed for r in gathered),
                      unreadable=sum(r.unreadable for r in gathered),
                      already_done=sum(r.already_done for r in gathered),
                      skipped=[item for r in gathered for item in r.skipped])
    if not dist.leader:
        return total
    carried = outputs.previous_rows(settings.save_dir) if result.resumed else {}
    rows = _wanted_rows(entries, carried)
    for process in gathered:
        rows.update({int(row[0]): row for row in process.rows})
    total.rows = list(rows.values())
    return _write_summary_and_report(entries, labels, options, settings, total, dist)


def _write_summary_and_report(entries: list[ImageEntry], labels: list[str],
                              options: ExplainOptions, settings: RunSettings, total: RunResult,
                              dist: Distributed) -> RunResult:
    """The first process's summary.csv, report and closing lines for a run that is done."""
    merged = total.rows
    plan = ClassPlan(options)
    header = summary_header(options, settings)
    try:
        outputs.release_space(settings.save_dir)
        outputs.write_summary(settings.save_dir, header, merged)
    except OSError as error:
        total.stop = faults.RunFault(f"cannot write {settings.save_dir / outputs.SUMMARY}: "
                                     f"{error.strerror or error}")
        _say_stopped(total.stop, total.processed + total.already_done, len(entries),
                     "the rows are kept for --skip_existing", settings, dist)
        return total
    if options.metrics:
        ranks = ["top1"] if plan.is_top else plan.ranks
        print_metric_means(outputs.metric_means(merged, header, settings.tags, ranks), options,
                           len(merged), ranks)
    scores = outputs.accuracy(merged, labels, plan.top) if plan.is_top else None
    if scores is not None:
        print(f"accuracy over {len(merged)} images whose folder names are labels: "
              f"top-1 {scores[0]:.1%}, top-{plan.top} {scores[1]:.1%}")
    if settings.report:
        _run_report(entries, labels, options, settings).write(merged, total.skipped)
    done = f", {total.already_done} already done" if total.already_done else ""
    print(f"processed {total.processed} image(s), skipped {total.unreadable}{done}; "
          f"figures in {settings.save_dir}")
    return total


def summary_header(options: ExplainOptions, settings: RunSettings) -> list[str]:
    """summary.csv's columns for this run's panels, layers and metrics."""
    return outputs.summary_header(ClassPlan(options).ranks, settings.tags, options.metrics)


def _wanted_rows(entries: list[ImageEntry], rows: dict[int, list[str]],
                 width: Optional[int] = None) -> dict[int, list[str]]:
    """The rows that belong to this run's images (same index, same file), of full width."""
    wanted = {entry.index: entry.relative for entry in entries}
    return {i: row for i, row in rows.items() if wanted.get(i) == row[1]
            and (width is None or len(row) == width)}


def _run_report(entries: list[ImageEntry], labels: list[str], options: ExplainOptions,
                settings: RunSettings) -> Optional[report.RunReport]:
    """The run's report.html writer; None with --no_report."""
    if not settings.report:
        return None
    plan = ClassPlan(options)
    return report.RunReport(settings.save_dir, summary_header(options, settings), labels,
                            settings.signature,
                            len(entries), plan.top if plan.is_top else None)


def _finish_stopped(entries: list[ImageEntry], labels: list[str], options: ExplainOptions,
                    settings: RunSettings, result: RunResult,
                    dist: Distributed) -> RunResult:
    """summary.csv for the images done so far, and the one line that says how to resume.

    Under torchrun the first process writes it from every process's row log (which stay in
    place, as other processes may still be adding to them); the others only say why they
    stopped."""
    header = summary_header(options, settings)
    mine = entries[dist.rank::dist.world]
    done = result.processed + result.already_done
    written = "the rows are kept for --skip_existing"
    if dist.leader:
        if dist.active:
            rows = outputs.previous_rows(settings.save_dir, with_summary=result.resumed)
        else:
            rows = outputs.previous_rows(settings.save_dir) if result.resumed else {}
            rows.update({int(row[0]): row for row in result.rows})
        rows = _wanted_rows(entries, rows, width=len(header))
        try:
            with faults.deferred():
                outputs.release_space(settings.save_dir)
                outputs.write_summary(settings.save_dir, header, list(rows.values()),
                                      keep_logs=dist.active)
            written = f"{len(rows)} in {settings.save_dir / outputs.SUMMARY}"
        except OSError as error:
            written = (f"summary.csv not written ({error.strerror or error}); "
                       f"the rows are kept for --skip_existing")
        else:
            stopped_report = _run_report(entries, labels, options, settings)
            if stopped_report is not None:
                with faults.deferred():
                    stopped_report.write(list(rows.values()), result.skipped,
                                         stopped=faults.describe_stop(result.stop))
    _say_stopped(result.stop, done, len(mine), written, settings, dist)
    return result


def _say_stopped(stop: BaseException, done: int, share: int, written: str,
                 settings: RunSettings, dist: Distributed) -> None:
    who = f"{program()} (rank {dist.rank} of {dist.world})" if dist.active else program()
    print(f"{who}: {faults.describe_stop(stop)}; {done} of {share} images done ({written}); "
          f"resume with: {settings.resume_command}", file=sys.stderr, flush=True)


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
