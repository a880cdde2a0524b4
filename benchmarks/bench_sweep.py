"""Benchmark: a beta sweep on digits through the job registry, as the Trade-off page runs it.

    .venv/bin/python benchmarks/bench_sweep.py                 # 6 betas, 2 at a time, autosave on (as the app)
    .venv/bin/python benchmarks/bench_sweep.py --lab           # also each collapse lab (preset + 4 remedies)

Each run is vae.tradeoff.sweep_specs' short run (MLP 128, d = 16, 30 epochs, lr 1e-2, seed 0). The wall time counts
from the first submit until every run has ended, then the (R, D) points are computed as the page does. Prints a
table, then one JSON line. Target: under 60 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vae.data import load_dataset  # noqa: E402
from vae.jobs import ACTIVE, JobRegistry  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.bench import cpu_name  # noqa: E402
from vae.config import ModelConfig  # noqa: E402
from vae.tradeoff import lab_specs, rate_distortion, run_summary, sweep_specs  # noqa: E402

TARGET_S = 60.0


def run_group(reg: JobRegistry, specs, poll_s: float = 0.05) -> tuple[float, list]:
    t0 = time.perf_counter()
    jobs = [reg.submit(s.train_config, s.model_config, name=s.name, group="bench") for s in specs]
    while any(j.snapshot().state in ACTIVE for j in jobs):
        time.sleep(poll_s)
    return time.perf_counter() - t0, jobs


def points(jobs, x) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = []
    for j in jobs:
        cfg, state, _ = j.latest_weights()
        model = VAE(ModelConfig.from_dict(cfg))
        model.load_state_dict(state)
        out.append(rate_distortion(model.eval(), x))
    return time.perf_counter() - t0, out


def report(title: str, specs, jobs, rds, wall: float, rd_s: float) -> dict:
    print(f"\n{title}: {len(specs)} runs, wall {wall:.1f} s (+ {rd_s:.2f} s for the (R, D) points)")
    print(f"  {'run':34s} {'state':9s} {'R':>7s} {'D':>7s} {'ELBO':>8s} {'AU':>3s} {'train s':>8s}")
    rows = []
    for s, j, rd in zip(specs, jobs, rds):
        snap = j.snapshot()
        train_s = sum(snap.history["epoch"]["time_s"])
        sm = run_summary(snap.history) or {}
        print(f"  {s.name:34s} {snap.state:9s} {rd.rate:7.2f} {rd.distortion:7.2f} {rd.elbo:8.2f} "
              f"{rd.active_units:3d} {train_s:8.2f}")
        rows.append({"name": s.name, "state": snap.state, "rate": round(rd.rate, 3),
                     "distortion": round(rd.distortion, 3), "elbo": round(rd.elbo, 3),
                     "active_units": rd.active_units, "peak_active_units": sm.get("peak_active_units"),
                     "train_s": round(train_s, 2)})
    return {"wall_s": round(wall, 2), "points_s": round(rd_s, 2), "runs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", default="0.1,0.5,1,2,4,8")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--no-autosave", action="store_true", help="run without the per-epoch autosave")
    ap.add_argument("--lab", action="store_true", help="also time each collapse lab (a preset + 4 remedies)")
    args = ap.parse_args(argv)

    load_avg = os.getloadavg()
    test = load_dataset("digits", "test")
    load_dataset("digits", "train")  # the server has it cached after its first page: time training, not sklearn
    with tempfile.TemporaryDirectory() as tmp:
        reg = JobRegistry(max_concurrent=args.max_concurrent, autosave_dir=None if args.no_autosave else tmp)
        specs = sweep_specs(args.betas, epochs=args.epochs)
        wall, jobs = run_group(reg, specs)
        rd_s, rds = points(jobs, test.x)
        result = {"bench": "sweep", "betas": [s.beta for s in specs], "epochs": args.epochs,
                  "max_concurrent": args.max_concurrent, "autosave": not args.no_autosave,
                  **report("beta sweep", specs, jobs, rds, wall, rd_s)}
        if args.lab:
            for preset in ("beta4", "autoregressive"):
                lspecs = lab_specs(preset)
                lwall, ljobs = run_group(reg, lspecs)
                lrd_s, lrds = points(ljobs, test.x)
                result[f"lab_{preset}"] = report(f"collapse lab ({preset}: preset + 4 remedies)", lspecs, ljobs,
                                                 lrds, lwall, lrd_s)
        reg.shutdown()
        if hasattr(reg, "flush"):
            reg.flush()
    labs_ok = all(result[k]["wall_s"] < TARGET_S for k in result if k.startswith("lab_"))
    result.update({"target_s": TARGET_S, "ok": result["wall_s"] < TARGET_S and labs_ok, "cpu": cpu_name(),
                   "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "load_avg_1m_before": round(load_avg[0], 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)})
    print(f"\nsweep of {len(result['betas'])} betas: {result['wall_s']:.1f} s wall "
          f"({'under' if result['ok'] else 'OVER'} the {TARGET_S:.0f} s target) on {result['cores']} cores "
          f"({result['cpu']}); 1-min load average before {result['load_avg_1m_before']}")
    for k in [k for k in result if k.startswith("lab_")]:
        print(f"{k.replace('_', ' ', 1)} (5 runs): {result[k]['wall_s']:.1f} s wall")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
