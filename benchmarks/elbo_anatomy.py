"""ELBO anatomy figures on this machine: timings of the heavy estimates for one image, and how well importance
sampling agrees with the grid integral on the shipped 2-D model.

    .venv/bin/python benchmarks/elbo_anatomy.py            # timings + agreement over the whole digits test split
    .venv/bin/python benchmarks/elbo_anatomy.py --quick    # timings only

Prints wall-clock and process CPU seconds (the median of --repeats runs) on 1 intra-op thread (as the page runs them)
and on all cores, and the machine's load average: on a busy CPU, threads spin-waiting for each other inflate
wall-clock times several-fold.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vae import load_checkpoint, load_dataset  # noqa: E402
from vae.bench import cpu_name  # noqa: E402
from vae import anatomy as an  # noqa: E402
from vae.diagnostics import grid_log_px  # noqa: E402
from vae.losses import iw_log_px  # noqa: E402


def timed(fn, repeats: int):
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="timings only, no agreement statistics")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average before {os.getloadavg()[0]:.1f}")
    x = load_dataset("digits", "test").x
    for name in ("digits-z2", "digits-z16"):
        model, _ = load_checkpoint(ROOT / "checkpoints" / f"{name}.pt")
        x1 = x[:1]
        g = torch.Generator().manual_seed(0)
        rows = [("IS log p(x), K=5000, 1 image", lambda: iw_log_px(model, x1, 5000, generator=g)),
                ("anatomy(): ELBO S=1000 + IS K=5000 + IWAE curve, 1 image",
                 lambda: an.anatomy(model, x1, k=5000, samples=1000))]
        if model.config.latent_dim == 2:
            rows += [("grid 241^2 log p(x), vae.diagnostics.grid_log_px, 1 image", lambda: grid_log_px(model, x1)),
                     ("grid 241^2 log p(x), anatomy.grid_log_px_batch, 1 image",
                      lambda: an.grid_log_px_batch(model, x1)),
                     ("grid 241^2 log p(x), anatomy.grid_log_px_batch, 32 images",
                      lambda: an.grid_log_px_batch(model, x[:32])),
                     ("posterior_picture(): 241^2 grid + 161^2 zoom + KL, 1 image",
                      lambda: an.posterior_picture(model, x[0]))]
        for label, fn in rows:
            for threads in sorted({1, os.cpu_count() or 1}):
                torch.set_num_threads(threads)
                fn()  # warm-up
                wall, cpu_s = timed(fn, args.repeats)
                print(f"{name:10s} {label:62s} {threads} thread(s): wall {wall:6.3f} s   cpu {cpu_s:6.3f} s")
            torch.set_num_threads(os.cpu_count() or 1)
    print(f"load average after {os.getloadavg()[0]:.1f}")
    if args.quick:
        return
    model, _ = load_checkpoint(ROOT / "checkpoints" / "digits-z2.pt")
    grid, ring = an.grid_log_px_batch(model, x)
    grid = grid.numpy()
    print(f"\ndigits-z2, whole test split ({len(x)} images): posterior mass on the grid's edge <= {ring.max():.1e}")
    for k in (1000, 5000):
        for seed in (0, 1):
            a = an.anatomy(model, x, k=k, samples=1000, seed=seed)
            pe = a.per_example
            d = pe["log_px"] - grid
            ok = np.array([an.grid_agrees(v, s, gv) for v, s, gv in zip(pe["log_px"], pe["log_px_se"], grid)])
            q = np.percentile(np.abs(d), [50, 90, 95, 99, 100])
            print(f"K={k:5d} seed={seed}: IS - grid: mean {d.mean():+.4f} (set SE {a.log_px_se:.4f}); |d| median "
                  f"{q[0]:.3f}, 90% {q[1]:.3f}, 95% {q[2]:.3f}, 99% {q[3]:.3f}, max {q[4]:.3f}; within "
                  f"{an.AGREE_SIGMAS:g} SE + {an.AGREE_FLOOR:g}: {ok.sum()}/{len(ok)} (misses IS low: "
                  f"{(d[~ok] < 0).sum()}/{(~ok).sum()}); gap/SE min {(pe['gap'] / pe['gap_se']).min():+.2f}; "
                  f"mean gap IS {a.gap:.3f} +- {a.gap_se:.3f}, grid {(grid - pe['elbo']).mean():.3f}")


if __name__ == "__main__":
    main()
