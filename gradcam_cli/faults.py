"""Faults during a run: the stop signals, the fault that ends a run, and how to resume it.

A run that stops part-way (a write fails, a helper process dies, SIGTERM, SIGHUP or Ctrl-C)
ends with one line that says why, how many images are done and the exact command that resumes
it. The signal handlers raise in the main thread, except inside ``deferred()`` sections (a queue
read, a summary row being appended), which finish first, so a stop never leaves a half-read
message or a half-written row behind, and once every image is done (``run_complete``), when a
stop would save nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import program

EXIT_FAULT = 3       # stopped by a fault; --skip_existing resumes
EXIT_SIGINT = 130    # Ctrl-C (SIGINT)
EXIT_SIGTERM = 143   # SIGTERM (a scheduler, timeout, torchrun stopping its other processes)
EXIT_SIGHUP = 129    # SIGHUP (the terminal closed, the ssh connection dropped)


class RunFault(Exception):
    """A fault that stops the run: a write that failed, a helper process that died."""


class DecodeProcessDied(RuntimeError):
    """A decode process found dead where the DataLoader's own error did not say so: killed
    while handing a batch over, which breaks the connection its shared memory travels on."""


# torch's words, which the fault layer matches (and the name of the DataLoader's pin-memory
# thread). torch promises none of them: tests/test_torch_contract.py checks each against the
# installed torch, and names the function to update where one has changed.
#
# A dead decode process: "DataLoader worker (pid 7) is killed by signal: Killed." (its SIGCHLD
# handler) or "DataLoader worker (pid(s) 7) exited unexpectedly" (its status check), raised in
# the model process wherever it is (is_helper_death).
LOADER_DEATH_WORDS = ("DataLoader worker (pid",)
# An error raised inside a decode process comes back as "Caught X in DataLoader worker process
# 0.", followed by that process's traceback: not a death (decode_fault).
IN_DECODE_PROCESS_WORDS = "in DataLoader worker process"
# A decode process cannot put a batch in shared memory, /dev/shm (is_shared_memory_full).
SHARED_MEMORY_WORDS = ("unable to allocate shared memory", "unable to open shared memory")
# An allocation failed: torch's CPU allocator's words, and the C library's for ENOMEM, which
# torch quotes (decode_fault).
OUT_OF_MEMORY_WORDS = ("not enough memory", "Cannot allocate memory")
# The DataLoader's error once its pin-memory thread (CUDA) has died (image_loader.handed_over).
PIN_MEMORY_THREAD_EXITED = "Pin memory thread exited unexpectedly"
# In the pin-memory thread's name, which Python takes from its target, torch's function
# _pin_memory_loop: "Thread-3 (_pin_memory_loop)" (image_loader.quiet_pin_memory_thread).
PIN_MEMORY_THREAD_NAME = "_pin_memory_loop"

SHARED_MEMORY_ADVICE = ("give a container more with docker run --shm-size=1g (or --ipc=host), "
                        "or in Kubernetes an emptyDir of medium Memory at /dev/shm")


def is_helper_death(error: BaseException) -> bool:
    """A decode process died: raised in the model process wherever it happens to be, so it
    is neither the model's fault nor a bug."""
    if isinstance(error, DecodeProcessDied):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error)
                                                   for words in LOADER_DEATH_WORDS)


def decode_fault(error: BaseException) -> str | None:
    """The reason, in torch's last line, when a decode process raised because of the machine
    (shared memory, memory, an OS error), which the DataLoader re-raises here as "Caught X in
    DataLoader worker process N" with the process's traceback; None for anything else raised
    there (a bug, which should show its traceback)."""
    text = str(error)
    if IN_DECODE_PROCESS_WORDS not in text:
        return None
    if isinstance(error, (OSError, MemoryError)) or any(
            words in text for words in SHARED_MEMORY_WORDS + OUT_OF_MEMORY_WORDS):
        return text.strip().splitlines()[-1]
    return None


def is_shared_memory_full(error: BaseException) -> bool:
    """A decode process found no room (or none at all) for a batch in shared memory."""
    return any(words in str(error) for words in SHARED_MEMORY_WORDS)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: stop cleanly, like Ctrl-C (a BaseException, so nothing
    swallows it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


_HANGUP: int | None = getattr(signal, "SIGHUP", None)  # none on Windows
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((_HANGUP,) if _HANGUP is not None else ())


class _State:
    deferred = 0
    pending: int | None = None
    received: int | None = None
    complete = False
    ignored_from_start: set[int] = set()  # see ignore_stop_signals
    handled: tuple[int, ...] = ()  # the signals stop_signals handles


def stop_for(signum: int) -> BaseException:
    """The exception a stop signal becomes: KeyboardInterrupt for SIGINT, else Terminated."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum: int, frame) -> None:
    _State.received = signum
    if signum == _HANGUP:
        leave_a_hung_up_terminal()
    if _State.complete:  # every image is done: the run ends whole either way
        return
    if _State.deferred:
        _State.pending = signum
        return
    _hold_further_signals()
    raise stop_for(signum)


def _hold_further_signals() -> None:
    """Once a stop is raised, every stop signal (not just the one that came) is only noted
    while the stop is cleaned up (a few seconds at most), so that a SIGTERM after a Ctrl-C,
    say, cannot cut the writing of what is done short."""
    for signum in _State.handled:
        signal.signal(signum, _late_handler)


def _late_handler(signum: int, frame) -> None:
    _State.received = _State.received or signum
    if signum == _HANGUP:  # the terminal closed while an earlier stop is cleaned up
        leave_a_hung_up_terminal()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section a stop signal may not cut in two; the signal is raised when it ends."""
    _State.deferred += 1
    try:
        yield
    finally:
        _State.deferred -= 1
        if not _State.deferred and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            _hold_further_signals()
            raise stop_for(signum)


def run_complete() -> None:
    """Every image of the run is done: from here until ``stop_signals`` ends, a stop signal is
    noted and dropped. Stopping would save nothing (the last steps write summary.csv and the
    report, in about a second at 50,000 images) and would only report a finished run as
    stopped, or cut its last file short."""
    _State.complete = True
    _State.pending = None


def signal_received() -> int | None:
    """The stop signal this process got, if any (a dying helper may be a side effect of it)."""
    return _State.received


@contextlib.contextmanager
def helpers_start_deaf() -> Iterator[None]:
    """Processes started inside begin with the stop signals blocked (a child inherits the
    mask, through exec too), so the terminal's Ctrl-C, which goes to the whole process group,
    cannot cut their start-up short with a traceback; each then ignores them for good, and
    the model process stops them. A stop signal for this process itself waits until the
    block ends only if no other thread takes it (another thread may, and Python then raises
    it in the main thread at once), so a caller ends what it started if the block raises."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """The command line's first step: stop signals are ignored outside ``stop_signals``, which
    puts this back when it ends. So the interpreter's shutdown after a run, finished or
    stopped, is never cut short (Ctrl-C there would print a traceback from an exit handler,
    and SIGTERM would turn a finished run's exit code into 143), with no moment between the
    run's end and the shutdown where a default handler is back. Python leaves SIG_IGN in
    place while it shuts down, and a process started outside ``stop_signals`` inherits it.

    A stop signal this process was started with ignored stays ignored throughout: that is
    how ``nohup`` keeps a run going when the terminal closes (SIGHUP), and how a shell
    starts a background job (``&``) that Ctrl-C must not reach."""
    _State.ignored_from_start = {s for s in STOP_SIGNALS
                                 if signal.getsignal(s) is signal.SIG_IGN}
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """The stop signals become exceptions in the main thread while the block runs (deferred
    inside ``deferred()``, dropped after ``run_complete()``)."""
    _State.deferred, _State.pending, _State.received, _State.complete = 0, None, None, False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS
                if s not in _State.ignored_from_start}
    _State.handled = tuple(previous)
    previous_unraisable = sys.unraisablehook
    sys.unraisablehook = _swallowed_stops_raised_again(previous_unraisable)
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _hold_further_signals()  # one that comes between two of these is only noted
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = previous_unraisable
        _State.complete = False


RAISE_AGAIN_S = 0.05  # long after the unraisable-error hook has returned


def _swallowed_stops_raised_again(previous: Callable) -> Callable:
    """An unraisable-error hook. The handler may run while a finaliser or a weakref callback
    is running (the garbage collector, an import's lock), where Python prints "Exception
    ignored in ..." with a traceback and goes on, so the stop would be lost and the run
    would carry on deaf to further signals. Such a stop is instead sent again, with the
    handler back, a moment later from a thread (sent at once, it would be raised inside
    this hook, and lost again), and so raised in the run's own code."""
    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not isinstance(error, (KeyboardInterrupt, Terminated)) or _State.received is None:
            previous(unraisable)
            return
        for signum in _State.handled:
            signal.signal(signum, _handler)
        signum = signal.SIGINT if isinstance(error, KeyboardInterrupt) else error.signum
        again = threading.Timer(RAISE_AGAIN_S, _signal_the_main_thread, args=(signum,))
        again.daemon = True
        again.start()
    return hook


def _signal_the_main_thread(signum: int) -> None:
    """Send ``signum`` to the main thread, so that a wait there (a sleep, a queue read) is
    cut short as by a signal from outside."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:  # Windows
        signal.raise_signal(signum)


def exit_code_for(stop: BaseException) -> int:
    if isinstance(stop, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(stop, Terminated):
        return EXIT_SIGHUP if stop.signum == _HANGUP else EXIT_SIGTERM
    return EXIT_FAULT


def describe_stop(stop: BaseException) -> str:
    """What stopped the run, in a few words."""
    if isinstance(stop, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    if isinstance(stop, Terminated):
        return f"stopped by {signal.Signals(stop.signum).name}"
    return f"stopped: {stop}"


def leave_a_hung_up_terminal() -> None:
    """After SIGHUP: a standard output or error whose writes now fail with EIO, a terminal
    that hung up (its window closed, the ssh connection dropped), goes to /dev/null, so the
    stop is not cut short by its own messages and still writes summary.csv and report.html,
    which say what was done and why. One that still works (a terminal sent a plain
    ``kill -HUP``, a log file, a pipe) keeps the stop line."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")  # a hung-up terminal fails every write, even of nothing
        except OSError as error:
            if error.errno == errno.EIO:
                _send_to_devnull(fd)


def _send_to_devnull(fd: int) -> None:
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def describe_exit(exitcode: int) -> str:
    """'killed by SIGKILL' or 'exited with code 1' for a process's exit code."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so none is ever left behind."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # not at the top: the command line imports this before it ignores Ctrl-C
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def remove_temporaries(folders: list[Path], pids: list[int]) -> None:
    """Temporary files (``.name.PID.tmp``) that processes killed mid-write left behind."""
    for folder in folders:
        for pid in pids:
            for path in folder.glob(f".*.{pid}.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()


def resume_command(argv: list[str] | None) -> str:
    """The command that started this run, shell-quoted, with --skip_existing added.

    Under torchrun it is the launcher's own command line (read from /proc), since that is
    what the user typed; the installed command is ``gradcam ...``; otherwise the
    interpreter's original argv (``python main.py ...``)."""
    words: list[str] | None = None
    if os.environ.get("TORCHELASTIC_RUN_ID") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        words = _launcher_command()
    installed = program() == "gradcam"
    if words is None:
        if argv is not None:
            words = (["gradcam"] if installed else ["python", "main.py"]) + list(argv)
        elif installed:
            words = ["gradcam", *sys.argv[1:]]
        else:
            words = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    if "--skip_existing" not in words:
        words.append("--skip_existing")
    return shlex.join(words)


def _launcher_command() -> list[str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    joined = " ".join(words)
    if "torchrun" in joined or "torch.distributed.run" in joined:
        return words
    return None
