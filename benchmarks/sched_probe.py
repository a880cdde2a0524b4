"""Where a dashboard job's training thread spends the wall clock while Chromium shows its live view, and while the
page is closed: the kernel's own accounting of the thread (/proc/<pid>/task/<tid>/schedstat: time on a CPU, time
runnable but waiting for one), the CPU of Chromium and of the server, and the epochs the job finished.

    .venv/bin/python benchmarks/sched_probe.py            # about 95 s: one 10,000-epoch run, 8 windows of 8 s
    VAE_JOB_NICE=0 .venv/bin/python benchmarks/sched_probe.py

Linux only. Windows: open, open, closed, closed, then again; the job's epochs in each from its autosave (written at
most once a second, so the counts are good to about one second of epochs). docs/performance.md has figures.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dashboard import CHROMIUM, CHROMIUM_ARGS, ready, start_run, start_server, stop_server  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
WINDOW_S = 8.0
EPOCHS = 10_000


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                kids = [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / HZ
    except OSError:
        return 0.0


def schedstat(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (ns on a CPU, ns runnable and waiting) for each thread of pid."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        run, wait, _ = Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()
        out[int(t)] = (int(run), int(wait))
    return out


def window(server_pid: int, worker: int, chromium: list[int]) -> dict:
    t0, c0, s0, w0 = schedstat(worker), {p: cpu_s(p) for p in chromium}, cpu_s(server_pid), time.monotonic()
    time.sleep(WINDOW_S)
    t1, c1, s1, dt = schedstat(worker), {p: cpu_s(p) for p in chromium}, cpu_s(server_pid), time.monotonic() - w0
    rows = sorted(((t1[t][0] - t0[t][0], t1[t][1] - t0[t][1]) for t in t1 if t in t0), reverse=True)
    (run, wait), others = rows[0], sum(r[0] for r in rows[1:])  # the busiest thread trains
    return {"train_on_cpu": run / 1e9 / dt, "train_waiting": wait / 1e9 / dt, "worker_others": others / 1e9 / dt,
            "chromium": sum(c1[p] - c0.get(p, 0.0) for p in c1) / dt, "server": (s1 - s0) / dt}


def epochs_done(path: Path) -> int:
    for _ in range(50):
        try:
            return len(torch.load(path, weights_only=True)["job"]["trainer_state"]["history"]["epoch"]["epoch"])
        except Exception:  # being replaced right now
            time.sleep(0.1)
    raise RuntimeError(f"cannot read {path}")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="vae-sched-"))
    server, url, *_ = start_server(tmp)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            run_id = start_run(page, url, EPOCHS)
            time.sleep(6)
            kids = descendants(server.pid)
            before = {k: cpu_s(k) for k in kids}
            time.sleep(1.0)
            worker = max(kids, key=lambda k: cpu_s(k) - before[k])  # the one training now (not the forkserver)
            chromium = [q for q in descendants(os.getpid()) if q != server.pid and q not in kids]
            autosave = tmp / "autosave" / f"{run_id}.pt"
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"load {load}, job nice {os.environ.get('VAE_JOB_NICE', 10)}")
            for i, phase in enumerate(("open", "closed", "open", "closed")):
                if phase == "closed":
                    page.goto("about:blank")
                elif i:
                    page.goto(f"{url}/train?run={run_id}")
                    ready(page)
                time.sleep(3)
                for _ in range(2):
                    e0 = epochs_done(autosave)
                    w = window(server.pid, worker, chromium)
                    e1 = epochs_done(autosave)
                    print(f"{phase:6} epochs {e1 - e0:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in w.items()),
                          flush=True)
            browser.close()
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
