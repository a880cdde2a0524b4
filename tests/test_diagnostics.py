"""Diagnostics: active units, per-dimension KL, the aggregate-posterior split of the KL, evaluate(), and the 2-D
grid (true posterior and log p(x))."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import gen, tiny_model
from vae.diagnostics import (ACTIVE_THRESHOLD, active_units, encode_dataset, evaluate, grid_log_joint, grid_log_px,
                             grid_posterior, kl_decomposition, kl_per_dim, latent_grid, mean_variances)


def _column_with_variance(n: int, var: float) -> torch.Tensor:
    """n values (n even) alternating +a/-a whose unbiased variance is exactly var."""
    a = math.sqrt(var * (n - 1) / n)
    return torch.tensor([a, -a] * (n // 2), dtype=torch.float64)


def test_active_units_threshold_by_hand():
    """Burda et al. 2015: dimension d is active when Var_x(mu_d) > 0.01."""
    assert ACTIVE_THRESHOLD == 0.01
    variances = [1.0, 0.02, 0.011, 0.009, 0.001, 0.0]
    mu = torch.stack([_column_with_variance(100, v) for v in variances], 1)
    torch.testing.assert_close(mean_variances(mu), torch.tensor(variances, dtype=torch.float64))
    assert active_units(mu) == 3  # 1.0, 0.02 and 0.011 are above 0.01
    assert active_units(mu, threshold=0.005) == 4
    assert active_units(mu, threshold=2.0) == 0
    # a constant posterior mean (collapse) has no active unit, and one example cannot show variation
    assert active_units(torch.ones(50, 4)) == 0
    assert active_units(torch.randn(1, 4, generator=gen(0))) == 0


def test_kl_per_dim_matches_torch_distributions():
    g = gen(0)
    mu, logvar = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(kl_per_dim(mu, logvar), ref)
    # a collapsed dimension (q = prior for every x) carries 0 nats
    mu[:, 2], logvar[:, 2] = 0.0, 0.0
    assert kl_per_dim(mu, logvar)[2].item() == 0.0


def test_kl_decomposition_on_a_trained_model(trained_z2, digits_test):
    """Hoffman & Johnson 2016: mean KL = I(n; z) + KL(q(z) || p(z)); the marginal KL is >= 0 and I <= log N."""
    mu, logvar = encode_dataset(trained_z2, digits_test.x)
    n = mu.shape[0]
    r = kl_decomposition(mu, logvar, n_samples=2000, generator=gen(0))
    assert set(r) == {"mean_kl", "mutual_info", "marginal_kl", "mutual_info_max"}
    assert r["mean_kl"] == pytest.approx(r["mutual_info"] + r["marginal_kl"], abs=1e-9)
    assert r["mean_kl"] == pytest.approx(kl_per_dim(mu, logvar).sum().item(), rel=1e-5)
    assert r["marginal_kl"] > -0.05  # >= 0 up to Monte Carlo error
    assert r["mutual_info_max"] == pytest.approx(math.log(n))
    assert 0 < r["mutual_info"] <= math.log(n) + 0.05
    # seeded: the same generator seed gives the same estimate
    assert kl_decomposition(mu, logvar, n_samples=2000, generator=gen(0)) == r


def test_kl_decomposition_extremes():
    # collapse: q(z|x) = p(z) for every x, so every term is 0
    r = kl_decomposition(torch.zeros(40, 3), torch.zeros(40, 3), n_samples=500, generator=gen(0))
    assert r["mean_kl"] == 0
    assert abs(r["mutual_info"]) < 1e-9 and abs(r["marginal_kl"]) < 1e-9
    # far-apart, very narrow posteriors: z identifies the example, so I(n; z) reaches log N
    n = 32
    mu = 20 * torch.randn(n, 2, generator=gen(1))
    r = kl_decomposition(mu, torch.full((n, 2), -12.0), n_samples=1000, generator=gen(2))
    assert r["mutual_info"] == pytest.approx(math.log(n), abs=0.05)
    assert r["marginal_kl"] > 0


def test_evaluate_keys_and_consistency(trained_z2, digits_test):
    x = digits_test.x[:100]
    r = evaluate(trained_z2, x, iw_samples=0, seed=3)
    assert set(r) == {"elbo", "recon", "kl", "kl_per_dim", "active_units", "n"}
    assert r["n"] == 100
    assert r["elbo"] == pytest.approx(-(r["recon"] + r["kl"]))
    assert len(r["kl_per_dim"]) == 2 and sum(r["kl_per_dim"]) == pytest.approx(r["kl"], rel=1e-5)
    mu, _ = encode_dataset(trained_z2, x)
    assert r["active_units"] == active_units(mu)
    # seeded: the same seed gives the same figures, another seed draws other z
    assert evaluate(trained_z2, x, seed=3) == r
    assert evaluate(trained_z2, x, seed=4)["recon"] != r["recon"]

    r_iw = evaluate(trained_z2, x, iw_samples=50, seed=3)
    assert set(r_iw) == set(r) | {"log_px", "log_px_stderr", "iw_samples"}
    assert r_iw["iw_samples"] == 50
    assert r_iw["log_px"] >= r_iw["elbo"] - 0.05
    assert 0 < r_iw["log_px_stderr"] < 0.5


def test_evaluate_sets_eval_mode():
    model = tiny_model().train()
    evaluate(model, torch.rand(10, 64, generator=gen(0)))
    assert not model.training


def test_latent_grid():
    axis, pts, area = latent_grid(lim=2.0, n=5)
    torch.testing.assert_close(axis, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    assert pts.shape == (25, 2) and area == pytest.approx(1.0)
    # row-major: z1 (the columns) varies fastest
    torch.testing.assert_close(pts[:5, 0], axis)
    assert (pts[:5, 1] == -2.0).all()


def test_grid_posterior(trained_z2, digits_test):
    x = digits_test.x[0]
    axis, probs = grid_posterior(trained_z2, x)
    assert axis.shape == (241,) and probs.shape == (241, 241)
    assert (probs >= 0).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    # the true posterior's mean lies near the encoder's mean (q is a good, not perfect, fit)
    mean_z1, mean_z2 = (probs.sum(0) * axis).sum().item(), (probs.sum(1) * axis).sum().item()
    mu, _ = trained_z2.encode(x[None])
    assert math.dist((mean_z1, mean_z2), mu[0].tolist()) < 1.0


def test_grid_integral_of_a_prior_only_model():
    """A decoder that ignores z has p(x) = p(x|z) for any z: the grid integral of p(z) must give back log p(x|0)."""
    model = tiny_model(latent_dim=2)
    with torch.no_grad():
        model.decoder[0][0].weight.zero_()  # the first decoder layer no longer sees z
    x = torch.rand(3, 64, generator=gen(0))
    expected = model.log_likelihood(x, torch.zeros(3, 2))
    torch.testing.assert_close(grid_log_px(model, x), expected.detach(), atol=1e-3, rtol=1e-5)


def test_grid_needs_a_2d_latent():
    with pytest.raises(ValueError, match="latent_dim=3"):
        grid_log_joint(tiny_model(latent_dim=3), torch.rand(1, 64))
