"""The VAE: encoder q_phi(z|x) = N(mu, diag sigma^2), prior p(z) = N(0, I), decoder p_theta(x|z).

Names follow pytorch/examples (encode, reparameterize, decode, forward). Inputs are flattened (B, D) tensors in
[0, 1]; the model knows its image shape (config.image_shape) for display.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

LOG_2PI = math.log(2 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # encode() clamps log sigma^2 to this range: exp() stays finite


class ForwardOutput(NamedTuple):
    recon: torch.Tensor  # decoder parameters for x: logits (Bernoulli) or mean (Gaussian), (B, D)
    mu: torch.Tensor  # (B, d)
    logvar: torch.Tensor  # (B, d)
    z: torch.Tensor  # the reparameterised sample, (B, d)


def _mlp(sizes, final_activation=False) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MaskedLinear(nn.Linear):
    """A D -> D linear map where output i sees only inputs j < i (a fully visible sigmoid belief net layer)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim)
        self.register_buffer("mask", torch.ones(dim, dim).tril(-1), persistent=False)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        D, d = c.input_dim, c.latent_dim
        if c.arch == "mlp":
            self.encoder = _mlp((D, *c.hidden), final_activation=True)
            self.enc_out = nn.Linear(c.hidden[-1], 2 * d)  # (mu, logvar) in one GEMM
            self.decoder = nn.Sequential(_mlp((d, *reversed(c.hidden)), final_activation=True),
                                         nn.Linear(c.hidden[0], D))
        else:  # conv, for (H, W) images with H, W divisible by 4
            H, W = c.image_shape
            h = c.hidden[0]
            self.encoder = nn.Sequential(
                nn.Unflatten(1, (1, H, W)),
                nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, H/2, W/2)
                nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, H/4, W/4)
                nn.Flatten(), nn.Linear(64 * (H // 4) * (W // 4), h), nn.ReLU())
            self.enc_out = nn.Linear(h, 2 * d)
            self.decoder = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 64 * (H // 4) * (W // 4)), nn.ReLU(),
                nn.Unflatten(1, (64, H // 4, W // 4)),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, H/2, W/2)
                nn.ConvTranspose2d(32, 1, 4, 2, 1),  # (B, 1, H, W)
                nn.Flatten())
        if c.likelihood == "gaussian-learned":
            self.log_sigma = nn.Parameter(torch.full((D,), math.log(0.1)))  # per-pixel decoder std
        if c.decoder == "autoregressive":
            self.ar = MaskedLinear(D)

    # ---- encoder q_phi(z|x) -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """x (B, D) -> mu, logvar, each (B, d)."""
        h = self.enc_out(self.encoder(x))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu, logvar, generator: torch.Generator | None = None):
        """z = mu + sigma * eps, eps ~ N(0, I). Pass a generator for reproducible, thread-local randomness."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    # ---- decoder p_theta(x|z) -----------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None):
        """z (..., d) -> decoder parameters (..., D): Bernoulli logits or the Gaussian mean.

        The autoregressive decoder also needs the pixels: with x it is teacher-forced, without x it decodes
        pixel by pixel, feeding back each pixel's mean.
        """
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        out = out.reshape(*lead, out.shape[-1])
        if self.config.decoder != "autoregressive":
            return out
        if x is not None:
            return out + self.ar(x)  # broadcasts over leading sample dims of z
        W = self.ar.weight * self.ar.mask  # (D, D): W[i, j] is how pixel j < i moves pixel i's logit
        acc = out + self.ar.bias
        logits = torch.empty_like(out)
        for i in range(out.shape[-1]):  # sequential decoding, feeding back each pixel's mean
            logits[..., i] = acc[..., i]
            acc = acc + torch.sigmoid(acc[..., i:i + 1]) * W[:, i]
        return logits

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] in data space, (..., D) in [0, 1] for images: what the UI draws."""
        out = self.decode(z)
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0.0, 1.0) if self.config.image_shape != (2,) else out

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p_theta(x|z) in nats, summed over the D data dimensions.

        x (B, D); z (B, d) or (K, B, d) for K samples per example -> (B,) or (K, B).
        """
        params = self.decode(z, x=x)
        return self.log_likelihood_from_params(x, params)

    def log_likelihood_from_params(self, x, params):
        lik = self.config.likelihood
        if lik == "bernoulli":
            # x log sigmoid(l) + (1 - x) log sigmoid(-l) = -BCE-with-logits, summed over pixels
            return -F.binary_cross_entropy_with_logits(params, x.expand_as(params), reduction="none").sum(-1)
        if lik == "gaussian":
            log_sigma = torch.full_like(params[..., :1], math.log(self.config.sigma))
        else:
            log_sigma = self.log_sigma
        return (-0.5 * ((x - params) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI).sum(-1)

    # ---- the whole model ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> ForwardOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        return ForwardOutput(self.decode(z, x=x), mu, logvar, z)

    @torch.inference_mode()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        """n draws z ~ N(0, T^2 I), decoded to E[x|z]: (n, D)."""
        device = next(self.parameters()).device
        z = temperature * torch.randn(n, self.config.latent_dim, generator=generator, device=device)
        return self.decode_mean(z)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: x (B, D) -> E[x | z = mu(x)], (B, D)."""
        mu, _ = self.encode(x)
        return self.decode_mean(mu)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
