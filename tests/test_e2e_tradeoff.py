"""Chromium against `streamlit run app.py`: a 2-point beta sweep whose points appear on the rate–distortion plane, and
the collapse lab's "collapsed -> fixed" side by side. Screenshots go to test-artifacts/."""
from __future__ import annotations

import re

import pytest

from e2e_support import screenshot, wait_ready

pytestmark = pytest.mark.browser

PLANE_TRACES = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')][0];
  if (!gd || !gd.data) return {};
  const out = {};
  for (const t of gd.data) if (t.name) out[t.name] = (t.x || []).length;
  return out;
}"""


def test_two_point_sweep_appears_on_the_plane(server, page):  # noqa: F811
    page.goto(server + "/tradeoff")
    wait_ready(page)
    page.wait_for_function(f"() => ({PLANE_TRACES})()['shipped sweep'] === 6")  # instantly there
    screenshot(page, "tradeoff-shipped")
    page.get_by_role("textbox", name="β values").fill("0.5, 4")
    page.get_by_role("spinbutton", name="epochs").fill("3")
    page.get_by_role("button", name="Start sweep").click()
    page.get_by_text("2/2 runs ended").wait_for(timeout=120_000)  # the polled progress line
    page.wait_for_function(f"() => ({PLANE_TRACES})()['run'] === 2", timeout=60_000)
    wait_ready(page)
    traces = page.evaluate(PLANE_TRACES)
    assert traces["run"] == 2 and traces["shipped sweep"] == 6
    assert page.get_by_text("Traceback").count() == 0
    page.get_by_role("heading", name="Trade-off: rate against distortion").scroll_into_view_if_needed()
    screenshot(page, "tradeoff-sweep")


def test_collapse_lab_collapsed_and_fixed_side_by_side(server, page):  # noqa: F811
    page.goto(server + "/collapse")
    wait_ready(page)
    for label in ("linear warm-up", "cyclical annealing", "capacity C → 10 nats"):  # keep free bits only
        page.get_by_role("button", name=label).click()
        wait_ready(page)
    page.get_by_role("button", name="Settings").click()
    page.get_by_role("spinbutton", name="epochs per run").fill("12")
    page.keyboard.press("Enter")
    wait_ready(page)
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("+ free bits λ = 0.5").first.wait_for(timeout=60_000)
    page.wait_for_function("() => { const b = [...document.querySelectorAll('button')]"
                           ".find(b => b.innerText.trim().endsWith('Run')); return b && !b.disabled; }",
                           timeout=120_000)  # Run is enabled again once both runs ended
    wait_ready(page)
    body = page.inner_text("body")
    units = [int(v) for v in re.findall(r"active units (\d+)/16", body)]
    assert len(units) == 2 and units[0] <= 1 and units[1] >= 8  # collapsed -> fixed
    assert "Traceback" not in body
    assert page.locator(".js-plotly-plot").count() == 4  # active units, the heatmaps' colour scale, two heatmaps
    page.get_by_role("heading", name="Collapse lab").scroll_into_view_if_needed()
    screenshot(page, "collapse-lab")
