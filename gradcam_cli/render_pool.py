"""Figures in parallel: render processes compose, encode and write each image's files.

The model process hands over, per image, everything a figure needs as plain arrays (the crop
as shown, the maps already quantised to uint8 colour indices, titles, paths, raw maps), so a
render process never imports torch. ``InlineRenderer`` does the same work in the model
process (``--render_workers 0``, and ``--show``). Both report which images are finished, so
the model process logs an image's summary row only once all its files are on disk.

Render processes are started with ``spawn`` (never a fork of a process that may hold CUDA),
early, so their start-up overlaps the model's loading. The job queue is bounded, so memory
stays flat however many images there are. A render process that dies, or a write that fails,
stops the run with a ``faults.RunFault``; temporary files a killed process left are removed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from pathlib import Path

from . import faults, outputs
from .figures import FigureWriter, show_figure
from .handover import ImageJob

QUEUED_PER_PROCESS = 2   # images waiting per render process: enough to never starve one
POLL_S = 0.05            # how often a wait checks for finished images and dead processes
CLOSE_S = 30.0           # a normal close waits this long for the last figures
ABORT_S = 5.0            # a stop gives the current figures this long, then ends the processes


def render_image(job: ImageJob, writers: dict, show: bool = False) -> None:
    """Compose and write every file of ``job``; a failed write raises ``RunFault``."""
    writer = writers.get(job.layout)
    if writer is None:
        writer = writers[job.layout] = FigureWriter(*job.layout)
    for spec in job.figures:
        figure = writer.compose(job.shown, spec.maps, spec.titles, job.image_title,
                                spec.heading, guided=spec.guided)
        _write(outputs.save_jpeg, figure, spec.path)
        if show:
            show_figure(figure, spec.path.name)
    if job.raw_path is not None:
        _write(lambda maps, path: outputs.save_raw(path, maps, job.classes, job.probabilities),
               job.raw_maps, job.raw_path)


def rendering_problem(job: ImageJob, writers: dict, who: str, show: bool = False
                      ) -> str | None:
    """Render ``job``: None once its files are written, else why not, in one line. A figure
    that cannot be drawn stops the run by name, in a render process or inline alike."""
    try:
        render_image(job, writers, show)
    except faults.RunFault as fault:
        return str(fault)
    except Exception as error:
        return f"{who} failed on {job.image_title} ({type(error).__name__}: {error})"
    return None


def _write(save, value, path: Path) -> None:
    try:
        save(value, path)
    except OSError as error:
        raise faults.RunFault(f"cannot write {path}: {error.strerror or error}") from None


class InlineRenderer:
    """Renders in the model process, image by image (``--render_workers 0``, ``--show``)."""

    workers = 0

    def __init__(self, show: bool = False) -> None:
        self.show = show
        self._writers: dict = {}
        self._finished: list[int] = []

    def submit(self, job: ImageJob) -> None:
        problem = rendering_problem(job, self._writers, "drawing", self.show)
        if problem is not None:
            raise faults.RunFault(problem)
        self._finished.append(job.index)

    def take_finished(self) -> list[int]:
        finished, self._finished = self._finished, []
        return finished

    def flush(self) -> None:
        pass

    def hold_batches_of(self, batch_size: int) -> None:
        pass

    def close(self, abort: bool = False) -> None:
        pass


class RenderPool:
    """``workers`` spawned render processes fed through a bounded queue."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers = workers
        _start_resource_tracker()
        self._jobs = context.Queue()  # bounded by submit(): at most ``limit`` images in flight
        self.limit = QUEUED_PER_PROCESS * workers
        self._done = context.Queue()
        self._stop = context.Event()
        self._in_flight: set[int] = set()
        self._finished: list[int] = []
        self._folders: set[Path] = set()
        self._closed = False  # no more images: close() has begun
        self._ended = False   # every process has ended and the queues are closed
        self._processes = [context.Process(target=_serve, name=f"render-{i}", daemon=True,
                                           args=(self._jobs, self._done, self._stop,
                                                 os.getpid()))
                           for i in range(workers)]
        try:
            with faults.helpers_start_deaf():
                for process in self._processes:
                    process.start()
        except BaseException:  # a stop signal, or no room in /dev/shm: the caller never gets
            self._processes = [p for p in self._processes if p.pid is not None]  # the pool
            self.close(abort=True)  # to close, and each process left would hang the exit
            raise

    def hold_batches_of(self, batch_size: int) -> None:
        """Let a whole batch be in flight, so the model goes on to the next batch while this
        one's figures are drawn (memory stays bounded by the batch size, not the run)."""
        self.limit = max(QUEUED_PER_PROCESS * self.workers, batch_size)

    def submit(self, job: ImageJob) -> None:
        """Queue one image; waits (collecting finished images) while ``limit`` are in flight.
        Below the limit it does not look for finished images: ``take_finished``, called
        after each submit, does (a look costs the model process about 10-20 us)."""
        while len(self._in_flight) >= self.limit:
            self._collect(block=True)
        self._folders |= {path.parent for path in job.paths()}
        self._in_flight.add(job.index)
        self._jobs.put(job)

    def take_finished(self) -> list[int]:
        """Images whose files are all written since the last call; raises on a fault."""
        if not self._closed:
            self._collect(block=False)
        finished, self._finished = self._finished, []
        return finished

    def flush(self) -> None:
        """Wait until every submitted image is written."""
        while self._in_flight:
            self._collect(block=True)

    def close(self, abort: bool = False) -> None:
        """End the processes. ``abort``: each finishes the image it is writing (for at most
        ``ABORT_S``), the queued ones are dropped, then any left are ended and the temporary
        files they leave are removed. Which images finished is then told by their files
        (see batch_run), not by messages, which a stop may have cut. A close that a stop
        signal cut short is finished by the next call (an abort); after one that went
        through, a call does nothing."""
        if self._ended:
            return
        if abort:
            self._stop.set()
        elif not self._closed:
            for _ in self._processes:
                self._jobs.put(None)
        self._closed = True
        deadline = time.monotonic() + (ABORT_S if abort else CLOSE_S)
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join()
        faults.remove_temporaries(sorted(self._folders), [p.pid for p in self._processes])
        for channel in (self._jobs, self._done):
            channel.cancel_join_thread()
            channel.close()
        self._ended = True

    def _collect(self, block: bool) -> None:
        """Move finished images to ``_finished``; raise for a failed image or dead process."""
        received = False
        while True:
            try:
                index, error = self._done.get(timeout=POLL_S if block and not received
                                              else 0.0)
            except queue.Empty:
                break
            received = True
            self._in_flight.discard(index)
            if error is not None:
                raise faults.RunFault(error)
            self._finished.append(index)
        if not received:
            self._check_alive()

    def _check_alive(self) -> None:
        for process in self._processes:
            if process.exitcode is not None:
                raise faults.RunFault(f"render process {process.pid} "
                                      f"{faults.describe_exit(process.exitcode)}")


def _serve(jobs, done, stop, parent: int) -> None:
    """A render process: take image jobs until told to stop, report each one's outcome."""
    faults.die_with_parent()
    if os.getppid() != parent:
        return
    for signum in faults.STOP_SIGNALS:  # Ctrl-C, or a SIGTERM or SIGHUP sent to the whole
        signal.signal(signum, signal.SIG_IGN)  # group: the model process stops us
    writers: dict = {}
    while not stop.is_set() and os.getppid() == parent:  # (no die_with_parent on macOS)
        try:
            job = jobs.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if job is None:
            break
        done.put((job.index, rendering_problem(job, writers, f"render process {os.getpid()}")))


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that removes the queues' named
    semaphores if this one dies) with the stop signals blocked, before the queues would
    start it: it ignores SIGINT and SIGTERM itself but not SIGHUP, which a closing terminal
    sends the whole process group, and its death mid-run ends the run in tracebacks."""
    from multiprocessing import resource_tracker
    with faults.helpers_start_deaf():
        resource_tracker.ensure_running()


def start_renderer(workers: int, show: bool = False):
    """A RenderPool of ``workers`` processes, or an InlineRenderer for 0 (and for --show)."""
    if workers <= 0 or show:
        return InlineRenderer(show)
    return RenderPool(workers)
