"""report.html rendered by a real headless browser (Chromium); skipped where none is installed.

The same code path as ``python benchmarks/render_report.py RUN_DIR`` (the README's
screenshot): the page must lay out, show the verdict table on its first screen and
every chart must decode as an image.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tests.test_report_verdict import _metrics

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("render_report", ROOT / "benchmarks/render_report.py")
render = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["render_report"] = render
spec.loader.exec_module(render)  # type: ignore[union-attr]

BROWSER = render.find_browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium/Chrome installed")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(diverged=True)))
    return run


def test_browser_renders_the_report_and_its_first_screen(run_dir, tmp_path, capsys):
    png = tmp_path / "first.png"
    assert render.main([str(run_dir), "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out)["screenshot"] == str(png)
    image = mpimg.imread(png)
    assert image.shape[:2] == (render.WINDOW[1], render.WINDOW[0])
    assert image[..., :3].std() > 0.05  # text and tables, not a blank page
    dom = render.rendered_dom(run_dir / "report.html", BROWSER)
    # the parsed page: verdict table first, the audit slot, then the charts
    assert (
        dom.index('id="verdict"') < dom.index("slot: what the audit verified") < dom.index("<img")
    )
    assert "no significant difference" in dom and "Model health" in dom
    assert dom.count('src="data:image/png;base64,') >= 3
