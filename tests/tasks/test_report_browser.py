"""Debian's headless Chromium opens a fixture report offline: no console errors, no request
that leaves the file system, no horizontal overflow, every plot drawn; a full-page
screenshot is kept for a human to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tasks import registry
from tasks.report import build_report
from tests.tasks.fixtures_report import XSS, make_run

CHROMIUM = Path("/usr/bin/chromium")
# where a copy of the screenshot goes for people to look at (only if that folder exists)
SCREENSHOT_COPY = Path(os.environ.get("LORAFLOW_SCREENSHOT", "/work/notes/report_screenshot.png"))

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _browser_or_skip():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the python package playwright is not installed"
    if missing is None and not CHROMIUM.exists():
        missing = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    return sync_playwright


def _open(page, url: str) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"errors": [], "requests": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on(
        "request",
        lambda r: (
            seen["requests"].append(r.url) if not r.url.startswith(("file:", "data:")) else None
        ),
    )
    page.goto(url, wait_until="load")
    return seen


HIDDEN_COLUMNS = ("[...document.querySelectorAll('table')].filter("
                  "t => t.getBoundingClientRect().right > window.innerWidth"
                  " || t.scrollWidth > t.parentElement.clientWidth + 1).map(t => t.className)")
# Every way a block can sit wrongly, from the elements' boxes: the page scrolls sideways; a
# block sticks out of its card (unless a scroll box inside the card clips it); two blocks
# of one card overlap (columns of .cols and .grid, tables, figures, paragraphs).
LAYOUT_PROBLEMS = """() => {
  const out = [], W = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > W)
    out.push(`page is ${document.documentElement.scrollWidth} px wide in ${W}`);
  const box = e => e.getBoundingClientRect();
  const name = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
    (e.className && typeof e.className === 'string' ? '.' + e.className.split(' ')[0] : '') +
    ' "' + (e.innerText || '').trim().slice(0, 30) + '"';
  const clipper = (e, card) => {  // the nearest ancestor that clips e sideways, or the card
    for (let a = e.parentElement; a && a !== card; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== 'visible') return a;
    return card;
  };
  for (const card of document.querySelectorAll('section.card, header.top')) {
    const c = box(card);
    const blocks = [...card.querySelectorAll(
      'h1, h2, h3, p, ul, table, figure, .scroll, .cols > *, .grid > *, .kpi, .problem, details')]
      .filter(e => clipper(e, card) === card && box(e).width > 0);
    for (const e of blocks) {
      const b = box(e);
      if (b.left < c.left - 1 || b.right > c.right + 1)
        out.push(`${name(e)} spans ${Math.round(b.left)}-${Math.round(b.right)} outside its card ` +
                 `${Math.round(c.left)}-${Math.round(c.right)}`);
    }
    for (let i = 0; i < blocks.length; i++) for (let j = i + 1; j < blocks.length; j++) {
      const [a, b] = [blocks[i], blocks[j]];
      if (a.contains(b) || b.contains(a)) continue;
      const [p, q] = [box(a), box(b)];
      if (p.left < q.right - 1 && q.left < p.right - 1 && p.top < q.bottom - 1 && q.top < p.bottom - 1)
        out.push(`${name(a)} overlaps ${name(b)}`);
    }
  }
  return out;
}"""
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")  # matplotlib's cycle


def test_report_opens_offline_without_errors_or_requests(tmp_path):
    sync_playwright = _browser_or_skip()
    reports = tmp_path / "reports"
    build_report(
        make_run(tmp_path, run_id="older-run", finished_at="2026-11-19T10:00:00+00:00").run_dir,
        reports,
    )
    report = build_report(make_run(tmp_path).run_dir, reports)
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            seen = _open(page, report.as_uri())
            assert page.title() == "loraflow · fixture-run"
            # the page is laid out for its width: nothing sticks out sideways, and no table
            # hides columns behind a scroll bar of its own
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            assert page.evaluate(HIDDEN_COLUMNS) == []
            # one colour per method in every figure: LoRA's in the accuracy, loss and cost
            # plots alike, and no colour from matplotlib's default cycle anywhere
            svgs = page.evaluate("[...document.querySelectorAll('figure svg')]"
                                 ".map(s => s.outerHTML.toLowerCase())")
            lora = registry.method("lora").color.lower()
            assert sum(lora in svg for svg in svgs) >= 4
            assert not any(default in svg for svg in svgs for default in TAB10)
            sizes = page.evaluate(
                "[...document.querySelectorAll('svg')].map(s => s.getBoundingClientRect().height)"
            )
            assert len(sizes) == 8 and min(sizes) > 100  # seven plots, the token histogram
            assert page.locator("#plumbing").count() == 1  # tiny-distilbert: random weights
            assert page.locator("tbody.selected").count() == 5  # one per method that ran
            # the failed variant's error is shown as text, never run as markup
            assert XSS in " ".join(page.locator(".problem").all_inner_texts())
            assert (
                page.evaluate(
                    "JSON.parse(document.getElementById('report-data').textContent).run_id"
                )
                == "fixture-run"
            )
            assert (
                page.evaluate(
                    "document.querySelectorAll('script:not([type=\"application/json\"])').length"
                )
                == 0
            )
            page.screenshot(path=str(shot), full_page=True)

            index = browser.new_page(viewport={"width": 1280, "height": 900})
            seen_index = _open(index, (reports / "index.html").as_uri())
            assert index.locator("a[href='./fixture-run/report.html']").count() == 1
            assert index.evaluate("document.documentElement.scrollWidth") <= 1280
            assert index.evaluate(HIDDEN_COLUMNS) == []
            trend = index.locator("figure svg").first.inner_html().lower()
            # the methods' lines stay distinguishable when their values coincide
            for name in ("lora", "full_finetune", "tfidf_logreg"):
                assert registry.method(name).color.lower() in trend, name
            index.screenshot(path=str(tmp_path / "index.png"), full_page=True)
        finally:
            browser.close()
    assert seen["errors"] == [] and seen_index["errors"] == []
    assert seen["requests"] == [] and seen_index["requests"] == []
    assert shot.stat().st_size > 50_000
    if SCREENSHOT_COPY.parent.is_dir():
        shutil.copyfile(shot, SCREENSHOT_COPY)


def test_report_of_a_real_smoke_run_opens_offline(tmp_path, smoke_all):
    """The issue's check on real output: every step of a (shrunk) smoke run, then its report."""
    from tasks.pipeline import load_run

    sync_playwright = _browser_or_skip()
    config, _ = load_run(smoke_all.run_dir)
    report = smoke_all.report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            seen = _open(page, report.as_uri())
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "smoke.png"), full_page=True)
        finally:
            browser.close()
    assert seen["errors"] == [] and seen["requests"] == []
    for variant in config.variants():
        assert variant.name in text
    assert "LoRA r=4" in text and "full fine-tuning" in text


@pytest.mark.parametrize("width", [760, 1032, 1400])
def test_report_reflows_without_overlap_or_sideways_scroll(tmp_path, width):
    """At the narrowest supported width, in the Report tab's frame (1032 px in a 1400 px
    window) and full screen: the element boxes, not only a picture. A long Airflow run id
    and the Data and Provenance columns were where blocks ran into each other."""
    sync_playwright = _browser_or_skip()
    run_id = "scheduled__2026-11-29T00:00:00.123456+00:00_with_a_long_suffix_x"
    report = build_report(make_run(tmp_path, run_id=run_id).run_dir, tmp_path / "reports")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            seen = _open(page, report.as_uri())
            problems = page.evaluate(LAYOUT_PROBLEMS)
            # the comparison table keeps its columns; where the card is narrower than the
            # table, the table scrolls inside its card (not the page)
            table = page.evaluate("""() => { const s = document.querySelector('#comparison .scroll');
                return [s.scrollWidth, s.clientWidth, getComputedStyle(s).overflowX]; }""")
            columns = page.locator("table.comparison thead th").count()
            page.screenshot(path=str(tmp_path / f"report_{width}.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert seen["errors"] == []
    assert table[2] == "auto" and columns >= 11
    if width == 760:
        assert table[0] > table[1]  # wider than its card at 760 px: it scrolls there
