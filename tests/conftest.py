"""Shared test set-up: the repository root on sys.path, no windows, a fixed seed."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield


@pytest.fixture
def interrupt_rendering(monkeypatch):
    """``interrupt_rendering(n)``: from then on, Ctrl-C (KeyboardInterrupt) is raised in the
    renderer once n images are written. Returns the original render function, to put back."""
    import render_pool
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
