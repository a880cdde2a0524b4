"""vae.tradeoff: the rate–distortion point of a model, lines on the plane, sweep and lab specs, and seeded training
checks on digits (beta moves the point along the trade-off; the collapse presets collapse; remedies revive)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vae import Trainer
from vae.checkpoint import load_checkpoint
from vae.diagnostics import evaluate
from vae.tradeoff import (LAB_REMEDIES, PRESETS, REMEDIES, beta_line, clip_line, describe_objective, frontier,
                          iso_elbo_lines, kl_heatmap, lab_meta_from_names, lab_run_name, lab_specs, nice_step,
                          outliers, parse_betas, plane_box, rate_distortion, repeated_betas, run_summary, sweep_specs,
                          trajectory)

REPO = Path(__file__).resolve().parents[1]


# ---- rate_distortion -------------------------------------------------------------------------------------------
def test_rate_distortion_agrees_with_evaluate_and_elbo_surgery(trained_z2, digits_test):
    x = digits_test.x
    pt = rate_distortion(trained_z2, x, z_samples=1, seed=3)
    ev = evaluate(trained_z2, x, seed=3)
    assert pt.rate == pytest.approx(ev["kl"], rel=1e-6)
    assert pt.distortion == pytest.approx(ev["recon"], rel=1e-6)
    assert pt.elbo == pytest.approx(-(pt.rate + pt.distortion))
    assert sum(pt.kl_per_dim) == pytest.approx(pt.rate, rel=1e-5)
    assert pt.active_units == ev["active_units"] and pt.latent_dim == 2 and pt.n == len(x)
    # ELBO surgery: R = I(n; z) + KL(q(z) || p(z)), with I <= log N
    assert pt.mutual_info + pt.marginal_kl == pytest.approx(pt.rate, abs=1e-4)
    assert pt.mutual_info <= pt.mutual_info_max + 1e-9
    assert pt.mutual_info_max == pytest.approx(math.log(len(x)))
    assert pt.rate > 0.5  # a trained 2-D model carries information


def test_distortion_averages_z_samples_and_is_seeded(trained_z2, digits_test):
    x = digits_test.x
    pt = rate_distortion(trained_z2, x, z_samples=4, seed=7, decomposition=False)
    expected = np.mean([evaluate(trained_z2, x, seed=7 + k)["recon"] for k in range(4)])
    assert pt.distortion == pytest.approx(expected, rel=1e-6)
    assert pt.mutual_info is None and pt.z_samples == 4
    again = rate_distortion(trained_z2, x, z_samples=4, seed=7, decomposition=False)
    assert again == pt


@pytest.mark.parametrize("kwargs, match", [(dict(z_samples=0), "z_samples"), (dict(z_samples=1.5), "z_samples")])
def test_rate_distortion_rejects_bad_samples(trained_z2, digits_test, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rate_distortion(trained_z2, digits_test.x, **kwargs)


def test_rate_distortion_rejects_bad_data(trained_z2):
    with pytest.raises(ValueError, match="at least 2 examples"):
        rate_distortion(trained_z2, torch.zeros(1, 64))


# ---- lines on the plane ---------------------------------------------------------------------------------------
def test_iso_elbo_lines_have_slope_minus_one_and_constant_elbo():
    box = (0.0, 15.0, 15.0, 28.0)
    lines = iso_elbo_lines(box)
    assert len(lines) >= 3
    elbos = [e for e, _ in lines]
    steps = np.diff(elbos)
    assert np.allclose(steps, steps[0]) and steps[0] < 0  # evenly spaced, best first
    for elbo, ((r0, d0), (r1, d1)) in lines:
        assert r0 < r1
        assert r0 + d0 == pytest.approx(-elbo) and r1 + d1 == pytest.approx(-elbo)
        assert (d1 - d0) / (r1 - r0) == pytest.approx(-1.0)
        for r, d in ((r0, d0), (r1, d1)):
            assert box[0] - 1e-9 <= r <= box[1] + 1e-9 and box[2] - 1e-9 <= d <= box[3] + 1e-9


def test_beta_line_has_slope_minus_beta_through_the_point():
    box = (0.0, 20.0, 10.0, 30.0)
    (r0, d0), (r1, d1) = beta_line((3.0, 20.0), 2.0, box)
    assert (d1 - d0) / (r1 - r0) == pytest.approx(-2.0)
    assert d0 + (-2.0) * (3.0 - r0) == pytest.approx(20.0)  # the point lies on it
    assert beta_line((3.0, 20.0), 0.0, box) is None  # beta = 0: a flat line, not drawn


def test_clip_line_misses_and_rejects_rising_lines():
    assert clip_line(0.0, 5.0, -1.0, (0.0, 10.0, 20.0, 30.0)) is None  # entirely below the box
    with pytest.raises(ValueError, match="negative slope"):
        clip_line(0.0, 5.0, 1.0, (0.0, 10.0, 0.0, 30.0))


@pytest.mark.parametrize("span, target, step", [(10, 5, 2), (23, 6, 5), (0.3, 3, 0.1), (1000, 4, 500), (0, 5, 1)])
def test_nice_step(span, target, step):
    assert nice_step(span, target) == pytest.approx(step)


def test_plane_box_contains_points_and_starts_at_zero_rate():
    pts = [(0.0, 27.0), (14.3, 16.4), (3.3, 20.6)]
    r_min, r_max, d_min, d_max = plane_box(pts)
    assert r_min == 0.0 and r_max > 14.3 and d_min < 16.4 and d_max > 27.0
    assert plane_box([]) == (0.0, 10.0, 0.0, 30.0)


def test_outliers_are_only_the_points_that_would_squeeze_the_rest():
    sweep = [(14.3, 16.5), (6.0, 18.5), (3.3, 20.5), (1.3, 23.8), (0.0, 27.0), (0.0, 27.0), (3.1, 21.0)]
    assert outliers(sweep) == [False] * 7  # the shipped sweep's spread, β = 0.1 at R = 14 included
    assert outliers(sweep + [(0.0, 300.0)])[-1] and outliers(sweep + [(80.0, 14.0)])[-1]  # far on D, far on R
    assert outliers(sweep + [(0.0, 300.0)])[:-1] == [False] * 7
    assert outliers([(0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.5, 1.5)]) == [False] * 5  # IQR 0: 1 nat floor
    assert outliers([(1.0, 2.0), (50.0, 900.0)]) == [False, False]  # too few to tell
    assert outliers([(1.0, 2.0), (float("nan"), 3.0), (2.0, 2.0), (3.0, 3.0), (4.0, 4.0)]) == [
        False, True, False, False, False]  # a non-finite point cannot be drawn


def test_frontier_is_the_set_of_beta_optima():
    pts = [(0.0, 27.0), (1.3, 23.7), (3.3, 20.6), (6.0, 18.5), (14.3, 16.4),  # a convex trade-off
           (5.0, 24.0), (0.0, 28.0), (2.0, 25.0), (20.0, 16.4)]  # dominated or not optimal for any beta
    hull = frontier(pts)
    assert hull == [0, 1, 2, 3, 4]
    for beta in np.linspace(0.01, 10, 200):  # brute force: the beta-VAE optimum is always on the frontier
        best = min(range(len(pts)), key=lambda i: (pts[i][1] + beta * pts[i][0], pts[i][0]))
        assert best in hull
    assert frontier([]) == [] and frontier([(1.0, 2.0)]) == [0]


# ---- histories -------------------------------------------------------------------------------------------------
def test_trajectory_heatmap_and_summary_follow_the_history(make_trainer):
    t = make_trainer(epochs=3)
    t.fit()
    h = t.history
    path = trajectory(h)
    assert path["epoch"] == [1, 2, 3]
    assert path["rate"] == pytest.approx(h["epoch"]["test_kl"])
    assert path["distortion"] == pytest.approx(h["epoch"]["test_recon"])
    assert path["elbo"] == pytest.approx(h["epoch"]["test_elbo"], abs=1e-6)
    heat = kl_heatmap(h)
    assert heat.shape == (4, 3)  # (latent dims, epochs)
    assert heat[:, -1] == pytest.approx(h["epoch"]["test_kl_per_dim"][-1])
    sm = run_summary(h)
    assert sm["epoch"] == 3 and sm["active_units"] == h["epoch"]["active_units"][-1]
    assert sm["peak_active_units"] == max(h["epoch"]["active_units"])
    empty = {"epoch": {"epoch": [], "test_kl": [], "test_recon": []}}
    assert trajectory(empty)["epoch"] == [] and kl_heatmap(empty).shape == (0, 0) and run_summary(empty) is None
    assert trajectory(None)["rate"] == []


# ---- specs ------------------------------------------------------------------------------------------------------
def test_parse_betas_accepts_lists_and_refuses_bad_text():
    assert parse_betas("0.5, 1, 4") == (0.5, 1.0, 4.0)
    assert parse_betas("1 2;4,,1") == (1.0, 2.0, 4.0)  # separators, duplicates dropped
    assert repeated_betas("1 2;4,,1, 1.0, 2e0, 3") == (1.0, 2.0)  # ... and named, for the page to say so
    assert repeated_betas("0.5, 1, 4") == ()
    assert parse_betas("0, 0.0, 0e5, 1e-6") == (0.0, 1e-6)  # zero written any way, and the smallest other β
    with pytest.raises(ValueError, match="below the smallest β allowed besides 0"):
        parse_betas("1, 1e-400")  # would read as 0.0
    with pytest.raises(ValueError, match="1e-09 is below"):
        parse_betas("1e-09")
    b0 = parse_betas("-0")  # not a negative β: zero, named "0"
    assert b0 == (0.0,) and math.copysign(1.0, b0[0]) == 1.0
    for bad in ("", "  ", "a, 1", "-1", "inf", "nan", "2000", ",".join(str(i) for i in range(13))):
        with pytest.raises(ValueError, match="β"):
            parse_betas(bad)


def test_sweep_specs_differ_only_in_beta():
    specs = sweep_specs("0.5, 4", free_bits=0.25, schedule="linear", epochs=12, seed=3)
    assert [s.beta for s in specs] == [0.5, 4.0]
    assert [s.name for s in specs] == ["sweep β=0.5, λ=0.25, linear", "sweep β=4, λ=0.25, linear"]
    a, b = (s.train_config.to_dict() for s in specs)
    assert {k for k in a if a[k] != b[k]} == {"beta"}
    assert a["seed"] == 3 and a["free_bits"] == 0.25 and a["epochs"] == 12 and a["warmup_epochs"] == 8
    assert specs[0].model_config == specs[1].model_config
    assert specs[0].model_config.input_dim == 64 and specs[0].model_config.latent_dim == 16
    with pytest.raises(ValueError, match="schedule"):
        sweep_specs("1", schedule="capacity")
    with pytest.raises(ValueError, match="epochs"):
        sweep_specs("1", epochs=0)
    with pytest.raises(ValueError, match="free_bits"):
        sweep_specs("1", free_bits=-1)


def test_lab_specs_share_the_seed_and_apply_each_remedy():
    specs = lab_specs("beta4", LAB_REMEDIES, seed=5, epochs=30)
    assert [s.role for s in specs] == ["collapse", *LAB_REMEDIES]
    base = specs[0].train_config
    assert base.beta == 4.0 and base.beta_schedule == "constant" and base.free_bits == 0
    for s in specs:
        assert s.train_config.seed == 5 and s.model_config == specs[0].model_config and s.train_config.beta == 4.0
    by_role = {s.role: s.train_config for s in specs}
    assert by_role["warmup"].beta_schedule == "linear" and by_role["warmup"].warmup_epochs == 25
    assert by_role["cyclical"].beta_schedule == "cyclical" and by_role["cyclical"].cycles == 3
    assert by_role["free_bits"].free_bits == 0.5
    assert by_role["capacity"].beta_schedule == "capacity" and by_role["capacity"].capacity_max == 10
    ar = lab_specs("autoregressive", ["free_bits"])
    assert ar[0].model_config.decoder == "autoregressive" and ar[0].train_config.beta == 1.0 and len(ar) == 2
    with pytest.raises(ValueError, match="preset"):
        lab_specs("nope")
    with pytest.raises(ValueError, match="remedy"):
        lab_specs("beta4", ["magic"])
    assert all(r.cite and r.objective and r.short for r in REMEDIES.values())
    assert set(PRESETS) == {"beta4", "autoregressive"}


def test_describe_objective():
    assert describe_objective({"beta": 4.0}) == "β=4"
    assert describe_objective({"beta": 1.0, "beta_schedule": "linear", "warmup_epochs": 25}) == \
        "β→1 linear warm-up (25 ep)"
    assert describe_objective({"beta": 4.0, "beta_schedule": "capacity", "capacity_max": 10,
                               "free_bits": 0.5}) == "capacity γ=4, C→10 nats, free bits λ=0.5"
    assert describe_objective(None) == "β unknown"


# ---- the shipped sweep -------------------------------------------------------------------------------------------
def test_shipped_sweep_moves_along_the_trade_off(digits_test):
    pts = {}
    for b in ("0.1", "0.5", "1", "2", "4", "8"):
        model, info = load_checkpoint(REPO / "checkpoints" / "sweep" / f"digits-beta-{b}.pt")
        assert info["train_config"]["beta"] == float(b)
        pts[float(b)] = rate_distortion(model, digits_test.x, z_samples=2, decomposition=False)
    betas = sorted(pts)
    rates = [pts[b].rate for b in betas]
    dists = [pts[b].distortion for b in betas]
    aus = [pts[b].active_units for b in betas]
    assert all(r1 >= r2 - 1e-3 for r1, r2 in zip(rates, rates[1:]))  # rate falls with beta
    assert all(d1 <= d2 + 0.05 for d1, d2 in zip(dists, dists[1:]))  # distortion rises
    assert all(a1 >= a2 for a1, a2 in zip(aus, aus[1:])) and aus[0] > aus[-1] == 0
    # beta = 1 maximises the ELBO among them: the beta-VAE optimum for beta = 1
    assert max(betas, key=lambda b: pts[b].elbo) == 1.0


# ---- seeded training on digits ----------------------------------------------------------------------------------
def _fit(spec, train, test):
    t = Trainer(spec.train_config, spec.model_config, train, test)
    t.fit()
    return t


@pytest.fixture(scope="module")
def sweep_runs(digits_train, digits_test):
    """The page's short sweep runs (MLP 128, d = 16, 30 epochs, seed 0) for beta 0.1, 0.5 and 4."""
    out = {}
    for s in sweep_specs("0.1, 0.5, 4"):
        t = _fit(s, digits_train, digits_test)
        out[s.beta] = (rate_distortion(t.model, digits_test.x), t.history)
    return out


def test_higher_beta_gives_lower_rate_and_higher_distortion(sweep_runs):
    low, high = sweep_runs[0.5][0], sweep_runs[4.0][0]
    assert high.rate < low.rate - 1.0
    assert high.distortion > low.distortion + 1.0


def test_active_units_fall_with_beta(sweep_runs):
    au = [sweep_runs[b][0].active_units for b in (0.1, 0.5, 4.0)]
    assert au[0] >= au[1] >= au[2]
    assert au[0] >= 12 and au[2] == 0


@pytest.fixture(scope="module")
def lab_runs(digits_train, digits_test):
    """Each collapse preset with free bits (and, for the autoregressive decoder, linear warm-up) on the same seed."""
    out = {}
    for preset, remedies in (("beta4", ["free_bits", "capacity"]), ("autoregressive", ["free_bits", "warmup"])):
        for s in lab_specs(preset, remedies):
            t = _fit(s, digits_train, digits_test)
            out[preset, s.role] = (rate_distortion(t.model, digits_test.x, decomposition=False), t.history)
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_collapse_presets_collapse(lab_runs, preset):
    rd, history = lab_runs[preset, "collapse"]
    assert rd.active_units <= 1
    assert rd.rate < 0.1  # nats: the code carries (almost) nothing
    assert max(rd.kl_per_dim) < 0.1


@pytest.mark.parametrize("preset", list(PRESETS))
def test_free_bits_revive_dimensions(lab_runs, preset):
    collapsed, _ = lab_runs[preset, "collapse"]
    fixed, _ = lab_runs[preset, "free_bits"]
    assert fixed.active_units >= collapsed.active_units + 8
    assert fixed.rate > 2.0
    assert sum(kl > 0.1 for kl in fixed.kl_per_dim) >= 8


def test_capacity_annealing_holds_the_rate_near_its_target(lab_runs):
    rd, _ = lab_runs["beta4", "capacity"]
    assert rd.active_units >= 8 and 5.0 < rd.rate < 15.0  # C ramps to 10 nats


def test_autoregressive_decoder_ignores_z_with_a_better_elbo(lab_runs):
    """The strong decoder models digits alone: its collapsed ELBO beats the free-bits run that uses z."""
    collapsed, _ = lab_runs["autoregressive", "collapse"]
    with_z, _ = lab_runs["autoregressive", "free_bits"]
    assert collapsed.elbo > with_z.elbo


def test_warm_up_keeps_dimensions_active_while_beta_is_low(lab_runs):
    _, collapsed = lab_runs["autoregressive", "collapse"]
    _, warm = lab_runs["autoregressive", "warmup"]
    au_c, au_w = collapsed["epoch"]["active_units"], warm["epoch"]["active_units"]
    assert max(au_w) >= 12 and max(au_w) > max(au_c) + 4  # warm-up: most dimensions come alive early on
    assert au_w[-1] > au_c[-1]  # and more are still alive at the end of the short run


def test_lab_run_names_read_back_to_their_preset_and_roles():
    for preset in PRESETS:
        specs = lab_specs(preset, ["free_bits", "warmup"])
        names = [lab_run_name(preset, s) for s in specs]
        assert lab_meta_from_names(names) == {"preset": preset, "roles": ["collapse", "free_bits", "warmup"]}
    assert lab_run_name("beta4", lab_specs("beta4", [])[0]) == "lab β4 · collapsed"
    assert lab_meta_from_names([]) is None
    assert lab_meta_from_names(["sweep β=4"]) is None  # not a lab
    assert lab_meta_from_names(["lab β4 · collapsed", "lab β4 · + something else"]) is None
