"""The MLP VAE's training step with its backward pass written out: the same loss and gradients as autograd gives for
vae.losses.elbo_terms, in fewer, larger operations.

For small models on a CPU most of an autograd step is not arithmetic: the graph's bookkeeping, a kernel launch and a
fresh buffer for each of dozens of small operations, and the Python of Optimizer.step. Here every buffer is kept
between steps, each GEMM writes straight into its output (the weight gradients into .grad), and Adam runs as the one
fused kernel Optimizer.step would call. tests/test_fused.py checks every term and gradient against autograd.

Notation (one batch of B examples, latent size d): the encoder's hidden layers h = relu(a W^T + b), its last layer
gives (mu, logvar) in one GEMM, z = mu + exp(logvar / 2) * eps, the decoder's hidden layers likewise, and its last
layer the decoder parameters (Bernoulli logits or the Gaussian mean). Per example, in nats:
    recon = -log p(x|z)            summed over the D pixels
    KL_d  = (mu_d^2 + exp(logvar_d) - 1 - logvar_d) / 2
and, batch-averaged, loss = recon + beta * R with R = sum_d max(lambda, KL_d) (free bits) or |R - C| (capacity).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import LOG_2PI, LOGVAR_MAX, LOGVAR_MIN, VAE

EXP_FLOOR = 40.0  # log(1 + exp(-t)) for t >= 40 is 0 in float32 and float64 (exp(-40) = 4e-18 < 2^-53)


def unsupported_reason(model: VAE) -> str | None:
    """Why this model needs the autograd step (None: the fused step handles it)."""
    c = model.config
    if c.arch != "mlp":
        return f"arch={c.arch!r}: the fused step covers the MLP"
    if c.decoder != "standard":
        return f"decoder={c.decoder!r}: the fused step covers the standard decoder"
    if c.likelihood not in ("bernoulli", "gaussian", "gaussian-learned"):
        return f"likelihood={c.likelihood!r}: the fused step has no gradient for it"
    return None


def _relu_backward(grad: torch.Tensor, out: torch.Tensor) -> None:
    """grad *= (out > 0) in place, for out = relu(...): the kernel autograd's ReluBackward runs."""
    torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _clamp_backward(grad: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> None:
    """grad *= (lo < x < hi) in place, for clamp(x, lo, hi): one kernel (hardtanh's backward) where a comparison and
    a multiply would be two. The same mask as autograd's clamp gives, at x == lo or hi included (no gradient)."""
    torch.ops.aten.hardtanh_backward.grad_input(grad, x, lo, hi, grad_input=grad)


def _linears(seq: nn.Module) -> list[nn.Linear]:
    return [m for m in seq.modules() if isinstance(m, nn.Linear)]


class FusedStep:
    """forward_backward(x, ...) -> (3,) tensor [loss, recon, kl] of the batch, with every parameter's .grad set."""

    def __init__(self, model: VAE):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        self.enc = _linears(model.encoder)  # each followed by a ReLU
        self.enc_out = model.enc_out  # -> (mu, logvar)
        dec = _linears(model.decoder)
        self.dec, self.dec_out = dec[:-1], dec[-1]  # hidden layers (ReLU), then the decoder parameters
        self.d = model.config.latent_dim
        layers = (*self.enc, self.enc_out, *self.dec, self.dec_out)
        written = [p for layer in layers for p in (layer.weight, layer.bias)]
        if model.config.likelihood == "gaussian-learned":
            written.append(model.log_sigma)
        # every .grad is overwritten each step, never zeroed: a parameter not written here would keep a stale one
        if {id(p) for p in written} != {id(p) for p in model.parameters()}:
            raise ValueError("the model has parameters the fused step does not compute gradients for")
        self.ref = written[0]  # dtype and device of the buffers
        self._bufs: dict = {}

    def _buf(self, name: str, *shape, fill: float | None = None) -> torch.Tensor:
        """A buffer kept between steps, made anew for a new shape, dtype or device (filled with `fill` then)."""
        t, ref = self._bufs.get(name), self.ref
        if t is None or t.shape != shape or t.dtype != ref.dtype or t.device != ref.device:
            t = self._bufs[name] = torch.empty(shape, dtype=ref.dtype, device=ref.device)
            if fill is not None:
                t.fill_(fill)
        return t

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        return p.grad

    @staticmethod
    def _linear(layer: nn.Linear, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.addmm(layer.bias, a, layer.weight.t(), out=out)

    def _linear_backward(self, layer: nn.Linear, a: torch.Tensor, gy: torch.Tensor, ga: torch.Tensor | None,
                         scale: float = 1.0):
        """Given gy = dloss/dy / scale for y = a W^T + b: W.grad = scale gy^T a, b.grad = scale sum_b gy, and
        ga = scale gy W (if asked). A scale other than 1 costs nothing: the GEMMs' alpha."""
        ones = self._buf("ones", gy.shape[0], fill=1.0)
        w, b = self._grad(layer.weight), self._grad(layer.bias)
        if scale == 1.0:
            torch.mm(gy.t(), a, out=w)
            torch.mv(gy.t(), ones, out=b)  # a GEMV: faster than sum(0)
            if ga is not None:
                torch.mm(gy, layer.weight, out=ga)
        else:  # beta=0: what the output held (a new .grad's garbage included) is not read
            w.addmm_(gy.t(), a, beta=0, alpha=scale)
            b.addmv_(gy.t(), ones, beta=0, alpha=scale)
            if ga is not None:
                torch.addmm(ga, gy, layer.weight, beta=0, alpha=scale, out=ga)

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                         capacity: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        B, d = x.shape[0], self.d
        # ---- forward, keeping each layer's output ------------------------------------------------------------
        acts = [x]
        for i, layer in enumerate(self.enc):
            acts.append(self._linear(layer, acts[-1], self._buf(f"e{i}", B, layer.out_features)).relu_())
        h = self._linear(self.enc_out, acts[-1], self._buf("h", B, 2 * d))
        mu, raw_logvar = h[:, :d], h[:, d:]
        logvar = torch.clamp(raw_logvar, LOGVAR_MIN, LOGVAR_MAX, out=self._buf("logvar", B, d))
        std = torch.mul(logvar, 0.5, out=self._buf("std", B, d)).exp_()
        eps = torch.randn((B, d), generator=generator, out=self._buf("eps", B, d))  # VAE.reparameterize's draw
        z = torch.addcmul(mu, std, eps, out=self._buf("z", B, d))
        dacts = [z]
        for i, layer in enumerate(self.dec):
            dacts.append(self._linear(layer, dacts[-1], self._buf(f"d{i}", B, layer.out_features)).relu_())
        out = self._linear(self.dec_out, dacts[-1], self._buf("out", B, cfg.input_dim))
        # ---- the terms, and dloss/d(decoder parameters) into g, up to the factor g_scale (1/B: the batch mean;
        # it is applied by the first backward GEMMs, as their alpha) -----------------------------------------
        g = self._buf("g_out", B, cfg.input_dim)
        g_scale = 1.0 / B
        if cfg.likelihood == "bernoulli":
            # BCE(l, x) = softplus(l) - x l = [max(l, 0) - x l] + log(1 + exp(-|l|)), with x in [0, 1]: both parts
            # are >= 0 element by element, so their sums do not cancel. A few passes that vectorise (softplus and
            # log_sigmoid do not). -|l| is cut at -EXP_FLOOR first: exp() of an argument below about -87 (a
            # denormal or zero result) takes a slow path, ~25x the time, and a trained model's logits for
            # always-black pixels go there. 1 + exp(-40) is 1 in float32 and float64 alike, so the sum is unchanged.
            log_sum = torch.abs(out, out=g).clamp_(max=EXP_FLOOR).neg_().exp_().add_(1.0).log_().sum()
            recon_sum = torch.clamp_min(out, 0.0, out=g).addcmul_(x, out, value=-1.0).sum() + log_sum
            torch.sigmoid(out, out=g).sub_(x)  # d BCE / d logits = sigmoid(l) - x
        else:
            r = torch.sub(out, x, out=g)  # m - x
            if cfg.likelihood == "gaussian":
                inv_var = cfg.sigma ** -2
                sq = torch.dot(r.view(-1), r.view(-1))
                recon_sum = 0.5 * inv_var * sq + B * cfg.input_dim * (math.log(cfg.sigma) + 0.5 * LOG_2PI)
                g_scale = inv_var / B
            else:  # gaussian-learned: a per-pixel log sigma, (D,)
                ls = model.log_sigma
                inv_var = torch.exp(-2 * ls)
                r2 = r.square().sum(0)  # (D,)
                recon_sum = 0.5 * torch.dot(r2, inv_var) + B * (ls.sum() + 0.5 * LOG_2PI * cfg.input_dim)
                torch.mul(r2 * inv_var, -1.0 / B, out=self._grad(ls)).add_(1.0)  # (1/B) sum_b (1 - r^2 / s^2)
                r.mul_(inv_var)
        var_m1 = torch.mul(std, std, out=self._buf("var_m1", B, d)).sub_(1.0)  # exp(logvar) - 1
        kl_bd = torch.addcmul(var_m1, mu, mu, out=self._buf("kl_bd", B, d)).sub_(logvar)  # 2 KL per example, dim
        kl_per_dim = kl_bd.sum(0).mul_(0.5 / B)  # (d,)
        kl = kl_per_dim.sum()
        recon = recon_sum / B
        reg = kl_per_dim.clamp(min=free_bits).sum() if free_bits > 0 else kl
        # dloss/dKL_d: beta, 0 where free bits hold KL_d up, times sign(R - C) with a capacity
        g_kl = beta
        if free_bits > 0:
            g_kl = (kl_per_dim >= free_bits).to(kl.dtype) * beta
        if capacity is not None:
            g_kl = g_kl * torch.sign(reg - capacity)
            loss = recon + beta * (reg - capacity).abs()
        else:
            loss = recon + beta * reg
        # ---- backward through the decoder -------------------------------------------------------------------
        gy = g
        for i in range(len(self.dec), -1, -1):
            layer = self.dec_out if i == len(self.dec) else self.dec[i]
            a = dacts[i]
            ga = self._buf(f"gd{i}", B, a.shape[1])
            self._linear_backward(layer, a, gy, ga, g_scale if i == len(self.dec) else 1.0)
            if i > 0:
                _relu_backward(ga, a)
            gy = ga
        gz = gy  # (B, d)
        # ---- through the reparameterisation and the KL to (dmu, dlogvar) ------------------------------------
        gh = self._buf("gh", B, 2 * d)
        gmu, glogvar = gh[:, :d], gh[:, d:]
        # dKL_d/dmu = mu / B, dKL_d/dlogvar = (exp(logvar) - 1) / (2B); dz/dmu = 1, dz/dlogvar = eps * std / 2
        k = g_kl / B  # a float, or a tensor (free bits: per dimension; capacity: the sign of R - C)
        if torch.is_tensor(k):
            torch.addcmul(gz, mu, k, out=gmu)
        else:
            torch.add(gz, mu, alpha=k, out=gmu)
        kl_lv = torch.mul(var_m1, k * 0.5, out=self._buf("kl_lv", B, d))
        torch.mul(gz, eps, out=glogvar)
        torch.addcmul(kl_lv, glogvar, std, value=0.5, out=glogvar)
        _clamp_backward(glogvar, raw_logvar, LOGVAR_MIN, LOGVAR_MAX)  # only where the clamp left logvar as it was
        # ---- backward through the encoder -------------------------------------------------------------------
        gy = gh
        for i in range(len(self.enc), -1, -1):
            layer = self.enc_out if i == len(self.enc) else self.enc[i]
            a = acts[i]
            ga = self._buf(f"ge{i}", B, a.shape[1]) if i > 0 else None  # no gradient for the data
            self._linear_backward(layer, a, gy, ga)
            if ga is not None:
                _relu_backward(ga, a)
            gy = ga
        return torch.stack([loss, recon, kl])


class AdamStep:
    """Optimizer.step() of a fused torch.optim.Adam without its Python wrapper: the same kernel, the same state
    (optimizer.state stays the truth, so state_dict and load_state_dict work as ever). Falls back to
    optimizer.step() for a setting it does not cover or a torch without the kernel."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.direct_steps = 0  # steps taken without the wrapper

    def covered(self) -> bool:
        """Whether the direct call does what Optimizer.step would, for the settings as they are now (checked at
        every step: load_state_dict brings the saved groups' settings)."""
        opt, groups = self.optimizer, self.optimizer.param_groups
        g = groups[0]
        return (isinstance(opt, torch.optim.Adam) and len(groups) == 1 and bool(g.get("fused"))
                and not g["amsgrad"] and not g["maximize"] and g["weight_decay"] == 0
                and not g.get("differentiable") and not g.get("capturable") and not g.get("decoupled_weight_decay")
                and not torch.is_tensor(g["lr"]) and hasattr(torch, "_fused_adam_"))

    def step(self):
        opt = self.optimizer
        group = opt.param_groups[0]
        params = group["params"]
        # the first step creates Adam's state; a parameter without a gradient is skipped as Adam skips it
        if not self.covered() or any(p.grad is None or p not in opt.state for p in params):
            return opt.step()
        st = [opt.state[p] for p in params]  # read each time: load_state_dict replaces these tensors
        exp_avgs, exp_avg_sqs, steps = [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], \
            [s["step"] for s in st]
        grads = [p.grad for p in params]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
        self.direct_steps += 1
        return None
