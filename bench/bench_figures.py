"""Benchmark: the cost of composing one figure (FigureWriter.compose), JPEG encoding apart.

Run by hand (never by the tests), on one core:
    taskset -c 0 python bench/bench_figures.py [--baseline REV_OR_PATH]

Times are this process's CPU time by default, which other work on a shared machine changes
far less than the elapsed time (--clock wall for that).

200 figures at 224 px (the image and 4 overlays), each with its own realistic titles: a label
from the ImageNet list and a probability drawn at random, as a real run makes them. Timed:

- writer setup: making a FigureWriter (fonts, blank figure), per writer;
- compose cold: the first figure of a run, titles never seen before: each figure is composed
  by a fresh writer (made untimed), so no title of it has been measured or drawn;
- compose warm: one writer that has composed 200 figures with the same labels but other
  probabilities and paths ("labels seen"), and once one after 2000 figures ("long run": a
  renderer that caches title parts has most of them by then).

With --baseline, another renderer is timed in the same process, interleaved in rounds, and
the ratio printed. It is a git revision (``--baseline 5d16555``: its figures.py and, where it
has one, title_text.py, from gradcam_cli/ or the top folder, put in a temporary package so
that relative imports work), a figures.py file (loaded as a module of a package made of its
folder, so ``from .title_text import ...`` finds the file beside it), or a checkout's folder.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADING = "Grad-CAM at layer 1 (_conv_head)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another renderer to time beside this one: a git "
                                           "revision, a figures.py file or a checkout folder")
    parser.add_argument("--figures", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long_run", type=int, default=2000,
                        help="figures composed (untimed) before the 'long run' timing")
    parser.add_argument("--panel", type=int, default=224)
    parser.add_argument("--uint8", action="store_true", help="maps as uint8 colour indices")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time, which other work on a shared "
                             "machine barely changes (the default); wall: elapsed time")
    return parser


def load_in_package(folder: Path, stem: str, package: str):
    """Module ``stem`` of ``folder``, imported as ``package.stem`` of a bare package made of
    that folder (its __init__.py, if any, is not run), so its relative imports find the files
    beside it."""
    module = types.ModuleType(package)
    module.__path__ = [str(folder)]
    sys.modules[package] = module
    return importlib.import_module(f"{package}.{stem}")


def load_baseline(where: str, package: str = "figures_baseline"):
    """The baseline renderer: a figures.py file, a folder holding one (a checkout or its
    package), or a git revision of this repository."""
    path = Path(where)
    if path.is_file():
        return load_in_package(path.resolve().parent, path.stem, package)
    if path.is_dir():
        for candidate in (path / "gradcam_cli" / "figures.py", path / "figures.py"):
            if candidate.is_file():
                return load_in_package(candidate.resolve().parent, "figures", package)
        raise SystemExit(f"--baseline {where}: no figures.py in that folder")
    folder = Path(tempfile.mkdtemp(prefix="bench_figures_"))
    for prefix in ("gradcam_cli/", ""):
        for name in ("figures.py", "title_text.py"):
            shown = subprocess.run(["git", "show", f"{where}:{prefix}{name}"], cwd=ROOT,
                                   capture_output=True, check=False)
            if shown.returncode == 0:
                (folder / name).write_bytes(shown.stdout)
        if (folder / "figures.py").is_file():
            return load_in_package(folder, "figures", package)
    raise SystemExit(f"--baseline {where}: not a file, a folder, or a git revision with "
                     f"figures.py")


def workload(n: int, panel: int, uint8: bool, seed: int = 0) -> list[tuple]:
    """``n`` figures' inputs: an image, 4 maps, 4 titles and an image title each. The labels
    depend on the item's place only; probabilities and paths on ``seed`` too. Pixels cycle
    through 8 sets (their values do not change the cost), so long workloads fit in memory."""
    from gradcam_cli.labels import default_labels
    labels = [label.split(",")[0] for label in default_labels(1000)]
    rng = np.random.default_rng(seed)
    pixels = []
    for _ in range(8):
        maps = rng.random((4, panel, panel), dtype=np.float32)
        if uint8:
            maps = np.clip(maps * 255.0 + 0.5, 0, 255).astype(np.uint8)
        pixels.append((rng.integers(0, 256, (panel, panel, 3), dtype=np.uint8), maps))
    items = []
    for i in range(n):
        probabilities = np.sort(rng.dirichlet(np.full(1000, 0.05)))[::-1]
        ranks = ["1.", "2.", "3.", "lowest:"]
        chosen = [probabilities[0], probabilities[1], probabilities[2], probabilities[-1]]
        picks = np.random.default_rng(i).integers(1000, size=4)  # the same for every seed
        titles = [(rank, labels[c], p) for rank, c, p in zip(ranks, picks, chosen)]
        image, maps = pixels[i % len(pixels)]
        items.append((image, maps, titles, f"n{rng.integers(10 ** 8):08d}/image{i:05d}.JPEG"))
    return items


def texts(module, titles: list[tuple]) -> list[str]:
    return [f"{rank} {label} {module.format_probability(p)}" for rank, label, p in titles]


def compose_all(module, writer, items: list[tuple]) -> None:
    for image, maps, titles, image_title in items:
        writer.compose(image, maps, texts(module, titles), image_title, HEADING)


def time_setup(module, n: int, panel: int, clock) -> float:
    """Seconds to make one FigureWriter (fonts, blank figure), over ``n`` writers."""
    gc.collect()
    start = clock()
    for _ in range(n):
        module.FigureWriter(n_maps=4, panel=panel)
    return (clock() - start) / n


def time_cold(module, items: list[tuple], panel: int, clock) -> float:
    """Seconds per figure, each composed by a fresh writer (made untimed): a run's first."""
    gc.collect()
    total = 0.0
    for image, maps, titles, image_title in items:
        writer = module.FigureWriter(n_maps=4, panel=panel)
        start = clock()
        writer.compose(image, maps, texts(module, titles), image_title, HEADING)
        total += clock() - start
    return total / len(items)


def time_warm(module, items: list[tuple], panel: int, warm: list[tuple], clock) -> float:
    """Seconds per figure over ``items``, with a fresh writer that first composed ``warm``
    (untimed: labels already seen, as in a long run, but other probabilities and paths)."""
    writer = module.FigureWriter(n_maps=4, panel=panel)
    compose_all(module, writer, warm)
    gc.collect()
    start = clock()
    compose_all(module, writer, items)
    return (clock() - start) / len(items)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from gradcam_cli import figures
    modules = {"current": figures}
    if args.baseline:
        modules["baseline"] = load_baseline(args.baseline)
    items = workload(args.figures, args.panel, args.uint8)
    seen = workload(args.figures, args.panel, args.uint8, seed=1)  # same labels, new numbers
    for module in modules.values():  # warm-up: imports, font files, colour tables
        time_warm(module, items[:5], args.panel, [], time.perf_counter)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    long_run = workload(args.long_run, args.panel, args.uint8, seed=2)
    states = (
        ("writer setup", "per writer",
         lambda m: time_setup(m, args.figures, args.panel, clock), args.rounds),
        ("compose cold", "per figure, a fresh writer each",
         lambda m: time_cold(m, items, args.panel, clock), args.rounds),
        ("compose warm, labels seen", f"per figure, after {args.figures} figures",
         lambda m: time_warm(m, items, args.panel, seen, clock), args.rounds),
        ("compose warm, long run", f"per figure, after {args.long_run} figures",
         lambda m: time_warm(m, items, args.panel, long_run, clock), 1),
    )
    maps = "uint8" if args.uint8 else "float32"
    for state, what, timer, rounds in states:
        times = {name: [] for name in modules}
        for _ in range(rounds):
            for name, module in modules.items():
                times[name].append(timer(module))
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        for name, ms in medians.items():
            print(f"{name}, {state}: {ms:.3f} ms {args.clock} time {what} ({args.panel} px, "
                  f"4 {maps} maps, median of {rounds} rounds of {args.figures})", flush=True)
        if "baseline" in medians:
            print(f"{state}: baseline / current = "
                  f"{medians['baseline'] / medians['current']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
