"""The Latent space and Decode pages in Chromium: box-select points on the scatter and see their images appear;
move a slider and see the decoded image change. Screenshots: test-artifacts/latent-selection.png, decode-z16.png."""
from __future__ import annotations

import pytest

from e2e_support import screenshot, wait_ready

pytestmark = pytest.mark.browser


def _open(page, url):  # noqa: F811
    page.goto(url)
    wait_ready(page, 120_000)
    page.wait_for_selector("[data-testid='stPlotlyChart']", timeout=60_000)
    wait_ready(page, 120_000)


def _tall_screenshot(page, name):  # noqa: F811
    """Streamlit scrolls inside its own container: a tall viewport shows the whole page in the PNG."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": 2600})
    wait_ready(page)
    page.wait_for_timeout(800)
    screenshot(page, name)
    page.set_viewport_size(size)


def test_box_select_shows_images(server, page):  # noqa: F811
    _open(page, f"{server}/latent?model=file:checkpoints/digits-z2.pt")
    assert page.locator("[data-testid='stException']").count() == 0
    chart = page.locator("[data-testid='stPlotlyChart']").first
    chart.hover()
    chart.locator("[data-title='Box Select']").click()
    box = chart.locator(".nsewdrag").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 0.12 * box["width"], cy - 0.12 * box["height"])  # a box around the dense middle
    page.mouse.down()
    page.mouse.move(cx, cy, steps=8)
    page.mouse.move(cx + 0.12 * box["width"], cy + 0.12 * box["height"], steps=8)
    page.mouse.up()
    page.get_by_text("originals x").first.wait_for(timeout=60_000)
    wait_ready(page)
    assert page.get_by_text("selected", exact=False).first.is_visible()
    assert page.get_by_text("reconstructions E[x | z=μ(x)]").first.is_visible()
    assert page.locator("[data-testid='stImage'] img").count() >= 2
    assert page.locator("[data-testid='stException']").count() == 0
    _tall_screenshot(page, "latent-selection")
    # another model in the sidebar: the Projection box shows that model's choice, not the 2-D model's "none"
    page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox']").first.click()
    page.get_by_role("option", name="shipped: digits-z16").click()
    wait_ready(page, 120_000)
    page.wait_for_function("() => document.querySelector('.st-key-latent_method input').value.startsWith('PCA')",
                           timeout=60_000)


def test_slider_changes_decoded_image(server, page):  # noqa: F811
    _open(page, f"{server}/decode?model=file:checkpoints/digits-z16.pt")
    img = page.locator("[data-testid='stImage'] img").first
    before = img.get_attribute("src")
    thumb = page.locator(".st-key-dec_z_10 input[type='range']")  # z11: the most informative dimension
    thumb.focus()
    for _ in range(30):  # 30 steps of 0.05
        page.keyboard.press("ArrowRight")
    page.wait_for_function("(b) => { const i = document.querySelector(\"[data-testid='stImage'] img\");"
                           " return i && i.getAttribute('src') !== b; }", arg=before, timeout=30_000)
    wait_ready(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert "1.50" in page.locator(".st-key-dec_z_10").inner_text()
    _tall_screenshot(page, "decode-z16")
