"""Shared test set-up: the repository root on sys.path, no windows, a fixed seed."""

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


def _stop_signals_as_usual() -> None:
    """The fault tests start main.py and signal it as a terminal or a scheduler would. main.py
    keeps ignoring a stop signal it was started with ignored (as nohup and a shell's
    background jobs ask), and a process passes SIG_IGN on to those it starts: so a test
    session started that way (``pytest &`` in a script ignores SIGINT) gets the usual
    dispositions back first."""
    usual = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    if hasattr(signal, "SIGHUP"):
        usual[signal.SIGHUP] = signal.SIG_DFL
    for signum, handler in usual.items():
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, handler)


_stop_signals_as_usual()


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield


@pytest.fixture
def interrupt_rendering(monkeypatch):
    """``interrupt_rendering(n)``: from then on, Ctrl-C (KeyboardInterrupt) is raised in the
    renderer once n images are written. Returns the original render function, to put back."""
    from gradcam_cli import render_pool
    original = render_pool.render_image

    def arm(after: int):
        written = []

        def render_then_interrupt(job, *args, **kwargs):
            if len(written) == after:
                raise KeyboardInterrupt
            original(job, *args, **kwargs)
            written.append(job.index)

        monkeypatch.setattr(render_pool, "render_image", render_then_interrupt)
        return original
    return arm


BROWSER_FIXTURES = {"browser", "open_report"}


def pytest_collection_modifyitems(items) -> None:
    """Tests that open a browser are slow whether or not they say so, so that
    ``-m "not slow"`` (the inner loop) never starts Chromium."""
    for item in items:
        if BROWSER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("slow")
