"""vae.anatomy: the derivation's quantities, each checked against an independent computation (torch.distributions,
a by-hand formula, the grid integral of p(x|z) p(z) for a 2-D latent, or an identity of the derivation)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import gen, tiny_model
from vae import load_checkpoint
from vae import anatomy as an
from vae.diagnostics import grid_log_px, grid_posterior, latent_grid
from vae.losses import log_importance_weights, log_mean_exp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_z2():
    return load_checkpoint(REPO / "checkpoints" / "digits-z2.pt")[0]


@pytest.fixture(scope="module")
def shipped_z16():
    return load_checkpoint(REPO / "checkpoints" / "digits-z16.pt")[0]


# ---- input checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, message", [(0, "K=0 is out of range"), (5001, "K=5001 is out of range"),
                                        (9, "between 10 and 5000"), ("abc", "whole number"), (3.5, "whole number"),
                                        (float("nan"), "whole number"), (True, "whole number")])
def test_check_k_rejects_bad_values(k, message):
    with pytest.raises(ValueError, match=message):
        an.check_k(k)


def test_check_inputs_accept_good_values_and_name_the_range():
    assert an.check_k(10) == 10 and an.check_k(5000.0) == 5000 and an.check_k(np.int64(100)) == 100
    assert an.check_samples(1000) == 1000
    assert an.check_index(359, 360) == 359
    with pytest.raises(ValueError, match=r"image index 360 is out of range: the test split has 360 images, pick 0 to "
                                         r"359"):
        an.check_index(360, 360)
    with pytest.raises(ValueError, match="image index -1"):
        an.check_index(-1, 360)
    with pytest.raises(ValueError, match="S=5 is out of range"):
        an.check_samples(5)
    assert an.check_count(32, 360) == 32
    with pytest.raises(ValueError, match="average over 1 to 20 images"):
        an.check_count(21, 20)
    with pytest.raises(ValueError, match="number of images 0"):
        an.check_count(0, 360)


# ---- the ELBO terms ----------------------------------------------------------------------------------------------
def test_expected_log_lik_matches_the_same_draws_by_hand():
    """E_q[log p(x|z)] with S samples and its standard error std/sqrt(S), recomputed from the same noise."""
    model = tiny_model(latent_dim=3)
    x = torch.rand(4, 64, generator=gen(1))
    mean, se = an.expected_log_lik(model, x, 50, generator=gen(7), chunk_size=50)
    mu, logvar = model.encode(x)
    eps = torch.randn((50, 4, 3), generator=gen(7))
    ll = model.log_likelihood(x, mu + torch.exp(0.5 * logvar) * eps).double()  # (S, B)
    torch.testing.assert_close(mean, ll.mean(0).detach())
    torch.testing.assert_close(se, (ll.std(0, unbiased=True) / math.sqrt(50)).detach())
    # chunking draws the noise in pieces: a different draw, the same estimate within a few standard errors
    mean2, _ = an.expected_log_lik(model, x, 50, generator=gen(7), chunk_size=7)
    assert ((mean2 - mean).abs() < 6 * se).all()


def test_anatomy_identities_and_units():
    """ELBO = E_q[log p(x|z)] - KL, gap = log p(x) - ELBO, loss = -ELBO; the KL is torch's closed form; set values
    are means of the per-example ones (nats per example) and set errors add in quadrature."""
    model = tiny_model(latent_dim=3)
    x = torch.rand(5, 64, generator=gen(2))
    a = an.anatomy(model, x, k=200, samples=100, seed=3)
    pe = a.per_example
    mu, logvar = model.encode(x)
    kl_ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1).detach().double()
    np.testing.assert_allclose(pe["kl"], kl_ref.numpy(), rtol=1e-5, atol=1e-6)  # float32
    np.testing.assert_allclose(pe["elbo"], pe["expected_log_lik"] - pe["kl"], rtol=1e-12)
    np.testing.assert_allclose(pe["gap"], pe["log_px"] - pe["elbo"], rtol=1e-12)
    np.testing.assert_allclose(pe["gap_se"], np.sqrt(pe["log_px_se"] ** 2 + pe["elbo_se"] ** 2), rtol=1e-12)
    for name in ("expected_log_lik", "kl", "elbo", "log_px", "gap"):
        assert getattr(a, name) == pytest.approx(pe[name].mean(), rel=1e-12)
    assert a.log_px_se == pytest.approx(np.sqrt((pe["log_px_se"] ** 2).sum()) / 5, rel=1e-12)
    assert a.loss == -a.elbo and a.n == 5 and a.k == 200 and a.samples == 100
    # the IWAE curve is built from the same K weights as log p(x): its last point is log p(x), its first one weight
    logw = log_importance_weights(model, x, 200, generator=torch.Generator().manual_seed(4)).double()
    assert a.ks[0] == 1 and a.ks[-1] == 200 and (np.diff(a.ks) > 0).all()
    assert a.iwae[-1] == pytest.approx(a.log_px, rel=1e-12)
    np.testing.assert_allclose(pe["log_px"], log_mean_exp(logw).numpy(), rtol=1e-9)
    assert a.iwae[0] == pytest.approx(logw[0].mean().item(), rel=1e-9)
    assert np.isnan(a.iwae_se[0]) and np.isfinite(a.iwae_se[1:]).all()


def test_anatomy_k5000_fits_on_a_784d_model():
    """The one K = 5000 check: chunked weights for a 784-pixel model, finite values, the curve up to 5000."""
    model = tiny_model(input_dim=784, image_shape=(28, 28), hidden=(16,), latent_dim=2)
    x = torch.rand(2, 784, generator=gen(0))
    a = an.anatomy(model, x, k=5000, samples=50)
    assert a.ks[-1] == 5000 and a.iwae.shape == a.ks.shape == a.iwae_se.shape
    assert all(math.isfinite(v) for v in (a.log_px, a.log_px_se, a.elbo, a.gap, a.gap_se))
    assert a.per_example["log_px"].shape == (2,)


def test_log_spaced_ks():
    ks = an.log_spaced_ks(5000)
    assert ks[0] == 1 and ks[-1] == 5000 and len(ks) == len(set(ks)) and ks == sorted(ks)
    assert 30 < len(ks) < 60
    assert an.log_spaced_ks(1) == [1] and an.log_spaced_ks(2) == [1, 2]


# ---- the IWAE bound ----------------------------------------------------------------------------------------------
def test_iwae_bound_non_decreasing_in_expectation(shipped_z2, digits_test):
    """E[L_K] <= E[L_2K] <= ... (Burda et al. 2015), estimated by the mean over 8 nested draws and 16 images, and
    bounded above by log p(x) from the grid (exact to ~1e-3 nats) plus Monte Carlo slack."""
    x = digits_test.x[:16]
    ks, curves = an.iwae_curve_draws(shipped_z2, x, 1000, draws=8, seed=0)
    mean = curves.mean(0)  # (m,)
    se = curves.std(0, ddof=1) / math.sqrt(curves.shape[0])
    picks = [list(ks).index(k) for k in (1, 10, 100, 1000)]
    for i, j in zip(picks[:-1], picks[1:]):
        assert mean[j] > mean[i] - 2 * math.hypot(se[i], se[j])
    assert mean[picks[-1]] - mean[picks[0]] > 0.2  # a clear climb for this model (gap ~0.4 nats)
    # along the whole curve no step falls by more than its noise
    drops = mean[:-1] - mean[1:]
    assert (drops < 3 * np.maximum(se[:-1], se[1:]) + 1e-9).all()
    grid = an.grid_log_px_batch(shipped_z2, x)[0].mean().item()
    assert mean[-1] <= grid + 3 * se[-1] + 0.01


# ---- 2-D: the grid -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned"])
def test_loglik_matrix_matches_the_model(likelihood):
    """The matrix-product form of log p(x_b|z_c) equals the model's own per-pixel sum for every pair (b, c)."""
    model = tiny_model(latent_dim=2, likelihood=likelihood, sigma=0.3)
    if likelihood == "gaussian-learned":
        with torch.no_grad():
            model.log_sigma.copy_(torch.randn(64, generator=gen(5)) * 0.5 - 1.0)
    x = torch.rand(3, 64, generator=gen(1))
    z = torch.randn(7, 2, generator=gen(2))
    with torch.no_grad():
        got = an.loglik_matrix(model, x, model.decode(z))  # (3, 7)
        ref = model.log_likelihood(x, z[:, None, :].expand(-1, 3, -1)).T.double()  # (3, 7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(), dict(decoder="autoregressive"),
                                       dict(likelihood="gaussian-learned")], ids=["standard", "autoregressive",
                                                                                  "gaussian-learned"])
def test_grid_log_px_batch_matches_diagnostics(overrides):
    """Decoding each grid chunk once for all examples gives the same integral as vae.diagnostics.grid_log_px."""
    model = tiny_model(latent_dim=2, **overrides)
    x = torch.rand(5, 64, generator=gen(3))
    lp, ring = an.grid_log_px_batch(model, x, n=61, grid_chunk=500)
    torch.testing.assert_close(lp, grid_log_px(model, x, n=61).double(), rtol=1e-6, atol=1e-4)
    assert ((ring >= 0) & (ring <= 1)).all()
    with pytest.raises(ValueError, match="needs a 2-D latent"):
        an.grid_log_px_batch(tiny_model(latent_dim=3), x)


def test_grid_posterior_normalises_to_one(shipped_z2, digits_test):
    """p(z|x) sums to 1 on the reference grid (diagnostics) and integrates to 1 on the zoomed grid; the zoom holds
    the posterior's mass and q's mass, and both quadratures give the same log p(x)."""
    x = digits_test.x[0]
    _, probs = grid_posterior(shipped_z2, x, n=121)
    assert probs.shape == (121, 121) and (probs >= 0).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    pp = an.posterior_picture(shipped_z2, x, zoom_n=101)
    assert pp.density.shape == (101, 101) and (pp.density >= 0).all()
    assert pp.density.sum() * pp.cell_area == pytest.approx(1.0, abs=1e-9)
    assert pp.zoom_mass > 0.999 and pp.q_mass > 0.9999 and pp.boundary_mass < 1e-6
    assert pp.log_px_zoom == pytest.approx(pp.log_px_grid, abs=2e-3)
    assert pp.log_px_grid == pytest.approx(grid_log_px(shipped_z2, x[None]).item(), abs=1e-4)
    # the zoom window is centred on the posterior: its mean lies inside, as does q's mean
    for m in (pp.post_mean, pp.mu):
        assert pp.z1[0] < m[0] < pp.z1[-1] and pp.z2[0] < m[1] < pp.z2[-1]


def test_reference_grid_is_converged(shipped_z2, digits_test):
    """241^2 points over [-6, 6]^2 agree with a 481^2 grid to < 1e-3 nats (the quadrature error the UI states)."""
    x = digits_test.x[:4]
    coarse = an.grid_log_px_batch(shipped_z2, x)[0]
    fine = an.grid_log_px_batch(shipped_z2, x, n=481)[0]
    assert (coarse - fine).abs().max().item() < 1e-3


def test_grid_and_is_agree_on_a_small_2d_model(trained_z2, digits_test):
    """Every one of 32 images within the stated tolerance (4 SE + 0.02 nats), and the means within 0.02 nats."""
    x = digits_test.x[:32]
    grid = an.grid_log_px_batch(trained_z2, x)[0].numpy()
    a = an.anatomy(trained_z2, x, k=1000, samples=200, seed=0)
    pe = a.per_example
    assert all(an.grid_agrees(v, s, g) for v, s, g in zip(pe["log_px"], pe["log_px_se"], grid))
    assert abs(a.log_px - grid.mean()) < 0.02


def test_grid_and_is_agree_on_the_shipped_digits_z2(shipped_z2, digits_test):
    """The shipped 2-D model, K = 1000, first 32 test images: at least 90% within the stated tolerance, the means
    within 0.06 nats, and every miss is IS too low (q misses part of the posterior: heavy-tailed weights)."""
    x = digits_test.x[:32]
    grid = an.grid_log_px_batch(shipped_z2, x)[0].numpy()
    a = an.anatomy(shipped_z2, x, k=1000, samples=200, seed=0)
    pe = a.per_example
    ok = np.array([an.grid_agrees(v, s, g) for v, s, g in zip(pe["log_px"], pe["log_px_se"], grid)])
    assert ok.mean() >= 0.9
    assert abs(a.log_px - grid.mean()) < 0.06
    assert (pe["log_px"][~ok] < grid[~ok]).all()


def test_gap_is_the_kl_to_the_true_posterior(shipped_z2, digits_test):
    """KL(q(z|x) || p(z|x)) by quadrature equals log p(x) - ELBO, with the ELBO by Monte Carlo (S samples)."""
    for i in (0, 3):
        x = digits_test.x[i:i + 1]
        pp = an.posterior_picture(shipped_z2, x[0], zoom_n=121)
        a = an.anatomy(shipped_z2, x, k=100, samples=2000, seed=i)
        assert pp.kl_q_post > 0
        assert pp.kl_q_post == pytest.approx(pp.log_px_grid - a.elbo, abs=4 * a.elbo_se + 0.01)
        assert pp.elbo_quad == pytest.approx(a.elbo, abs=4 * a.elbo_se + 0.01)


@pytest.mark.parametrize("which", ["z2", "z16"])
def test_gap_is_never_negative_beyond_its_error(which, shipped_z2, shipped_z16, digits_test):
    model = shipped_z2 if which == "z2" else shipped_z16
    x = digits_test.x[:32]
    a = an.anatomy(model, x, k=1000, samples=200, seed=1)
    pe = a.per_example
    assert (pe["gap"] >= -3 * pe["gap_se"]).all()
    assert a.gap >= -3 * a.gap_se and a.gap > 0
    if which == "z2":  # and with the exact log p(x) from the grid
        grid = an.grid_log_px_batch(model, x)[0].numpy()
        assert (grid - pe["elbo"] >= -3 * pe["elbo_se"]).all()


def test_ellipse_is_the_n_sigma_contour():
    z1, z2 = an.ellipse([1.0, -2.0], [0.5, 2.0], n_sigma=2, points=50)
    r2 = ((z1 - 1.0) / 0.5) ** 2 + ((z2 + 2.0) / 2.0) ** 2
    np.testing.assert_allclose(r2, 4.0, rtol=1e-12)


def test_latent_grid_cell_area():
    axis, pts, area = latent_grid(6.0, 241)
    assert pts.shape == (241 * 241, 2) and area == pytest.approx(0.05 ** 2, rel=1e-5)


# ---- history -----------------------------------------------------------------------------------------------------
def test_elbo_history_from_the_shipped_checkpoint():
    _, info = load_checkpoint(REPO / "checkpoints" / "digits-z2.pt")
    h = an.elbo_history(info["history"])
    assert h["epoch"][0] == 1 and len(h["epoch"]) == len(h["test_elbo"]) == len(h["train_elbo"]) == 200
    assert h["test_elbo"][-1] == pytest.approx(info["metrics"]["test_elbo"])
    assert "log_px" not in h  # only the ELBO is recorded per epoch


@pytest.mark.parametrize("history", [None, {}, {"epoch": {}}, {"epoch": {"epoch": [], "test_elbo": []}},
                                     {"epoch": {"epoch": [1, 2], "test_elbo": [1.0]}}])
def test_elbo_history_without_usable_epochs(history):
    assert an.elbo_history(history) is None
