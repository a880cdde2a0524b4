"""The ELBO anatomy page in Chromium: it renders its four figures for the shipped 2-D model, a bad K in the URL gives
a one-line message, and the screenshot goes to test-artifacts/elbo-z2.png (the 16-D model is covered by AppTest)."""
from __future__ import annotations

import pytest

from e2e_support import screenshot, wait_ready

pytestmark = pytest.mark.browser


def _open(page, url):  # noqa: F811
    # A fresh server that is first opened on a deep link runs the page without app.py (pages/ auto-discovery, no
    # sidebar); open the root once so st.navigation is in charge, then the deep link.
    page.goto(url.split("/elbo")[0] + "/")
    wait_ready(page, 120_000)
    page.goto(url)
    wait_ready(page, 120_000)
    page.wait_for_selector("[data-testid='stPlotlyChart']", timeout=60_000)
    wait_ready(page, 120_000)


def test_elbo_page_2d_screenshot_and_bad_k(server, page):  # noqa: F811
    _open(page, f"{server}/elbo?model=file:checkpoints/digits-z2.pt&elbo_idx=3&elbo_k=500")
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_text("ELBO anatomy").first.is_visible()
    # the decomposition, the IWAE curve, the posterior heatmap and the history
    assert page.locator("[data-testid='stPlotlyChart']").count() == 4
    assert page.get_by_text("log p_θ(x), grid integral").first.is_visible()
    page.set_viewport_size({"width": 1400, "height": 4400})  # the app scrolls inside its own container
    wait_ready(page, 120_000)
    screenshot(page, "elbo-z2")
    # a bad K from a shared link: one line, no traceback
    page.goto(f"{server}/elbo?model=file:checkpoints/digits-z2.pt&elbo_k=99999")
    wait_ready(page, 120_000)
    page.get_by_text("K=99999 is out of range").first.wait_for(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0
