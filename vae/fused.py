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

import ctypes
import math

import torch
from torch import nn

from . import native
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
    """forward_backward(x, ...) -> (3,) tensor [loss, recon, kl] of the batch, with every parameter's .grad set;
    terms(x, ...) the same as three floats.

    native=True: where vae.native's C library is built and covers the batch (float32 on the CPU, a Bernoulli or
    fixed-sigma Gaussian decoder), it computes the step in one call; elsewhere the torch code below does."""

    def __init__(self, model: VAE, native: bool = True):
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
        self.layers = layers
        self._bufs: dict = {}
        self._native = _Native(self) if native and _Native.model_covered(model) else None
        self.chunked_steps = 0  # steps taken by native_steps

    @property
    def native(self) -> bool:
        """Whether the C library is ready for this model (a batch must also be float32 on the CPU to use it)."""
        return self._native is not None and self._native.ready()

    def terms(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0, capacity: float | None = None,
              generator: torch.Generator | None = None, adam: AdamStep | None = None,
              rows: torch.Tensor | None = None) -> tuple[list[float], bool]:
        """([loss, recon, kl] of the batch as floats, whether Adam's step was taken), with every parameter's .grad
        set. rows: the batch is x[rows] (gathered in the C step, or with index_select). adam: take that
        optimizer's step in the same call where the C library can (vae.native; Adam applied layer by layer while
        the gradients are in cache); when it cannot, the caller still has to."""
        nat = self._native
        if nat is not None and nat.covers(x) and (rows is None or _Native.rows_ok(rows)):
            nat.bind()
            state = adam.native_state(nat.params) if adam is not None else None
            vals = nat.run(x, beta, free_bits, capacity, generator, state, rows)
            if state is not None:
                adam.direct_steps += 1
            return vals, state is not None
        if rows is not None:
            x = torch.index_select(x, 0, rows, out=self._buf("batch", rows.shape[0], x.shape[1]))
        return self._forward_backward(x, beta, free_bits, capacity, generator).tolist(), False

    def can_chunk(self, x: torch.Tensor) -> bool:
        """Whether native_steps can take steps on batches of x (given Adam's state; see there)."""
        return self._native is not None and self._native.covers(x)

    def native_steps(self, x: torch.Tensor, rows: torch.Tensor, batch: int, betas: list[float], free_bits: float,
                     capacities: list[float] | None, generator: torch.Generator | None,
                     adam: AdamStep) -> list[list[float]] | None:
        """len(betas) training steps (forward, backward and Adam's step) in one call into the C library: step i
        takes the batch x[rows[i batch:(i + 1) batch]], beta betas[i] and capacity capacities[i]. Returns each
        step's [loss, recon, kl], ending with the first with a term that is not finite if one is; or None where the C
        library cannot take these steps (the caller takes them one by one then). The reparameterisation's draws
        come from generator in the order single steps would draw them."""
        nat, k = self._native, len(betas)
        if nat is None or k < 1 or not nat.covers(x) or not _Native.rows_ok(rows) or rows.shape[0] != k * batch:
            return None
        nat.bind()
        state = adam.native_state(nat.params)
        if state is None:
            return None
        out = nat.run_steps(x, rows, batch, betas, free_bits, capacities, generator, state)
        adam.direct_steps += len(out)
        self.chunked_steps += len(out)
        return out

    def forward_backward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
                         capacity: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        if self._native is not None and self._native.covers(x):
            self._native.bind()
            return torch.tensor(self._native.run(x, beta, free_bits, capacity, generator), dtype=x.dtype)
        return self._forward_backward(x, beta, free_bits, capacity, generator)

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
    def _forward_backward(self, x: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
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


class _Native:
    """FusedStep's computation as one call into vae.native's C library (vae/native/fused_mlp.c)."""

    LIKELIHOODS = {"bernoulli": 0, "gaussian": 1}

    @classmethod
    def model_covered(cls, model: VAE) -> bool:
        c = model.config
        return (c.likelihood in cls.LIKELIHOODS and 1 <= len(c.hidden) and 2 * len(c.hidden) + 2 <= native.MAX_LAYERS
                and c.latent_dim <= native.MAX_LATENT)

    def __init__(self, step: FusedStep):
        self.step = step
        self.params = [p for layer in step.layers for p in (layer.weight, layer.bias)]
        c = step.model.config
        net = self.net = native.Net()
        net.n_layers, net.n_enc, net.d, net.D = len(step.layers), len(step.enc), c.latent_dim, c.input_dim
        net.likelihood = self.LIKELIHOODS[c.likelihood]
        net.inv_var = c.sigma ** -2 if c.likelihood == "gaussian" else 1.0
        net.recon_const = c.input_dim * (math.log(c.sigma) + 0.5 * LOG_2PI) if c.likelihood == "gaussian" else 0.0
        net.logvar_min, net.logvar_max = LOGVAR_MIN, LOGVAR_MAX
        for i, layer in enumerate(step.layers):
            net.inp[i], net.out[i] = layer.in_features, layer.out_features
        self.net_ref = ctypes.byref(net)
        self.terms_out = (ctypes.c_double * 3)()
        self._ptrs: tuple = ()
        self._grads: list = []
        self._ws: torch.Tensor | None = None
        self._ws_batch = 0
        self._eps: torch.Tensor | None = None
        self._eps_steps: torch.Tensor | None = None

    def ready(self) -> bool:
        return native.library() is not None

    @staticmethod
    def rows_ok(rows: torch.Tensor) -> bool:
        """Row indices the C step can read: int64, contiguous, on the CPU."""
        return rows.dtype == torch.int64 and rows.is_contiguous() and rows.device.type == "cpu"

    def covers(self, x: torch.Tensor) -> bool:
        ref = self.step.ref
        return (x.dtype == torch.float32 and ref.dtype == torch.float32 and x.device.type == "cpu"
                and ref.device.type == "cpu" and x.is_contiguous() and x.dim() == 2 and x.shape[0] >= 1
                and native.library() is not None)

    def bind(self):
        """Point the C struct at the parameters and their .grad (again when either has moved: a new tensor set
        in place of the old, .to(), a grad set to None, a Parameter replaced: load_state_dict(assign=True))."""
        params = [t for layer in self.step.layers for t in (layer.weight, layer.bias)]
        if any(p is not q for p, q in zip(params, self.params)):
            self.params, self._grads = params, []
        grads = self._grads
        if not grads or any(p.grad is not g for p, g in zip(self.params, grads)):  # a new .grad tensor, or None
            grads = self._grads = [self.step._grad(p) for p in self.params]
        ptrs = (*map(torch.Tensor.data_ptr, self.params), *map(torch.Tensor.data_ptr, grads))
        if ptrs != self._ptrs:
            if not all(p.is_contiguous() for p in self.params):
                raise ValueError("the fused step needs contiguous parameters")
            net, n = self.net, len(self.params)
            for i in range(n // 2):
                net.W[i], net.b[i] = ptrs[2 * i], ptrs[2 * i + 1]
                net.gW[i], net.gb[i] = ptrs[n + 2 * i], ptrs[n + 2 * i + 1]
            self._ptrs = ptrs

    def _prepare(self, x: torch.Tensor, B: int):
        """The library, with a workspace (and a draw buffer) for batches of B of x."""
        lib = native.library()
        if x.shape[1] != self.net.D:
            raise ValueError(f"a batch of {x.shape[1]} values an example; the model takes {self.net.D}")
        if B < 1:
            raise ValueError("an empty batch")
        if self._ws is None or B > self._ws_batch:
            self._ws = torch.empty(lib.vae_workspace_floats(self.net_ref, B), dtype=torch.float32)
            self._ws_batch = B
            self._eps = torch.empty(B, self.net.d, dtype=torch.float32)
        self.net.threads = torch.get_num_threads()
        return lib

    @staticmethod
    def _check(rc: int, x: torch.Tensor) -> int:
        if rc == -2:
            raise IndexError(f"a row index out of range for {x.shape[0]} examples")
        if rc < 0:
            raise RuntimeError("the native fused step refused this model")
        return rc

    @torch.no_grad()
    def run(self, x, beta, free_bits, capacity, generator, adam_state=None, rows=None) -> list[float]:
        """One step in C (bind() first)."""
        B = x.shape[0] if rows is None else rows.shape[0]
        lib = self._prepare(x, B)
        eps = torch.randn((B, self.net.d), generator=generator, out=self._eps[:B])  # VAE.reparameterize's draw
        self._check(lib.vae_fb(self.net_ref, x.data_ptr(), None if rows is None else rows.data_ptr(), x.shape[0],
                               eps.data_ptr(), B, self._ws.data_ptr(), beta, free_bits, capacity is not None,
                               0.0 if capacity is None else capacity, self.terms_out,
                               None if adam_state is None else ctypes.addressof(adam_state)), x)
        return self.terms_out[:]

    @torch.no_grad()
    def run_steps(self, x, rows, B, betas, free_bits, capacities, generator, adam_state) -> list[list[float]]:
        """len(betas) steps in C (bind() first)."""
        lib, d, k = self._prepare(x, B), self.net.d, len(betas)
        if self._eps_steps is None or self._eps_steps.numel() < k * B * d:
            self._eps_steps = torch.empty(k * B * d, dtype=torch.float32)
        eps = self._eps_steps[:k * B * d].view(k * B, d)
        if (B * d) % 16 == 0:  # torch fills normals 16 at a time: one draw of k batches = k draws of one
            torch.randn((k * B, d), generator=generator, out=eps)
        else:
            for i in range(k):
                torch.randn((B, d), generator=generator, out=eps[i * B:(i + 1) * B])
        dbl = ctypes.c_double * k
        terms = (ctypes.c_double * (3 * k))()
        caps = dbl(*capacities) if capacities is not None else None
        n = self._check(lib.vae_fb_steps(self.net_ref, x.data_ptr(), rows.data_ptr(), x.shape[0], eps.data_ptr(), B,
                                         k, self._ws.data_ptr(), dbl(*betas), free_bits, capacities is not None,
                                         caps, terms, ctypes.addressof(adam_state)), x)
        t = terms[:3 * n]
        return [t[3 * i:3 * i + 3] for i in range(n)]


class AdamStep:
    """Optimizer.step() of a fused torch.optim.Adam without its Python wrapper: the same kernel, the same state
    (optimizer.state stays the truth, so state_dict and load_state_dict work as ever). Falls back to
    optimizer.step() for a setting it does not cover or a torch without the kernel."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.direct_steps = 0  # steps taken without the wrapper
        self._native: tuple | None = None  # (optimizer.state it was made from, params, vae.native.Adam)

    def covered(self) -> bool:
        """Whether the direct call does what Optimizer.step would, for the settings as they are now (checked at
        every step: load_state_dict brings the saved groups' settings)."""
        opt, groups = self.optimizer, self.optimizer.param_groups
        g = groups[0]
        return (isinstance(opt, torch.optim.Adam) and len(groups) == 1 and bool(g.get("fused"))
                and not g["amsgrad"] and not g["maximize"] and g["weight_decay"] == 0
                and not g.get("differentiable") and not g.get("capturable") and not g.get("decoupled_weight_decay")
                and not torch.is_tensor(g["lr"]) and hasattr(torch, "_fused_adam_"))

    def native_state(self, params: list[torch.Tensor]) -> "native.Adam | None":
        """vae.native's Adam struct over this optimizer's state for params (in that order: the C step's layer
        order), or None where the C step cannot take Adam's step: a setting covered() does not cover, a first step
        (no state yet), state that is not float32 on the CPU, params that are not exactly the optimizer's."""
        opt = self.optimizer
        if not self.covered():
            return None
        group = opt.param_groups[0]
        cached = self._native
        # load_state_dict gives the optimizer a new state dict (and new tensors): made again then, as when a state
        # tensor was replaced in place of another
        if (cached is None or cached[0] is not opt.state or cached[1] != [id(p) for p in params]
                or any(t is not opt.state[p].get(k) for p, ts in zip(params, cached[3])
                       for k, t in zip(("exp_avg", "exp_avg_sq", "step"), ts))):
            self._native = cached = self._make_native(params)
            if cached is None:
                return None
        a = cached[2]
        a.lr, (a.beta1, a.beta2), a.eps = group["lr"], group["betas"], group["eps"]
        return a

    def _make_native(self, params) -> tuple | None:
        opt, group = self.optimizer, self.optimizer.param_groups[0]
        if len(params) != len(group["params"]) or {id(p) for p in params} != {id(p) for p in group["params"]}:
            return None
        a, kept = native.Adam(), []
        for i, p in enumerate(params):
            st = opt.state.get(p)
            if not st:
                return None
            m, v, step = st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step")
            for t, shape in ((m, p.shape), (v, p.shape), (step, ())):
                if (not torch.is_tensor(t) or t.dtype != torch.float32 or t.device.type != "cpu"
                        or not t.is_contiguous() or t.shape != shape):
                    return None
            a.exp_avg[i], a.exp_avg_sq[i], a.step[i] = m.data_ptr(), v.data_ptr(), step.data_ptr()
            kept.append((m, v, step))  # held: the C struct points into them
        return opt.state, [id(p) for p in params], a, kept

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
