"""Make docs/report.png: the report page of a run over data/, as headless Chromium shows it.

    python docs/make_report_screenshot.py

Runs the tool over data/ with the built-in model into a temporary folder, opens its
report.html with Debian's chromium through playwright (no browser download), and saves a
screenshot of the top of the page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    parser.add_argument("--hash", default="", help="a view to show, e.g. filter=wrong")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from gradcam_cli import cli as tool

    os.chdir(ROOT)  # so the page shows the images folder as "data"
    with tempfile.TemporaryDirectory() as folder:
        code = tool.main(["--images_path", "data", "--n_images", "all",
                          "--save_dir", folder, "--device", "cpu", "--quiet"])
        if code != 0:
            print(f"the run failed with exit code {code}", file=sys.stderr)
            return code
        url = (Path(folder) / "report.html").as_uri() + (f"#{args.hash}" if args.hash else "")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000},
                                    device_scale_factor=1)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#entries [data-index]")
            page.wait_for_function("Array.from(document.images).filter(i => i.closest('#entries'))"
                                   ".slice(0, 3).every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=args.out)
            browser.close()
        if errors:
            print("console errors: " + "; ".join(errors), file=sys.stderr)
            return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
