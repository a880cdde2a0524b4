"""vae.projection: projections of the posterior means against simple references (numpy SVD, explicit covariances,
numerical integrals), per-dimension statistics against vae.diagnostics, and the cache keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vae import projection as P
from vae.diagnostics import ACTIVE_THRESHOLD, active_units, kl_per_dim, mean_variances


def _codes(n=300, d=5, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(2.0, 0.2, d)
    mu = rng.standard_normal((n, d)) * scales + np.arange(d) * 0.3
    logvar = rng.uniform(-3, 0, (n, d))
    return mu, logvar


def test_auto_method_by_dimension():
    assert P.project(_codes(d=1)[0]).method == "strip"
    assert P.project(_codes(d=2)[0]).method == "identity"
    assert P.project(_codes(d=5)[0]).method == "pca"
    assert P.available_methods(16) == ["pca", "dims", "tsne"]


def test_identity_for_2d():
    mu, _ = _codes(d=2)
    proj = P.project(mu)
    np.testing.assert_array_equal(proj.coords, mu)
    np.testing.assert_array_equal(proj.transform(mu), mu)


def test_pca_matches_numpy_svd():
    mu, _ = _codes(d=6)
    proj = P.project(mu, "pca")
    centered = mu - mu.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    for k in range(2):  # components agree up to sign
        sign = np.sign(proj.components[k] @ vt[k])
        np.testing.assert_allclose(proj.components[k], sign * vt[k], atol=1e-8)
        np.testing.assert_allclose(proj.coords[:, k], sign * centered @ vt[k], atol=1e-8)
    np.testing.assert_allclose(proj.explained_variance_ratio, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-8)
    assert "% of variance" in proj.axis_labels[0]
    np.testing.assert_allclose(proj.transform(mu), proj.coords, atol=1e-10)


def test_raw_dims_and_bad_dims():
    mu, _ = _codes(d=4)
    proj = P.project(mu, "dims", dims=(3, 1))
    np.testing.assert_array_equal(proj.coords, mu[:, [3, 1]])
    assert proj.axis_labels == ("z4", "z2")
    with pytest.raises(ValueError, match="out of range"):
        P.project(mu, "dims", dims=(0, 4))
    with pytest.raises(ValueError, match="different"):
        P.project(mu, "dims", dims=(2, 2))
    with pytest.raises(ValueError, match="not known"):
        P.project(mu, "umap")


def test_strip_for_1d():
    mu, logvar = _codes(d=1)
    proj = P.project(mu)
    np.testing.assert_array_equal(proj.coords[:, 0], mu[:, 0])
    assert np.abs(proj.coords[:, 1]).max() <= P.STRIP_JITTER
    ell = P.posterior_ellipses(mu, logvar, proj, [0, 5])
    # a 1-D posterior's +-2 sigma "ellipse" is the interval mu +- 2 sigma at the point's jitter height
    sd = np.exp(0.5 * logvar[[0, 5], 0])
    np.testing.assert_allclose(ell[:, :, 0].min(1), mu[[0, 5], 0] - 2 * sd, atol=1e-6)
    np.testing.assert_allclose(ell[:, :, 0].max(1), mu[[0, 5], 0] + 2 * sd, atol=1e-6)
    np.testing.assert_allclose(ell[:, :, 1], proj.coords[[0, 5], 1][:, None].repeat(ell.shape[1], 1), atol=1e-9)


def test_tsne_subsamples_and_is_not_linear():
    mu, logvar = _codes(n=120, d=6)
    proj = P.project(mu, "tsne", max_points=80, seed=1)
    assert proj.coords.shape == (80, 2) and len(np.unique(proj.index)) == 80
    assert np.isfinite(proj.coords).all() and "80 of 120" in proj.note
    with pytest.raises(ValueError, match="t-SNE"):
        P.posterior_ellipses(mu, logvar, proj)
    with pytest.raises(ValueError, match="t-SNE"):
        P.prior_in_plane(proj)


def test_projected_covariance_is_w_sigma_wt():
    mu, logvar = _codes(d=5)
    proj = P.project(mu, "pca")
    covs = P.projected_covariances(logvar, proj.components)
    n = 7
    ref = proj.components @ np.diag(np.exp(logvar[n])) @ proj.components.T
    np.testing.assert_allclose(covs[n], ref, rtol=1e-12)


def test_posterior_ellipse_is_the_two_sigma_contour():
    mu, logvar = _codes(d=5)
    proj = P.project(mu, "pca")
    ell = P.posterior_ellipses(mu, logvar, proj, [3], n_std=2.0)[0]
    center = proj.coords[3]
    cov = P.projected_covariances(logvar[[3]], proj.components)[0]
    maha = np.einsum("ni,ij,nj->n", ell - center, np.linalg.inv(cov), ell - center)
    np.testing.assert_allclose(maha, 4.0, rtol=1e-8)  # every point at Mahalanobis distance 2


def test_raw_dims_ellipse_is_axis_aligned():
    mu, logvar = _codes(d=4)
    proj = P.project(mu, "dims", dims=(0, 2))
    ell = P.posterior_ellipses(mu, logvar, proj, [10])[0]
    sd = np.exp(0.5 * logvar[10, [0, 2]])
    np.testing.assert_allclose(ell.max(0) - mu[10, [0, 2]], 2 * sd, rtol=1e-3)


def test_prior_in_plane():
    mu, _ = _codes(d=5)
    pca = P.project(mu, "pca")
    mean, cov = P.prior_in_plane(pca)
    np.testing.assert_allclose(cov, np.eye(2), atol=1e-10)  # orthonormal components keep N(0, I) standard
    np.testing.assert_allclose(mean, -pca.components @ mu.mean(0), atol=1e-10)
    mean2, cov2 = P.prior_in_plane(P.project(mu[:, :2]))
    np.testing.assert_array_equal(mean2, 0.0)
    np.testing.assert_array_equal(cov2, np.eye(2))


def test_aggregate_density_integrates_to_one_and_equals_prior_when_q_is_prior():
    mu, logvar = _codes(n=200, d=3)
    proj = P.project(mu, "pca")
    xs = np.linspace(-12, 12, 241)
    ys = np.linspace(-12, 12, 241)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    dens = P.aggregate_density(mu, logvar, proj, xs, ys)
    assert dens.shape == (241, 241)
    assert abs(dens.sum() * cell - 1.0) < 1e-3
    # collapsed posterior: q(z|x) = N(0, I) for every x, so q(z) = p(z)
    z0, lv0 = np.zeros((50, 2)), np.zeros((50, 2))
    ident = P.project(z0 + np.array([[0.0, 0.0]]), "identity")
    np.testing.assert_allclose(P.aggregate_density(z0, lv0, ident, xs[::8], ys[::8]),
                               P.prior_density(ident, xs[::8], ys[::8]), rtol=1e-4, atol=1e-12)


def test_aggregate_density_1d():
    grid = np.linspace(-8, 8, 1601)
    mu = np.array([-1.0, 2.0])
    logvar = np.log(np.array([0.25, 1.0]))
    dens = P.aggregate_density_1d(mu, logvar, grid)
    ref = 0.5 * (np.exp(-0.5 * (grid + 1) ** 2 / 0.25) / np.sqrt(2 * np.pi * 0.25)
                 + np.exp(-0.5 * (grid - 2) ** 2) / np.sqrt(2 * np.pi))
    np.testing.assert_allclose(dens, ref, rtol=1e-3, atol=1e-12)  # the density adds a 1e-6 variance floor
    assert abs(P.standard_normal_pdf(grid).sum() * (grid[1] - grid[0]) - 1) < 1e-6


def test_dimension_stats_reuse_diagnostics():
    mu, logvar = _codes(d=6)
    mu[:, 4] = 0.001 * mu[:, 4]  # a collapsed dimension: its mean barely varies
    logvar[:, 4] = 0.0
    s = P.dimension_stats(mu, logvar)
    mu_t, lv_t = torch.tensor(mu), torch.tensor(logvar)
    np.testing.assert_allclose(s.kl, kl_per_dim(mu_t, lv_t).numpy(), rtol=1e-10)
    np.testing.assert_allclose(s.mean_variance, mean_variances(mu_t).numpy(), rtol=1e-10)
    assert s.n_active == active_units(mu_t) == 5 and not s.active[4]
    assert s.threshold == ACTIVE_THRESHOLD
    assert list(s.order) == list(np.argsort(-s.kl))
    assert s.order[-1] == 4


def test_plot_limits_cover_points_and_prior():
    (x0, x1), (y0, y1) = P.plot_limits(np.array([[10.0, 0.0], [11.0, 1.0]]))
    assert x0 < -3 and x1 > 11 and y0 < -3 and y1 > 3


def test_sample_indices():
    a = P.sample_indices(100, 10, seed=3)
    assert len(np.unique(a)) == 10 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, P.sample_indices(100, 10, seed=3))
    assert len(P.sample_indices(5, 50)) == 5 and len(P.sample_indices(5, 0)) == 0


def test_cache_keys():
    k = P.encoding_key("run:abc:3:cpu", "digits", "test")
    assert k != P.encoding_key("run:abc:4:cpu", "digits", "test")  # a live run's next weights: a new key
    assert k != P.encoding_key("run:abc:3:cpu", "digits", "train")
    assert k != P.encoding_key("run:abc:3:cpu", "digits", "test", binarize=True)
    assert k == P.encoding_key("run:abc:3:cpu", "digits", "test")
    with pytest.raises(ValueError, match="model_key"):
        P.encoding_key("", "digits", "test")
    # arguments a method ignores do not change its key; those it uses do
    assert P.projection_key(k, "pca", (0, 1)) == P.projection_key(k, "pca", (2, 3), seed=5)
    assert P.projection_key(k, "dims", (0, 1)) != P.projection_key(k, "dims", (0, 2))
    assert P.projection_key(k, "tsne", seed=0) != P.projection_key(k, "tsne", seed=1)
    assert P.projection_key(k, "pca") != P.projection_key(P.encoding_key("other", "digits", "test"), "pca")


def test_free_cpu_threads(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    assert P.free_cpu_threads() == 1  # a busy machine: one thread, never zero
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert P.free_cpu_threads() == 7

    def no_load():
        raise OSError("unavailable")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert P.free_cpu_threads() is None
    mu, _ = _codes(d=4)
    np.testing.assert_allclose(P.project_pca(mu, threads="auto").coords, P.project_pca(mu, threads=None).coords)
