"""Images in: decode processes that read, resize and crop each image and hand over batches.

A DataLoader's worker processes decode the images; each batch reaches the model process as one
(B, H, W, 3) uint8 tensor through shared memory (a quarter of float32's bytes), which the model
process copies out at once and normalizes on its device (``preprocessing.normalize``). As many
decode processes start as /dev/shm holds the batches of. A file that cannot be decoded comes back
as its error, to be skipped by name. A decode process that dies is reported as such, in one line,
and none is left behind when the run ends.

Only torch's public API is used, except for the DataLoader's own shutdown (``_loader_shutdown``);
the texts of torch's errors that the fault layer matches are in ``faults``, and
tests/test_torch_contract.py checks both against the installed torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

from . import faults
from .handover import DecodedBatch
from .images import ImageEntry, load_rgb
from .preprocessing import Preprocessing, crop_image
from .torchrun_group import local_world_size


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized and cropped images (uint8); a file that fails to decode comes back as
    its error."""

    def __init__(self, entries: list[ImageEntry], preprocessing: Preprocessing) -> None:
        self.entries = entries
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int):
        try:
            shown = crop_image(load_rgb(self.entries[position].path), self.preprocessing)
        except Exception as error:  # any undecodable file is skipped, never fatal
            return position, None, f"{type(error).__name__}: {error}"
        return position, shown, None


def collate(items: list) -> DecodedBatch:
    """The batch's crops as one (B, H, W, 3) uint8 tensor, built in shared memory inside a
    decode process, so it crosses to the model process without being pickled."""
    good = [item for item in items if item[2] is None]
    shown = None
    if good:
        shown = torch.empty((len(good),) + good[0][1].shape, dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            shown.share_memory_()
        pixels = shown.numpy()
        for b, item in enumerate(good):
            pixels[b] = item[1]
    return DecodedBatch(positions=[item[0] for item in good], shown=shown,
                        failed=[(item[0], item[2]) for item in items if item[2] is not None])


SHARED_MEMORY = Path("/dev/shm")
PREFETCH = 2  # batches each decode process prepares ahead
SLACK = 2 ** 20  # shared memory left to the DataLoader's own queues and locks


def make_loader(entries: list[ImageEntry], preprocessing: Preprocessing, batch_size: int,
                workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of decoded images, in order. Decode processes beyond the number of batches
    would only start, so there are never more than batches; nor more than the free shared
    memory holds the batches of (see ``decode_processes_that_fit``)."""
    workers = min(workers, -(-len(entries) // batch_size))
    workers = decode_processes_that_fit(workers, batch_size * preprocessing.crop ** 2 * 3)
    return torch.utils.data.DataLoader(
        ImageDataset(entries, preprocessing), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH if workers > 0 else None,
        worker_init_fn=_decode_worker_init if workers > 0 else None)


def decode_processes_that_fit(workers: int, batch_bytes: int,
                              free_bytes: int | None = None) -> int:
    """At most ``workers`` decode processes, as many as the free shared memory holds.

    Each batch a decode process hands over lives in shared memory (/dev/shm) until the model
    process takes its own copy (``handed_over``): up to ``PREFETCH`` batches per process. A
    container's /dev/shm is 64 MiB by default, less than 8 processes' batches of 64 images
    need (147 MiB at 224 px); torch then fails to allocate and the run would stop. So fewer
    processes start, with a warning that says how to give the container more; with none, the
    model process decodes (no shared memory needed). torchrun's processes on this machine
    share /dev/shm evenly.
    """
    if free_bytes is None:
        free_bytes = shared_memory_free()
    if workers == 0 or free_bytes is None:
        return workers
    local_world = local_world_size()
    share = free_bytes // local_world - SLACK
    fits = max(0, share // (PREFETCH * batch_bytes))
    if fits >= workers:
        return workers
    whose = "its share of " if local_world > 1 else ""
    print(f"warning: {whose}shared memory ({SHARED_MEMORY}, {free_bytes / 2 ** 20:.0f} MiB free)"
          f" is too little for {workers} decode processes' batches of "
          f"{batch_bytes / 2 ** 20:.1f} MiB; "
          + (f"starting {fits}" if fits else "decoding in the main process")
          + f"; {faults.SHARED_MEMORY_ADVICE}", file=sys.stderr)
    return fits


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm, or None where there is none (macOS, Windows)."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def _decode_worker_init(worker_id: int) -> None:
    """A decode process ignores the terminal's Ctrl-C and a SIGTERM sent to the whole group
    (the model process stops it), dies with the model process, so none is left behind, and
    prints no traceback for a hand-over the model process cut short."""
    faults.die_with_parent()
    for signum in faults.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.excepthook = _quiet_about_cut_hand_overs


def _quiet_about_cut_hand_overs(kind: type, error: BaseException, trace) -> None:
    """A decode process's error hook. A batch's shared memory crosses to the model process as
    a file descriptor, sent by multiprocessing's resource-sharer thread when the model
    process connects for it; if a stop signal ends the model process's side half-way, that
    thread finds the connection reset or the pipe closed, and hands the error to
    ``sys.excepthook``. The model process reports the stop in its one line; the traceback
    would only add noise to it. Every other error prints as usual."""
    if issubclass(kind, (BrokenPipeError, ConnectionResetError)):
        return
    sys.__excepthook__(kind, error, trace)


@contextlib.contextmanager
def batches_from(loader: torch.utils.data.DataLoader) -> Iterator[Iterator[DecodedBatch]]:
    """The loader's batches, as ``handed_over`` gives them; on the way out, also after an
    error or a signal, its decode processes are stopped (and its pin-memory thread, on CUDA,
    has ended) before the pin-memory thread's errors may print again."""
    kept: list[BaseException] = []
    batches = given = None
    processes: list[BaseProcess] = []
    with quiet_pin_memory_thread(kept):
        try:
            # iter() starts the decode processes
            with faults.helpers_start_deaf(), processes_started(processes):
                batches = iter(loader)
            given = handed_over(batches, kept, processes)
            yield given
        finally:
            close_loader(batches, processes)
            if given is not None:
                given.close()
            batches = given = None  # a traceback that holds this frame holds no iterator


@contextlib.contextmanager
def processes_started(found: list[BaseProcess]) -> Iterator[None]:
    """The child processes started inside the block are added to ``found``, also where it
    raises (so that a caller can end those started before the error).

    The DataLoader starts its decode processes inside ``iter(loader)`` (``num_workers`` > 0),
    as multiprocessing processes of this one; children started earlier (the render pool's)
    are in the first snapshot, so only the decode processes are new in the second. The
    Process objects themselves are kept: their ``pid``, ``is_alive()`` and ``kill()`` still
    work once the process has died. (The DataLoader's own list of them is private.)"""
    before = set(multiprocessing.active_children())
    try:
        yield
    finally:
        found.extend(p for p in multiprocessing.active_children() if p not in before)


def handed_over(batches, pin_thread_errors: Sequence[BaseException] = (),
                processes: Sequence[BaseProcess] = ()) -> Iterator[DecodedBatch]:
    """The loader's batches, each in the model process's own memory: a copy out of shared
    memory, which the render jobs' crops would otherwise hold on to (and /dev/shm is small in
    a container). On CUDA the pin-memory thread has made that copy already.

    A decode process (one of ``processes``) killed while it hands a batch over breaks the
    connection its shared memory travels on, before the DataLoader notices the death: in this
    thread, or (CUDA) in the pin-memory thread, which then exits. Either is reported as the
    process's death, by pid, once it is seen to be gone; a break with every process alive is
    reported with its own error (for the pin-memory thread, as kept by
    ``quiet_pin_memory_thread``)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (ConnectionError, EOFError, RuntimeError) as error:
            pin_thread = isinstance(error, RuntimeError)
            if pin_thread and faults.PIN_MEMORY_THREAD_EXITED not in str(error):
                raise
            dead = dead_decode_processes(processes)
            if dead:
                raise faults.DecodeProcessDied(
                    f"process(es) {', '.join(map(str, dead))} exited while handing a batch "
                    f"over") from error
            cause = pin_thread_errors[0] if pin_thread and pin_thread_errors else error
            where = "the DataLoader's pin-memory thread" if pin_thread else "a batch's hand-over"
            raise faults.RunFault(f"{where} failed ({type(cause).__name__}: {cause})") from error
        if batch.shown is not None and batch.shown.is_shared():
            batch.shown = batch.shown.clone()
        yield batch


@contextlib.contextmanager
def quiet_pin_memory_thread(kept: list[BaseException]) -> Iterator[None]:
    """While batches are handed over and until the loader is closed, the DataLoader's
    pin-memory thread (CUDA) dying (of a broken hand-over, say) prints no traceback of its
    own: its error goes to ``kept``, and the model process reports the stop in one line
    (``handed_over``). Other threads' errors print as before. The thread is known by its name
    (``faults.PIN_MEMORY_THREAD_NAME``), the only public trace of it."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and faults.PIN_MEMORY_THREAD_NAME in args.thread.name:
            kept.append(args.exc_value)
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def dead_decode_processes(processes: Sequence[BaseProcess], wait: float = 2.0) -> list[int]:
    """The pids of ``processes`` that have exited (waiting up to ``wait`` seconds for one that
    is still being torn down)."""
    deadline = time.monotonic() + wait
    while True:
        dead = [process.pid for process in processes if not process.is_alive()]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def close_loader(batches, processes: Sequence[BaseProcess]) -> None:
    """Stop the decode processes now (the DataLoader's own shutdown, ``_loader_shutdown``),
    killing any that hang. ``batches`` is None where ``iter(loader)`` did not return; the
    processes it had started are killed."""
    _loader_shutdown(batches, processes)
    _kill(processes)


def _loader_shutdown(batches, processes: Sequence[BaseProcess]) -> None:
    """The DataLoader's own orderly shutdown of the iterator ``batches``: the one place where
    this program uses a private name of torch's, ``_shutdown_workers``.

    torch has no public way to end an iterator's decode processes at a chosen moment: its
    ``__del__`` calls this same method, but only once the last reference to the iterator has
    gone, and a stop's traceback may hold one for the rest of the run. The method ends the
    pin-memory thread first (so that it reads no half-sent batch, and its errors are kept
    quiet, as ``batches_from`` promises), tells each process to stop and joins it, and takes
    their pids off the list that torch's SIGCHLD handler checks (after which an exit is no
    longer reported as a death).

    Where the method is missing (a single-process iterator, or a torch that renamed it, for
    which tests/test_torch_contract.py fails, naming this function), ``processes`` (those
    ``iter(loader)`` started, see ``processes_started``) are killed instead, and the caller
    drops its references to the iterator; the pin-memory thread (CUDA), which only a private
    event stops, is then left to the iterator's own clean-up, or to the end of the process (it
    is a daemon thread). A death reported by torch's SIGCHLD handler while this runs is one of
    those being ended here: the run has already stopped for it, or has received every batch."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        _kill(processes)
        return
    try:
        shutdown()
    except RuntimeError as error:
        if not faults.is_helper_death(error):
            raise


def _kill(processes: Sequence[BaseProcess], wait: float = 1.0) -> None:
    """Kill those of ``processes`` still running and wait up to ``wait`` seconds for them to
    go. SIGKILL, not SIGTERM: a decode process ignores SIGTERM (``_decode_worker_init``), and
    holds nothing that a kill loses (a batch's shared memory goes with its last file
    descriptor). Where torch's SIGCHLD handler still lists their pids, it reports each exit as
    a RuntimeError in this thread, which is only the death asked for here, and is dropped."""
    deadline = time.monotonic() + wait
    for process in processes:
        for _ in range(len(processes) + 1):  # one report per exit at most
            try:
                if process.is_alive():
                    process.kill()
                    process.join(max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError as error:
                if not faults.is_helper_death(error):
                    raise
