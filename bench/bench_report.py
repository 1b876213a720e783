"""Benchmark: how fast a 50,000-image report.html is written and becomes usable in Chromium.

Run by hand (never by the tests):  python bench/bench_report.py [--rows 50000] [--repeats 5]

Builds synthetic summary rows (ImageNet labels, a folder class per image, random
probabilities, one shared figure file for every thumbnail) and the metrics columns of a
--metrics run, then:
  1. times report.write_report (the call a long run repeats for its live view), in wall-clock
     and CPU time (the second says more on a busy machine);
  2. opens the page in headless Chromium (Debian's /usr/bin/chromium, through playwright) and
     times, from the start of navigation, until #count is filled and the first page of
     entries is in the DOM;
  3. times a filter change (wrong only) and a sort change (top-1 probability) on the full list.
Each is the median of --repeats runs, each in a fresh page.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcam_cli import outputs, report
from gradcam_cli.labels import IMAGENET_LABELS_PATH, read_labels  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY = ("() => { const c = document.querySelector('#count');"
         " return c && /^\\d/.test(c.textContent)"
         " && document.querySelectorAll('#entries [data-index]').length > 0"
         " && performance.now(); }")


def synthetic_run(n_rows: int, labels: list[str], seed: int = 0):
    """summary.csv's header and ``n_rows`` plausible rows of a one-layer --metrics run."""
    rng = random.Random(seed)
    ranks = ["top1", "top2", "top3", "lowest"]
    header = outputs.summary_header(ranks, ["layer1"], metrics=True)
    folders = rng.sample(range(len(labels)), 100)
    rows = []
    for i in range(n_rows):
        truth = folders[i % len(folders)]
        top = [truth] + rng.sample(range(len(labels)), 3) if rng.random() < 0.7 \
            else rng.sample(range(len(labels)), 4)
        probabilities = sorted((rng.random() for _ in range(3)), reverse=True) + [1e-6]
        folder = labels[truth].split(",")[0]
        row = outputs.summary_row(i, f"{folder}/img_{i:06d}.JPEG", folder,
                                  [labels[c] for c in top], probabilities, ["figure.jpg"],
                                  [f"{rng.random():.6g}" for _ in range(4 + 16)])
        rows.append(row)
    return header, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from PIL import Image
    from playwright.sync_api import sync_playwright

    labels = read_labels(IMAGENET_LABELS_PATH, 1000)
    header, rows = synthetic_run(args.rows, labels)
    info = report.ReportInfo(model="synthetic", layers=[("layer1", "conv")], method="gradcam",
                             n_images=args.rows, labels=labels, metrics=True,
                             accuracy=outputs.accuracy(rows, labels, 3))
    with tempfile.TemporaryDirectory() as folder:
        save_dir = Path(folder)
        Image.new("RGB", (1168, 294), (200, 200, 200)).save(save_dir / "figure.jpg")
        writes, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            path = report.write_report(save_dir, header, rows, info)
            writes.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        size = path.stat().st_size
        ready, wrong, sort = [], [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for _ in range(args.repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(path.as_uri(), wait_until="commit")
                ready.append(page.wait_for_function(READY, polling="raf").json_value() / 1000)
                wrong.append(_timed_click(page, "#filter-wrong"))
                sort.append(_timed_select(page, "#sort", "prob-asc"))
                page.close()
            browser.close()
    print(f"{args.rows} rows, report.html {size / 1e6:.1f} MB, median of {args.repeats}:")
    print(f"  write_report:                         {statistics.median(writes):.3f} s "
          f"({statistics.median(cpu):.3f} s of CPU time)")
    print(f"  page usable (#count and first page):  {statistics.median(ready):.3f} s "
          f"(target < 2 s)")
    print(f"  filter to wrong:                      {statistics.median(wrong):.3f} s")
    print(f"  sort by top-1 probability:            {statistics.median(sort):.3f} s")
    return 0


def _timed_click(page, selector: str) -> float:
    return page.evaluate("s => { const t = performance.now(); document.querySelector(s).click();"
                         " return (performance.now() - t) / 1000; }", selector)


def _timed_select(page, selector: str, value: str) -> float:
    return page.evaluate("([s, v]) => { const e = document.querySelector(s); e.value = v;"
                         " const t = performance.now(); e.dispatchEvent(new Event('change'));"
                         " return (performance.now() - t) / 1000; }", [selector, value])


if __name__ == "__main__":
    sys.exit(main())
