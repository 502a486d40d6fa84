"""Render a run's report.html in a real headless browser and screenshot its first screen.

    python benchmarks/render_report.py RUN_DIR [--out docs/report_first_screen.png]

Opens the run's own report.html (built with ``flower_ext.report.build_report`` only when the
run has none: the run's report is signed in its audit trail), in headless Chromium
(Debian: ``apt-get install chromium``; or set ``CHROMIUM=/path/to/chrome``) at 1280x900,
the first screen a committee member sees, and writes the screenshot. Prints JSON. With no
browser installed it prints ``{"skipped": ...}`` and exits 0, so CI without one passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
WINDOW = (1280, 900)


def find_browser() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _run(browser: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:  # no state shared with a user's browser
        return subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",  # root in containers
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def screenshot(html: Path, png: Path, browser: str) -> None:
    """The first ``WINDOW`` pixels of ``html`` as rendered by the browser."""
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _run(
        browser,
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={png.resolve()}",
        html.resolve().as_uri(),
    )
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot: {result.stderr[-500:]}")


def rendered_dom(html: Path, browser: str) -> str:
    """The page's DOM after the browser has parsed and laid it out."""
    return _run(browser, "--dump-dom", html.resolve().as_uri()).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/report_first_screen.png"))
    args = parser.parse_args(argv)
    html_path = args.run_dir / "report.html"
    if not html_path.is_file():  # the run's own report is signed in its trail: never rewrite it
        from flower_ext.report import build_report

        html_path = build_report(args.run_dir).html_path
    browser = find_browser()
    if browser is None:
        print(json.dumps({"skipped": "no Chromium/Chrome found (apt-get install chromium)"}))
        return 0
    screenshot(html_path, args.out, browser)
    version = _run(browser, "--version").stdout.strip()
    print(json.dumps({"report": str(html_path), "screenshot": str(args.out),
                      "browser": version, "window": WINDOW}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
