"""Dashboard benchmark: what the live Train page costs, and what a lecturer waits for.

    .venv/bin/python benchmarks/bench_dashboard.py            # about 6-9 minutes on 2 cores
    .venv/bin/python benchmarks/bench_dashboard.py --quick    # shorter runs, fewer repeats (a smoke test)

(a) Training throughput of one job started from the Train page while Chromium shows its live view (the fragment
    redraws every second), against the CLI's trainer alone on the same config (digits, the "fast demo" model: MLP
    256-128, d = 8, batch 64). Wall clock, per-epoch test evaluation included, model set-up excluded, for both:
      - dashboard: the job's own clock (vae.jobs records it; read back from its autosave file);
      - CLI: Trainer.fit() timed in a fresh process, as `python -m vae train` runs it, with torch's default threads
        (all cores; a dashboard job trains on the cores but one, which it leaves to the server and the browser: see
        vae.jobs).
    The two alternate, --repeats times each; medians are compared.
    Also the trainer's own compute-only samples/s (history "samples_per_s") of both. Target: >= 85 %.
(b) Interaction latency on another page: a widget on Home (the sidebar's presentation toggle, a full rerun of Home)
    clicked in a second browser context, timed in the page from the click until its effect shows (presentation
    mode's layout on or off) with the script idle, while nothing trains and while a job trains with its live view
    open in the first context.
(c) Cold start: from `streamlit run app.py` to the server answering, and to Home rendered in Chromium (its images
    drawn, the script idle).
(d) The Collapse lab from the browser: Run clicked, until the page shows every one of its five runs ended.

Prints figures as it goes and, last, one JSON line. The machine's load average is printed too: other processes
share the CPU, so compare figures taken together.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from e2e_support import CHROMIUM, CHROMIUM_ARGS, free_port, stop_server, wait_ready  # noqa: E402
from vae.bench import cpu_name  # noqa: E402

CONFIG = dict(dataset="digits", batch_size=64, lr=3e-3, beta=1.0, seed=0, device="cpu")
MODEL = dict(hidden=(256, 128), latent_dim=8)

CLI_SNIPPET = r"""
import json, sys, time, torch
from vae import Trainer, TrainConfig
from vae.presets import model_config_for
cfg = json.loads(sys.argv[1]); threads = int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
t = Trainer(TrainConfig(**cfg["train"]), model_config_for("digits", **cfg["model"]))
t0 = time.perf_counter()
t.fit()
wall = time.perf_counter() - t0
sps = t.history["epoch"]["samples_per_s"]
print(json.dumps({"wall_s": wall, "steps": t.step_count, "samples_per_s": t.step_count * t.config.batch_size / wall,
                  "compute_samples_per_s": sum(sps) / len(sps), "threads": torch.get_num_threads()}))
"""

ROUND_TRIP_JS = """async () => {
  // from the click until the page shows its effect (presentation mode's 2.5rem side padding on or off: ui.core's
  // PRESENT_CSS) and the script is idle
  const box = document.querySelector('[data-testid=stSidebar] .st-key-present input');
  const want = !box.checked;
  const t0 = performance.now();
  box.click();
  return await new Promise(resolve => {
    const tick = () => {
      const app = document.querySelector('[data-testid=stApp]');
      const main = document.querySelector('[data-testid=stMainBlockContainer]');
      const on = !!main && getComputedStyle(main).paddingLeft === '40px';
      if (on === want && app && app.getAttribute('data-test-script-state') === 'notRunning') {
        resolve(performance.now() - t0);
      } else if (performance.now() - t0 > 60000) {
        resolve(-1);  // no effect seen: reported, not waited for
      } else {
        setTimeout(tick, 2);
      }
    };
    tick();
  });
}"""


def log(msg: str):
    print(msg, flush=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# ---- the server --------------------------------------------------------------------------------------------------
def start_server(tmp: Path, wait: bool = True, log_to: Path | None = None):
    port = free_port()
    env = dict(os.environ, VAE_AUTOSAVE_DIR=str(tmp / "autosave"), VAE_USER_CHECKPOINTS=str(tmp / "user"),
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
                             "true", "--server.port", str(port), "--server.address", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=open(log_to, "wb") if log_to else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t_health = None
    while wait and time.perf_counter() - t0 < 120:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    t_health = time.perf_counter() - t0
                    break
        except OSError:
            time.sleep(0.05)
    return proc, url, t0, t_health


def ready(pg, timeout_ms=120_000):
    pg.wait_for_timeout(300)  # a rerun just asked for may not have begun yet
    wait_ready(pg, timeout_ms)


def open_train(pg, url):
    """The Train page, with slow motion off (the "fast demo" preset sets a lecture pace): full speed is measured."""
    pg.goto(url + "/train")
    ready(pg)
    pg.locator(".st-key-btn_start button").first.wait_for(timeout=120_000)
    ready(pg)
    speed = pg.locator(".st-key-train_delay input[type=range]").first
    speed.focus()
    for _ in range(12):
        speed.press("ArrowLeft")
    ready(pg)
    assert speed.get_attribute("aria-valuetext") == "off", speed.get_attribute("aria-valuetext")


def start_run(pg, url: str, epochs: int) -> str:
    """Start a run of the config for `epochs` from the Train page (slow motion off); returns its id."""
    open_train(pg, url)
    box = pg.locator(".st-key-cfg_epochs input").first
    box.fill(str(epochs))
    box.press("Enter")
    ready(pg)
    pg.locator(".st-key-btn_start button").first.click()
    pg.wait_for_function("() => new URL(location.href).searchParams.has('run')")
    return pg.evaluate("() => new URL(location.href).searchParams.get('run')")


def dashboard_run(pg, url: str, autosave: Path, epochs: int) -> dict:
    """Start a run from the Train page and keep its live view open until it ends; the job's clock from its
    autosave."""
    run_id = start_run(pg, url, epochs)
    seen, t_end = set(), time.monotonic() + 600
    while time.monotonic() < t_end:  # the live view must keep redrawing: count the progress texts it shows
        text = pg.evaluate("() => { const e = document.querySelector('[data-testid=stProgress]');"
                           " return e ? e.innerText : ''; }")
        seen.add(text)
        if f"epoch {epochs}/{epochs}" in text:
            break
        pg.wait_for_timeout(250)
    path = autosave / f"{run_id}.pt"
    import torch

    deadline = time.monotonic() + 30
    while True:  # the final autosave is written as the job ends
        try:
            meta = torch.load(path, weights_only=True)["job"]
            if meta["state"] == "finished":
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not finish (autosave {path})")
        time.sleep(0.2)
    w = meta["train_wall"]
    wall = w["t1"] - w["t0"]
    sps = meta["trainer_state"]["history"]["epoch"]["samples_per_s"]
    return {"wall_s": wall, "steps": w["steps"], "samples_per_s": w["steps"] * w["batch_size"] / wall,
            "compute_samples_per_s": sum(sps) / len(sps), "live_view_updates": len(seen)}


def cli_run(epochs: int, threads: int) -> dict:
    cfg = {"train": {**CONFIG, "epochs": epochs}, "model": MODEL}
    out = subprocess.run([sys.executable, "-c", CLI_SNIPPET, json.dumps(cfg), str(threads)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- (a) ---------------------------------------------------------------------------------------------------------
def bench_throughput(browser, epochs: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url, _, _ = start_server(tmp)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            pg = ctx.new_page()
            pg.set_default_timeout(120_000)
            dashboard_run(pg, url, tmp / "autosave", 2)  # warm the server's UI (imports, first figures)
            rows = {"dashboard": [], "cli": []}
            for r in range(repeats):
                for kind in ("cli", "dashboard") if r % 2 == 0 else ("dashboard", "cli"):
                    res = dashboard_run(pg, url, tmp / "autosave", epochs) if kind == "dashboard" else \
                        cli_run(epochs, 0)
                    rows[kind].append(res)
                    log(f"  (a) repeat {r + 1} {kind:10s} {res['samples_per_s']:8,.0f} samples/s wall "
                        f"({res['wall_s']:.1f} s, {res['steps']} steps), compute-only "
                        f"{res['compute_samples_per_s']:8,.0f}" +
                        (f", live view redrew {res['live_view_updates']} times" if kind == "dashboard" else "") +
                        f"   [load {load()}]")
            ctx.close()
        finally:
            stop_server(proc)
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in rows.items()}
    med_c = {k: statistics.median(x["compute_samples_per_s"] for x in v) for k, v in rows.items()}
    out = {"epochs": epochs, "repeats": repeats, "dashboard_samples_per_s": med["dashboard"],
           "cli_samples_per_s": med["cli"], "ratio": med["dashboard"] / med["cli"],
           "compute_ratio": med_c["dashboard"] / med_c["cli"], "runs": rows}
    log(f"(a) dashboard with live view: {med['dashboard']:,.0f} samples/s; CLI trainer {med['cli']:,.0f} -> "
        f"{100 * out['ratio']:.0f} % of the CLI (target >= 85 %)")
    return out


# ---- (b) ---------------------------------------------------------------------------------------------------------
def bench_latency(browser, clicks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url, _, _ = start_server(tmp)
        try:
            viewer = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            user = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            for p in (viewer, user):
                p.set_default_timeout(120_000)
            user.goto(url)
            ready(user)
            user.locator("[data-testid=stSidebar] .st-key-present input").first.wait_for()
            ready(user)

            def measure(n):
                times = []
                for _ in range(n):
                    ms = user.evaluate(ROUND_TRIP_JS)
                    if ms < 0:
                        shot = Path(tempfile.gettempdir()) / "bench_dashboard_no_rerun.png"
                        user.screenshot(path=str(shot), full_page=True)
                        state = user.evaluate("() => [document.querySelector('[data-testid=stApp]')"
                                              ".getAttribute('data-test-script-state'), document.querySelector("
                                              "'[data-testid=stSidebar] .st-key-present input').checked]")
                        raise RuntimeError(f"a click on Home's presentation toggle started no rerun within 60 s "
                                           f"(script state, toggle: {state}; screenshot {shot})")
                    times.append(ms)
                    user.wait_for_timeout(200)
                return times

            measure(2)  # warm
            idle = measure(clicks)
            log(f"  (b) idle: median {statistics.median(idle):.0f} ms over {clicks} clicks   [load {load()}]")
            open_train(viewer, url)
            box = viewer.locator(".st-key-cfg_epochs input").first
            box.fill("5000")
            box.press("Enter")
            ready(viewer)
            viewer.locator(".st-key-btn_start button").first.click()
            viewer.wait_for_function("() => { const e = document.querySelector('[data-testid=stProgress]');"
                                     " return e && /step [1-9]/.test(e.innerText); }")
            busy = measure(clicks)
            step_text = viewer.locator("[data-testid=stProgress]").first.inner_text()
            log(f"  (b) training, live view open: median {statistics.median(busy):.0f} ms over {clicks} clicks "
                f"(the job was at '{step_text}')   [load {load()}]")
            viewer.locator(".st-key-btn_stop button").first.click()
            ready(viewer)
        finally:
            stop_server(proc)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    out = {"clicks": clicks, "idle_ms_median": statistics.median(idle), "idle_ms_p90": q(idle, 0.9),
           "training_ms_median": statistics.median(busy), "training_ms_p90": q(busy, 0.9),
           "idle_ms": idle, "training_ms": busy}
    out["ratio_median"] = out["training_ms_median"] / out["idle_ms_median"]
    log(f"(b) a Home widget round trip: {out['idle_ms_median']:.0f} ms idle, {out['training_ms_median']:.0f} ms while "
        f"a job trains with its live view open (x{out['ratio_median']:.2f}; p90 {out['idle_ms_p90']:.0f} vs "
        f"{out['training_ms_p90']:.0f} ms)")
    return out


# ---- (d) ---------------------------------------------------------------------------------------------------------
def bench_lab(browser, repeats: int) -> dict:
    """The Collapse lab as a lecturer runs it: Run clicked, until the page shows every run ended (the progress line
    "k/5 runs ended" gone), in one browser tab; a fresh server each time."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url, _, _ = start_server(Path(tmp))
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            try:
                pg = ctx.new_page()
                pg.set_default_timeout(180_000)
                pg.goto(url + "/collapse")
                ready(pg)
                t0 = time.perf_counter()
                pg.locator(".st-key-lab_run button").first.click()
                # ended: the progress line ("k/5 runs ended") gone and a heatmap drawn for each run
                pg.wait_for_function("() => !document.body.innerText.includes('runs ended') && "
                                     "document.querySelectorAll('[class*=st-key-lab_heat_]').length >= 5",
                                     timeout=300_000, polling=100)
                times.append(time.perf_counter() - t0)
            finally:
                ctx.close()
                stop_server(proc)
        log(f"  (d) collapse lab, Run -> every run ended on screen: {times[-1]:.1f} s   [load {load()}]")
    out = {"repeats": repeats, "lab_s_median": statistics.median(times), "lab_s": times}
    log(f"(d) collapse lab from the browser: {out['lab_s_median']:.1f} s (median of {repeats})")
    return out


# ---- (c) ---------------------------------------------------------------------------------------------------------
def bench_cold_start(browser, repeats: int) -> dict:
    health, rendered = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url, t0, t_health = start_server(Path(tmp))
            try:
                pg = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                pg.set_default_timeout(180_000)
                pg.goto(url)
                pg.locator("[data-testid=stSidebarNav]").first.wait_for()
                pg.wait_for_function("() => document.querySelectorAll('[data-testid=stMain] img').length >= 3")
                ready(pg)
                rendered.append(time.perf_counter() - t0)
                health.append(t_health)
                pg.context.close()
            finally:
                stop_server(proc)
        log(f"  (c) server answering after {health[-1]:.1f} s, Home rendered after {rendered[-1]:.1f} s   "
            f"[load {load()}]")
    out = {"repeats": repeats, "server_ready_s_median": statistics.median(health),
           "home_rendered_s_median": statistics.median(rendered), "server_ready_s": health, "home_rendered_s": rendered}
    log(f"(c) cold start: server answers in {out['server_ready_s_median']:.1f} s, Home rendered in "
        f"{out['home_rendered_s_median']:.1f} s (median of {repeats})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=120, help="epochs per throughput run (23 steps each)")
    ap.add_argument("--repeats", type=int, default=4, help="throughput repeats (CLI and dashboard alternate)")
    ap.add_argument("--clicks", type=int, default=12, help="widget round trips per condition")
    ap.add_argument("--cold", type=int, default=3, help="cold starts")
    ap.add_argument("--quick", action="store_true", help="a smoke test: short runs, one repeat")
    ap.add_argument("--labs", type=int, default=3, help="collapse lab runs from the browser")
    ap.add_argument("--only", default="abcd", help="which parts to run, e.g. 'a' or 'bc' (default: all four)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats, args.clicks, args.cold, args.labs = 20, 1, 4, 1, 1
    for name, v in (("epochs", args.epochs), ("repeats", args.repeats), ("clicks", args.clicks), ("cold", args.cold),
                    ("labs", args.labs)):
        if v < 1:
            ap.error(f"--{name} {v} is not allowed: give at least 1")
    import torch
    from playwright.sync_api import sync_playwright

    cpu = cpu_name()
    machine = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "load_avg_start": os.getloadavg()}
    log(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; load average {load()}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            a = bench_throughput(browser, args.epochs, args.repeats) if "a" in args.only else None
            b = bench_latency(browser, args.clicks) if "b" in args.only else None
            c = bench_cold_start(browser, args.cold) if "c" in args.only else None
            d = bench_lab(browser, args.labs) if "d" in args.only else None
        finally:
            browser.close()
    machine["load_avg_end"] = os.getloadavg()
    print(json.dumps({"machine": machine, "throughput": a, "latency": b, "cold_start": c, "collapse_lab": d}),
          flush=True)


if __name__ == "__main__":
    main()
