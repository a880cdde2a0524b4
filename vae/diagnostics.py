"""Diagnostics over a dataset: ELBO terms, active units, per-dimension KL, the aggregate-posterior split of the KL,
and, for a 2-D latent, log p(x) and the true posterior on a grid. All in nats per example."""
from __future__ import annotations

import math

import torch

from .losses import iw_log_px, kl_normal_std, log_normal_diag, log_normal_std

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015: dimension d is active when Cov_x(E_q[z_d]) > 0.01


def _batches(x, batch_size):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


@torch.inference_mode()
def encode_dataset(model, x: torch.Tensor, batch_size: int = 2048):
    """Posterior parameters of every example: mu, logvar each (N, d), on the CPU."""
    device = model.device
    mus, logvars = [], []
    for xb in _batches(x, batch_size):
        mu, logvar = model.encode(xb.to(device, non_blocking=True))
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(mus), torch.cat(logvars)


def mean_variances(mu: torch.Tensor) -> torch.Tensor:
    """A_d = Var_x(E_q[z_d]) for each dimension: (d,)."""
    return mu.var(0, unbiased=True) if mu.shape[0] > 1 else torch.zeros(mu.shape[1])


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of dimensions whose posterior mean varies over the data by more than threshold (Burda et al. 2015)."""
    return int((mean_variances(mu) > threshold).sum())


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """E_x KL(q(z_d|x) || N(0, 1)) for each dimension: (d,). Near 0 nats: collapsed."""
    return kl_normal_std(mu, logvar).mean(0)


@torch.inference_mode()
def kl_decomposition(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int = 2000,
                     generator: torch.Generator | None = None, chunk: int = 256) -> dict:
    """ELBO surgery (Hoffman & Johnson 2016): mean KL = I_q(n; z) + KL(q(z) || p(z)).

    q(z) = (1/N) sum_n q(z|x_n) is the aggregate posterior. KL(q(z)||p(z)) is estimated by Monte Carlo with
    z ~ q(z) (pick n, then z ~ q(z|x_n)), log q(z) as a logsumexp over all N encoded points; the mutual
    information is the remainder, and is capped by log N.
    The marginal KL uses the same draws with the exact per-example KLs as a control variate:
    mean_kl + E[log q(z) - log q(z|x_n)]. Without it the spread of the KLs between examples leaks into the
    estimate (picking n at random), and the mutual information could come out above log N.
    """
    mu, logvar = mu.double(), logvar.double()
    N = mu.shape[0]
    mean_kl = float(kl_normal_std(mu, logvar).sum(1).mean())
    idx = torch.randint(N, (n_samples,), generator=generator)
    eps = torch.randn((n_samples, mu.shape[1]), generator=generator, dtype=mu.dtype)
    z = mu[idx] + torch.exp(0.5 * logvar[idx]) * eps  # (S, d) samples of q(z)
    log_qz = []
    for zc in _batches(z, chunk):
        lq = log_normal_diag(zc[:, None, :], mu[None], logvar[None])  # (s, N)
        log_qz.append(torch.logsumexp(lq, 1) - math.log(N))
    log_qz = torch.cat(log_qz)
    log_q_own = log_normal_diag(z, mu[idx], logvar[idx])  # log q(z|x_n) for the n each z was drawn from
    marginal_kl = mean_kl + float((log_qz - log_q_own).mean())  # each term >= -log N: mutual_info <= log N
    return {"mean_kl": mean_kl, "mutual_info": mean_kl - marginal_kl, "marginal_kl": marginal_kl,
            "mutual_info_max": math.log(N)}


@torch.inference_mode()
def evaluate(model, x: torch.Tensor, batch_size: int = 1024, iw_samples: int = 0, seed: int = 0) -> dict:
    """ELBO terms over a whole split (one z sample per example, seeded), plus active units and, with iw_samples
    = K > 0, log p(x) by importance sampling with its standard error. Every figure in nats per example."""
    model.eval()
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    n = x.shape[0]
    recon_sum, mus, logvars, logpx_sum, se_sq_sum = 0.0, [], [], 0.0, 0.0
    for xb in _batches(x, batch_size):
        xb = xb.to(device)
        out = model(xb, generator=g)
        recon_sum += float(-model.log_likelihood_from_params(xb, out.recon).sum())
        mus.append(out.mu.float().cpu())
        logvars.append(out.logvar.float().cpu())
        if iw_samples:
            lp, se = iw_log_px(model, xb, iw_samples, generator=g)
            logpx_sum += float(lp.sum())
            se_sq_sum += float(se.nan_to_num(0).pow(2).sum())
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    kld = kl_per_dim(mu, logvar)
    recon = recon_sum / n
    kl = float(kld.sum())
    result = {"elbo": -(recon + kl), "recon": recon, "kl": kl, "kl_per_dim": [float(v) for v in kld],
              "active_units": active_units(mu), "n": n}
    if iw_samples:
        result["log_px"] = logpx_sum / n
        result["log_px_stderr"] = math.sqrt(se_sq_sum) / n  # of the mean over examples
        result["iw_samples"] = iw_samples
    return result


# ---- 2-D latents: the true posterior on a grid ------------------------------------------------------------------
def latent_grid(lim: float = 6.0, n: int = 241, device=None):
    """Grid points over [-lim, lim]^2: axis (n,), points (n*n, 2) in row-major (z2 rows, z1 columns), cell area."""
    axis = torch.linspace(-lim, lim, n, device=device)
    z2, z1 = torch.meshgrid(axis, axis, indexing="ij")
    return axis, torch.stack([z1.reshape(-1), z2.reshape(-1)], 1), float((axis[1] - axis[0]) ** 2)


@torch.inference_mode()
def grid_log_joint(model, x: torch.Tensor, lim: float = 6.0, n: int = 241, chunk: int | None = None):
    """log p(x|z_g) + log p(z_g) at every grid point: (B, n*n). Needs latent_dim == 2.

    Grid points go through the decoder in chunks of about 2^22 decoded values (chunk x B x D), so many images or
    28x28 models stay within memory."""
    if model.config.latent_dim != 2:
        raise ValueError(f"latent_dim={model.config.latent_dim}: the grid integral needs a 2-D latent")
    axis, pts, area = latent_grid(lim, n, model.device)
    x = x.to(model.device)
    chunk = chunk or max(1, (1 << 22) // max(1, x.shape[0] * x.shape[-1]))
    out = []
    for zc in _batches(pts, chunk):
        z = zc[:, None, :].expand(-1, x.shape[0], -1)  # (g, B, 2)
        out.append(model.log_likelihood(x, z) + log_normal_std(z))  # (g, B)
    return torch.cat(out, 0).T, area


def grid_log_px(model, x, lim: float = 6.0, n: int = 241) -> torch.Tensor:
    """log p(x) = log sum_g p(x|z_g) p(z_g) * cell area: a deterministic check on importance sampling, (B,)."""
    lj, area = grid_log_joint(model, x, lim, n)
    return (torch.logsumexp(lj, 1) + math.log(area)).cpu()


def grid_posterior(model, x, lim: float = 6.0, n: int = 241):
    """The true posterior p(z|x) on the grid for one example x (D,) or (1, D): (axis (n,), probs (n, n)) with
    probs summing to 1 (rows: z2, columns: z1)."""
    lj, _ = grid_log_joint(model, x.reshape(1, -1), lim, n)
    p = torch.softmax(lj[0], 0).reshape(n, n).cpu()
    return torch.linspace(-lim, lim, n), p
