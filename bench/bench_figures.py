"""Benchmark: the cost of composing one figure (FigureWriter.compose), JPEG encoding apart.

Run by hand (never by the tests), on one core:
    taskset -c 0 python bench/bench_figures.py [--baseline OLD_FIGURES_PY]

Times are this process's CPU time by default, which other work on a shared machine changes
far less than the elapsed time (--clock wall for that).

200 figures at 224 px (the image and 4 overlays), each with its own realistic titles: a label
from the ImageNet list and a probability drawn at random, as a real run makes them. Timed
with a fresh writer ("cold"), with one that has drawn 200 figures with the same
labels but other probabilities and paths ("labels seen"); and once after 2000 figures ("long
run": most label and probability parts of the titles are cached by then). With
--baseline (for example ``git show 7db66bd:figures.py > /tmp/old_figures.py``) the other
renderer is timed in the same process, interleaved in rounds, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another figures.py to time beside this one")
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


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def time_module(module, items: list[tuple], panel: int, warm: list[tuple] = (),
                clock=time.process_time) -> float:
    """Seconds per figure over ``items``, with a fresh writer that first composed ``warm``
    (untimed: labels already seen, as in a long run, but other probabilities and paths)."""
    writer = module.FigureWriter(n_maps=4, panel=panel)
    compose_all(module, writer, warm)
    start = clock()
    compose_all(module, writer, items)
    return (clock() - start) / len(items)


def compose_all(module, writer, items: list[tuple]) -> None:
    heading = "Grad-CAM at layer 1 (_conv_head)"
    for image, maps, titles, image_title in items:
        texts = [f"{r} {label} {module.format_probability(p)}" for r, label, p in titles]
        writer.compose(image, maps, texts, image_title, heading)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    modules = {"current": load_module(ROOT / "figures.py", "figures_current")}
    if args.baseline:
        modules["baseline"] = load_module(Path(args.baseline), "figures_baseline")
    items = workload(args.figures, args.panel, args.uint8)
    seen = workload(args.figures, args.panel, args.uint8, seed=1)  # same labels, new numbers
    for module in modules.values():  # warm-up: imports, fonts, colour tables
        time_module(module, items[:5], args.panel)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    long_run = workload(args.long_run, args.panel, args.uint8, seed=2)
    states = (("cold", [], args.rounds), ("labels seen", seen, args.rounds),
              (f"long run ({args.long_run} figures before)", long_run, 1))
    for state, warm, rounds in states:
        times = {name: [] for name in modules}
        for _ in range(rounds):
            for name, module in modules.items():
                times[name].append(time_module(module, items, args.panel, warm, clock))
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        for name, ms in medians.items():
            print(f"{name}, {state}: {ms:.2f} ms {args.clock} time per figure (compose, "
                  f"{args.panel} px, 4 maps, "
                  f"{'uint8' if args.uint8 else 'float32'} maps, median of {rounds} "
                  f"rounds of {args.figures})", flush=True)
        if "baseline" in medians:
            print(f"{state}: baseline / current = "
                  f"{medians['baseline'] / medians['current']:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
