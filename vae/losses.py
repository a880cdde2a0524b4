"""The ELBO, term by term, in nats per example (summed over pixels and latent dimensions, averaged over the batch).

    log p_theta(x) = ELBO + KL(q_phi(z|x) || p_theta(z|x)) >= ELBO
    ELBO           = E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z))
    loss           = recon + beta * KL   (recon = -E_q[log p_theta(x|z)]; the loss is -ELBO at beta = 1)

q_phi is the encoder, p_theta the decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ELBOTerms:
    recon: torch.Tensor  # reconstruction NLL -E_q[log p(x|z)], nats/example (scalar)
    kl: torch.Tensor  # KL(q(z|x) || p(z)) summed over latent dims, nats/example (scalar)
    kl_per_dim: torch.Tensor  # (d,) batch-averaged KL of each latent dimension
    loss: torch.Tensor  # the objective that is minimised (beta, free bits, capacity applied)
    elbo: torch.Tensor  # -(recon + kl): always the true bound, whatever beta is
    beta: float
    capacity: float | None = None


def kl_normal_std(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, sigma^2) || N(0, 1)) per dimension: (mu^2 + sigma^2 - 1 - log sigma^2) / 2.

    Kingma & Welling 2013, Appendix B. Shape: same as mu.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def regularizer(kl_per_dim: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """The KL as optimised: with free bits lambda > 0, sum_d max(lambda, E_batch KL_d) (Kingma et al. 2016)."""
    if free_bits > 0:
        return kl_per_dim.clamp(min=free_bits).sum()
    return kl_per_dim.sum()


def elbo_terms(model, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0, capacity: float | None = None,
               generator: torch.Generator | None = None) -> ELBOTerms:
    """Every term of the (beta-)VAE objective for a batch x (B, D), one z sample per example.

    With capacity C (Burgess et al. 2018) the loss is recon + beta * |KL - C| (beta plays gamma's role).
    """
    out = model(x, generator=generator)
    recon = -model.log_likelihood_from_params(x, out.recon).mean()
    kl_per_dim = kl_normal_std(out.mu, out.logvar).mean(0)
    kl = kl_per_dim.sum()
    reg = regularizer(kl_per_dim, free_bits)
    if capacity is not None:
        loss = recon + beta * (reg - capacity).abs()
    else:
        loss = recon + beta * reg
    return ELBOTerms(recon=recon, kl=kl, kl_per_dim=kl_per_dim, loss=loss, elbo=-(recon + kl), beta=float(beta),
                     capacity=capacity)


def log_normal_std(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_diag(z, mu, logvar) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dim."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def _chunk_size(model, batch: int, budget: int = 1 << 22) -> int:
    """Samples per chunk so that one chunk's decoder output (chunk, B, D) stays near `budget` floats."""
    return max(1, budget // max(1, batch * model.config.input_dim))


@torch.inference_mode()
def log_importance_weights(model, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): shape (K, B).

    Computed in chunks of samples so that K = 5000 fits in memory.
    """
    if k < 1:
        raise ValueError(f"k={k} is not allowed: the number of importance samples must be >= 1")
    mu, logvar = model.encode(x)
    chunk = chunk_size or _chunk_size(model, x.shape[0])
    out = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # (n, B, d)
        out.append(model.log_likelihood(x, z) + log_normal_std(z) - log_normal_diag(z, mu, logvar))
    return torch.cat(out, 0)


def log_mean_exp(logw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) sum_k exp(logw_k), numerically stable."""
    return torch.logsumexp(logw, dim) - math.log(logw.shape[dim])


def iwae_bound(model, x, k: int, generator=None, chunk_size=None) -> torch.Tensor:
    """The importance-weighted bound L_K (Burda et al. 2015) per example, (B,). L_1 is the ELBO; L_K <= log p(x)."""
    return log_mean_exp(log_importance_weights(model, x, k, generator, chunk_size))


def iw_log_px(model, x, k: int = 1000, generator=None, chunk_size=None):
    """Importance-sampling estimate of log p(x) per example and its standard error (delta method), each (B,).

    se = sqrt((K sum w^2 / (sum w)^2 - 1) / (K - 1)): the weights' relative spread over sqrt(K).
    """
    logw = log_importance_weights(model, x, k, generator, chunk_size)
    return log_mean_exp(logw), iw_standard_error(logw)


def iw_standard_error(logw: torch.Tensor) -> torch.Tensor:
    """Standard error of log_mean_exp(logw) over dim 0, by the delta method. logw (K, B) -> (B,)."""
    k = logw.shape[0]
    if k < 2:
        return torch.full(logw.shape[1:], float("nan"), dtype=logw.dtype, device=logw.device)
    ratio = k * torch.exp(torch.logsumexp(2 * logw, 0) - 2 * torch.logsumexp(logw, 0))  # in [1, K]
    return torch.sqrt((ratio - 1).clamp(min=0) / (k - 1))


def iwae_curve(logw: torch.Tensor, ks) -> torch.Tensor:
    """L_K for each K in ks using the first K weights of logw (K_max, B): (len(ks), B). Non-decreasing in
    expectation; computed from nested samples so one draw shows the climb towards log p(x)."""
    return torch.stack([log_mean_exp(logw[:k]) for k in ks])
