"""Pytest fixtures for the browser tests (see e2e_support.py). Import these names in conftest.py."""
from __future__ import annotations

import pytest

from e2e_support import CHROMIUM, CHROMIUM_ARGS, have_chromium, start_server, stop_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    proc, url = start_server(tmp)
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def _playwright():
    if not have_chromium():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
                    ".ci/run does this")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(_playwright):
    b = _playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = ctx.new_page()
    p.set_default_timeout(60_000)
    yield p
    ctx.close()
