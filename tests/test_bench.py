"""`python -m vae bench` in miniature: it trains both loops, reports the fused step, and its figures are consistent
with one another (the figures themselves are the benchmark's business, not a test's)."""
from __future__ import annotations

import pytest

from vae.bench import LAYERS, run_bench, step_flops


def test_step_flops_counts_forward_and_backward_gemms():
    # forward 2BAB per layer, grad-weight 2BAB, grad-input 2BAB except the first layer (no gradient for the data)
    want = sum(2 * 128 * a * b * (2 if i == 0 else 3) for i, (a, b) in enumerate(LAYERS))
    assert step_flops(128) == want == 2 * 128 * (784 * 400 * 2 + 400 * 40 * 3 + 20 * 400 * 3 + 400 * 784 * 3)


def test_a_tiny_bench_reports_consistent_figures():
    lines = []
    res = run_bench(steps=4, batch_size=16, device="cpu", log=lines.append)
    assert {"samples_per_s", "baseline_samples_per_s", "speedup", "roofline_fraction"} <= set(res)
    assert res["samples_per_s"] > 0 and res["baseline_samples_per_s"] > 0
    assert res["speedup"] == pytest.approx(res["samples_per_s"] / res["baseline_samples_per_s"])
    assert res["roofline_fraction"] == pytest.approx(res["achieved_gflops"] / res["gemm_gflops"])
    assert any("fused step" in line for line in lines)  # the trainer took the hand-written step for the MLP
    assert lines[0].startswith("machine: ")


@pytest.mark.parametrize("kw", [dict(steps=0), dict(batch_size=0)])
def test_bench_refuses_sizes_below_one(kw):
    with pytest.raises(ValueError, match="must be >= 1"):
        run_bench(**kw)
