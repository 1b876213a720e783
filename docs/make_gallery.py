"""Rebuild docs/gallery.jpg and the README's metrics table with the tool itself.

    python docs/make_gallery.py                 # the gallery and the table
    python docs/make_gallery.py --gallery_only  # the gallery alone (seconds, not minutes)

For every method: main.py on the cat photo (its figure becomes one row of the gallery), then
main.py --metrics over data/ (its printed means become one row of the table).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcam_cli import cli  # noqa: E402
from gradcam_cli.cam_methods import METHODS  # noqa: E402

PHOTO = ROOT / "data" / "tabby" / "chelsea.png"
# The final activation (ReLU6 after the head conv and its BatchNorm): non-negative, as
# Score-CAM's channel masks assume, so every method is compared at one fair layer.
LAYER = ["--layer", "_swish"]


def run_quietly(argv: list[str]) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = cli.main(argv + ["--quiet"])
    if code != 0:
        raise SystemExit(f"main.py {' '.join(argv)} exited with {code}")
    return output.getvalue()


def gallery(workdir: Path) -> Path:
    rows = []
    for method in METHODS:
        save_dir = workdir / f"gallery-{method}"
        run_quietly(["--images_path", str(PHOTO), "--method", method, "--save_dir",
                     str(save_dir)] + LAYER)
        rows.append(np.asarray(Image.open(save_dir / "image0.jpg").convert("RGB")))
    target = ROOT / "docs" / "gallery.jpg"
    Image.fromarray(np.concatenate(rows, axis=0)).save(target, quality=85)
    return target


def metrics_table(workdir: Path) -> str:
    pattern = re.compile(r"deletion AUC ([\d.]+), insertion AUC ([\d.]+), average drop "
                         r"([\d.]+)%, increase in confidence ([\d.]+)%")
    lines = ["| method | deletion AUC (lower is better) | insertion AUC (higher is better) "
             "| average drop | increase in confidence |", "|---|---|---|---|---|"]
    for method, entry in METHODS.items():
        printed = run_quietly(["--images_path", str(ROOT / "data"), "--n_images", "all",
                               "--method", method, "--metrics", "--save_dir",
                               str(workdir / f"metrics-{method}")] + LAYER)
        deletion, insertion, drop, increase = pattern.search(printed).groups()
        lines.append(f"| {entry.name} | {deletion} | {insertion} | {drop}% | {increase}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    gallery_only = "--gallery_only" in (sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"wrote {gallery(Path(tmp))}")
        if not gallery_only:
            print(metrics_table(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
