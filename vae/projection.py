"""Latent codes drawn in a plane: projections of the posterior means, posterior ellipses, the prior and the aggregate
posterior in that plane, and per-dimension statistics. Pure NumPy / scikit-learn; inputs are (N, d) arrays.

    proj = project(mu, "pca")                 # Projection: coords (N, 2), a linear map W (2, d), explained variance
    ell = posterior_ellipses(mu, logvar, proj, idx)   # (K, n, 2): +-2 sigma of q(z|x) in the plane
    mean, cov = prior_in_plane(proj)          # N(0, I) pushed through the plane
    dens = aggregate_density(mu, logvar, proj, xs, ys)  # q(z) = (1/N) sum_n q(z|x_n), in the plane

A linear projection maps z to W (z - c). A Gaussian N(m, S) then lands on N(W (m - c), W S W^T), so the +-2 sigma
ellipse of a diagonal posterior is drawn exactly, and the prior N(0, I) becomes N(-W c, W W^T).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .diagnostics import ACTIVE_THRESHOLD

METHODS = ("identity", "strip", "pca", "dims", "tsne")
TSNE_MAX_POINTS = 3000  # t-SNE beyond a few thousand points takes too long on a laptop CPU: subsample
STRIP_JITTER = 0.35  # a 1-D latent is drawn as a strip: x = mu, y = seeded jitter in [-0.35, 0.35]


@dataclass
class Projection:
    method: str  # identity | strip | pca | dims | tsne
    coords: np.ndarray  # (n, 2) plane coordinates of the projected points
    index: np.ndarray  # (n,) which rows of mu the coords belong to (all of them except for subsampled t-SNE)
    axis_labels: tuple  # (x label, y label)
    components: np.ndarray | None = None  # (2, d) linear map W; None for t-SNE (non-linear)
    center: np.ndarray | None = None  # (d,) c subtracted before W (the PCA mean); zeros otherwise
    explained_variance_ratio: np.ndarray | None = None  # (2,) for PCA
    offsets: np.ndarray | None = None  # (n, 2) added after W: the strip plot's jitter
    note: str = ""  # shown under the plot (e.g. "t-SNE of 3000 of 10000 points")
    extra: dict = field(default_factory=dict)

    @property
    def linear(self) -> bool:
        return self.components is not None

    def transform(self, z: np.ndarray) -> np.ndarray:
        """Map other latent points (m, d) into the plane with the same linear map: (m, 2). Not for t-SNE."""
        if not self.linear:
            raise ValueError("t-SNE is not a linear map: other points cannot be placed in its plane")
        z = np.asarray(z, dtype=np.float64)
        return (z - self.center) @ self.components.T


def _as2d(mu) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[0] < 1:
        raise ValueError(f"latent means must be an (N, d) array with N >= 1, got shape {mu.shape}")
    return mu


def project_identity(mu) -> Projection:
    """A 2-D latent needs no projection."""
    mu = _as2d(mu)
    if mu.shape[1] != 2:
        raise ValueError(f"identity projection needs a 2-D latent, got d={mu.shape[1]}")
    return Projection("identity", mu.copy(), np.arange(len(mu)), ("z1", "z2"), np.eye(2), np.zeros(2))


def project_strip(mu, seed: int = 0) -> Projection:
    """A 1-D latent as a strip plot: x = mu, y = seeded jitter (meaningless, only to spread the points)."""
    mu = _as2d(mu)
    if mu.shape[1] != 1:
        raise ValueError(f"strip plot needs a 1-D latent, got d={mu.shape[1]}")
    jitter = np.random.default_rng(seed).uniform(-STRIP_JITTER, STRIP_JITTER, len(mu))
    offsets = np.stack([np.zeros(len(mu)), jitter], 1)
    coords = np.stack([mu[:, 0], jitter], 1)
    return Projection("strip", coords, np.arange(len(mu)), ("z1", "jitter (no meaning)"), np.array([[1.0], [0.0]]),
                      np.zeros(1), offsets=offsets)


def free_cpu_threads() -> int | None:
    """CPU cores not already busy: cores minus the 1-minute load average (at least 1); None where the load is
    unknown (no os.getloadavg). Oversubscribed OpenMP/BLAS workers spin-wait for each other: on a 2-core CPU at
    load 6, t-SNE of 359 points took 20-40 s with 2 threads and 2.6 s with 1; when idle, 2 threads are ~2x faster."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return max(1, (os.cpu_count() or 1) - int(load + 0.5))


def _threads(n):
    """Limit BLAS/OpenMP threads (threadpoolctl) for a scikit-learn job: an int, "auto" (free_cpu_threads) or None
    (leave them alone)."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    if n == "auto":
        n = free_cpu_threads()
    return nullcontext() if n is None else threadpool_limits(limits=int(n))


def project_pca(mu, threads: int | str | None = "auto") -> Projection:
    """The first two principal components of the posterior means (scikit-learn PCA), with explained variance."""
    from sklearn.decomposition import PCA

    mu = _as2d(mu)
    if mu.shape[0] < 2 or mu.shape[1] < 2:
        raise ValueError(f"PCA needs at least 2 points and 2 dimensions, got shape {mu.shape}")
    with _threads(threads):
        pca = PCA(n_components=2, svd_solver="full").fit(mu)
    comps = pca.components_.astype(np.float64)  # (2, d), orthonormal rows
    center = pca.mean_.astype(np.float64)
    evr = pca.explained_variance_ratio_.astype(np.float64)
    labels = tuple(f"PC{i + 1} ({100 * r:.0f}% of variance)" for i, r in enumerate(evr))
    return Projection("pca", (mu - center) @ comps.T, np.arange(len(mu)), labels, comps, center, evr)


def project_dims(mu, i: int, j: int) -> Projection:
    """Two raw latent dimensions (0-based) as the axes."""
    mu = _as2d(mu)
    d = mu.shape[1]
    for name, v in (("first dimension", i), ("second dimension", j)):
        if not 0 <= int(v) < d:
            raise ValueError(f"{name}={v} is out of range: choose 0..{d - 1} (the latent has {d} dimensions)")
    if i == j:
        raise ValueError(f"both axes are dimension {i}: choose two different dimensions")
    comps = np.zeros((2, d))
    comps[0, i] = comps[1, j] = 1.0
    return Projection("dims", mu[:, [i, j]].copy(), np.arange(len(mu)), (f"z{i + 1}", f"z{j + 1}"), comps,
                      np.zeros(d), extra={"dims": (int(i), int(j))})


def project_tsne(mu, max_points: int = TSNE_MAX_POINTS, seed: int = 0, perplexity: float = 30.0,
                 threads: int | str | None = "auto") -> Projection:
    """t-SNE (scikit-learn) of up to max_points means (a seeded subsample beyond that). Non-linear: no ellipses."""
    from sklearn.manifold import TSNE

    mu = _as2d(mu)
    n = len(mu)
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    index = np.arange(n)
    if n > max_points:
        index = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    perp = float(min(perplexity, (len(index) - 1) / 3))
    with _threads(threads):
        coords = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed,
                      max_iter=500).fit_transform(mu[index].astype(np.float32)).astype(np.float64)
    note = f"t-SNE of {len(index)} of {n} points (seeded subsample)" if len(index) < n else f"t-SNE of {n} points"
    return Projection("tsne", coords, index, ("t-SNE 1", "t-SNE 2"), note=note + "; distances are not meaningful")


def available_methods(d: int) -> list[str]:
    """Projection choices for a d-dimensional latent, the default first."""
    if d == 1:
        return ["strip"]
    if d == 2:
        return ["identity", "tsne"]
    return ["pca", "dims", "tsne"]


def project(mu, method: str = "auto", dims: tuple = (0, 1), seed: int = 0,
            max_points: int = TSNE_MAX_POINTS) -> Projection:
    """Project posterior means (N, d) to 2-D. auto: strip for d=1, identity for d=2, PCA above."""
    mu = _as2d(mu)
    d = mu.shape[1]
    if method == "auto":
        method = available_methods(d)[0]
    if method not in METHODS:
        raise ValueError(f"projection={method!r} is not known: choose one of {', '.join(METHODS)}")
    if method == "identity":
        return project_identity(mu)
    if method == "strip":
        return project_strip(mu, seed)
    if method == "pca":
        return project_pca(mu)
    if method == "dims":
        return project_dims(mu, int(dims[0]), int(dims[1]))
    return project_tsne(mu, max_points, seed)


# ---- Gaussians in the plane -------------------------------------------------------------------------------------
def projected_covariances(logvar, components) -> np.ndarray:
    """W diag(sigma_n^2) W^T for each example: (N, 2, 2)."""
    var = np.exp(np.asarray(logvar, dtype=np.float64))  # (N, d)
    W = np.asarray(components, dtype=np.float64)  # (2, d)
    return np.einsum("id,nd,jd->nij", W, var, W)


def gaussian_ellipse(mean, cov, n_std: float = 2.0, n_points: int = 49) -> np.ndarray:
    """Points (n_points, 2) on the n_std contour of N(mean, cov) in 2-D (closed: last point = first)."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    t = np.linspace(0, 2 * np.pi, n_points)
    circle = np.stack([np.cos(t), np.sin(t)], 0)  # (2, n)
    return np.asarray(mean, dtype=np.float64) + (vecs @ (np.sqrt(np.clip(vals, 0, None))[:, None] * circle)).T \
        * n_std


def posterior_ellipses(mu, logvar, proj: Projection, index=None, n_std: float = 2.0,
                       n_points: int = 49) -> np.ndarray:
    """+-n_std ellipses of q(z|x) = N(mu, diag sigma^2) in the plane, for rows `index` of mu: (K, n_points, 2).

    Centred on the plotted points (so a strip plot's jitter is kept). Needs a linear projection."""
    if not proj.linear:
        raise ValueError("posterior ellipses need a linear projection (identity, PCA or two dimensions), not t-SNE")
    mu, logvar = _as2d(mu), _as2d(logvar)
    index = np.arange(len(mu)) if index is None else np.asarray(index, dtype=int)
    centers = proj.transform(mu[index])
    if proj.offsets is not None:
        centers = centers + proj.offsets[index]
    covs = projected_covariances(logvar[index], proj.components)
    return np.stack([gaussian_ellipse(c, s, n_std, n_points) for c, s in zip(centers, covs)]) if len(index) \
        else np.zeros((0, n_points, 2))


def prior_in_plane(proj: Projection):
    """The prior N(0, I) pushed through the projection: (mean (2,), cov (2, 2)) = (-W c, W W^T)."""
    if not proj.linear:
        raise ValueError("the prior cannot be drawn in a t-SNE plane (t-SNE is not a linear map)")
    W = proj.components
    return -(W @ proj.center), W @ W.T


def sample_indices(n: int, k: int, seed: int = 0) -> np.ndarray:
    """k distinct indices out of n, seeded and sorted (which points get ellipses)."""
    k = max(0, min(int(k), n))
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)) if k else np.zeros(0, dtype=int)


def _mixture_logpdf_2d(points, means, covs, min_var: float = 1e-6):
    """log of (1/K) sum_k N(points; means_k, covs_k) in 2-D: points (G, 2), means (K, 2), covs (K, 2, 2) -> (G,)."""
    a = covs[:, 0, 0] + min_var
    b = covs[:, 0, 1]
    c = covs[:, 1, 1] + min_var
    det = a * c - b * b  # (K,)
    out = np.empty(len(points))
    for s in range(0, len(points), 2048):
        g = points[s:s + 2048]
        dx = g[:, None, 0] - means[None, :, 0]  # (g, K)
        dy = g[:, None, 1] - means[None, :, 1]
        maha = (c * dx * dx - 2 * b * dx * dy + a * dy * dy) / det
        logp = -0.5 * maha - np.log(2 * np.pi) - 0.5 * np.log(det)
        m = logp.max(1, keepdims=True)
        out[s:s + 2048] = m[:, 0] + np.log(np.exp(logp - m).mean(1))
    return out


def density_grid(xs, ys) -> np.ndarray:
    """Grid points (len(ys) * len(xs), 2) in row-major order (rows: y, columns: x)."""
    gx, gy = np.meshgrid(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
    return np.stack([gx.ravel(), gy.ravel()], 1)


def aggregate_density(mu, logvar, proj: Projection, xs, ys, max_components: int = 2000, seed: int = 0):
    """The aggregate posterior q(z) = (1/N) sum_n q(z|x_n), projected into the plane, on a grid: (len(ys), len(xs)).

    Uses a seeded subsample of max_components examples for speed (an unbiased estimate of the mixture)."""
    if not proj.linear:
        raise ValueError("the aggregate posterior needs a linear projection (identity, PCA or two dimensions)")
    mu, logvar = _as2d(mu), _as2d(logvar)
    idx = sample_indices(len(mu), min(len(mu), max_components), seed)
    means = proj.transform(mu[idx])
    covs = projected_covariances(logvar[idx], proj.components)
    pts = density_grid(xs, ys)
    return np.exp(_mixture_logpdf_2d(pts, means, covs)).reshape(len(ys), len(xs))


def prior_density(proj: Projection, xs, ys) -> np.ndarray:
    """The prior N(0, I) in the plane on the same grid: (len(ys), len(xs))."""
    mean, cov = prior_in_plane(proj)
    return np.exp(_mixture_logpdf_2d(density_grid(xs, ys), mean[None], cov[None])).reshape(len(ys), len(xs))


def aggregate_density_1d(mu_d, logvar_d, grid, max_components: int = 5000, seed: int = 0) -> np.ndarray:
    """The aggregate posterior of one dimension, (1/N) sum_n N(grid; mu_nd, sigma_nd^2): (len(grid),)."""
    mu_d = np.asarray(mu_d, dtype=np.float64).ravel()
    var = np.exp(np.asarray(logvar_d, dtype=np.float64).ravel()) + 1e-6
    idx = sample_indices(len(mu_d), min(len(mu_d), max_components), seed)
    g = np.asarray(grid, dtype=np.float64)[:, None]
    return (np.exp(-0.5 * (g - mu_d[idx]) ** 2 / var[idx]) / np.sqrt(2 * np.pi * var[idx])).mean(1)


def standard_normal_pdf(grid) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)
    return np.exp(-0.5 * g * g) / np.sqrt(2 * np.pi)


def plot_limits(coords, pad: float = 0.08, include_prior: bool = True) -> tuple:
    """((x0, x1), (y0, y1)) covering the points (and the prior's 3 sigma when include_prior)."""
    c = np.asarray(coords, dtype=np.float64)
    lo, hi = c.min(0), c.max(0)
    if include_prior:
        lo, hi = np.minimum(lo, -3.2), np.maximum(hi, 3.2)
    span = np.maximum(hi - lo, 1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


# ---- per-dimension statistics -----------------------------------------------------------------------------------
@dataclass
class DimStats:
    kl: np.ndarray  # (d,) E_x KL(q(z_d|x) || N(0, 1)) in nats
    mean_variance: np.ndarray  # (d,) A_d = Var_x(mu_d)
    active: np.ndarray  # (d,) bool: A_d > threshold (Burda et al. 2015)
    order: np.ndarray  # (d,) dimensions by KL, most informative first
    threshold: float = ACTIVE_THRESHOLD

    @property
    def n_active(self) -> int:
        return int(self.active.sum())


def dimension_stats(mu, logvar, threshold: float = ACTIVE_THRESHOLD) -> DimStats:
    """KL per dimension, variance of the means and active flags (vae.diagnostics), and the KL order."""
    import torch

    from .diagnostics import kl_per_dim, mean_variances

    mu_t = torch.as_tensor(np.asarray(mu), dtype=torch.float64)
    lv_t = torch.as_tensor(np.asarray(logvar), dtype=torch.float64)
    kl = kl_per_dim(mu_t, lv_t).numpy()
    var = mean_variances(mu_t).double().numpy()
    return DimStats(kl, var, var > threshold, np.argsort(-kl, kind="stable"), threshold)


# ---- cache keys -------------------------------------------------------------------------------------------------
def encoding_key(model_key: str, dataset: str, split: str, binarize: bool = False) -> str:
    """Identifies one encoded split: the exact weights (a model key that changes whenever they do, e.g. a live
    run's weights version), the dataset, the split and its binarisation."""
    if not model_key:
        raise ValueError("model_key is empty: pass the key that identifies the model's weights")
    return f"{model_key}|{dataset}|{split}|{'bin' if binarize else 'grey'}"


def projection_key(encoding: str, method: str, dims: tuple = (0, 1), seed: int = 0,
                   max_points: int = TSNE_MAX_POINTS) -> str:
    """Identifies one projection of an encoded split; arguments a method ignores do not change the key."""
    parts = [encoding, method]
    if method == "dims":
        parts.append(f"{int(dims[0])},{int(dims[1])}")
    if method in ("tsne", "strip"):
        parts.append(f"seed={int(seed)}")
    if method == "tsne":
        parts.append(f"max={int(max_points)}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
