"""What the fault layer needs of the installed torch, checked against it for real.

requirements.txt caps torch no longer, so each thing that torch does not promise, but
gradcam_cli/image_loader.py and gradcam_cli/faults.py rely on, is checked here: the texts of
the DataLoader's errors they match (a killed worker, an error inside a worker, shared memory,
memory, a dead pin-memory thread), the pin-memory thread's name, that the DataLoader starts its
workers as child processes inside ``iter()``, and its one private method still used,
``_shutdown_workers``. A failure says which torch changed what, and which function to update.
"""

from __future__ import annotations

import errno
import inspect
import mmap
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from gradcam_cli import faults, image_loader

VERSION = torch.__version__


def changed(what: str, function: str, file: str) -> str:
    return f"torch {VERSION} changed {what}; update {function} in gradcam_cli/{file}"


# ----------------------------------------------------------------------------- datasets
# At module level, so that a start method that pickles them (forkserver, spawn) can.

class Pids(torch.utils.data.Dataset):
    """Each item is the pid of the process that fetched it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, position: int) -> int:
        return os.getpid()


class KilledAtOnce(torch.utils.data.Dataset):
    """The process fetching the first item is killed (SIGKILL), as the out-of-memory killer
    would; a moment later, so that the model process is waiting for it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, position: int) -> int:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
        return position


SHARED_MEMORY_FULL = ("unable to allocate shared memory(shm) for file </torch_1_2>: No space "
                      "left on device (28)")


class Raising(torch.utils.data.Dataset):
    """Each item raises inside the decode process: the machine's faults, then a bug."""

    errors = [OSError(errno.EMFILE, "Too many open files"), RuntimeError(SHARED_MEMORY_FULL),
              ValueError("a bug in decoding")]

    def __len__(self) -> int:
        return len(self.errors)

    def __getitem__(self, position: int) -> int:
        raise self.errors[position]


def as_list(items: list) -> list:
    """A batch with no tensor in it, which the pin-memory thread passes on as it is."""
    return list(items)


def loader_of(dataset: torch.utils.data.Dataset, workers: int = 1,
              **options) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers,
                                       collate_fn=as_list, **options)


def errors_of(loader: torch.utils.data.DataLoader, batches: int) -> list[BaseException | None]:
    """What each of the first ``batches`` next() calls raised (None where it returned), with
    the loader closed after as the run closes it."""
    found: list[BaseException | None] = []
    processes: list = []
    iterator = None
    try:
        with image_loader.processes_started(processes):
            iterator = iter(loader)
        for _ in range(batches):
            try:
                next(iterator)
                found.append(None)
            except Exception as error:  # noqa: BLE001 (what torch raises is the point)
                found.append(error)
    finally:
        image_loader.close_loader(iterator, processes)
    return found


# ----------------------------------------------------------------------------- processes

@pytest.mark.slow
def test_the_decode_processes_are_the_children_that_iter_starts() -> None:
    """``processes_started`` finds the DataLoader's workers as the multiprocessing children
    that ``iter(loader)`` starts (a child started before is not one of them), and
    ``close_loader`` leaves none running."""
    before = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,),
                                                         daemon=True)
    before.start()
    processes: list = []
    iterator = None
    try:
        with image_loader.processes_started(processes):
            iterator = iter(loader_of(Pids(), workers=2))
        fetched_by = {pid for batch in iterator for pid in batch}
        where = changed(f"how the DataLoader starts its worker processes (the children started "
                        f"by iter() are {[p.pid for p in processes]}, the items were fetched "
                        f"by {sorted(fetched_by)})", "processes_started", "image_loader.py")
        assert before not in processes, where
        assert sorted(p.pid for p in processes) == sorted(fetched_by), where
    finally:
        image_loader.close_loader(iterator, processes)
        before.kill()
        before.join()
    assert not [p.pid for p in processes if p.is_alive()], \
        changed("its shutdown: decode processes still run after it", "_loader_shutdown",
                "image_loader.py")


@pytest.mark.slow
def test_the_dataloaders_own_shutdown_is_there() -> None:
    """``_loader_shutdown`` calls the multi-process iterator's ``_shutdown_workers``, the one
    private name the fault layer uses; it ends every decode process."""
    processes: list = []
    with image_loader.processes_started(processes):
        iterator = iter(loader_of(Pids()))
    try:
        next(iterator)
        assert callable(getattr(iterator, "_shutdown_workers", None)), changed(
            f"the DataLoader's iterator ({type(iterator).__name__}): it has no "
            f"_shutdown_workers() any more (its processes are now killed instead)",
            "_loader_shutdown", "image_loader.py")
        image_loader._loader_shutdown(iterator, processes)
        assert processes and not [p.pid for p in processes if p.is_alive()], changed(
            "_shutdown_workers(): decode processes still run after it", "_loader_shutdown",
            "image_loader.py")
    finally:
        image_loader.close_loader(iterator, processes)


class _WithoutShutdown:
    """A DataLoader iterator of a torch that has no ``_shutdown_workers``."""


@pytest.mark.slow
def test_without_the_dataloaders_shutdown_the_decode_processes_are_killed() -> None:
    """The fallback: decode processes (which ignore SIGTERM) are killed, and the deaths that
    torch's SIGCHLD handler reports while they are are dropped, not raised."""
    loader = loader_of(Pids(), workers=2, worker_init_fn=image_loader._decode_worker_init)
    processes: list = []
    with image_loader.processes_started(processes):
        iterator = iter(loader)
    try:
        next(iterator)
        started = time.monotonic()
        image_loader._loader_shutdown(_WithoutShutdown(), processes)
        assert len(processes) == 2 and not [p.pid for p in processes if p.is_alive()]
        assert time.monotonic() - started < 1.0
        time.sleep(0.2)  # a late SIGCHLD report would be raised here
    finally:
        image_loader.close_loader(iterator, processes)


# ----------------------------------------------------------------------------- torch's words

@pytest.mark.slow
def test_a_killed_decode_process_is_reported_in_torchs_words() -> None:
    """A worker killed by SIGKILL: the DataLoader raises a RuntimeError that
    ``is_helper_death`` knows, and ``decode_fault`` does not take for a machine fault."""
    error, = errors_of(loader_of(KilledAtOnce()), batches=1)
    assert isinstance(error, RuntimeError) and faults.is_helper_death(error), changed(
        f"its error for a killed DataLoader worker (now {error!r}, not containing "
        f"{faults.LOADER_DEATH_WORDS})", "is_helper_death (LOADER_DEATH_WORDS)", "faults.py")
    assert faults.decode_fault(error) is None


@pytest.mark.slow
def test_an_error_inside_a_decode_process_is_reported_in_torchs_words() -> None:
    """An error raised inside a worker comes back with "in DataLoader worker process" and the
    worker's traceback, its own message last: ``decode_fault`` gives that line for the
    machine's faults (an OSError, shared memory full) and None for a bug."""
    too_many, shared_memory, bug = errors_of(loader_of(Raising()), batches=3)
    where = "decode_fault (IN_DECODE_PROCESS_WORDS)"
    for error in (too_many, shared_memory, bug):
        assert error is not None and faults.IN_DECODE_PROCESS_WORDS in str(error), changed(
            f"how an error raised in a DataLoader worker comes back (now {error!r}, not "
            f"containing {faults.IN_DECODE_PROCESS_WORDS!r})", where, "faults.py")
    reason = faults.decode_fault(too_many)
    assert isinstance(too_many, OSError) and reason is not None \
        and reason.endswith("Too many open files"), changed(
            f"how an OSError raised in a DataLoader worker comes back (now {too_many!r}; "
            f"decode_fault gives {reason!r})", "decode_fault", "faults.py")
    reason = faults.decode_fault(shared_memory)
    assert reason is not None and reason.endswith("No space left on device (28)") \
        and faults.is_shared_memory_full(shared_memory), changed(
            f"how a RuntimeError raised in a DataLoader worker comes back (now "
            f"{shared_memory!r}; decode_fault gives {reason!r})", "decode_fault", "faults.py")
    assert faults.decode_fault(bug) is None and not faults.is_helper_death(bug)


def test_torchs_words_for_a_failed_allocation() -> None:
    """An allocation that cannot succeed anywhere (4 EiB) fails in words ``decode_fault``
    counts as the machine's fault."""
    try:
        torch.empty(2 ** 62, dtype=torch.uint8)
        error: BaseException | None = None
    except (RuntimeError, MemoryError) as raised:
        error = raised
    assert error is not None and any(words in str(error) for words in
                                     faults.OUT_OF_MEMORY_WORDS), changed(
        f"its error for a failed allocation (now {error!r}, containing none of "
        f"{faults.OUT_OF_MEMORY_WORDS})", "decode_fault (OUT_OF_MEMORY_WORDS)", "faults.py")


def _torch_libraries() -> list[Path]:
    """torch's compiled libraries, the CPU one (where the shared-memory allocator is) first."""
    folder = Path(torch.__file__).parent / "lib"
    found = [p for p in folder.glob("*") if p.is_file() and any(
        p.name.endswith(end) or f"{end}." in p.name for end in (".so", ".dylib", ".dll"))]
    return sorted(found, key=lambda p: ("torch_cpu" not in p.name, p.name))


def test_torchs_words_for_shared_memory() -> None:
    """Shared memory (/dev/shm) full or missing cannot be caused cheaply, so the words that
    ``is_shared_memory_full`` looks for are looked for in torch's compiled libraries."""
    libraries = _torch_libraries()
    if not libraries:
        pytest.skip(f"no compiled libraries found under {Path(torch.__file__).parent / 'lib'}")
    missing = {words.encode() for words in faults.SHARED_MEMORY_WORDS}
    for library in libraries:
        if library.stat().st_size == 0:
            continue
        with library.open("rb") as file, \
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as contents:
            missing = {words for words in missing if contents.find(words) < 0}
        if not missing:
            return
    pytest.fail(changed(f"its shared-memory errors ({sorted(w.decode() for w in missing)} is "
                        f"in none of its libraries)", "is_shared_memory_full "
                        "(SHARED_MEMORY_WORDS)", "faults.py"))


# ----------------------------------------------------------------------------- pin memory

@pytest.fixture
def pinning(monkeypatch) -> None:
    """The DataLoader's pin-memory thread, also on a machine without an accelerator: there
    torch is told that the CPU is one (as test_faults.py's pinned hand-over does); the batches
    hold no tensor, so nothing is pinned."""
    if torch.accelerator.is_available():
        return
    needed = ("is_available", "current_accelerator", "current_device_index",
              "set_device_index")
    if not all(hasattr(torch.accelerator, name) for name in needed):
        pytest.skip("this torch's DataLoader pins without torch.accelerator, so it cannot be "
                    "made to start its pin-memory thread without an accelerator")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *args, **kwargs: torch.device("cpu"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda index: None)


def _pin_memory_threads(others: set[threading.Thread]) -> list[threading.Thread]:
    """The threads named as a pin-memory thread is, but for ``others`` (those of earlier
    tests)."""
    return [thread for thread in threading.enumerate()
            if faults.PIN_MEMORY_THREAD_NAME in thread.name and thread not in others]


@pytest.mark.slow
def test_the_pin_memory_thread_is_known_by_its_name(pinning) -> None:
    """While a loader with pin_memory=True iterates, its pin-memory thread is the one whose
    name holds ``PIN_MEMORY_THREAD_NAME``; ``close_loader`` ends it."""
    others = set(threading.enumerate())
    processes: list = []
    iterator = None
    try:
        with image_loader.processes_started(processes):
            iterator = iter(loader_of(Pids(), pin_memory=True))
        next(iterator)
        started = [thread.name for thread in threading.enumerate() if thread not in others]
        assert _pin_memory_threads(others), changed(
            f"its pin-memory thread's name (the threads it started: {started}, none with "
            f"{faults.PIN_MEMORY_THREAD_NAME!r})", "quiet_pin_memory_thread "
            "(PIN_MEMORY_THREAD_NAME)", "image_loader.py")
    finally:
        image_loader.close_loader(iterator, processes)
    assert not _pin_memory_threads(others), changed(
        "its shutdown: the pin-memory thread still runs after close_loader", "_loader_shutdown",
        "image_loader.py")


def _dies(index: int) -> None:
    raise OSError(errno.EMFILE, "Too many open files")


@pytest.mark.slow
def test_a_dead_pin_memory_thread_is_reported_in_torchs_words(pinning, monkeypatch) -> None:
    """The pin-memory thread dies as it starts (it sets the accelerator's device first): the
    DataLoader says so in ``PIN_MEMORY_THREAD_EXITED``, and the thread's error reaches the
    thread error hook under the thread's name. Where this torch's thread no longer sets the
    device, only the text can be looked for, in torch's source."""
    others = set(threading.enumerate())
    reported: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", reported.append)
    monkeypatch.setattr(torch.accelerator, "set_device_index", _dies)
    errors = []
    processes: list = []
    iterator = None
    try:
        with image_loader.processes_started(processes):
            iterator = iter(loader_of(Pids(), pin_memory=True))
        for thread in _pin_memory_threads(others):
            thread.join(5.0)  # so that next() finds it dead at once
        try:
            next(iterator)
        except RuntimeError as error:
            errors.append(error)
    finally:
        image_loader.close_loader(iterator, processes)
    if not reported:
        source = inspect.getsource(torch.utils.data.dataloader)
        assert faults.PIN_MEMORY_THREAD_EXITED in source, changed(
            f"its error for a dead pin-memory thread ({faults.PIN_MEMORY_THREAD_EXITED!r} is "
            f"not in torch.utils.data.dataloader)", "handed_over (PIN_MEMORY_THREAD_EXITED)",
            "image_loader.py")
        return
    name = reported[0].thread.name if reported[0].thread is not None else None
    assert name is not None and faults.PIN_MEMORY_THREAD_NAME in name, changed(
        f"its pin-memory thread's name (now {name!r})",
        "quiet_pin_memory_thread (PIN_MEMORY_THREAD_NAME)", "image_loader.py")
    assert errors and faults.PIN_MEMORY_THREAD_EXITED in str(errors[0]), changed(
        f"its error for a dead pin-memory thread (now {errors!r}, not containing "
        f"{faults.PIN_MEMORY_THREAD_EXITED!r})", "handed_over (PIN_MEMORY_THREAD_EXITED)",
        "image_loader.py")


@pytest.mark.slow
def test_a_dead_pin_memory_thread_stops_the_run_in_one_line(pinning, monkeypatch,
                                                            capsys) -> None:
    """Through ``batches_from``, as the run sees it: a fault naming the thread's own error,
    and no traceback from the thread."""
    others = set(threading.enumerate())
    monkeypatch.setattr(torch.accelerator, "set_device_index", _dies)
    monkeypatch.setattr(image_loader, "dead_decode_processes",
                        lambda processes, wait=2.0: [])  # every process is alive here
    with pytest.raises(faults.RunFault) as stop:
        with image_loader.batches_from(loader_of(Pids(), pin_memory=True)) as batches:
            for thread in _pin_memory_threads(others):
                thread.join(5.0)
            if _pin_memory_threads(others):
                pytest.skip("this torch's pin-memory thread does not set the device as it "
                            "starts (test_a_dead_pin_memory_thread_is_reported_in_torchs_words "
                            "checks its words)")
            next(batches)
    assert "pin-memory thread failed (OSError: [Errno 24] Too many open files)" \
        in str(stop.value), changed(f"how its pin-memory thread dies (the run stopped with "
                                    f"{stop.value!r})", "handed_over", "image_loader.py")
    assert "Traceback" not in capsys.readouterr().err


def test_relu6_and_hardtanh_reach_a_torch_function_mode_as_guided_py_expects() -> None:
    """F.relu6 and F.hardtanh reach a TorchFunctionMode as themselves (guided.py's table
    names them), and the private functions behind them, which code may call directly and
    guided.py also guides, still exist."""
    from torch.overrides import TorchFunctionMode

    from gradcam_cli.guided import _SIGNATURES, _private_nn_function
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, requires_grad=True)
    with Record():
        torch.nn.functional.relu6(x)
        torch.nn.functional.hardtanh(x, 0.0, 2.0)
        torch.nn.ReLU6()(x)
    assert all(func in _SIGNATURES for func in seen), (
        f"torch {torch.__version__} sends ReLU6/hardtanh calls to a TorchFunctionMode as "
        f"{seen}; update _relu_signatures in gradcam_cli/guided.py")
    for name in ("relu6", "relu6_", "hardtanh", "hardtanh_"):
        assert _private_nn_function(name) is not None, (
            f"torch {torch.__version__} has no torch._C._nn.{name}; update "
            f"_private_nn_function in gradcam_cli/guided.py")
