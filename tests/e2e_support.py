"""End-to-end support: `streamlit run app.py` on a free port, and Debian's Chromium driven by Playwright.

The fixtures live in tests/conftest_e2e.py and are imported once, by tests/conftest.py: `server` (base URL of a
running app, one per test module, with its own autosave and user-checkpoint folders), `browser` and `page`. Do not
import them again in a test module: a second session-scoped Playwright would start inside the first one's loop.
Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_READY = "[data-testid='stApp'][data-test-script-state='notRunning']"


def have_chromium() -> bool:
    return Path(CHROMIUM).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, env_extra: dict | None = None):
    """Start the app; returns (process, base_url). The app's writable folders live under tmp."""
    port = free_port()
    env = dict(os.environ)
    env.update({"VAE_AUTOSAVE_DIR": str(tmp / "autosave"), "VAE_USER_CHECKPOINTS": str(tmp / "user"),
                "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    env.update(env_extra or {})
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
                             "true", "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("streamlit did not answer /_stcore/health within 60 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(page, timeout_ms: int = 60_000):
    """Wait until the script run finished and the app is idle."""
    page.wait_for_selector(APP_READY, timeout=timeout_ms)


def screenshot(page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def cleanup(tmp: Path):
    shutil.rmtree(tmp, ignore_errors=True)
