"""AppTest for app.py, with a work-around for a Streamlit 1.67 AppTest quirk.

AppTest resets PagesManager.uses_pages_directory to None before every run, and a new PagesManager then sets it to
True because a pages/ folder exists. From the second run on, the script runner then executes the page file alone
(multipage v1 behaviour) instead of app.py with its st.navigation and sidebar. The real server never does this:
st.navigation sets the flag to False for good. Here the flag is pinned to False after each PagesManager is built.
"""
from __future__ import annotations

from pathlib import Path

from streamlit.runtime import pages_manager as _pm
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as _app_test

APP = str(Path(__file__).resolve().parent.parent / "app.py")
_Base = _pm.PagesManager


class _NavigationPagesManager(_Base):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Base.uses_pages_directory = False


_app_test.PagesManager = _NavigationPagesManager


def new_app_test(timeout: float = 60) -> AppTest:
    return AppTest.from_file(APP, default_timeout=timeout)


def _open(page: str, timeout: float, query: dict, session: dict) -> AppTest:
    at = new_app_test(timeout)
    for k, v in query.items():
        at.query_params[k] = v
    for k, v in session.items():
        at.session_state[k] = v
    at.run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    return at


def open_link(page: str, timeout: float = 60, **query) -> AppTest:
    """As a shared link opens page: query holds the URL's parameters (?model=...&sel=...) before the first run."""
    return _open(page, timeout, query, {})


def open_page(page: str, timeout: float = 60, **session) -> AppTest:
    """Run app.py once, then switch to page ('pages/train.py') and run it. session: values set beforehand."""
    return _open(page, timeout, {}, session)
