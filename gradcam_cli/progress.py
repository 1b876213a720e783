"""Progress of a run as the user sees it: a tqdm bar on a terminal, a plain line every 30 s
in a log, nothing with --quiet; and the bars of Score-CAM's and Ablation-CAM's masked passes."""

from __future__ import annotations

import sys
import time


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
            self._on_the_bar(self.bar.update, n)
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
            self._on_the_bar(self.bar.close)

    def _on_the_bar(self, action, *args) -> None:
        """Draw; a terminal that has gone (its window closed: SIGHUP is on its way, and the
        stop it makes says so) fails the write, and the run goes on without a bar rather
        than stopping for a write that no one can see."""
        try:
            action(*args)
        except OSError:
            self.bar.disable = True  # tqdm draws nothing more, not even when collected
            self.bar = None


def score_progress(quiet: bool):
    """A ``progress(done, total)`` callback for Score-CAM's masked passes: one bar per layer
    and batch, gone when it is full."""
    current: list[Progress] = []

    def report(done: int, total: int) -> None:
        if not current:
            current.append(Progress(total, quiet, unit="masked passes"))
        current[0].update(done - current[0].done)
        if done >= total:
            current.pop().close()
    return report
