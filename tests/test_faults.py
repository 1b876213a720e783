"""Faults during a run, caused for real where that is cheap, and the render pool.

Each fault test checks the exit code and the one line that names the fault (no traceback), that
no temporary file is left, that summary.csv holds exactly the images whose files are all
written, and that a --skip_existing rerun completes the run with files and rows equal to an
uninterrupted run. Runs use a tiny random CNN saved with torch.save and copies of data/.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_cli import cli, outputs
from gradcam_cli.explainer import quantise
from gradcam_cli.figures import FigureWriter

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
N_IMAGES = 24
# --batch_size 1 makes every image's numbers independent of which images share its batch,
# so an interrupted-then-resumed run must equal an uninterrupted one byte for byte.
COMMON = ["--n_images", "all", "--conv2d_backcount", "1", "2", "--save_raw", "--quiet",
          "--device", "cpu", "--batch_size", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


# ----------------------------------------------------------------------------- set-up

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A torch.save()d nn.Sequential with three Conv2d layers and five classes."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """N_IMAGES copies of the photos in data/, in one flat folder."""
    folder = tmp_path_factory.mktemp("images")
    photos = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    for i in range(N_IMAGES):
        source = photos[i % len(photos)]
        (folder / f"img{i:02d}{source.suffix}").write_bytes(source.read_bytes())
    return folder


def arguments(model: Path, folder: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--model_path", str(model), "--images_path", str(folder), "--save_dir",
            str(save_dir), *COMMON, *extra]


@pytest.fixture(scope="module")
def reference(tiny_model: Path, images: Path, tmp_path_factory) -> Path:
    """The uninterrupted run, rendered in this process."""
    save_dir = tmp_path_factory.mktemp("reference")
    assert cli.main(arguments(tiny_model, images, save_dir, "--render_workers", "0")) == 0
    return save_dir


def files_in(save_dir: Path) -> dict[str, bytes]:
    """Every output file (not the hidden bookkeeping ones), by relative path."""
    return {p.relative_to(save_dir).as_posix(): p.read_bytes() for p in save_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def rows_of(save_dir: Path) -> list[list[str]]:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


def assert_equal_runs(save_dir: Path, reference: Path) -> None:
    """Byte-identical figures, npz files and summary.csv."""
    mine, theirs = files_in(save_dir), files_in(reference)
    assert sorted(mine) == sorted(theirs)
    different = [name for name in mine if mine[name] != theirs[name]]
    assert not different, different


def assert_clean_stop(save_dir: Path, reference: Path) -> None:
    """No temporary file; summary.csv rows are exactly the images whose files all exist,
    and each equals the uninterrupted run's row."""
    assert not [p for p in save_dir.rglob("*.tmp")]
    expected = {row[0]: row for row in rows_of(reference)[1:]}
    rows = rows_of(save_dir)
    assert rows[0] == rows_of(reference)[0]
    complete = set()
    for index, row in expected.items():
        names = row[rows[0].index("figures")].split(";")
        paths = [save_dir / n for n in names] + [save_dir / "raw" / f"image{index}.npz"]
        if all(p.exists() for p in paths):
            complete.add(index)
    assert {row[0] for row in rows[1:]} == complete
    for row in rows[1:]:
        assert row == expected[row[0]]


def fault_line(stderr: str) -> str:
    """The one line a stopped run prints (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "resume with:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def resume_and_compare(line: str, save_dir: Path, reference: Path,
                       torchrun: bool = False) -> None:
    """Run the command the line gives; it completes the run."""
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[-1] == "--skip_existing"
    if not torchrun:
        command = [sys.executable, str(ROOT / "main.py")] + command[2:]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equal_runs(save_dir, reference)


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- processes

def children(pid: int) -> list[int]:
    """Every process below ``pid``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append(child)
                frontier.append(child)
    return found


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                .decode(errors="replace"))
    return ""


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_figures(save_dir: Path, process: subprocess.Popen, n: int = 2) -> None:
    deadline = time.monotonic() + 240
    while len(list(save_dir.glob("*.jpg"))) < n:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def finish(process: subprocess.Popen, helpers: list[int]) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in helpers if alive(pid)], "helper processes left behind"
    return process.returncode, err


# ----------------------------------------------------------------------------- the render pool

@pytest.mark.slow
def test_render_workers_0_and_2_write_identical_files(tiny_model: Path, images: Path,
                                                      reference: Path, tmp_path: Path) -> None:
    """Two render processes write byte-identical figures, npz files and rows."""
    assert cli.main(arguments(tiny_model, images, tmp_path, "--render_workers", "2")) == 0
    assert_equal_runs(tmp_path, reference)


def test_quantised_maps_draw_the_same_figure() -> None:
    """Maps quantised on the device give the pixels the float maps gave."""
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((4, 32, 32), dtype=np.float32))
    maps[0, :4] = 0.0
    maps[1, :4] = 1.0
    maps[2, 0, :8] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 0.998, 0.999, 1e-9, 0.25,
                                   0.75])
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    writer = FigureWriter(n_maps=4, panel=32)
    titles = ["1. a 10.0%", "2. b 5.0%", "3. c 1.0%", "lowest: d 0.1%"]
    expected = writer.compose(image, maps.numpy(), titles, "x.png", "heading")
    quantised = quantise(maps).numpy()
    assert quantised.dtype == np.uint8
    np.testing.assert_array_equal(quantised,
                                  np.clip(maps.numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(writer.compose(image, quantised, titles, "x.png", "heading"),
                                  expected)


# ----------------------------------------------------------------------------- 1. a write fails

@pytest.mark.slow
def test_disk_full_injected_at_the_write(tiny_model: Path, images: Path, reference: Path,
                                         tmp_path: Path, monkeypatch) -> None:
    """ENOSPC at the 7th JPEG: exit 3, one line, the done images in summary.csv, resumable."""
    original, written = outputs.save_jpeg, []

    def fill_up(figure, path, *args, **kwargs):
        if len(written) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(figure, path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(outputs, "save_jpeg", fill_up)
    code, _, err = call(arguments(tiny_model, images, tmp_path, "--render_workers", "0"))
    assert code == 3
    line = fault_line(err)
    assert "No space left on device" in line and "image3_layer1.jpg" in line
    assert f"3 of {N_IMAGES} images done" in line
    assert_clean_stop(tmp_path, reference)
    monkeypatch.setattr(outputs, "save_jpeg", original)
    resume_and_compare(line, tmp_path, reference)


def test_a_figure_that_cannot_be_drawn_stops_inline_as_in_a_render_process(
        tiny_model: Path, images: Path, reference: Path, tmp_path: Path, monkeypatch) -> None:
    """A bug in drawing one image's figure, in the main process (--render_workers 0): exit 3
    and one line naming the image, as a render process reports it; no traceback."""
    from gradcam_cli import render_pool
    original = render_pool.render_image

    def fail_on_the_third(job, *args, **kwargs):
        if job.index == 2:
            raise ValueError("cannot draw this")
        original(job, *args, **kwargs)

    monkeypatch.setattr(render_pool, "render_image", fail_on_the_third)
    code, _, err = call(arguments(tiny_model, images, tmp_path, "--render_workers", "0"))
    assert code == 3
    line = fault_line(err)
    assert "drawing failed on" in line and "(ValueError: cannot draw this)" in line
    assert f"2 of {N_IMAGES} images done" in line
    assert_clean_stop(tmp_path, reference)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MB tmpfs (root only); skipped where one cannot be mounted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(tiny_model: Path, images: Path, reference: Path,
                                   small_tmpfs: Path) -> None:
    """A full file system under the render processes: exit 3 and one line; after making room,
    the resume command completes the run."""
    save_dir = small_tmpfs / "out"
    done = subprocess.run([sys.executable, str(ROOT / "main.py"),
                           *arguments(tiny_model, images, save_dir, "--render_workers", "2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 3, done.stderr[-3000:]
    line = fault_line(done.stderr)
    assert "No space left on device" in line and "cannot write" in line
    assert_clean_stop(save_dir, reference)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    resume_and_compare(line, save_dir, reference)


def test_a_disk_already_full_is_one_line_and_exit_2(tiny_model: Path, images: Path,
                                                    small_tmpfs: Path) -> None:
    """Nothing can be written at all: refused before the run starts, in one line."""
    with open(small_tmpfs / "filler", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(bytes(4096))
    code, _, err = call(arguments(tiny_model, images, small_tmpfs / "out"))
    assert code == 2 and "Traceback" not in err
    assert err.strip().endswith("cannot write there (No space left on device); choose another "
                                "folder")


# ----------------------------------------------------------------------------- 2. signals

@pytest.mark.parametrize("signum, code, to_the_group",
                         [(signal.SIGTERM, 143, False), (signal.SIGHUP, 129, True)])
@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resumes(signum: int, code: int, to_the_group: bool,
                                           tiny_model: Path, images: Path, reference: Path,
                                           tmp_path: Path) -> None:
    """SIGTERM mid-run (exit 143), or SIGHUP to the whole process group as a shell or tmux
    sends it when its terminal closes (exit 129): one line, no traceback from any process
    (the resource tracker included), no decode or render process left behind."""
    argv = arguments(tiny_model, images, tmp_path, "--workers", "1", "--render_workers", "1")
    process = in_its_own_group(argv) if to_the_group else start(argv)
    try:
        wait_for_figures(tmp_path, process)
        helpers = children(process.pid)
        if to_the_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        exit_code, err = finish(process, helpers)
    finally:
        if process.poll() is None:
            process.kill()
    assert exit_code == code, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in fault_line(err)
    assert_clean_stop(tmp_path, reference)
    resume_and_compare(fault_line(err), tmp_path, reference)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nohup") is None, reason="needs nohup")
def test_a_run_under_nohup_goes_on_when_the_terminal_closes(tiny_model: Path, images: Path,
                                                            reference: Path,
                                                            tmp_path: Path) -> None:
    """nohup starts main.py with SIGHUP ignored, so that it outlives its terminal: the
    terminal's SIGHUP to the group mid-run changes nothing, and the run completes."""
    argv = arguments(tiny_model, images, tmp_path, "--workers", "1", "--render_workers", "1")
    process = subprocess.Popen([shutil.which("nohup"), sys.executable, str(ROOT / "main.py"),
                                *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    try:
        wait_for_figures(tmp_path, process)
        os.killpg(process.pid, signal.SIGHUP)
        _, err = process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    assert_equal_runs(tmp_path, reference)


@pytest.mark.slow
def test_a_closed_terminal_stops_cleanly_and_resumes(tiny_model: Path, images: Path,
                                                     reference: Path, tmp_path: Path) -> None:
    """The terminal main.py runs in goes away (its window closed, an ssh connection lost),
    with the progress bar on it: the kernel sends SIGHUP to main.py (the session's leader),
    and every later write to the terminal fails. The run stops as for SIGTERM, exit 129:
    summary.csv and report.html say what is done and why (the line has nowhere to go),
    nothing is partial, no process is left, and the run's command with --skip_existing
    completes it."""
    import pty
    argv = [word for word in arguments(tiny_model, images, tmp_path, "--workers", "1",
                                       "--render_workers", "1") if word != "--quiet"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: main.py, with the new terminal as its controlling one
        try:
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, str(ROOT / "main.py"), *argv], ENV)
        finally:
            os._exit(127)
    shown, status = b"", None
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("*.jpg"))) < 2:
            assert time.monotonic() < deadline, shown[-3000:]
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), shown[-3000:]
            with contextlib.suppress(OSError):  # keep the terminal's buffer from filling
                if select.select([terminal], [], [], 0.02)[0]:
                    shown += os.read(terminal, 65536)
        helpers = children(pid)
        os.close(terminal)  # the terminal hangs up
        terminal = None
        deadline = time.monotonic() + 120
        while status is None and time.monotonic() < deadline:
            finished, code = os.waitpid(pid, os.WNOHANG)
            status = code if finished else None
            time.sleep(0.05)
    finally:
        if terminal is not None:
            os.close(terminal)
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status is not None, "main.py did not end after its terminal closed"
    assert os.waitstatus_to_exitcode(status) == 129
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in helpers if alive(p)], "helper processes left behind"
    assert_clean_stop(tmp_path, reference)
    assert "stopped by SIGHUP" in (tmp_path / "report.html").read_text(encoding="utf-8")
    command = shlex.join(["python", "main.py", *argv, "--skip_existing"])
    resume_and_compare(f"resume with: {command}", tmp_path, reference)


def test_only_a_hung_up_terminal_is_left(tmp_path: Path) -> None:
    """On SIGHUP, standard output and error go to /dev/null only once their terminal has hung
    up (writes fail with EIO); while it is there (a plain ``kill -HUP``) they stay, so the
    stop line is shown. The child notes what it sees in a file, the terminal being gone."""
    import pty
    notes = tmp_path / "notes.txt"
    script = textwrap.dedent(f"""
        import os, signal, sys, time, traceback
        from gradcam_cli import faults
        notes = open({str(notes)!r}, "w")
        def on_devnull():
            null = os.stat(os.devnull)
            return [os.path.samestat(os.fstat(fd), null) for fd in (1, 2)]
        try:
            hung_up = []
            signal.signal(signal.SIGHUP, lambda signum, frame: hung_up.append(signum))
            faults.leave_a_hung_up_terminal()
            notes.write(f"alive {{on_devnull()}}\\n")
            notes.flush()
            os.write(1, b"still shown\\n")
            while not hung_up:
                time.sleep(0.01)
            faults.leave_a_hung_up_terminal()
            print("written to /dev/null", flush=True)
            notes.write(f"hung up {{on_devnull()}}\\n")
        except BaseException:
            notes.write(traceback.format_exc())
        notes.close()
        os._exit(0)
    """)
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-c", script], ENV)
        finally:
            os._exit(127)
    shown = b""
    try:
        deadline = time.monotonic() + 60
        while b"still shown" not in shown and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if select.select([terminal], [], [], 0.05)[0]:
                    shown += os.read(terminal, 4096)
    finally:
        os.close(terminal)  # the terminal hangs up
        os.waitpid(pid, 0)
    assert notes.read_text().splitlines() == ["alive [False, False]", "hung up [True, True]"], \
        notes.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_swallowed_by_a_finaliser_is_raised_again(signum: int, capsys) -> None:
    """A stop signal whose handler runs inside a finaliser (or a weakref callback: seen when
    Ctrl-C came during an import) would be printed as "Exception ignored" and lost; it is
    raised again in the ordinary code instead, with nothing printed."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are only installed from the main thread")
    from gradcam_cli import faults

    class SignalledWhileCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signum)  # its handler runs here, inside the finaliser

    expected = KeyboardInterrupt if signum == signal.SIGINT else faults.Terminated
    with faults.stop_signals():
        with pytest.raises(expected):
            SignalledWhileCollected()  # collected at once
            time.sleep(5)  # the stop comes back in here
    assert "Exception ignored" not in capsys.readouterr().err


def in_its_own_group(argv: list[str]) -> subprocess.Popen:
    """main.py as a shell runs it: the leader of a process group, which a terminal's Ctrl-C
    reaches whole (every decode and render process with it)."""
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def group_alive(group: int) -> list[int]:
    """The processes of a process group still running (zombies are not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    found.append(int(entry.name))
    return found


def importing_numpy(pid: int) -> bool:
    """Whether numpy's compiled core is mapped into the process."""
    with contextlib.suppress(OSError):
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    return False


def test_ctrl_c_while_the_helpers_start_is_one_line(tiny_model: Path, images: Path,
                                                    tmp_path: Path) -> None:
    """Ctrl-C on the terminal while the render processes are still importing (and the model
    process is loading torch): the whole group gets it, and the run ends in one line, exit
    130, with no traceback from any process, nothing in save_dir and no process left. (They
    start with the stop signals blocked, then ignore them; the model process stops them.)"""
    save_dir = tmp_path / "out"
    process = in_its_own_group(arguments(tiny_model, images, save_dir, "--workers", "1",
                                          "--render_workers", "2"))
    try:
        deadline = time.monotonic() + 60
        while not [pid for pid in children(process.pid) if "spawn_main" in command_line(pid)
                   and importing_numpy(pid)]:  # half-way through its imports
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130, err[-3000:]
        assert err.splitlines() == ["main.py: interrupted (SIGINT)"], err[-3000:]
        deadline = time.monotonic() + 10
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(process.pid), "helper processes left behind"
        assert not save_dir.exists() or not list(save_dir.rglob("*"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def signal_me_at(monkeypatch, owner: object, name: str, signum: int, after: bool = False,
                 when: Callable[..., bool] = lambda *args, **kwargs: True) -> None:
    """Patch ``owner.name`` so that its first call for which ``when`` holds sends this
    process ``signum``, before the original runs or (``after``) once it has returned. The
    handler runs as ``os.kill`` returns, so "before" means the original is never reached
    unless the signal is deferred there."""
    original, sent = getattr(owner, name), []

    def signal_around_call(*args, **kwargs):
        armed = not sent and when(*args, **kwargs)
        if armed:
            sent.append(signum)
        if armed and not after:
            os.kill(os.getpid(), signum)
        value = original(*args, **kwargs)
        if armed and after:
            os.kill(os.getpid(), signum)
        return value
    monkeypatch.setattr(owner, name, signal_around_call)


@pytest.mark.slow
@pytest.mark.parametrize("signum, after", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_stop_while_save_dir_is_prepared_is_a_clean_stop(
        signum: int, after: bool, tiny_model: Path, images: Path, reference: Path,
        tmp_path: Path, monkeypatch) -> None:
    """A stop signal between the run's first write in save_dir and its first image (as the
    room for summary.csv is taken, or just after): the resume line, 0 images done, and the
    room given back."""
    signal_me_at(monkeypatch, outputs, "reserve_space", signum, after=after)
    code, _, err = call(arguments(tiny_model, images, tmp_path, "--render_workers", "1"))
    assert code == (130 if signum == signal.SIGINT else 143), err[-3000:]
    assert f"0 of {N_IMAGES} images done" in fault_line(err)
    assert not (tmp_path / outputs.RESERVE).exists()
    assert_clean_stop(tmp_path, reference)
    monkeypatch.undo()
    resume_and_compare(fault_line(err), tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["render processes told to end", "row log closed"])
def test_a_stop_as_the_images_are_finished_is_a_clean_stop(
        where: str, tiny_model: Path, images: Path, reference: Path, tmp_path: Path,
        monkeypatch) -> None:
    """Ctrl-C once every figure is written, as the render processes are told to end or as
    the row log is closed (a stop then waits until everything is closed): the resume line
    with every image done (not a bare 'interrupted'), summary.csv whole, no render process
    left."""
    from gradcam_cli import render_pool
    if where == "row log closed":
        signal_me_at(monkeypatch, outputs.SummaryLog, "close", signal.SIGINT)
    else:
        signal_me_at(monkeypatch, render_pool.RenderPool, "close", signal.SIGINT,
                     when=lambda pool, abort=False: not abort)
    code, _, err = call(arguments(tiny_model, images, tmp_path, "--render_workers", "2"))
    assert code == 130, err[-3000:]
    assert f"{N_IMAGES} of {N_IMAGES} images done" in fault_line(err)
    assert_clean_stop(tmp_path, reference)
    assert len(rows_of(tmp_path)) == N_IMAGES + 1
    assert not (tmp_path / outputs.RESERVE).exists()
    assert not [pid for pid in children(os.getpid()) if "spawn_main" in command_line(pid)
                and alive(pid)]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_after_every_image_is_done_is_dropped(signum: int, tiny_model: Path,
                                                     images: Path, reference: Path,
                                                     tmp_path: Path, monkeypatch) -> None:
    """A stop signal while summary.csv is written: the run ends whole, exit 0, as if none
    had come (stopping then would save nothing and report a finished run as stopped)."""
    signal_me_at(monkeypatch, outputs, "write_summary", signum)
    code, out, err = call(arguments(tiny_model, images, tmp_path, "--render_workers", "1"))
    assert code == 0, err[-3000:]
    assert "resume with" not in err and f"processed {N_IMAGES} image(s)" in out
    assert_equal_runs(tmp_path, reference)


def test_a_render_pool_close_cut_short_is_finished_by_the_next() -> None:
    """A stop signal inside RenderPool.close (while it waits for the processes): the next
    close, the abort every stop makes, still ends them all; a third does nothing."""
    from gradcam_cli import render_pool
    pool = render_pool.RenderPool(2)
    try:
        first = pool._processes[0]
        first.join = lambda timeout=None: (_ for _ in ()).throw(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            pool.close()
        del first.join
        pool.close(abort=True)
        assert all(process.exitcode is not None for process in pool._processes)
        pool.close(abort=True)
    finally:
        for process in pool._processes:
            if process.is_alive():
                process.kill()


def test_a_stop_as_the_render_processes_start_ends_those_started(monkeypatch) -> None:
    """A stop signal held back while the render processes start is raised as they are all
    started, inside RenderPool(): the caller never gets the pool, so the pool ends them
    itself (else each would hang the interpreter's exit, which waits for it)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are only installed from the main thread")
    from gradcam_cli import render_pool
    started: list = []
    original = render_pool.multiprocessing.context.SpawnProcess.start

    def start_then_signal(process) -> None:
        original(process)
        started.append(process)
        if len(started) == 2:  # to the main thread, which blocks it until the starts end
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    monkeypatch.setattr(render_pool.multiprocessing.context.SpawnProcess, "start",
                        start_then_signal)
    from gradcam_cli import faults
    try:
        with faults.stop_signals(), pytest.raises(KeyboardInterrupt):
            render_pool.RenderPool(3)
        assert len(started) == 3
        assert all(process.exitcode is not None for process in started)
    finally:
        for process in started:
            if process.is_alive():
                process.kill()


def test_stop_signals_put_back_what_the_command_line_set() -> None:
    """main.py ignores the stop signals before main() and main() handles them while it runs;
    when it returns, they are ignored again, so the interpreter's shutdown is never cut."""
    from gradcam_cli import faults
    previous = {s: signal.getsignal(s) for s in faults.STOP_SIGNALS}
    try:
        faults.ignore_stop_signals()
        with faults.stop_signals():
            assert all(signal.getsignal(s) is not signal.SIG_IGN for s in faults.STOP_SIGNALS)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in faults.STOP_SIGNALS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- 3. a helper dies

@pytest.mark.slow
@pytest.mark.parametrize("victim", ["decode", "render"])
def test_a_killed_helper_process_stops_the_run(victim: str, tiny_model: Path, images: Path,
                                               reference: Path, tmp_path: Path) -> None:
    """SIGKILL to a decode or a render process (as the out-of-memory killer would): exit 3,
    one line naming it, nothing partial, nothing left running."""
    process = start(arguments(tiny_model, images, tmp_path, "--workers", "1",
                              "--render_workers", "1"))
    wait_for_figures(tmp_path, process)
    helpers = children(process.pid)
    spawned = [pid for pid in helpers if "spawn_main" in command_line(pid)]
    forked = [pid for pid in helpers if command_line(pid) == command_line(process.pid)]
    victims = spawned if victim == "render" else forked
    assert len(victims) == 1, [command_line(pid) for pid in helpers]
    os.kill(victims[0], signal.SIGKILL)
    code, err = finish(process, helpers)
    assert code == 3, err[-3000:]
    line = fault_line(err)
    if victim == "render":
        assert f"render process {victims[0]} killed by SIGKILL" in line
    else:
        assert "decode process died" in line and str(victims[0]) in line
    assert_clean_stop(tmp_path, reference)
    resume_and_compare(line, tmp_path, reference)


# ----------------------------------------------------------------------------- 4. out of memory

@pytest.mark.slow
def test_out_of_memory_halves_the_batch(tiny_model: Path, images: Path, tmp_path: Path,
                                        monkeypatch) -> None:
    """A (faked) CUDA OOM for batches over 2: one line, then batches of 2, for the metrics'
    and Score-CAM's passes too; the outputs equal --batch_size 2 from the start."""
    from gradcam_cli import explainer, metrics
    engine, measure = explainer.explain_methods, metrics.faithfulness
    sizes = {"engine": [], "score": [], "metrics": []}

    def explain(model, inputs, *args, **kwargs):
        sizes["engine"].append(inputs.shape[0])
        sizes["score"].append(kwargs["batch_size"])
        if inputs.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return engine(model, inputs, *args, **kwargs)

    def faithfulness(*args, **kwargs):
        sizes["metrics"].append(kwargs["batch_size"])
        return measure(*args, **kwargs)

    monkeypatch.setattr(explainer, "explain_methods", explain)
    monkeypatch.setattr(metrics, "faithfulness", faithfulness)
    common = ["--model_path", str(tiny_model), "--images_path", str(images), "--n_images", "4",
              "--quiet", "--device", "cpu", "--metrics", "--method", "scorecam",
              "--layer", "5", "--render_workers", "0", "--workers", "0"]
    code, _, err = call(common + ["--save_dir", str(tmp_path / "oom"), "--batch_size", "4"])
    assert code == 0, err
    notes = [line for line in err.splitlines() if "out of GPU memory" in line]
    assert notes == ["warning: out of GPU memory with batches of 4; going on with batches of "
                     "2 (the same outputs as --batch_size 2)"]
    assert "Traceback" not in err
    assert sizes["engine"][:2] == [4, 2] and max(sizes["engine"][2:]) == 2
    assert max(sizes["score"][2:]) == 2 and max(sizes["metrics"]) == 2
    code, _, _ = call(common + ["--save_dir", str(tmp_path / "two"), "--batch_size", "2"])
    assert code == 0
    assert_equal_runs(tmp_path / "oom", tmp_path / "two")


# ----------------------------------------------------------------------------- 5. torchrun

@pytest.mark.slow
def test_one_failing_torchrun_process_stops_both(tiny_model: Path, images: Path,
                                                 reference: Path, tmp_path: Path) -> None:
    """Rank 1 cannot write image3's figure (a folder is in the way): it stops with its line,
    rank 0 stops too (torchrun's SIGTERM) with its own, nothing hangs, and the resume command
    completes the run."""
    save_dir = tmp_path / "out"
    (save_dir / "image3_layer1.jpg").mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(ROOT / "main.py"),
               *arguments(tiny_model, images, save_dir, "--workers", "0", "--render_workers",
                          "1")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("main.py")]
    assert len(ours) == 2, done.stderr[-4000:]
    failed = next(line for line in ours if "rank 1 of 2" in line)
    assert "cannot write" in failed and "image3_layer1.jpg" in failed
    assert any("rank 0 of 2" in line for line in ours)
    assert "torch.distributed.run" in failed.split("resume with: ", 1)[1]
    (save_dir / "image3_layer1.jpg").rmdir()
    assert not [p for p in save_dir.rglob("*.tmp")]
    header, *rows = rows_of(save_dir)
    expected = {row[0]: row for row in rows_of(reference)[1:]}
    assert all(row == expected[row[0]] for row in rows)
    resume_and_compare(failed, save_dir, reference, torchrun=True)


# ----------------------------------------------------------------------------- 6. the model raises

def test_a_model_raising_on_one_image_skips_only_that_image(images: Path, tmp_path: Path,
                                                            tmp_path_factory) -> None:
    """The model raises on a white image: that image is skipped by name (exit 1), its batch
    mates are done one by one, and the run goes on."""
    from tests.fault_models import FailsOnWhite
    torch.manual_seed(0)
    model_path = tmp_path / "fails.pt"
    torch.save(FailsOnWhite(), model_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "c.png", "d.png"):
        (folder / name).write_bytes((DATA / "tabby" / "chelsea.png").read_bytes())
    from PIL import Image
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "b.png")
    argv = ["--model_path", str(model_path), "--trust_model", "--images_path", str(folder),
            "--n_images", "all", "--quiet", "--device", "cpu", "--batch_size", "4",
            "--render_workers", "0", "--workers", "0"]
    code, out, err = call(argv + ["--save_dir", str(tmp_path / "out")])
    assert code == 1
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 1 and "b.png" in warnings[0]
    assert "the model failed on it (ValueError: this model cannot take a white image)" \
        in warnings[0]
    assert "processed 3 image(s), skipped 1" in out
    assert [row[1] for row in rows_of(tmp_path / "out")[1:]] == ["a.png", "c.png", "d.png"]
    # Done one by one, the batch mates equal a run without the white image.
    (folder / "b.png").unlink()
    code, _, _ = call(argv + ["--save_dir", str(tmp_path / "clean"), "--batch_size", "1"])
    assert code == 0
    def numbers(save_dir: Path) -> dict[str, list[str]]:
        header, *rows = rows_of(save_dir)
        figures = header.index("figures")
        return {row[1]: row[2:figures] + row[figures + 1:] for row in rows}
    assert numbers(tmp_path / "out") == numbers(tmp_path / "clean")


def test_what_counts_as_a_decode_process_death() -> None:
    """The DataLoader's own words for a dead process, and a hand-over broken by a killed
    process; a model's own RuntimeError is not one, nor an error raised inside a decode
    process, nor the pin-memory thread's exit alone (handed_over tells what caused it)."""
    from gradcam_cli import faults
    assert faults.is_helper_death(RuntimeError("DataLoader worker (pid(s) 7) exited "
                                               "unexpectedly"))
    assert faults.is_helper_death(RuntimeError("DataLoader worker (pid 7) is killed by signal: "
                                               "Killed. "))
    assert faults.is_helper_death(faults.DecodeProcessDied("process(es) 7 exited"))
    assert not faults.is_helper_death(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not faults.is_helper_death(ConnectionResetError("reset by peer"))
    assert not faults.is_helper_death(RuntimeError("Caught RuntimeError in DataLoader worker "
                                                   "process 0."))
    assert not faults.is_helper_death(RuntimeError("Pin memory thread exited unexpectedly"))


def _raised_in_a_decode_process(kind: type, last_line: str) -> BaseException:
    """What the DataLoader raises in the model process for an error inside a decode process."""
    return kind(f"Caught {kind.__name__} in DataLoader worker process 0.\nOriginal Traceback "
                f"(most recent call last):\n  File ...\n{kind.__name__}: {last_line}\n")


@pytest.mark.parametrize("kind, last_line, fragments", [
    (RuntimeError, "unable to allocate shared memory(shm) for file </torch_1_2_0>: No space "
                   "left on device (28)", ["shared memory", "No space left", "--shm-size",
                                           "--workers"]),
    (RuntimeError, "unable to open shared memory object </torch_1_2_0> in read-write mode: "
                   "No such file or directory (2)", ["shared memory", "--shm-size"]),
    (RuntimeError, "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                   "memory: you tried to allocate 9633792 bytes.", ["failed", "not enough memory"]),
    (MemoryError, "", ["failed", "MemoryError"]),
    (OSError, "[Errno 24] Too many open files", ["failed", "Too many open files"])])
def test_a_decode_process_failing_for_the_machine_is_one_line(
        kind: type, last_line: str, fragments: list[str]) -> None:
    """Shared memory full or missing, memory, an OS error inside a decode process: the stop
    is one line with torch's reason (and the fix for shared memory), not a death, and never
    "cannot write in save_dir"."""
    from gradcam_cli import faults
    from gradcam_cli.batch_run import _as_stop
    stop = _as_stop(_raised_in_a_decode_process(kind, last_line))
    assert isinstance(stop, faults.RunFault)
    assert "\n" not in str(stop) and "save_dir" not in str(stop)
    assert all(fragment in str(stop) for fragment in fragments), str(stop)


def test_a_bug_inside_a_decode_process_keeps_its_traceback() -> None:
    """Anything else raised inside a decode process is a bug: _as_stop leaves it to be
    raised with its traceback."""
    from gradcam_cli.batch_run import _as_stop
    assert _as_stop(_raised_in_a_decode_process(ValueError, "too many values")) is None
    assert _as_stop(_raised_in_a_decode_process(RuntimeError, "shape mismatch")) is None


@pytest.mark.slow
def test_a_decode_process_prints_no_traceback_for_a_cut_hand_over() -> None:
    """A stop signal in the model process half-way through receiving a batch's shared memory
    resets the connection to the decode process's resource-sharer thread (which serves the
    file descriptor): that thread's ConnectionResetError prints nothing, since the model
    process says why it stopped; other errors still print their traceback. The model
    process's side is played by a socket that connects and closes without reading."""
    script = textwrap.dedent("""
        import os, socket, sys, tempfile, time
        from multiprocessing import resource_sharer
        from gradcam_cli import image_loader
        image_loader._decode_worker_init(0)
        shared = resource_sharer.DupFd(os.open(tempfile.gettempdir(), os.O_RDONLY))
        model_side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        model_side.connect(resource_sharer._resource_sharer._address)
        time.sleep(0.5)   # the sharer's challenge is waiting, unread
        model_side.close()
        time.sleep(1.0)   # the sharer reads the reset
        try:
            raise ValueError("a real bug")
        except ValueError:
            sys.excepthook(*sys.exc_info())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ValueError: a real bug" in done.stderr
    assert "Error" not in done.stderr.replace("ValueError", ""), done.stderr[-3000:]


def test_decode_processes_fit_the_free_shared_memory(monkeypatch, capsys) -> None:
    """Each decode process holds up to 2 batches in /dev/shm (the model process copies each
    out at once), with 1 MiB left to the DataLoader's queues; torchrun's processes on the
    machine share it. Where it is short, fewer start (one warning line); with room for none,
    the model process decodes."""
    from gradcam_cli.image_loader import decode_processes_that_fit
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    mib = 2 ** 20
    assert decode_processes_that_fit(8, mib, free_bytes=17 * mib) == 8
    assert capsys.readouterr().err == ""
    assert decode_processes_that_fit(8, mib, free_bytes=16 * mib) == 7
    batch_64 = 64 * 224 * 224 * 3
    assert decode_processes_that_fit(8, batch_64, free_bytes=64 * mib) == 3  # docker's default
    assert decode_processes_that_fit(8, mib, free_bytes=2 * mib) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3 and all("--shm-size" in line for line in warnings)
    assert "decoding in the main process" in warnings[-1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decode_processes_that_fit(8, mib, free_bytes=34 * mib) == 8
    assert decode_processes_that_fit(8, mib, free_bytes=32 * mib) == 7
    assert "its share of shared memory" in capsys.readouterr().err
    assert decode_processes_that_fit(0, mib, free_bytes=0) == 0


def _in_a_small_shared_memory(megabytes: int, command: list[str],
                              filled: bool = False) -> subprocess.CompletedProcess:
    """``command`` with a /dev/shm of its own (a tmpfs in a mount namespace), as small as a
    container's, optionally filled up first; the test is skipped where that needs rights
    this machine does not give."""
    mount = f"mount -t tmpfs -o size={megabytes}m tmpfs /dev/shm"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs on /dev/shm in a mount namespace here (needs root)")
    fill = " && (cat /dev/zero > /dev/shm/filler 2>/dev/null; true)" if filled else ""
    return subprocess.run(["unshare", "-m", "sh", "-c",
                           f"{mount}{fill} && exec {shlex.join(command)}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow
def test_a_small_shared_memory_starts_fewer_decode_processes(tiny_model: Path, images: Path,
                                                             reference: Path,
                                                             tmp_path: Path) -> None:
    """A container's small /dev/shm (here 2 MiB): --workers 4 starts as many decode
    processes as their batches fit (3 of 1 image), says so in one warning line, and writes
    the same files as ever, however many render processes hold crops."""
    done = _in_a_small_shared_memory(2, [
        sys.executable, str(ROOT / "main.py"),
        *arguments(tiny_model, images, tmp_path, "--workers", "4", "--render_workers", "4")])
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "starting 3" in warnings[0], done.stderr
    assert_equal_runs(tmp_path, reference)


def test_a_full_shared_memory_at_the_start_is_one_line(tiny_model: Path, images: Path,
                                                       tmp_path: Path) -> None:
    """/dev/shm already full: the render processes cannot start (their queues' locks live
    there); one line that says so and how to go on, exit 2, no traceback."""
    done = _in_a_small_shared_memory(1, [
        sys.executable, str(ROOT / "main.py"),
        *arguments(tiny_model, images, tmp_path, "--render_workers", "2")], filled=True)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/shm" in lines[0] and "--render_workers 0" in lines[0], \
        done.stderr


class _ExitedProcess:
    pid = 4242

    @staticmethod
    def is_alive() -> bool:
        return False


class _BrokenHandOver:
    """A DataLoader iterator whose pin-memory thread (CUDA) exited because a decode process,
    now dead, was killed while handing a batch over."""

    def __next__(self):
        raise RuntimeError("Pin memory thread exited unexpectedly")


def test_a_hand_over_broken_in_the_pin_memory_thread_names_the_dead_process() -> None:
    """On CUDA the broken hand-over kills the pin-memory thread, and the DataLoader says only
    that the thread exited: the run reports the decode process's death, by pid; with every
    process alive, the thread's own error (kept by the hook); a model's error stays itself."""
    from gradcam_cli import faults
    from gradcam_cli.image_loader import handed_over
    with pytest.raises(faults.DecodeProcessDied, match="4242"):
        next(handed_over(_BrokenHandOver(), processes=[_ExitedProcess()]))

    class AllAlive(_BrokenHandOver):
        pass

    too_many = OSError(24, "Too many open files")
    with pytest.raises(faults.RunFault, match="pin-memory thread failed.*Too many open files"):
        next(handed_over(AllAlive(), [too_many]))

    class ModelBug(AllAlive):
        def __next__(self):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="mat1"):
        next(handed_over(ModelBug(), [too_many]))


def test_the_pin_memory_thread_dies_of_a_broken_hand_over_without_a_traceback(
        monkeypatch) -> None:
    """Only the one-line stop is printed: the pin-memory thread's own ConnectionRefusedError
    (its unpickling of a dead process's shared memory) is kept from the thread error hook,
    for ``handed_over`` to report; any other thread's error, and any error after, reaches
    the hook as usual."""
    import threading

    from gradcam_cli.image_loader import quiet_pin_memory_thread
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.thread.name))

    def _pin_memory_loop() -> None:  # the DataLoader names its thread after this function
        raise ConnectionRefusedError(111, "Connection refused")

    def other_work() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    def run(target) -> list[str]:
        reported.clear()
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        return [name.split(" ")[-1] for name in reported]

    hook, kept = threading.excepthook, []
    with quiet_pin_memory_thread(kept):
        assert run(_pin_memory_loop) == []
        assert run(other_work) == ["(other_work)"]
    assert threading.excepthook is hook
    assert [type(error) for error in kept] == [ConnectionRefusedError]
    assert run(_pin_memory_loop) == ["(_pin_memory_loop)"]


PINNED_HAND_OVER = """
import os, signal, sys, time
import multiprocessing.resource_sharer as resource_sharer
import torch
import torch.utils.data._utils.pin_memory as pin_memory
from gradcam_cli import batch_run, image_loader

# The DataLoader's CUDA path on the CPU: a pin-memory thread that pins nothing.
torch.accelerator.is_available = lambda: True
torch.accelerator.current_accelerator = lambda: torch.device("cpu")
torch.accelerator.current_device_index = lambda: 0
torch.accelerator.set_device_index = lambda index: None
pin_memory.pin_memory = lambda data, device=None: data
# waiting: the model process waits for batch 1 when its process dies; busy: it works on
# batch 1 when the process dies while batch 2 is fetched.
broken_batch, = {"waiting": [1], "busy": [2]}[sys.argv[1]]
fetched = []
fetch = resource_sharer.DupFd.detach


def slow_fetch(self):  # the pin-memory thread takes a second to fetch the broken batch
    fetched.append(self)
    if len(fetched) == broken_batch:
        time.sleep(1.0)
    return fetch(self)


resource_sharer.DupFd.detach = slow_fetch


class KilledAfterTheBrokenBatch(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, position):
        if position == 2 * broken_batch:  # the broken batch has been sent
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        return position, torch.zeros(4, 4, 3, dtype=torch.uint8).numpy(), None


loader = torch.utils.data.DataLoader(
    KilledAfterTheBrokenBatch(), batch_size=2, num_workers=1,
    collate_fn=image_loader.collate, pin_memory=True,
    worker_init_fn=image_loader._decode_worker_init)
try:
    with image_loader.batches_from(loader) as batches:
        for batch in batches:
            time.sleep(3)  # the model at work
except BaseException as error:
    print("stop:", batch_run._as_stop(error))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model_process", ["waiting", "busy"])
def test_the_pin_memory_thread_of_a_killed_decode_process_prints_no_traceback(
        model_process: str, tmp_path: Path) -> None:
    """The CUDA hand-over, simulated on the CPU with the DataLoader's own pin-memory thread: a
    decode process dies while that thread fetches its batch; whether the model process waits
    for the batch or is busy, the stop is one line, and the thread's traceback is not printed
    (its error comes while the loader is being closed, after the stop)."""
    import torch
    if not all(hasattr(torch.accelerator, name) for name in
               ("is_available", "current_accelerator", "set_device_index")):
        pytest.skip("this torch's DataLoader pins without torch.accelerator")
    script = tmp_path / "hand_over.py"
    script.write_text(PINNED_HAND_OVER, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), model_process], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**ENV, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("stop: a decode process died"), done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, \
        done.stderr
