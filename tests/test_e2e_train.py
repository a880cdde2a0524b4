"""End-to-end in Chromium against `streamlit run app.py`: every page opens (a screenshot of each goes to
test-artifacts/); on the Train page a run starts, its curves grow, it pauses, resumes, stops and is saved; a reload
reattaches to it through the URL; a second browser context runs its own job, and stopping that one leaves the first
running; on the first one's run, the second browser is watch-only."""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from e2e_support import ARTIFACTS, ROOT, wait_ready

pytestmark = pytest.mark.browser

STEP_JS = """() => { const e = document.querySelector('[data-testid=stProgress]');
  const m = e ? e.innerText.match(/step (\\d+)/) : null; return m ? +m[1] : -1; }"""
CURVE_POINTS_JS = """() => { const g = document.querySelector('.st-key-fig_curves .js-plotly-plot');
  const d = g && g._fullData && g._fullData[0]; return d && d.x ? d.x.length : -1; }"""  # plotly's decoded traces


def app_pages() -> list[tuple[str, str]]:
    """(url path, file) of every page app.py lists whose file exists (read from app.py without running it)."""
    tree = ast.parse((ROOT / "app.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PAGES" for t in node.targets):
            pages = ast.literal_eval(node.value)
            return [(u, f) for f, _, _, u in pages if (ROOT / f).exists()]
    raise AssertionError("app.py has no PAGES list")


def shot(pg, name: str):
    """A screenshot of the whole page: Streamlit scrolls inside its main container, so grow the viewport first."""
    ARTIFACTS.mkdir(exist_ok=True)
    pg.mouse.move(1, 1)  # no tooltip in the picture
    height = pg.evaluate("() => (document.querySelector('[data-testid=stMain]') || document.body).scrollHeight")
    size = pg.viewport_size
    pg.set_viewport_size({"width": size["width"], "height": min(max(size["height"], height + 40), 6000)})
    pg.wait_for_timeout(800)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    pg.set_viewport_size(size)


def step_of(pg) -> int:
    return pg.evaluate(STEP_JS)


def wait_step_above(pg, n: int, timeout_ms: int = 60_000):
    pg.wait_for_function(f"() => ({STEP_JS})() > {n}", timeout=timeout_ms)
    return step_of(pg)


def settle(pg):
    """Wait for the rerun an interaction triggered: it starts a moment after the event, then must finish."""
    pg.wait_for_timeout(300)
    wait_ready(pg)


def click(pg, key: str):
    pg.locator(f".st-key-{key} button").first.click()
    pg.mouse.move(1, 1)
    settle(pg)


def start_long_run(pg, base: str) -> str:
    """Open the Train page, ask for many epochs in slow motion (0.05 s per step: two runs and two viewers stay
    light on a small machine; the test stops the runs itself), Start; returns the run id."""
    pg.goto(f"{base}/train")
    wait_ready(pg)
    pg.locator(".st-key-btn_start button").first.wait_for()  # a fresh server's first visit runs twice
    box = pg.locator(".st-key-cfg_epochs input").first
    box.fill("2000")
    box.press("Enter")
    settle(pg)
    speed = pg.locator(".st-key-train_delay input[type=range]").first
    speed.focus()
    for _ in range(12):  # to "off" (the preset set a pace), then three notches up (0.01, 0.02, 0.05 s)
        speed.press("ArrowLeft")
    speed.press("ArrowRight")
    speed.press("ArrowRight")
    speed.press("ArrowRight")
    settle(pg)
    assert speed.get_attribute("aria-valuetext") == "0.05 s"
    click(pg, "btn_start")
    pg.wait_for_function("() => new URL(location.href).searchParams.has('run')")
    wait_step_above(pg, 0)
    return re.search(r"run=([0-9a-f]+)", pg.url).group(1)


def test_every_page_opens(page, server):  # noqa: F811
    for url_path, file in app_pages():
        t0 = time.monotonic()
        page.goto(f"{server}/{'' if url_path == 'home' else url_path}")
        wait_ready(page, 120_000)
        page.locator("[data-testid='stSidebarNav']").first.wait_for(timeout=120_000)
        wait_ready(page, 120_000)
        print(f"{url_path}: rendered in {time.monotonic() - t0:.1f} s")
        page.wait_for_timeout(500)
        errors = page.locator("[data-testid='stException']")
        assert errors.count() == 0, f"{file}: {errors.first.inner_text()[:300]}"
        assert page.locator("[data-testid='stSidebarNav']").count() == 1, f"{file} ran without app.py"
        shot(page, f"page-{url_path}")


def test_train_run_live_pause_resume_stop_save_reload_and_a_second_session(browser, server):  # noqa: F811
    ctx1 = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx2 = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        p1, p2 = ctx1.new_page(), ctx2.new_page()
        p1.set_default_timeout(150_000)  # generous: CI machines can be slow
        p2.set_default_timeout(150_000)
        run1 = start_long_run(p1, server)

        # the curves grow while the fragment polls
        p1.wait_for_function(f"() => ({CURVE_POINTS_JS})() > 0")
        n0 = p1.evaluate(CURVE_POINTS_JS)
        p1.wait_for_function(f"() => ({CURVE_POINTS_JS})() > {n0}", timeout=120_000)
        shot(p1, "train-running")

        # a second session runs its own job; stopping it leaves the first one running
        run2 = start_long_run(p2, server)
        assert run2 != run1
        click(p2, "btn_stop")
        p2.wait_for_function("() => document.body.innerText.includes('· stopped')")
        s2 = step_of(p2)
        s1 = step_of(p1)
        wait_step_above(p1, s1 + 5, 30_000)
        p2.wait_for_timeout(1500)
        assert step_of(p2) == s2
        # the second browser on the first one's run: watch-only (Stop disabled, Take over offered), the run goes on
        p2.goto(f"{server}/train?run={run1}")
        wait_ready(p2)
        p2.get_by_text("started in another browser session").first.wait_for()
        assert p2.locator(".st-key-btn_stop button").first.is_disabled()
        assert p2.locator(".st-key-btn_pause button").first.is_disabled()
        assert p2.locator(".st-key-btn_take_over button").first.is_enabled()
        shot(p2, "train-watch-only")
        wait_step_above(p1, step_of(p1), 30_000)

        # pause: the step count stands still (while the view keeps polling); resume: it moves again
        click(p1, "btn_pause")
        assert p1.locator(".st-key-btn_pause button").first.inner_text().endswith("Resume")
        p1.wait_for_timeout(1200)
        paused_at = step_of(p1)
        p1.wait_for_timeout(2500)
        assert step_of(p1) == paused_at
        click(p1, "btn_pause")
        wait_step_above(p1, paused_at, 30_000)

        # stop and save under a name; after a reload the run is still this browser's own: one Stop stops it
        p1.reload()
        wait_ready(p1)
        wait_step_above(p1, step_of(p1), 30_000)  # still running, its live view back
        click(p1, "btn_stop")
        p1.wait_for_function("() => document.body.innerText.includes('· stopped')")
        assert "started in another browser session" not in p1.inner_text("body")
        stopped_at = step_of(p1)
        name = f"e2e-{run1}"
        # the run has ended: the Save panel opens by itself
        try:
            p1.locator(".st-key-exp_save details[open] .st-key-save_name input").first.wait_for(timeout=60_000)
        except Exception as exc:
            shot(p1, "train-stopped-save-closed")
            panel = p1.evaluate("""() => { const e = document.querySelector('.st-key-exp_save');
                return e ? e.outerHTML.slice(0, 600) : 'no .st-key-exp_save'; }""")
            raise AssertionError(f"the Save panel did not open when the run stopped: {panel}") from exc
        box = p1.locator(".st-key-save_name input").first
        box.fill(name)
        box.press("Enter")
        settle(p1)
        click(p1, "btn_save")
        p1.get_by_text(f"Saved {name}.pt").wait_for()
        shot(p1, "train-stopped-saved")

        # a reload reattaches to the same run through the URL
        p1.reload()
        wait_ready(p1)
        assert f"run={run1}" in p1.url
        p1.wait_for_function(f"() => ({STEP_JS})() === {stopped_at}")
        picked = p1.evaluate("""() => { const b = document.querySelector('.st-key-run_pick');
            const i = b.querySelector('input'); return b.innerText + ' ' + (i ? i.value + ' ' + i.placeholder : ''); }""")
        assert run1 in picked, picked  # the run list shows the reattached run
        # and the saved checkpoint is offered by the sidebar's model picker on every page
        p1.locator("[data-testid='stSidebar'] .st-key-model input").first.click()
        assert p1.get_by_role("option", name=f"saved: {name}").count() == 1
    finally:
        ctx1.close()
        ctx2.close()
