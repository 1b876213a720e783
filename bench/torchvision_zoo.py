"""Every torchvision classifier through the tool, as a new user would run it.

For each architecture of ``torchvision.models.list_models(module=torchvision.models)``: build it
with random weights (nothing is downloaded; a head that torchvision starts at zero, as in ViT,
gets small random weights so that the maps can show something), ``torch.save`` the whole
model, then run

    python main.py --model_path FILE --n_images 2 --images_path data --save_dir DIR --quiet

with no other flag (no --trust_model). Each model's row says whether the run worked and wrote
its figures, the layer it explained (from summary.csv), whether the top-1 maps have any signal,
and the seconds the run took. Rows are appended to ``--table`` as they finish, so a long run
that is stopped keeps the models done so far.

    python bench/torchvision_zoo.py                       # all, smallest first
    python bench/torchvision_zoo.py --models vit_b_16 swin_t --table zoo.md
"""

from __future__ import annotations

import argparse
import csv
import gc
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="architecture names (default: every torchvision classifier)")
    parser.add_argument("--table", default="zoo.md", help="markdown table the rows go to")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model run")
    return parser.parse_args()


def by_size(names: list[str]) -> list[str]:
    """Smallest first (parameter counts recorded with the DEFAULT weights)."""
    def params(name: str) -> int:
        return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    return sorted(names, key=params)


def explained_layer(save_dir: Path) -> tuple[str, str]:
    """(the layer tag of the run, whether some top-1 map has a non-zero peak)."""
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    peaks = [key for key in rows[0] if key.startswith("top1_peak_")]
    tag = peaks[0][len("top1_peak_"):] if peaks else "?"
    signal = any(float(row[key]) > 0 for row in rows for key in peaks)
    return tag, "yes" if signal else "no"


def run_one(name: str, work: Path, timeout: int) -> tuple[str, str, str, float]:
    """(status, layer, signal, seconds) for one architecture."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():  # torchvision starts some heads at zero (ViT): every map would be 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.02)
    path = work / f"{name}.pt"
    torch.save(model, path)
    del model
    gc.collect()
    save_dir = work / f"out_{name}"
    command = [sys.executable, str(ROOT / "main.py"), "--model_path", str(path),
               "--n_images", "2", "--images_path", str(ROOT / "data"),
               "--save_dir", str(save_dir), "--quiet"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s", "-", "-", time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    figures = sorted(save_dir.glob("*.jpg")) if save_dir.is_dir() else []
    if done.returncode != 0 or len(figures) != 2:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed (exit {done.returncode}): {last[:120]}", "-", "-", seconds
    layer, signal = explained_layer(save_dir)
    warning = " (warned)" if "warning:" in done.stderr else ""
    return f"ok{warning}", layer, signal, seconds


def main() -> int:
    args = parse_args()
    names = args.models or by_size(torchvision.models.list_models(module=torchvision.models))
    table = Path(args.table)
    with open(table, "w", encoding="utf-8") as file:
        file.write(f"torch {torch.__version__}, torchvision {torchvision.__version__}\n\n"
                   "| model | status | explained layer | top-1 map non-zero | seconds |\n"
                   "|---|---|---|---|---|\n")
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for name in names:
            status, layer, signal, seconds = run_one(name, Path(tmp), args.timeout)
            row = f"| {name} | {status} | {layer} | {signal} | {seconds:.1f} |"
            print(row, flush=True)
            with open(table, "a", encoding="utf-8") as file:
                file.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
