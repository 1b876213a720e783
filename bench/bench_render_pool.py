"""Benchmark: figures/s of the render pool alone, with 0 (inline), 1, 2, 4 ... processes.

Run by hand (never by the tests):
    python bench/bench_render_pool.py [--workers 0 1 2 4] [--figures 400] [--rounds 3]

bench.py part g times the whole command line, where the decode processes and the model share
the cores with the renderers; on a machine with few cores that hides what the pool itself
does. Here this process only hands over ready jobs (as the model process does once a batch
is explained): realistic titles, uint8 maps at 224 px, JPEGs written to a temporary folder.
Each pool is started and warmed (fonts loaded, a few figures drawn) before its timing, and
the pool sizes are interleaved in rounds; the median of the rounds is printed. Figures/s
can only grow while there are idle cores: expect growth up to the machine's core count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_figures import workload  # noqa: E402

from gradcam_cli.figures import format_probability  # noqa: E402
from gradcam_cli.handover import FigureJob, ImageJob  # noqa: E402
from gradcam_cli.render_pool import start_renderer  # noqa: E402
from gradcam_cli.torchrun_group import cores_per_process  # noqa: E402

HEADING = "Grad-CAM at layer 1 (_conv_head)"
WARM_UP = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="render pool sizes to time (0: inline, in this process)")
    parser.add_argument("--figures", type=int, default=400, help="figures per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--panel", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32,
                        help="images let in flight at once, as main.py's --batch_size does")
    return parser


def image_jobs(items: list[tuple], folder: Path, first_index: int = 0) -> list[ImageJob]:
    """One ImageJob (one figure, 4 maps) per workload item, written under ``folder``."""
    jobs = []
    for offset, (image, maps, titles, image_title) in enumerate(items):
        index = first_index + offset
        texts = [f"{rank} {label} {format_probability(p)}" for rank, label, p in titles]
        figure = FigureJob(path=folder / f"{index:06d}.jpg", maps=maps, titles=texts,
                           heading=HEADING)
        jobs.append(ImageJob(index=index, image_title=image_title, shown=image,
                             layout=(len(maps), image.shape[0], False), figures=[figure]))
    return jobs


def figures_per_second(workers: int, jobs: list[ImageJob], warm: list[ImageJob],
                       batch_size: int) -> tuple[float, float]:
    """Start a pool of ``workers``, draw ``warm`` untimed, then time ``jobs`` to the last
    file on disk: (figures/s, this process's CPU ms per figure, which is what handing a
    figure over costs the model process, or drawing it too when inline)."""
    renderer = start_renderer(workers)
    renderer.hold_batches_of(batch_size)
    try:
        for job in warm:
            renderer.submit(job)
        renderer.flush()
        start, start_cpu = time.perf_counter(), time.process_time()
        for job in jobs:  # as batch_run does: collect finished images after each one
            renderer.submit(job)
            renderer.take_finished()
        renderer.flush()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        return len(jobs) / elapsed, cpu / len(jobs) * 1000
    finally:
        renderer.close()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    items = workload(args.figures + WARM_UP, args.panel, uint8=True)
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    feeding: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = image_jobs(items[:WARM_UP], folder)
        jobs = image_jobs(items[WARM_UP:], folder, first_index=WARM_UP)
        for _ in range(args.rounds):
            for workers in args.workers:
                rate, cpu_ms = figures_per_second(workers, jobs, warm, args.batch_size)
                rates[workers].append(rate)
                feeding[workers].append(cpu_ms)
    print(f"{cores_per_process()} usable CPUs, {args.figures} figures of {args.panel} px "
          f"(4 maps, uint8), median of {args.rounds} rounds")
    first = statistics.median(rates[args.workers[0]])
    print("| render processes | figures/s | ratio | CPU ms per figure in the feeding process |")
    print("|---|---|---|---|")
    for workers, values in rates.items():
        name = "0 (inline)" if workers == 0 else str(workers)
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / first:.2f}x | "
              f"{statistics.median(feeding[workers]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
