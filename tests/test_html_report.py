"""``--report-html``: the page's content, that it is self-contained, and that headless Chromium
renders the table and the chart (DOM and a non-blank screenshot)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from spa.cli import main
from spa.errors import OutputPathError
from spa.html_report import BAR_W, ROW, render_html, write_html_report
from spa.plan import FrozenGroup, GroupPlan, Plan, Prediction
from spa.recipe import Recipe
from tests.test_cli import _conv_net

CHROMIUM = "/usr/bin/chromium"
KEPT_RGB = (0x2B, 0x6C, 0xB0)


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "net.onnx"
    onnx.save(_conv_net(), str(p))
    return p


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


def _bars(html: str) -> list[tuple[float, float]]:
    """(full width, kept width) of each group's row in the channel chart."""
    chart = html[html.index('id="channels-chart"'):]
    rows = re.findall(r'<g class="bar">.*?</g>', chart[:chart.index("</svg>")])
    out = []
    for row in rows:
        widths = [float(w) for w in re.findall(r'<rect [^>]*width="([0-9.]+)"', row)]
        out.append((widths[0], widths[1]))
    return out


def _synthetic_plan(n: int) -> Plan:
    rng = np.random.default_rng(0)
    groups = []
    for i in range(n):
        size = int(rng.choice([64, 128, 256, 512, 1024, 2048]))
        keep = tuple(range(0, size, 2))
        groups.append(GroupPlan(i, f"layer{i}.conv.weight[0]", size, keep))
    frozen = (FrozenGroup(n, "fc.weight[0]", 1000,
                          tuple(f"reason {k} <b>not bold</b>" for k in range(7))),)
    pred = Prediction(25_000_000, 7_000_000, 4_000_000_000, 1_000_000_000)
    return Plan("f" * 16, tuple(groups), frozen, pred,
                Recipe.from_meta({"criterion": "l1", "ratio": 0.5}))


def test_report_from_a_prune_holds_the_measured_numbers(model_path: Path, tmp_path: Path,
                                                        capsys) -> None:
    page, plan = tmp_path / "r.html", tmp_path / "plan.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                 "--check-masked", "--plan", str(plan), "--report-html", str(page),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    html = page.read_text()
    text = " ".join(_parse(html).text)
    for key in ("params", "flops", "bytes"):
        assert f"{report[key + '_before']:,d}" in text and f"{report[key + '_after']:,d}" in text
    assert f"{report['latency_ms_before']:.3f}" in text and "latency-chart" in html
    assert "graph output &#x27;y&#x27; (axis 1) keeps its shape" in html  # the frozen group
    assert "numeric oracle" in text and '"l1"' in text  # validation and the criterion
    # One bar per prunable group; widths on one scale: 8 → 4 and 6 → 3 channels.
    assert _bars(html) == [(BAR_W, BAR_W / 2), (BAR_W * 6 / 8, BAR_W * 3 / 8)]
    # spa apply writes the same kind of page for the saved plan.
    page2 = tmp_path / "r2.html"
    assert main(["apply", str(model_path), str(plan), "-o", str(tmp_path / "a.onnx"),
                 "--report-html", str(page2), "--quiet"]) == 0
    assert _bars(page2.read_text()) == _bars(html)


def test_page_is_self_contained_and_escaped() -> None:
    html = render_html(_synthetic_plan(3), model='<img src=x onerror=alert(1)>.onnx')
    tags = _parse(html).tags
    assert not [t for t, a in tags if t in ("script", "link", "img", "iframe", "object")]
    assert not [a for _, a in tags if "src" in a or "href" in a]
    assert "http" not in html.lower() and "url(" not in html and "@import" not in html
    assert "<b>" not in html and "&lt;b&gt;not bold&lt;/b&gt;" in html
    assert "3 more" in html  # 7 reasons: 4 shown, 3 folded


def test_hundred_groups_stay_readable_in_a_scrolling_chart() -> None:
    plan = _synthetic_plan(100)
    html = render_html(plan, model="resnet50.onnx")
    bars = _bars(html)
    assert len(bars) == 100
    widest = max(g.size for g in plan.groups)
    for (full, kept), g in zip(bars, plan.groups):
        assert full == pytest.approx(BAR_W * g.size / widest, abs=0.06)
        assert kept == pytest.approx(BAR_W * len(g.keep) / widest, abs=0.06)
    assert f'height="{ROW * 100 + 4}"' in html and '<div class="scroll">' in html
    assert "not measured" in html and "dry run" in html  # no report: predicted figures only
    assert "25,000,000" in html and "7,000,000" in html


def test_dry_run_page_and_atomic_write(model_path: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "plan.html"
    assert main(["prune", str(model_path), "--dry-run", "--ratio", "0.5", "--report-html",
                 str(page), "--quiet"]) == 0
    html = page.read_text()
    assert "SPA pruning plan (dry run)" in html and _bars(html)[1][1] == BAR_W * 3 / 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "plan.html"]
    with pytest.raises(OutputPathError, match="does not exist"):
        write_html_report(tmp_path / "missing" / "r.html", _synthetic_plan(2))
    with pytest.raises(OutputPathError, match="is a directory"):
        write_html_report(tmp_path, _synthetic_plan(2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spa-")]


# --- rendering in headless Chromium --------------------------------------------------------


def _chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run installs it (apt-get install -y "
                    "--no-install-recommends chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI fails instead")


def _run_chromium(page: Path, tmp_path: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--window-size=1200,1600", *mode, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_chromium_renders_the_table_and_the_chart(tmp_path: Path) -> None:
    from PIL import Image

    page = tmp_path / "report.html"
    plan = _synthetic_plan(40)
    write_html_report(page, plan, model="model.onnx")
    dom = _run_chromium(page, tmp_path, "--dump-dom").stdout
    assert 'id="before-after"' in dom and 'id="channels-chart"' in dom
    assert dom.count('class="bar"') == 40 and dom.count('class="kept"') == 40
    assert "25,000,000" in dom
    shot = tmp_path / "shot.png"
    _run_chromium(page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20, "the screenshot is blank"
    kept = np.all(np.abs(pixels - KEPT_RGB) < 8, axis=-1)
    assert kept.sum() > 2000, "no kept-channel bars were drawn"
    rows = np.flatnonzero(kept.any(axis=1))
    assert rows.max() - rows.min() > 300  # bars down the page, not one blob
