"""ELBO anatomy: every quantity of the VAE derivation, as numbers for one example or the average over a set.

    log p_theta(x) = log E_{q_phi(z|x)}[p_theta(x, z) / q_phi(z|x)]
                  >= E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z))          (Jensen)  = ELBO
    log p_theta(x) - ELBO = KL(q_phi(z|x) || p_theta(z|x))                   = gap >= 0
    loss = -ELBO

q_phi is the encoder, p_theta the decoder. Every figure is in nats per example (summed over pixels and latent
dimensions, averaged over the chosen examples). Standard errors are Monte Carlo errors for the chosen examples:
for a set, sqrt(sum_n se_n^2) / N. For a 2-D latent the true posterior and log p(x) are also integrated on a grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .diagnostics import latent_grid
from .losses import (iw_standard_error, iwae_curve, kl_normal_std, log_importance_weights, log_mean_exp,
                     log_normal_diag, log_normal_std)

K_MIN, K_MAX = 10, 5000  # importance samples for log p(x)
S_MIN, S_MAX = 10, 5000  # Monte Carlo samples for the reconstruction term E_q[log p(x|z)]
MAX_SET = 500  # most examples averaged at once (the digits test split has 359)
GRID_LIM, GRID_N = 6.0, 241  # the reference grid: [-6, 6]^2, 241^2 points (spacing 0.05)
ZOOM_N = 161  # points per axis of the zoomed grid around one posterior
# Grid vs importance sampling: |IS - grid| <= AGREE_SIGMAS * SE_IS + AGREE_FLOOR per example (see tests and the
# page). SE_IS is the delta-method error of the IS estimate; the floor covers the grid quadrature (~1e-3 nats).
AGREE_SIGMAS, AGREE_FLOOR = 4.0, 0.02


# ---- input checks: one-line messages that say what to do ---------------------------------------------------------
def as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or (
            isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise ValueError(f"{name}={value!r} is not allowed: expected a whole number")
    return int(value)


def check_k(k, k_min: int = K_MIN, k_max: int = K_MAX) -> int:
    k = as_int("K", k)
    if not k_min <= k <= k_max:
        raise ValueError(f"K={k} is out of range: choose between {k_min} and {k_max} importance samples")
    return k


def check_samples(s, s_min: int = S_MIN, s_max: int = S_MAX) -> int:
    s = as_int("S", s)
    if not s_min <= s <= s_max:
        raise ValueError(f"S={s} is out of range: choose between {s_min} and {s_max} Monte Carlo samples")
    return s


def check_index(index, n_available: int, split: str = "test") -> int:
    i = as_int("image index", index)
    if not 0 <= i < n_available:
        raise ValueError(f"image index {i} is out of range: the {split} split has {n_available} images, "
                         f"pick 0 to {n_available - 1}")
    return i


def check_count(count, n_available: int, max_count: int = MAX_SET) -> int:
    n = as_int("number of images", count)
    top = min(n_available, max_count)
    if not 1 <= n <= top:
        raise ValueError(f"number of images {n} is out of range: average over 1 to {top} images")
    return n


# ---- the ELBO and log p(x) -------------------------------------------------------------------------------------
def _gen(model, seed: int) -> torch.Generator:
    return torch.Generator(device=model.device).manual_seed(int(seed))


def _set_se(se: torch.Tensor) -> float:
    """Standard error of the mean over examples of independent per-example estimates."""
    return float(se.double().pow(2).sum().sqrt() / se.shape[0])


@torch.inference_mode()
def expected_log_lik(model, x: torch.Tensor, samples: int, generator: torch.Generator | None = None,
                     chunk_size: int | None = None):
    """Monte Carlo E_{q(z|x)}[log p(x|z)] with S samples per example: (mean (B,), standard error (B,))."""
    mu, logvar = model.encode(x)
    chunk = chunk_size or max(1, (1 << 22) // max(1, x.shape[0] * model.config.input_dim))
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        ll = model.log_likelihood(x, mu + torch.exp(0.5 * logvar) * eps).double()  # (n, B)
        total += ll.sum(0)
        total_sq += ll.pow(2).sum(0)
    mean = total / samples
    var = ((total_sq - samples * mean.pow(2)) / max(1, samples - 1)).clamp(min=0)
    return mean, (var / samples).sqrt()


def log_spaced_ks(k_max: int, per_decade: int = 12) -> list[int]:
    """Integers from 1 to k_max, about evenly spaced on a log axis, both ends included."""
    n = max(2, int(round(per_decade * math.log10(max(k_max, 2)))) + 1)
    ks = np.unique(np.round(np.logspace(0, math.log10(k_max), n)).astype(int))
    return [int(k) for k in ks if 1 <= k <= k_max]


@dataclass(frozen=True)
class Anatomy:
    """The derivation's quantities, averaged over the chosen examples (nats per example), with standard errors."""
    n: int  # examples averaged
    k: int  # importance samples for log p(x) and the largest K of the IWAE curve
    samples: int  # Monte Carlo samples S for E_q[log p(x|z)]
    expected_log_lik: float  # E_q[log p_theta(x|z)]: the reconstruction term of the ELBO (negative)
    expected_log_lik_se: float
    kl: float  # KL(q_phi(z|x) || p(z)), closed form (exact, no error)
    elbo: float  # expected_log_lik - kl
    elbo_se: float
    log_px: float  # log p_theta(x) by importance sampling with K samples
    log_px_se: float  # delta-method standard error
    gap: float  # log_px - elbo = KL(q_phi(z|x) || p_theta(z|x))
    gap_se: float  # independent draws for the ELBO and log p(x): the errors add in quadrature
    ks: np.ndarray  # (m,) the K values of the IWAE curve, 1 ... k
    iwae: np.ndarray  # (m,) L_K from one nested draw (the first K of the same K weights), averaged over examples
    iwae_se: np.ndarray  # (m,) delta-method error of each point (nan at K = 1)
    per_example: dict  # name -> (n,) array: expected_log_lik, kl, elbo, elbo_se, log_px, log_px_se, gap, gap_se

    @property
    def loss(self) -> float:
        """The training loss at beta = 1: -ELBO."""
        return -self.elbo


def anatomy(model, x: torch.Tensor, k: int = 1000, samples: int = 1000, seed: int = 0) -> Anatomy:
    """Every term of the derivation for the examples x (B, D): reconstruction term (S samples), KL (closed form),
    ELBO, log p(x) by importance sampling (K samples) and the gap, each with its standard error, plus the IWAE
    curve L_1 ... L_K from the same K importance weights."""
    k, samples = check_k(k, 1), check_samples(samples, 1)
    x = x.reshape(-1, model.config.input_dim).to(model.device)
    with torch.inference_mode():
        mu, logvar = model.encode(x)
        kl = kl_normal_std(mu, logvar).double().sum(-1)  # (B,)
    ell, ell_se = expected_log_lik(model, x, samples, _gen(model, seed))
    logw = log_importance_weights(model, x, k, _gen(model, seed + 1)).double()  # (K, B), independent of ell
    log_px, log_px_se = log_mean_exp(logw), iw_standard_error(logw)
    if k == 1:
        log_px_se = torch.zeros_like(log_px)  # a single weight: no spread to measure
    ks = log_spaced_ks(k)
    curve = iwae_curve(logw, ks)  # (m, B)
    curve_se = torch.stack([iw_standard_error(logw[:kk]) for kk in ks])  # (m, B), nan at K = 1
    elbo = ell - kl
    gap = log_px - elbo
    gap_se = (log_px_se.pow(2) + ell_se.pow(2)).sqrt()
    per = {name: t.detach().cpu().numpy() for name, t in dict(
        expected_log_lik=ell, kl=kl, elbo=elbo, elbo_se=ell_se, log_px=log_px, log_px_se=log_px_se, gap=gap,
        gap_se=gap_se).items()}
    n = x.shape[0]
    curve_se_mean = curve_se.pow(2).sum(1).sqrt() / n
    return Anatomy(n=n, k=k, samples=samples,
                   expected_log_lik=float(ell.mean()), expected_log_lik_se=_set_se(ell_se), kl=float(kl.mean()),
                   elbo=float(elbo.mean()), elbo_se=_set_se(ell_se),
                   log_px=float(log_px.mean()), log_px_se=_set_se(log_px_se),
                   gap=float(gap.mean()), gap_se=_set_se(gap_se),
                   ks=np.asarray(ks), iwae=curve.mean(1).cpu().numpy(), iwae_se=curve_se_mean.cpu().numpy(),
                   per_example=per)


def iwae_curve_draws(model, x: torch.Tensor, k: int, draws: int = 5, seed: int = 0):
    """The IWAE curve from `draws` independent nested draws of K weights: (ks (m,), curves (draws, m)), each curve
    averaged over the examples. Their mean estimates E[L_K], which is non-decreasing in K (Burda et al. 2015)."""
    k = check_k(k, 1)
    x = x.reshape(-1, model.config.input_dim).to(model.device)
    ks = log_spaced_ks(k)
    curves = []
    for d in range(int(draws)):
        logw = log_importance_weights(model, x, k, _gen(model, seed + 1000 + d)).double()
        curves.append(iwae_curve(logw, ks).mean(1).cpu().numpy())
    return np.asarray(ks), np.stack(curves)


# ---- 2-D latents: grid integrals ---------------------------------------------------------------------------------
def loglik_matrix(model, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """log p(x_b | z_c) for every example b and every decoded point c: x (b, D), params (c, D) -> (b, c), float64.

    The per-pixel sums written as matrix products (exact identities, no (b, c, D) tensor):
      Bernoulli: sum_i x_i log s(l_i) + (1 - x_i) log s(-l_i) = x . l + sum_i log s(-l_i)
      Gaussian:  -1/2 sum_i (x_i - m_i)^2 / s_i^2 - sum_i log s_i - D/2 log 2 pi, expanded in x^2, x m and m^2.
    """
    x, params = x.double(), params.double()
    lik = model.config.likelihood
    if lik == "bernoulli":
        return x @ params.T + torch.nn.functional.logsigmoid(-params).sum(-1)
    if lik == "gaussian":
        log_sigma = torch.full((x.shape[1],), math.log(model.config.sigma), dtype=torch.float64, device=x.device)
    else:
        log_sigma = model.log_sigma.double()
    prec = torch.exp(-2 * log_sigma)  # (D,) 1 / s^2
    quad = (x.pow(2) @ prec)[:, None] - 2 * (x * prec) @ params.T + (params.pow(2) @ prec)[None, :]
    return -0.5 * quad - log_sigma.sum() - 0.5 * x.shape[1] * math.log(2 * math.pi)


@torch.inference_mode()
def grid_log_px_batch(model, x: torch.Tensor, lim: float = GRID_LIM, n: int = GRID_N, grid_chunk: int = 4096,
                      budget: int = 1 << 22):
    """log p(x) = log sum_g p(x|z_g) p(z_g) * cell area for many examples, and the share of each posterior's mass
    on the grid's outer ring (large when the grid cuts the posterior off): ((B,), (B,)), float64 on the CPU.

    The same sum as vae.diagnostics.grid_log_px, but each grid chunk is decoded once for all examples (the
    autoregressive decoder depends on x, so it is decoded per example)."""
    if model.config.latent_dim != 2:
        raise ValueError(f"latent_dim={model.config.latent_dim}: the grid integral needs a 2-D latent")
    x = x.reshape(-1, model.config.input_dim).to(model.device)
    B, D = x.shape
    axis, pts, area = latent_grid(lim, n, model.device)
    edge = (pts.abs() >= axis[-1] - 1e-6).any(1)  # the outer ring of grid points
    log_prior = log_normal_std(pts)
    total = torch.full((B,), -math.inf, dtype=torch.float64, device=model.device)
    ring = total.clone()
    shared = model.config.decoder != "autoregressive"
    per = B if shared else max(1, budget // (grid_chunk * D))  # examples per step
    for g0 in range(0, pts.shape[0], grid_chunk):
        zc = pts[g0:g0 + grid_chunk]  # (c, 2)
        params = model.decode(zc) if shared else None  # (c, D): decoded once for all examples
        for b0 in range(0, B, per):
            xb = x[b0:b0 + per]  # (b, D)
            if shared:
                ll = loglik_matrix(model, xb, params)  # (b, c)
            else:
                ll = model.log_likelihood(xb, zc[:, None, :].expand(-1, xb.shape[0], -1)).T.double()  # (b, c)
            lj = ll + log_prior[g0:g0 + grid_chunk].double()  # (b, c)
            total[b0:b0 + per] = torch.logaddexp(total[b0:b0 + per], torch.logsumexp(lj, 1))
            e = edge[g0:g0 + grid_chunk]
            if e.any():
                ring[b0:b0 + per] = torch.logaddexp(ring[b0:b0 + per], torch.logsumexp(lj[:, e], 1))
    return (total + math.log(area)).cpu(), (ring - total).exp().cpu()


@dataclass(frozen=True)
class PosteriorPicture:
    """The true posterior p_theta(z|x) of one example next to the encoder's q_phi(z|x), for a 2-D latent."""
    z1: np.ndarray  # (m,) zoomed grid, first latent axis
    z2: np.ndarray  # (m,) second latent axis
    density: np.ndarray  # (m, m) p(z|x) on the zoomed grid (rows z2, columns z1), sum(density) * cell = 1
    cell_area: float  # of the zoomed grid
    mu: np.ndarray  # (2,) encoder mean
    sigma: np.ndarray  # (2,) encoder standard deviations (q is diagonal: its ellipses are axis-aligned)
    post_mean: np.ndarray  # (2,) mean of the true posterior (reference grid)
    post_std: np.ndarray  # (2,)
    log_px_grid: float  # log p(x) on the reference grid [-lim, lim]^2, n^2 points
    log_px_zoom: float  # log p(x) on the zoomed grid: a second quadrature (agrees when the window holds the mass)
    boundary_mass: float  # posterior mass on the reference grid's outer ring (tiny when nothing is cut off)
    zoom_mass: float  # reference-grid posterior mass inside the zoom window
    q_mass: float  # q's mass inside the zoom window
    kl_q_post: float  # KL(q_phi(z|x) || p_theta(z|x)) by quadrature on the zoomed grid: the gap, directly
    elbo_quad: float  # log_px_zoom - kl_q_post = E_q[log p(x, z) - log q(z|x)] by quadrature


@torch.inference_mode()
def log_joint_at(model, x: torch.Tensor, pts: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """log p(x|z) + log p(z) of examples x (b, D) at points pts (P, 2): (b, P), float64."""
    x = x.reshape(-1, model.config.input_dim).to(model.device)
    pts = pts.to(model.device, torch.float32)
    out = []
    for p in pts.split(chunk):
        if model.config.decoder != "autoregressive":
            ll = loglik_matrix(model, x, model.decode(p))
        else:
            ll = model.log_likelihood(x, p[:, None, :].expand(-1, x.shape[0], -1)).T.double()
        out.append(ll + log_normal_std(p).double())
    return torch.cat(out, 1)


@torch.inference_mode()
def posterior_picture(model, x1: torch.Tensor, lim: float = GRID_LIM, n: int = GRID_N,
                      zoom_n: int = ZOOM_N) -> PosteriorPicture:
    """p(z|x) for one example, normalised on the reference grid, then redrawn on a finer grid zoomed onto its central
    99.9% (and onto q's 4-sigma box), with the encoder's Gaussian and KL(q || p(z|x)) by quadrature there."""
    x1 = x1.reshape(1, -1).to(model.device)
    axis, pts, area = latent_grid(lim, n, model.device)
    lj = log_joint_at(model, x1, pts)[0]  # (n*n,)
    pts = pts.double()
    log_px_grid = torch.logsumexp(lj, 0) + math.log(area)
    prob = torch.softmax(lj, 0)  # (n*n,) sums to 1
    edge = (pts.abs() >= float(axis[-1]) - 1e-6).any(1)
    post_mean = (prob[:, None] * pts).sum(0)
    post_std = ((prob[:, None] * (pts - post_mean).pow(2)).sum(0)).sqrt()
    mu, logvar = model.encode(x1)
    mu, logvar = mu[0].double(), logvar[0].double()
    sigma = torch.exp(0.5 * logvar)
    # a square window around the posterior's central 99.9% per axis (plus a margin) and q's 4-sigma box
    p2 = prob.reshape(n, n)
    bounds = []
    for marginal in (p2.sum(0), p2.sum(1)):  # over z1 (columns), over z2 (rows)
        cdf = marginal.cumsum(0)
        lo_i = int(torch.searchsorted(cdf, torch.tensor(5e-4, dtype=cdf.dtype, device=cdf.device)))
        hi_i = int(torch.searchsorted(cdf, torch.tensor(1 - 5e-4, dtype=cdf.dtype, device=cdf.device)))
        bounds.append((float(axis[min(lo_i, n - 1)]), float(axis[min(hi_i, n - 1)])))
    cell = float(axis[1] - axis[0])
    lo = torch.tensor([b[0] for b in bounds], dtype=torch.float64, device=mu.device)
    hi = torch.tensor([b[1] for b in bounds], dtype=torch.float64, device=mu.device)
    lo, hi = torch.minimum(lo, mu - 4 * sigma), torch.maximum(hi, mu + 4 * sigma)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.15 + 2 * cell
    a1 = torch.linspace(float(centre[0]) - half, float(centre[0]) + half, zoom_n, dtype=torch.float64,
                        device=model.device)
    a2 = torch.linspace(float(centre[1]) - half, float(centre[1]) + half, zoom_n, dtype=torch.float64,
                        device=model.device)
    g2, g1 = torch.meshgrid(a2, a1, indexing="ij")
    zp = torch.stack([g1.reshape(-1), g2.reshape(-1)], 1)  # (m*m, 2), rows z2, columns z1
    zarea = float((a1[1] - a1[0]) * (a2[1] - a2[0]))
    ljz = log_joint_at(model, x1, zp)[0]
    log_px_zoom = torch.logsumexp(ljz, 0) + math.log(zarea)
    log_post = ljz - log_px_zoom  # log density normalised on the window
    log_q = log_normal_diag(zp, mu, logvar)
    qw = torch.exp(log_q) * zarea
    q_mass = qw.sum()
    kl = float((qw * (log_q - log_post)).sum() / q_mass)
    inside = ((pts >= torch.stack([a1[0], a2[0]])) & (pts <= torch.stack([a1[-1], a2[-1]]))).all(1)
    return PosteriorPicture(
        z1=a1.cpu().numpy(), z2=a2.cpu().numpy(),
        density=torch.exp(log_post).reshape(zoom_n, zoom_n).cpu().numpy(), cell_area=zarea,
        mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), post_mean=post_mean.cpu().numpy(),
        post_std=post_std.cpu().numpy(), log_px_grid=float(log_px_grid), log_px_zoom=float(log_px_zoom),
        boundary_mass=float(prob[edge].sum()), zoom_mass=float(prob[inside].sum()), q_mass=float(q_mass),
        kl_q_post=kl, elbo_quad=float(log_px_zoom) - kl)


def ellipse(mu, sigma, n_sigma: float = 1.0, points: int = 120):
    """The n-sigma contour of the diagonal Gaussian N(mu, diag sigma^2) in 2-D: (z1 (points,), z2 (points,))."""
    t = np.linspace(0, 2 * np.pi, points)
    mu, sigma = np.asarray(mu, dtype=float), np.asarray(sigma, dtype=float)
    return mu[0] + n_sigma * sigma[0] * np.cos(t), mu[1] + n_sigma * sigma[1] * np.sin(t)


def grid_agrees(is_value: float, is_se: float, grid_value: float, sigmas: float = AGREE_SIGMAS,
                floor: float = AGREE_FLOOR) -> bool:
    """Whether the importance-sampling and grid values of log p(x) agree within the stated tolerance."""
    return abs(is_value - grid_value) <= sigmas * is_se + floor


# ---- training history --------------------------------------------------------------------------------------------
def elbo_history(history: dict | None):
    """Per-epoch ELBO curves from a checkpoint's or run's history: {epoch, train_elbo, test_elbo} as lists, or None
    when there is no completed epoch. Only the ELBO is recorded per epoch: log p(x) per epoch would need the
    weights of every epoch, which are not stored."""
    ep = (history or {}).get("epoch") or {}
    epochs = list(ep.get("epoch") or [])
    if not epochs:
        return None
    out = {"epoch": epochs}
    for key in ("train_elbo", "test_elbo"):
        vals = list(ep.get(key) or [])
        if len(vals) == len(epochs):
            out[key] = [float(v) for v in vals]
    return out if len(out) > 1 else None
